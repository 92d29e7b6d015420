"""Latency look-up table (LUT) and predictor.

**Units.** An arch's deployed model (BN folded, low-rank layers split: what ONNX Runtime runs)
is cut into units: every block of ``stages.<i>.blocks.<j>`` and every other top-level child with
weights (``stem``, ``head``). A unit's key is its layer structure (the plain torch layers'
``repr``: channels, kernel, stride, groups, factorization), its residual flag and its input shape
(channels x length / resolution), so equal keys mean equal work.

**Profiling** (``nasopt hw profile``) enumerates every distinct unit of a (sub-)space and times
each once: the unit alone as a small ONNX graph (as the profile runs it: float32 or int8 QDQ)
minus the time of an Identity graph on the same input (the per-run overhead of ONNX Runtime and
Python), floored at 0. Enumeration covers every unit by the gene-naming convention of the spaces:
a group's units (``sN.*``, ``stem.*``, ``head.*``) depend only on the group's structural genes
and on the previous group's ``width``; one arch per combination of those (depths at their
maximum) is decomposed. Bit-widths and sparsity do not change the graph ONNX Runtime runs
(dense kernels; the profile's data type decides), so they are not part of a unit.

**Prediction** = scale x (sum of the arch's unit entries) + constant, both fitted by least
squares on ``fit_archs`` random archs measured end to end. The constant is the per-run overhead;
the scale corrects what timing a unit alone adds to it (its own output allocation, input and
output binding, cold kernels): measured here on conv1d, isolated units take about twice their
share of a whole graph (fitted scale ~0.5; with the constant alone, 37 % of archs were within
±10 %, with scale and constant 87 %). The prediction is linear per unit, so :meth:`LatencyTable.expected_latency` gives the expected latency
under independent per-gene categorical distributions (differentiable in torch), for a
gradient-based search.

**Validation** (``nasopt hw validate``) measures random archs and reports the share predicted
within ±10 % and Kendall's tau, with the machine's noise: each arch is measured twice and the
median relative difference of the two (and the median relative IQR) is compared with the
profile's ``noise_threshold``: above half of it a ±10 % verdict cannot be trusted.
"""
from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .arch import Arch, Value
from .errors import NasoptError
from .hardware import Profile
from .memory import deployed_structure, structure_key

LUT_VERSION = 1
TOLERANCE = 0.10  # "within ±10 %"


@dataclass
class Unit:
    key: str
    name: str  # module name in the deployed model (stages.0.blocks.1, head, ...)
    module: nn.Module
    input_shape: tuple[int, ...]  # one sample, no batch dimension


def _structural(gene: str) -> bool:
    return not gene.endswith(".bits") and gene != "sparsity"


def units(space, arch: Mapping[str, Value], model: nn.Module | None = None) -> list[Unit]:  # noqa: ANN001
    """The units of ``arch`` in execution order (see the module doc)."""
    from .latency import torch_threads
    from .onnx_export import plain
    with torch_threads(1):
        model = deployed_structure(space, arch) if model is None else model
        targets: list[tuple[str, nn.Module]] = []
        for name, child in model.named_children():
            if name == "stages":
                for i, stage in enumerate(child):
                    targets += [(f"stages.{i}.blocks.{j}", b) for j, b in enumerate(stage.blocks)]
            elif any(True for _ in child.parameters()):
                targets.append((name, child))
        seen: list[Unit] = []

        def hook(name: str) -> Callable[..., None]:
            def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
                shape = tuple(inputs[0].shape[1:])
                structure = repr(plain(module)).replace("\n", "").replace("  ", "")
                residual = getattr(module, "residual", None)
                seen.append(Unit(f"{structure}|res={residual}|in={'x'.join(map(str, shape))}",
                                 name, module, shape))
            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in targets]
        try:
            with torch.no_grad():
                model.eval()(torch.zeros((1, *space.input_shape)))
        finally:
            for h in handles:
                h.remove()
    return seen


def _groups(space) -> list[str]:  # noqa: ANN001
    out: list[str] = []
    for gene in space.genes:
        group = gene.split(".")[0] if "." in gene else None
        if group and group not in out and _structural(gene):
            out.append(group)
    return out


def local_genes(space) -> dict[str, list[str]]:  # noqa: ANN001
    """Per group, the genes its units depend on: its structural genes (not depth) and the
    previous group's width."""
    out, previous = {}, None
    for group in _groups(space):
        own = [g for g in space.genes if g.startswith(group + ".") and _structural(g)
               and not g.endswith(".depth")]
        out[group] = ([previous] if previous else []) + own
        if f"{group}.width" in space.genes:
            previous = f"{group}.width"
    return out


