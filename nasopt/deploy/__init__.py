"""From a found architecture to a deployable model: distillation, fine-tuning with its compression,
and the exports (JSON, PyTorch, packed weights, ONNX, TorchScript)."""
