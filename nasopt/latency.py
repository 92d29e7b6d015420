"""Measured latency: a model (or an ONNX graph) timed in ONNX Runtime on this CPU, batch 1.

The graph is the deployed model exported by :mod:`nasopt.onnx_export` (float32, or int8 QDQ
for a profile with ``dtype = "int8"``; calibrated on given samples, else on seeded random inputs,
which changes values, not the kernels timed). The session has the profile's ``threads`` intra-op
threads, one inter-op thread, sequential execution, all graph optimizations. After ``warmup``
runs, ``repeats`` runs are timed one by one (``time.perf_counter_ns`` around ``session.run``);
the latency is their **median**, the spread their inter-quartile range (IQR). A timing whose
relative IQR exceeds the profile's ``noise_threshold`` is flagged ``noisy``: other processes
competed for the CPU while it ran.
"""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import onnx_export
from .errors import NasoptError
from .hardware import Profile


@dataclass(frozen=True)
class Timing:
    median_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int
    threads: int

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    @property
    def relative_iqr(self) -> float:
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else float("inf")

    def noisy(self, threshold: float) -> bool:
        return self.relative_iqr > threshold

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "iqr_ms": self.iqr_ms}


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """PyTorch's intra-op threads set to ``n`` for the block (small graphs built and exported
    on a loaded machine are many times faster on one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_session(sess, input_shape: Sequence[int], warmup: int, repeats: int,  # noqa: ANN001
                 threads: int) -> Timing:
    """Median and quartiles of ``repeats`` timed batch-1 runs after ``warmup`` runs."""
    x = np.random.default_rng(0).standard_normal((1, *input_shape)).astype(np.float32)
    feeds = {sess.get_inputs()[0].name: x}
    run = sess.run
    for _ in range(warmup):
        run(None, feeds)
    times = np.empty(repeats)
    clock = time.perf_counter_ns
    for i in range(repeats):
        start = clock()
        run(None, feeds)
        times[i] = clock() - start
    q1, median, q3 = np.percentile(times / 1e6, [25, 50, 75])
    return Timing(float(median), float(q1), float(q3), repeats, threads)


def onnx_for(model: nn.Module, input_shape: Sequence[int], dtype: str,
             calib_x: torch.Tensor | None = None) -> bytes:
    """The ONNX graph the profile runs: float32, or int8 QDQ (``dtype = "int8"``)."""
    with torch_threads(1):
        fp32 = onnx_export.to_onnx_bytes(model, input_shape)
    if dtype == "fp32":
        return fp32
    if calib_x is None:
        g = torch.Generator().manual_seed(0)
        calib_x = torch.randn((64, *input_shape), generator=g)
    return onnx_export.quantize_int8(fp32, calib_x.cpu().numpy())


def measure_onnx(graph: bytes | str | Path, input_shape: Sequence[int], profile: Profile
                 ) -> Timing:
    """Latency of an ONNX graph under ``profile`` (its threads, warm-up and repeats)."""
    if profile.engine != "onnxruntime":
        raise NasoptError(f"profile {profile.name!r} has runtime.engine = "
                          f"{profile.engine!r}: it cannot measure latency; use a profile with "
                          f"engine \"onnxruntime\" (e.g. cpu-ort)")
    sess = onnx_export.session(graph, profile.threads)
    return time_session(sess, input_shape, profile.warmup, profile.repeats, profile.threads)


def measure_model(model: nn.Module, input_shape: Sequence[int], profile: Profile,
                  calib_x: torch.Tensor | None = None) -> Timing:
    """Export ``model`` as the profile runs it, then time it (:func:`measure_onnx`)."""
    return measure_onnx(onnx_for(model, input_shape, profile.dtype, calib_x), input_shape,
                        profile)


def measure_export(folder: str | Path, profile: Profile, spaces) -> tuple[Timing, str]:  # noqa: ANN001
    """Latency of an export folder: its ``model.onnx`` / ``model.int8.onnx`` for the profile's
    data type when present, else its model loaded with ``nasopt.load`` and exported now.
    Returns the timing and what was timed."""
    folder = Path(folder)
    card_file = folder / "model.json"
    if not card_file.exists():
        raise NasoptError(f"{folder} is not a nasopt export (no model.json)")
    card = json.loads(card_file.read_text())
    input_shape = tuple(card["space"]["input_shape"])
    file = folder / (onnx_export.INT8_FILE if profile.dtype == "int8" else onnx_export.FP32_FILE)
    if file.exists():
        return measure_onnx(file, input_shape, profile), file.name
    from .export import load
    model = load(folder, spaces)
    return measure_model(model, input_shape, profile), f"{folder.name} exported now ({profile.dtype})"