def covering_archs(space) -> list[Arch]:  # noqa: ANN001
    """Archs whose units include every unit of the space (see the module doc)."""
    base = {g: (max(o) if g.endswith(".depth") else o[0]) for g, o in space.genes.items()}
    archs, seen = [], set()
    for genes in local_genes(space).values():
        for combo in itertools.product(*(space.genes[g] for g in genes)):
            arch = space.validate({**base, **dict(zip(genes, combo))})
            if arch.key not in seen:
                seen.add(arch.key)
                archs.append(arch)
    return archs


def group_of_unit(name: str) -> str:
    parts = name.split(".")
    return f"s{int(parts[1]) + 1}" if parts[0] == "stages" else parts[0]


# ---- timing --------------------------------------------------------------------------------
def _identity_graph(input_shape: Sequence[int]) -> bytes:
    import onnx
    from onnx import TensorProto, helper
    shape = ["batch", *input_shape]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


class UnitTimer:
    """Times units under a profile: unit graph minus the Identity graph on the same input."""

    def __init__(self, profile: Profile):
        self.profile = profile
        self._baseline: dict[tuple[int, ...], float] = {}

    def baseline(self, input_shape: tuple[int, ...]) -> float:
        from .latency import measure_onnx
        if input_shape not in self._baseline:
            self._baseline[input_shape] = measure_onnx(_identity_graph(input_shape), input_shape,
                                                       self.profile).median_ms
        return self._baseline[input_shape]

    def __call__(self, unit: Unit) -> float:
        from .latency import measure_model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = _fresh(unit.module)
        timing = measure_model(module, unit.input_shape, self.profile)
        return max(0.0, timing.median_ms - self.baseline(unit.input_shape))


def _fresh(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with small random weights (a deployed structure's are random too;
    re-drawn so that no denormal or NaN values slow the kernels)."""
    import copy
    module = copy.deepcopy(module).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.1)
    return module


def measure_arch_fn(space, profile: Profile) -> Callable[[Arch], tuple[float, float]]:  # noqa: ANN001
    """arch -> (latency ms, relative IQR), measured end to end (:mod:`nasopt.latency`)."""
    from .latency import measure_model

    def measure(arch: Arch) -> tuple[float, float]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = _fresh(deployed_structure(space, arch))
        t = measure_model(model, space.input_shape, profile)
        return t.median_ms, t.relative_iqr
    return measure


# ---- the table -----------------------------------------------------------------------------
@dataclass
class LatencyTable:
    space: dict[str, Any]  # the (sub-)space description it covers
    profile: dict[str, Any]
    entries: dict[str, float]  # unit key -> ms
    constant: float = 0.0
    scale: float = 1.0
    #: unit position (module name) -> {"genes": [...], "keys": {"v1|v2": unit key}}
    positions: dict[str, dict[str, Any]] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)

    # -- prediction
    def unit_costs(self, space, arch: Mapping[str, Value]) -> list[tuple[str, float]]:  # noqa: ANN001
        """(module name, ms) of each unit of ``arch``; a unit missing from the table is an error."""
        out = []
        for u in units(space, space.validate(arch)):
            if u.key not in self.entries:
                raise NasoptError(f"the latency table has no entry for unit {u.name} ({u.key[:80]}"
                                  f"...): it was profiled for another (sub-)space; re-run "
                                  f"`nasopt hw profile` for this space and restrictions")
            out.append((u.name, self.entries[u.key]))
        return out

    def predict(self, space, arch: Mapping[str, Value]) -> float:  # noqa: ANN001
        """Predicted latency (ms) = scale x sum of the arch's unit entries + constant."""
        return self.scale * self.entry_sum(space, arch) + self.constant

    def entry_sum(self, space, arch: Mapping[str, Value]) -> float:  # noqa: ANN001
        return sum(c for _, c in self.unit_costs(space, arch))

    def expected_latency(self, probs: Mapping[str, Any]) -> Any:
        """Expected predicted latency when each gene is drawn independently from ``probs[gene]``
        (probabilities over the gene's options in the table's space order; numpy arrays or torch
        tensors, then the result is differentiable). Genes not given are taken at their first
        option with probability 1. Exact because the prediction is a sum over units."""
        genes = self.space["genes"]

        def p(gene: str, value: Value) -> Any:
            if gene in probs:
                return probs[gene][genes[gene].index(value)]
            return 1.0 if genes[gene][0] == value else 0.0

        total: Any = self.constant
        for name, pos in self.positions.items():
            group, block = group_of_unit(name), _block_index(name)
            exists: Any = 1.0
            depth = f"{group}.depth"
            if block is not None and depth in genes:
                exists = sum(p(depth, d) for d in genes[depth] if int(d) > block)
            cost: Any = 0.0
            for config, key in pos["keys"].items():
                weight: Any = 1.0
                for gene, value in zip(pos["genes"], json.loads(config)):
                    weight = weight * p(gene, value)
                cost = cost + weight * self.entries[key]
            total = total + self.scale * exists * cost
        return total

    # -- files
    def save(self, path: str | Path) -> Path:
        from .checkpoint import atomic_write_bytes
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": LUT_VERSION, "space": self.space, "profile": self.profile,
                "constant_ms": self.constant, "scale": self.scale, "fit": self.fit, "entries_ms": self.entries,
                "positions": self.positions}
        atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise NasoptError(f"cannot read the latency table {path} ({exc}); re-run "
                              f"`nasopt hw profile`") from None
        if data.get("version") != LUT_VERSION:
            raise NasoptError(f"latency table {path} has version {data.get('version')}, "
                              f"expected {LUT_VERSION}; re-run `nasopt hw profile`")
        return cls(data["space"], data["profile"], data["entries_ms"], data["constant_ms"],
                   data["scale"], data["positions"], data.get("fit", {}))


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[3]) if parts[0] == "stages" else None


