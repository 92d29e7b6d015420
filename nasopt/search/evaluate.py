"""Evaluator: arch -> Metrics of the *compressed* model, from inherited supernet weights; cached."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from nasopt.core.arch import Arch, Value
from nasopt.compression.compress import Policy, StoredLayer, compress, nonzero_params
from nasopt.core.data import Dataset
from nasopt.core.errors import NasoptError
from nasopt.core.metrics import FLOAT32_BYTES, Metrics, count_macs, count_params
from nasopt.compression.packed import predicted_size
from nasopt.supernet.elastic import Supernet, recalibrate_bn
from nasopt.core.scores import Metric, scores
from nasopt.core.task import task_of
from nasopt.supernet.train import correct, outputs


class Evaluator:
    """Scores archs of ``space`` on the validation split of ``data`` (never on test).

    Each arch's architecture genes are extracted from the supernet and its BatchNorm statistics
    recalibrated on ``calib_samples`` training samples (a fixed, seeded random subset, so
    evaluation is deterministic); then its compression genes are applied (BN folding, low rank, pruning,
    quantization: :mod:`nasopt.compression.compress`) and the compressed model is measured. Results are
    cached by the arch's canonical key.
    """

    def __init__(self, space, supernet: Supernet, data: Dataset, calib_samples: int = 1024,
                 pruning: str = "magnitude", metric: Metric | None = None):
        self.space = space
        self.task = task_of(data)
        #: the scores of every evaluation: the task's built-in metrics, and a user's own one
        self.metrics = {**self.task.metrics,
                        **({metric.name: metric} if metric is not None else {})}
        self.supernet = supernet
        self.pruning = pruning
        if calib_samples < 1:
            raise NasoptError(f"eval.calib_samples must be at least 1, got {calib_samples}")
        # a fixed, seeded random subset: training data may be sorted by class
        order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(0))
        self._x_calib = data.x_train[order[:calib_samples].to(data.x_train.device)]
        self._x_val, self._y_val = data.x_val, data.y_val
        #: the trivial predictor's outputs on the validation split (nasopt.core.task)
        self.trivial_outputs = self.task.trivial_outputs(data.y_train, len(data.y_val),
                                                         data.num_classes)
        self._input_shape = data.input_shape
        self._cache: dict[str, Metrics] = {}

    @property
    def calibration_samples(self) -> torch.Tensor:
        """The fixed training subset used for BN recalibration (also int8 ONNX calibration)."""
        return self._x_calib

    def float_model(self, arch: Mapping[str, Value]) -> nn.Module:
        """The uncompressed standalone model (inherited weights, recalibrated BN)."""
        model = self.supernet.extract(arch)
        recalibrate_bn(model, self._x_calib)
        return model.eval()

    def compressed(self, arch: Mapping[str, Value]) -> tuple[nn.Module, list[StoredLayer]]:
        """The deployed model of ``arch`` exactly as it is scored, and its stored layers."""
        arch = self.space.validate(arch)
        return self._compress(arch, self.float_model(arch))

    def _compress(self, arch: Arch, float_model: nn.Module
                  ) -> tuple[nn.Module, list[StoredLayer]]:
        return compress(float_model, Policy.from_arch(arch, self.pruning), self.space.group_of,
                        inplace=True)

    def correct(self, arch: Mapping[str, Value]) -> torch.Tensor:
        """Which validation samples the compressed model of ``arch`` classifies right (a bool
        per sample; its mean is the arch's accuracy), for paired comparisons of two archs."""
        return correct(self.compressed(arch)[0], self._x_val, self._y_val)

    @torch.no_grad()
    def __call__(self, arch: Mapping[str, Value]) -> Metrics:
        arch = self.space.validate(arch)
        if arch.key not in self._cache:
            self._cache[arch.key] = self._measure(arch)
        return self._cache[arch.key]

    def _measure(self, arch: Arch) -> Metrics:
        float_model = self.float_model(arch)
        float_params = count_params(float_model)  # before compress() changes it in place
        model, stored = self._compress(arch, float_model)
        found = scores(outputs(model, self._x_val).cpu().numpy(), self._y_val.cpu().numpy(),
                       self.metrics)
        return Metrics(
            accuracy=found.pop("accuracy", None),  # None for regression
            scores=found,
            params=count_params(model),
            macs=count_macs(model, self._input_shape),
            float_bytes=float_params * FLOAT32_BYTES,
            compressed_bytes=predicted_size(self.space, arch, stored),
            nonzero_params=nonzero_params(stored),
            sources={"scores": "compressed model from inherited supernet weights + BN "
                               "recalibration, validation split",
                     "params": "counted (deployed model)",
                     "macs": "counted from executed ops (deployed model)",
                     "float_bytes": "uncompressed params x 4",
                     "compressed_bytes": "packed file size (formula, nasopt.compression.packed)"},
        )
