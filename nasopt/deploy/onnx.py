"""ONNX export of a deployed model: float32 (``model.onnx``) and int8 QDQ (``model.int8.onnx``),
each verified in ONNX Runtime after writing.

- **Exporter**: ``torch.onnx.export(..., dynamo=False)`` (the TorchScript-based exporter), opset
  17, dynamic batch axis. Measured here on the conv1d/mobilenet models: 0.1-0.4 s per export
  against 2-5 s for the dynamo exporter, with the same operators once the elastic layers are
  turned into their plain torch base classes (:func:`plain`); the hardware look-up table exports
  hundreds of small graphs, so the 10x matters. The elastic layers' runtime weight slicing would
  otherwise appear in the graph as Shape/Gather/Slice nodes.
- **int8**: ONNX Runtime's ``quantize_static`` in QDQ format, per-channel symmetric int8
  weights, uint8 activations (U8S8, the layout ORT's x86 kernels are fastest with), MinMax
  calibration over ``CALIB_SAMPLES`` training samples fed by :class:`SampleReader`. Weights use
  ORT's ``reduce_range`` (a 7-bit grid, symmetric -64..64): on x86 CPUs without VNNI (AVX2,
  AVX-512 without VNNI) ORT's U8S8 kernels add pairs of uint8 x int8 products in int16, which
  saturates with full-range weights. Measured on such a CPU (AMD EPYC, AVX2 only), three random
  conv1d archs of a supernet trained 8 epochs: predicted-class agreement with PyTorch 73, 36 and
  82 % with full-range weights, 98, 97 and 96 % with the reduced range. The file is meant to run
  on CPUs nobody knows at export time, so the range is always reduced.
- **The arch's bit-widths** are not kept by the int8 file: the float model holds the arch's
  dequantized weights (exact 2-8-bit grid values as float32), and the int8 file re-quantizes
  every layer, 8-bit ones included, to the 7-bit grid above. Only the packed file keeps them
  exactly.

The files take raw samples: an export passes its model behind the dataset's preprocessing
(:class:`nasopt.deploy.export.RawInput`), which becomes the graph's first nodes (Sub / Div), and raw
calibration and verification samples.

Verification (real samples, never random ones when data is given):

- float32: max abs difference of the logits vs PyTorch < ``FP32_TOLERANCE`` (1e-4);
- int8: predicted-class agreement with PyTorch >= ``INT8_MIN_AGREEMENT`` (90 %; near-tie logits of
  a weak model flip under int8 rounding without changing accuracy) and accuracy
  within ``INT8_MAX_ACCURACY_DROP`` (2 points) of PyTorch's on the verification samples; for
  regression, a validation MAE at most ``INT8_MAX_MAE_RISE`` (10 %) above PyTorch's.

A file that fails its check is never written. ``nasopt export --format onnx-int8`` then fails
with the reason; ``nasopt run`` (:func:`pipeline_export`) leaves the int8 file out, records why in
the model card and REPORT.md, and keeps the run's other files. The int8 graph is a by-product
there, and a long run should not be thrown away because of it.
"""
from __future__ import annotations

import copy
import io
import logging
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nasopt.core.errors import NasoptError

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
FILES = {"onnx": FP32_FILE, "onnx-int8": INT8_FILE}
OPSET = 17
FP32_TOLERANCE = 1e-4
INT8_MIN_AGREEMENT = 0.90
INT8_MAX_ACCURACY_DROP = 0.02
#: regression: the int8 graph's validation MAE may exceed PyTorch's by this fraction at most
INT8_MAX_MAE_RISE = 0.10
CALIB_SAMPLES = 256
CALIB_BATCH = 32
NOTE = ("the arch's bit-widths are dequantized in ONNX (float32 values on the arch's grid; the "
        "int8 file re-quantizes every layer to a 7-bit-range int8 grid); only model.packed "
        "stores them exactly")

_PLAIN = (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.Linear)