def table_path(run_dir: str | Path, space, profile: Profile) -> Path:  # noqa: ANN001
    """``run_dir/hardware/<space>-<profile>-<hash of sub-space and profile>.json``."""
    import hashlib
    blob = json.dumps({"space": space.describe(), "profile": profile.describe()},
                      sort_keys=True).encode()
    digest = hashlib.sha256(blob).hexdigest()[:10]
    return Path(run_dir) / "hardware" / f"{space.name}-{profile.name}-{digest}.json"


def build_table(space, profile: Profile, *,  # noqa: ANN001
                time_unit: Callable[[Unit], float] | None = None,
                measure_arch: Callable[[Arch], tuple[float, float]] | None = None,
                fit_archs: int = 20, seed: int = 0,
                log: Callable[[str], None] = lambda s: None) -> LatencyTable:
    """Profile every distinct unit of ``space`` once, then fit scale and constant on
    ``fit_archs`` random archs measured end to end (the constant alone when fewer than 3). ``time_unit`` / ``measure_arch`` default to ONNX Runtime
    timings under ``profile`` (tests pass a synthetic cost model)."""
    if not profile.has_latency:
        raise NasoptError(f"profile {profile.name!r} has no latency metric (metrics.latency = "
                          f"\"none\"); a latency table needs e.g. --hardware cpu-ort")
    time_unit = time_unit or UnitTimer(profile)
    measure_arch = measure_arch or measure_arch_fn(space, profile)
    locals_ = local_genes(space)
    entries: dict[str, float] = {}
    positions: dict[str, dict[str, Any]] = {}
    archs = covering_archs(space)
    log(f"latency table for {space.name} under {profile.name}: {len(archs)} covering archs")
    pending: dict[str, Unit] = {}
    widths = [g for g in space.genes if g.endswith(".width")]
    for arch in archs:
        for u in units(space, arch):
            # a group without genes of its own (a head without rank gene) follows the last width
            genes = locals_.get(group_of_unit(u.name)) or widths[-1:]
            pos = positions.setdefault(u.name, {"genes": genes, "keys": {}})
            pos["keys"][json.dumps([arch[g] for g in genes])] = u.key
            if u.key not in entries and u.key not in pending:
                pending[u.key] = u
    log(f"timing {len(pending)} distinct units")
    for i, (key, u) in enumerate(pending.items()):
        entries[key] = float(time_unit(u))
        if (i + 1) % 50 == 0:
            log(f"  {i + 1}/{len(pending)} units timed")
    table = LatencyTable(space.describe(), profile.describe(), entries, 0.0, 1.0, positions)
    rng = random.Random(seed)
    fit = [space.sample(rng) for _ in range(fit_archs)]
    sums = np.array([table.entry_sum(space, a) for a in fit])
    measured = np.array([measure_arch(a)[0] for a in fit])
    table.scale, table.constant = fit_line(sums, measured)
    residual = measured - table.scale * sums - table.constant
    table.fit = {"archs": len(fit), "seed": seed, "residual_rms_ms": float(np.sqrt(np.mean(
        residual ** 2))) if len(fit) else 0.0, "units": len(entries),
        # the machine's speed when the table was made: re-measured by validate() to see drift
        "reference_arch": dict(fit[0]) if fit else None,
        "reference_ms": float(measured[0]) if len(fit) else None}
    log(f"fitted latency = {table.scale:.3f} x sum + {table.constant:.4f} ms on {len(fit)} archs")
    return table


