"""Measured latency: a model (or an ONNX graph) timed in ONNX Runtime on this CPU, batch 1.

The graph is the deployed model exported by :mod:`nasopt.deploy.onnx` (float32, or int8 QDQ
for a profile with ``dtype = "int8"``; calibrated on given samples, else on seeded random inputs,
which changes values, not the kernels timed). The session has the profile's ``threads`` intra-op
threads, one inter-op thread, sequential execution, all graph optimizations.

**Why not one median.** Measured on this (shared, virtualised) 2-core machine: the CPU's speed
switches between two modes in bursts, even when the machine is idle. Back to back windows of 40
runs of one graph give a median of 19.4-19.8 us ("fast" mode, <= 1.06 x the lowest) or of
26-37 us ("slow", >= 1.2 x; almost nothing in between); slow bursts last 0.8-3.4 s, fast ones
0.2-0.7 s, and under load the machine was in its fast mode only 24 % of the time. A median of 60
runs lands in either mode, so single measurements were 1.3-2x off at random, and two of them
often agree (both slow) without being right. The lowest of 10 window medians 30 ms apart (0.3 s)
still found no fast window for ~10 % of measurements under load.

**The estimator: the lowest median among windows taken in the fast mode.** A fixed small probe
graph is timed (20 runs, its median) before and after every window of ``repeats`` timed runs of
the graph measured (``time.perf_counter_ns`` around ``session.run``, after ``warmup`` runs, and
a few more before each window); the probe's lowest median in this process is its fast-mode
speed (calibrated at first use for 1-4 s, and lowered whenever a faster probe window is seen). A
window is *fast* when both probes around it are within ``PROBE_TOLERANCE`` of that speed. A
graph's latency is the lowest median of its fast windows; it is measured until ``windows`` fast
windows are in (its latency is then ``confirmed``) or for ``max_wait_s`` seconds (a slow burst
outlasted them: the lowest of all its window medians, flagged unconfirmed).
Interference only ever slows a run down, so the lowest fast-window median is the least disturbed
one. Many graphs are measured round robin (:func:`measure_graphs`: one window each in turn, at
least ``window_pause_ms`` between two windows of the same graph), so waiting for the fast mode is
shared by all of them: with a loaded machine, a validation's 100 archs cost seconds of waiting,
not minutes. A timing is ``noisy`` when it is not confirmed or the relative IQR of its window
exceeds the profile's ``noise_threshold``.

What it does not remove: slower drifts within the fast mode. Measured here with the other core
loaded, 30 mobilenet graphs' fast-mode latencies drifted by 2-4 % over minutes while the probe's
stayed within 0.5 % (contention for the shared cache, which a 1.5 KB probe does not feel); the
look-up table's validation reports this as drift (:mod:`nasopt.hardware.lut`).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nasopt.deploy import onnx as onnx_export
from nasopt.core.errors import NasoptError
from nasopt.hardware.profile import Profile


PROBE_TOLERANCE = 0.10  # a probe window within 10 % of the probe's best: the fast mode
PROBE_RUNS = 20
CALIBRATION_S = (1.0, 4.0)  # probe calibration: at least / at most (until both modes are seen)


@dataclass(frozen=True)
class Timing:
    #: the latency: the lowest median of the fast windows (see the module doc)
    median_ms: float
    q1_ms: float  # quartiles of that window
    q3_ms: float
    repeats: int  # timed runs per window
    threads: int
    windows: int = 1  # windows taken
    fast_windows: int = 1  # of which in the fast mode
    #: median of all window medians / the latency - 1: how much slower the machine was overall
    window_spread: float = 0.0
    #: at least the profile's ``windows`` fast windows were seen
    confirmed: bool = True
    #: the probe's median around the window of the latency (ms): the machine's speed then
    probe_ms: float = 0.0

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    @property
    def relative_iqr(self) -> float:
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else float("inf")

    @property
    def fast_share(self) -> float:
        return self.fast_windows / self.windows if self.windows else 0.0

    def noisy(self, threshold: float) -> bool:
        return not self.confirmed or self.relative_iqr > threshold

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


def _probe_graph() -> bytes:
    """A fixed small graph (two 3-tap convolutions, 16 channels, length 32: ~10 us) whose speed
    tells the machine's mode."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.1).astype(np.float32), n)
             for n, s in (("w1", (16, 16, 3)), ("b1", (16,)), ("w2", (16, 16, 3)),
                          ("b2", (16,)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1]),
             helper.make_node("Relu", ["c2"], ["y"])]
    graph = helper.make_graph(nodes, "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 32])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


class Probe:
    """The machine's speed mode: a fixed graph's window median against its lowest one."""

    def __init__(self, threads: int):
        self.sess = onnx_export.session(_probe_graph(), threads)
        self.feeds = {"x": np.random.default_rng(0).standard_normal((1, 16, 32)).astype(
            np.float32)}
        self.best = float("inf")
        self.windows = self.fast = 0
        for _ in range(50):
            self.sess.run(None, self.feeds)
        self.calibrate()

    def window(self) -> float:
        run, feeds, clock = self.sess.run, self.feeds, time.perf_counter_ns
        times = np.empty(PROBE_RUNS)
        for i in range(PROBE_RUNS):
            start = clock()
            run(None, feeds)
            times[i] = clock() - start
        median = float(np.median(times)) / 1e6
        self.best = min(self.best, median)
        self.windows += 1
        self.fast += self.is_fast(median)
        return median

    def is_fast(self, median: float) -> bool:
        return median <= (1 + PROBE_TOLERANCE) * self.best

    def calibrate(self) -> None:
        """Probe windows 10 ms apart for CALIBRATION_S[0] s, longer (up to CALIBRATION_S[1])
        until windows of both modes were seen (one >= 1.2 x the lowest)."""
        start, worst = time.perf_counter(), 0.0
        while True:
            worst = max(worst, self.window())
            elapsed = time.perf_counter() - start
            if elapsed >= CALIBRATION_S[1] or (elapsed >= CALIBRATION_S[0]
                                               and worst >= 1.2 * self.best):
                break
            time.sleep(0.01)
        self.windows = self.fast = 0


_PROBES: dict[int, Probe] = {}


def probe(threads: int) -> Probe:
    """This process's probe for ``threads`` intra-op threads (calibrated at first use)."""
    if threads not in _PROBES:
        _PROBES[threads] = Probe(threads)
    return _PROBES[threads]


class _Target:
    def __init__(self, sess, input_shape: Sequence[int]):  # noqa: ANN001
        x = np.random.default_rng(0).standard_normal((1, *input_shape)).astype(np.float32)
        self.sess, self.feeds = sess, {sess.get_inputs()[0].name: x}
        #: (probe before, probe after, q1, median, q3) per window, ms
        self.records: list[tuple[float, float, float, float, float]] = []
        self.last = -float("inf")

    def fast(self, p: Probe) -> list[tuple[float, float, float, float, float]]:
        return [r for r in self.records if p.is_fast(r[0]) and p.is_fast(r[1])]

    def timing(self, p: Probe, repeats: int, threads: int, need: int) -> Timing:
        fast = self.fast(p)
        pool = fast or self.records
        before, after, q1, median, q3 = min(pool, key=lambda r: r[3])
        spread = float(np.median([r[3] for r in self.records]) / median - 1) if median else 0.0
        return Timing(median, q1, q3, repeats, threads, len(self.records), len(fast), spread,
                      len(fast) >= need, (before + after) / 2)


def time_sessions(sessions: Sequence[Any], input_shapes: Sequence[Sequence[int]], *,
                  warmup: int, repeats: int, threads: int, windows: int = 5,
                  max_wait_s: float = 10.0, pause_ms: float = 30.0) -> list[Timing]:
    """Time ONNX Runtime sessions round robin (see the module doc): per session, windows of
    ``repeats`` timed batch-1 runs until ``windows`` of them were taken in the fast mode or
    ``max_wait_s`` seconds have passed; each window preceded by a few warm-up runs, two windows
    of the same session at least ``pause_ms`` apart."""
    p = probe(threads)
    targets = [_Target(s, shape) for s, shape in zip(sessions, input_shapes)]
    for t in targets:
        for _ in range(warmup):
            t.sess.run(None, t.feeds)
    clock = time.perf_counter_ns
    rewarm = max(2, warmup // 4)
    before = p.window()
    deadline = time.perf_counter() + max_wait_s
    while True:
        pending = [t for t in targets if len(t.fast(p)) < windows
                   and (time.perf_counter() < deadline or not t.records)]
        if not pending:
            break
        wait = min(t.last for t in pending) + pause_ms / 1000 - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
            before = p.window()
        for t in pending:
            if time.perf_counter() - t.last < pause_ms / 1000:
                continue
            run, feeds = t.sess.run, t.feeds
            for _ in range(rewarm):
                run(None, feeds)
            times = np.empty(repeats)
            for i in range(repeats):
                start = clock()
                run(None, feeds)
                times[i] = clock() - start
            t.last = time.perf_counter()
            q1, median, q3 = (float(v) for v in np.percentile(times / 1e6, [25, 50, 75]))
            after = p.window()
            t.records.append((before, after, q1, median, q3))
            before = after
    return [t.timing(p, repeats, threads, windows) for t in targets]


def time_session(sess, input_shape: Sequence[int], warmup: int, repeats: int,  # noqa: ANN001
                 threads: int, windows: int = 5, max_wait_s: float = 10.0,
                 pause_ms: float = 30.0) -> Timing:
    """One session timed as :func:`time_sessions` does."""
    return time_sessions([sess], [input_shape], warmup=warmup, repeats=repeats, threads=threads,
                         windows=windows, max_wait_s=max_wait_s, pause_ms=pause_ms)[0]


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


def _check(profile: Profile) -> None:
    if profile.engine != "onnxruntime":
        raise NasoptError(f"profile {profile.name!r} has runtime.engine = "
                          f"{profile.engine!r}: it cannot measure latency; use a profile with "
                          f"engine \"onnxruntime\" (e.g. cpu-ort)")


def measure_graphs(graphs: Sequence[bytes | str | Path], input_shapes: Sequence[Sequence[int]],
                   profile: Profile, batch: int = 128) -> list[Timing]:
    """Latencies of ONNX graphs under ``profile``, measured round robin ``batch`` at a time
    (see the module doc; one batch is measured over the same seconds, so its figures share the
    machine's state: a LUT's fit archs and a validation pass are one batch each)."""
    _check(profile)
    out: list[Timing] = []
    for i in range(0, len(graphs), batch):
        sessions = [onnx_export.session(g, profile.threads) for g in graphs[i:i + batch]]
        out += time_sessions(sessions, input_shapes[i:i + batch], warmup=profile.warmup,
                             repeats=profile.repeats, threads=profile.threads,
                             windows=profile.windows, max_wait_s=profile.max_wait_s,
                             pause_ms=profile.window_pause_ms)
    return out


def measure_onnx(graph: bytes | str | Path, input_shape: Sequence[int], profile: Profile
                 ) -> Timing:
    """Latency of an ONNX graph under ``profile`` (:func:`measure_graphs`)."""
    return measure_graphs([graph], [input_shape], profile)[0]


def measure_model(model: nn.Module, input_shape: Sequence[int], profile: Profile,
                  calib_x: torch.Tensor | None = None) -> Timing:
    """Export ``model`` as the profile runs it, then time it (:func:`measure_onnx`)."""
    return measure_onnx(onnx_for(model, input_shape, profile.dtype, calib_x), input_shape,
                        profile)


def measure_export(folder: str | Path, profile: Profile, spaces) -> tuple[Timing, str]:  # noqa: ANN001
    """Latency of an export folder: its ``model.onnx`` / ``model.int8.onnx`` for the profile's
    data type when present, else its model loaded with ``nasopt.load`` and exported now.
    Returns the timing and what was timed."""
    from nasopt.deploy.export import read_card
    from nasopt.core.space import space_from_description
    folder = Path(folder)
    card = read_card(folder)
    input_shape = tuple(space_from_description(card["space"], spaces).input_shape)
    file = folder / (onnx_export.INT8_FILE if profile.dtype == "int8" else onnx_export.FP32_FILE)
    if file.exists():
        return measure_onnx(file, input_shape, profile), file.name
    from nasopt.deploy.export import load
    model = load(folder, spaces)
    return measure_model(model, input_shape, profile), f"{folder.name} exported now ({profile.dtype})"