def plain(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` (eval mode) whose elastic layers are their plain torch base
    classes: the same outputs (a standalone model's elastic layers use their full weights), and
    an ONNX graph without the elastic layers' slicing ops."""
    model = copy.deepcopy(model).cpu().eval()
    for module in model.modules():
        for base in _PLAIN:
            if isinstance(module, base) and type(module) is not base:
                module.__class__ = base
                break
    return model


def to_onnx_bytes(model: nn.Module, input_shape: Sequence[int]) -> bytes:
    """The float32 ONNX graph of ``model`` for inputs ``(N, *input_shape)`` (batch dynamic)."""
    model = plain(model)
    x = torch.zeros((1, *input_shape))
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation note
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=OPSET,
                              input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
        finally:
            logging.disable(logging.NOTSET)
    return buffer.getvalue()


class SampleReader:
    """``onnxruntime.quantization.CalibrationDataReader``: batches of calibration samples."""

    def __init__(self, x: np.ndarray, batch: int = CALIB_BATCH):
        self._batches = [x[i:i + batch] for i in range(0, len(x), batch)]
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._batches):
            return None
        self._next += 1
        return {"x": self._batches[self._next - 1]}

    def rewind(self) -> None:
        self._next = 0


def quantize_int8(fp32: bytes, calib_x: Tensor | np.ndarray) -> bytes:
    """int8 QDQ graph of a float32 ONNX graph, calibrated on ``calib_x`` (MinMax)."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    x = np.ascontiguousarray(np.asarray(calib_x, dtype=np.float32))
    if len(x) == 0:
        raise NasoptError("int8 ONNX export needs calibration samples; none were given")
    with tempfile.TemporaryDirectory(prefix="nasopt-onnx-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        logging.disable(logging.WARNING)  # ORT logs a pre-processing hint on every call
        try:
            quantize_static(str(src), str(dst), SampleReader(x), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, reduce_range=True,
                            calibrate_method=CalibrationMethod.MinMax)
        finally:
            logging.disable(logging.NOTSET)
        return dst.read_bytes()


def session(model: bytes | str | Path, threads: int = 1, optimize: bool = True):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (pinned: no spinning
    thread pool beyond them), sequential execution."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own errors: a damaged or foreign file
        if isinstance(model, bytes) or type(exc).__module__.split(".")[0] != "onnxruntime":
            raise
        raise NasoptError(f"{model} is not an ONNX graph ONNX Runtime can load "
                          f"({str(exc).splitlines()[0][:160]}); export the model again") from None


def run(sess: Any, x: Tensor | np.ndarray, batch: int = 256) -> np.ndarray:
    """Logits of ``x`` from an ONNX Runtime session, in batches."""
    x = np.asarray(x, dtype=np.float32)
    return np.concatenate([sess.run(None, {"x": x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


@torch.no_grad()
def verify_fp32(model: nn.Module, onnx_model: bytes, x: Tensor) -> dict[str, Any]:
    """Max abs logit difference ONNX Runtime vs PyTorch on ``x``; raises above tolerance."""
    x = x.detach().float().cpu()
    ref = model.cpu().eval()(x).numpy()
    got = run(session(onnx_model), x)
    diff = float(np.abs(ref - got).max())
    if not diff < FP32_TOLERANCE:
        raise NasoptError(f"ONNX fp32 verification failed: logits differ from PyTorch by {diff:.3g}"
                          f" (tolerance {FP32_TOLERANCE:g}); this is a bug, please report it")
    return {"max_abs_diff": diff, "tolerance": FP32_TOLERANCE, "samples": len(x)}


class Int8CheckFailed(NasoptError):
    """The int8 graph is outside the stated tolerances (:func:`verify_int8`): the model's fault,
    not the user's input, so ``nasopt run`` records it and keeps the other files."""


@torch.no_grad()
def verify_int8(model: nn.Module, onnx_model: bytes, x: Tensor, y: Tensor | None
                ) -> dict[str, Any]:
    """Predicted-class agreement (and accuracy, when labels ``y`` are given) of the int8 graph
    against PyTorch on ``x``; for regression (float targets ``y``) the MAE of both against the
    targets. Raises when outside the stated tolerances."""
    x = x.detach().float().cpu()
    if y is not None and y.is_floating_point():
        return _verify_int8_regression(model, onnx_model, x, y)
    ref = model.cpu().eval()(x).argmax(1).numpy()
    got = run(session(onnx_model), x).argmax(1)
    out: dict[str, Any] = {"agreement": float((ref == got).mean()), "samples": len(x),
                           "min_agreement": INT8_MIN_AGREEMENT}
    problems = []
    if out["agreement"] < INT8_MIN_AGREEMENT:
        problems.append(f"predicted classes agree on {out['agreement']:.1%} of samples "
                        f"(need >= {INT8_MIN_AGREEMENT:.0%})")
    if y is not None:
        labels = y.detach().cpu().numpy()
        out["accuracy_pytorch"] = float((ref == labels).mean())
        out["accuracy_onnx_int8"] = float((got == labels).mean())
        out["max_accuracy_drop"] = INT8_MAX_ACCURACY_DROP
        drop = out["accuracy_pytorch"] - out["accuracy_onnx_int8"]
        if drop > INT8_MAX_ACCURACY_DROP:
            problems.append(f"accuracy drops by {drop:.1%} ({out['accuracy_pytorch']:.2%} -> "
                            f"{out['accuracy_onnx_int8']:.2%}; allowed "
                            f"{INT8_MAX_ACCURACY_DROP:.0%})")
    if problems:
        raise Int8CheckFailed("ONNX int8 verification failed: " + "; ".join(problems) + ". Export "
                          "--format onnx (float32) instead, or fine-tune the model at 8 bits "
                          "(`nasopt finetune`) first")
    return out


def _verify_int8_regression(model: nn.Module, onnx_model: bytes, x: Tensor, y: Tensor
                            ) -> dict[str, Any]:
    targets = y.detach().cpu().numpy().reshape(len(x), -1)
    ref = model.cpu().eval()(x).numpy()
    got = run(session(onnx_model), x)
    out: dict[str, Any] = {"samples": len(x), "mae_pytorch": float(np.mean(np.abs(ref - targets))),
                           "mae_onnx_int8": float(np.mean(np.abs(got - targets))),
                           "max_abs_diff": float(np.max(np.abs(got - ref))),
                           "max_mae_rise": INT8_MAX_MAE_RISE}
    if out["mae_onnx_int8"] > out["mae_pytorch"] * (1 + INT8_MAX_MAE_RISE):
        raise Int8CheckFailed(
            f"ONNX int8 verification failed: the validation MAE rises from "
            f"{out['mae_pytorch']:.4g} to {out['mae_onnx_int8']:.4g} (allowed "
            f"{INT8_MAX_MAE_RISE:.0%}). Export --format onnx (float32) instead, or fine-tune the "
            f"model at 8 bits (`nasopt finetune`) first")
    return out


def write(model: nn.Module, folder: str | Path, input_shape: Sequence[int],
          formats: Sequence[str], x_calib: Tensor | None = None, x_check: Tensor | None = None,
          y_check: Tensor | None = None) -> dict[str, Any]:
    """Write ``model.onnx`` and/or ``model.int8.onnx`` into ``folder``, each verified first
    (only a verified file is written). ``x_calib``: calibration samples (training data) for
    int8; ``x_check``/``y_check``: verification samples and labels (validation data). Without
    samples, seeded random inputs are used (and said so in the returned record)."""
    unknown = [f for f in formats if f not in FILES]
    if unknown:
        raise NasoptError(f"unknown ONNX format(s) {unknown}; choose from {', '.join(FILES)}")
    folder = Path(folder)
    g = torch.Generator().manual_seed(0)
    random_check = x_check is None
    if x_check is None:
        x_check = torch.randn((64, *input_shape), generator=g)
    if x_calib is None:
        x_calib = x_check
    x_calib = x_calib[:CALIB_SAMPLES]
    model = plain(model)
    fp32 = to_onnx_bytes(model, input_shape)
    record: dict[str, Any] = {"note": NOTE, "exporter": f"torch.onnx.export(dynamo=False), "
                              f"opset {OPSET}", "verified_on": "random inputs" if random_check
                              else "real samples (validation split, as the file takes them)"}
    if "onnx" in formats:
        record["onnx"] = {"file": FP32_FILE, **verify_fp32(model, fp32, x_check)}
        (folder / FP32_FILE).write_bytes(fp32)
    if "onnx-int8" in formats:
        int8 = quantize_int8(fp32, x_calib.detach().cpu().numpy())
        check = verify_int8(model, int8, x_check, None if random_check else y_check)
        record["onnx-int8"] = {"file": INT8_FILE, "quantizer": "onnxruntime quantize_static, "
                               "QDQ, per-channel int8 weights (7-bit range), uint8 "
                               "activations, MinMax "
                               f"calibration on {len(x_calib)} training samples", **check}
        (folder / INT8_FILE).write_bytes(int8)
    return record


def pipeline_export(model: nn.Module, out: Path, space: Any, data: Any,
                    formats: Sequence[str], log: Callable[[str], None] = lambda s: None
                    ) -> dict[str, Any]:
    """For ``nasopt run`` (:mod:`nasopt.pipeline`): write and verify the ONNX files of
    ``formats`` into the export folder ``out`` (calibration on training samples, verification on
    the validation split) and return the model card's notes plus ``test``: the test accuracy (MAE
    for regression) of each file in ONNX Runtime. An int8 graph that fails its check is not written: the reason goes to the
    card (``onnx-int8.not_written``) and to ``log``, and the run keeps its other files.

    The files take raw samples: the data's preprocessing is applied inside (see
    :mod:`nasopt.deploy.export`); calibration, verification and test accuracy feed raw samples."""
    from nasopt.deploy.export import with_preprocess
    model = with_preprocess(model, data.preprocess)
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(0))
    x_calib = data.x_train[order[:CALIB_SAMPLES].to(data.x_train.device)].cpu()
    check = (data.preprocess.raw(x_calib), data.preprocess.raw(data.x_val.cpu()),
             data.y_val.cpu())
    record = write(model, out, space.input_shape, [f for f in formats if f != "onnx-int8"],
                   *check)
    if "onnx-int8" in formats:
        try:
            record.update(write(model, out, space.input_shape, ["onnx-int8"], *check))
        except Int8CheckFailed as exc:
            record["onnx-int8"] = {"file": None, "not_written": str(exc)}
            log(f"{INT8_FILE} not written: {exc}")
    x, y = data.preprocess.raw(data.x_test.cpu()).numpy(), data.y_test.cpu().numpy()
    from nasopt.core.task import task_of
    task = task_of(data)
    metric = task.metrics[task.default_quality]
    test = {}
    for fmt in formats:
        if (out / FILES[fmt]).exists():
            test[f"{FILES[fmt]} via ONNX Runtime"] = metric.score(run(session(out / FILES[fmt]),
                                                                      x), y)
    return {"onnx": record, "test": test}