def fit_line(sums: np.ndarray, measured: np.ndarray) -> tuple[float, float]:
    """Least-squares (scale, constant) of ``measured ~ scale * sums + constant``; the constant
    alone (scale 1) with fewer than 3 points or no spread in ``sums``."""
    if len(sums) == 0:
        return 1.0, 0.0
    if len(sums) < 3 or np.ptp(sums) <= 1e-12 * max(1.0, float(np.abs(sums).max())):
        return 1.0, float(np.mean(measured - sums))
    (scale, constant), *_ = np.linalg.lstsq(np.c_[sums, np.ones(len(sums))], measured,
                                            rcond=None)
    return float(scale), float(constant)


@dataclass(frozen=True)
class Validation:
    n: int
    within: float  # share predicted within ±TOLERANCE of measured
    tau: float  # Kendall's tau between predicted and measured
    median_abs_error: float  # relative
    repeat_spread: float  # median |t1 - t2| / mean over archs measured twice
    median_relative_iqr: float
    noise_threshold: float
    rows: list[tuple[str, float, float]]  # (arch key, predicted, measured)
    #: largest relative change of the reference arch's latency (measured when the table was
    #: made, and before and after this validation): the machine's speed drifting with its load
    drift: float = 0.0

    @property
    def too_noisy(self) -> bool:
        """Repeat measurements differ by more than half the profile's noise threshold, their
        IQR exceeds it, or the machine's speed drifted by more than half of it since the table
        was made: a ±10 % verdict is not trustworthy then."""
        return (self.repeat_spread > self.noise_threshold / 2
                or self.median_relative_iqr > self.noise_threshold
                or self.drift > self.noise_threshold / 2)

    def summary(self) -> str:
        noise = (f"repeat spread {self.repeat_spread:.1%}, relative IQR "
                 f"{self.median_relative_iqr:.1%}, speed drift since the table was made "
                 f"{self.drift:.1%} (threshold {self.noise_threshold:.0%})")
        verdict = (f"TOO NOISY TO TRUST: {noise}; re-run on a quiet machine" if self.too_noisy
                   else f"measurement noise ok: {noise}")
        return (f"{self.n} archs: {self.within:.1%} predicted within ±{TOLERANCE:.0%} of "
                f"measured, Kendall tau {self.tau:.3f}, median |error| "
                f"{self.median_abs_error:.1%}; {verdict}")


def validate(table: LatencyTable, space, profile: Profile, n: int = 100, seed: int = 1,  # noqa: ANN001
             measure_arch: Callable[[Arch], tuple[float, float]] | None = None,
             log: Callable[[str], None] = lambda s: None) -> Validation:
    """Predicted vs measured latency of ``n`` random archs (distinct structures; seed differs
    from the fit's), each measured twice."""
    from scipy.stats import kendalltau
    measure_arch = measure_arch or measure_arch_fn(space, profile)
    rng = random.Random(seed)
    archs, seen = [], set()
    for _ in range(50 * n):
        if len(archs) >= n:
            break
        arch = space.sample(rng)
        if structure_key(space, arch) not in seen:
            seen.add(structure_key(space, arch))
            archs.append(arch)
    reference = table.fit.get("reference_arch")
    ref_times = [table.fit["reference_ms"]] if reference is not None else []
    if reference is not None:
        ref_times.append(measure_arch(space.validate(reference))[0])
    rows, spreads, iqrs = [], [], []
    for i, arch in enumerate(archs):
        pred = table.predict(space, arch)
        (t1, iqr1), (t2, iqr2) = measure_arch(arch), measure_arch(arch)
        measured = min(t1, t2)  # the less disturbed of two medians
        spreads.append(abs(t1 - t2) / max((t1 + t2) / 2, 1e-12))
        iqrs.append(min(iqr1, iqr2))
        rows.append((arch.key, pred, measured))
        if (i + 1) % 25 == 0:
            log(f"  {i + 1}/{len(archs)} archs measured")
    if reference is not None:
        ref_times.append(measure_arch(space.validate(reference))[0])
    drift = (max(abs(t / ref_times[0] - 1) for t in ref_times[1:]) if len(ref_times) > 1
             else 0.0)
    pred = np.array([r[1] for r in rows])
    meas = np.array([r[2] for r in rows])
    error = np.abs(pred - meas) / meas
    tau = float(kendalltau(pred, meas).statistic) if len(rows) > 1 else float("nan")
    return Validation(len(rows), float(np.mean(error <= TOLERANCE)),
                      tau if math.isfinite(tau) else float("nan"), float(np.median(error)),
                      float(np.median(spreads)), float(np.median(iqrs)),
                      profile.noise_threshold, rows, drift)
