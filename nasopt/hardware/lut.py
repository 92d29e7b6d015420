"""Latency look-up table (LUT) and predictor.

**Units.** An arch's deployed model (BN folded, low-rank layers split: what ONNX Runtime runs)
is cut into units: every block of ``stages.<i>.blocks.<j>`` and every other top-level child with
weights (``stem``, ``head``). A unit's key is its layer structure (the plain torch layers'
``repr``: channels, kernel, stride, groups, factorization), its residual flag and its input shape
(channels x length / resolution), so equal keys mean equal work.

**Profiling** (``nasopt hw profile``) enumerates every distinct unit of a (sub-)space and, once
per unit: exports it alone as a small ONNX graph (as the profile runs it: float32 or int8 QDQ),
**counts its features** and **times it in isolation** (minus an Identity graph on the same input,
floored at 0). Enumeration covers every unit of any space: the structural genes each unit
depends on are found by probing (:func:`local_genes`), and one arch per combination of a unit's
genes (depths at their maximum) is decomposed. Bit-widths and sparsity do not change the graph
ONNX Runtime runs (dense kernels; the profile's data type decides), so they are not part of a
unit.

**Features** of a unit (:func:`unit_features`), counted from its graphs, in the spirit of
nn-Meter's kernel-level predictors: per kind of layer (``pw`` 1x1 conv, ``conv<k>`` dense kxk
conv, ``dw<k>`` depthwise kxk conv: one set per kernel size; ``fc`` Gemm/MatMul) its MACs, for
convs also its MACs over the taps not on padding (``eff_*``: a 7x7 depthwise on a 4x4 map
touches a third of what its MACs say) and its input elements, the output elements of every kind
(``Relu``, ``Clip``, ``Add`` too), plus the number of each op ONNX Runtime runs once it has
optimized the unit's graph (``o_*``: fused convs, NCHWc convs, the NCHWc reorders it inserts
where a channel count is not a multiple of the vector width, residual adds, Gemm), plus 1 per
unit (``units``).

**Prediction** = sum of the arch's unit entries + a constant; a unit's entry = fitted
coefficients . (its features, its isolated timing). Coefficients and constant are fitted by
least squares on the relative error over ``fit_archs`` random archs measured end to end (twice,
in two passes, the lower kept: the same measurement as the validation's; inputs
standardized, minimum norm where collinear, 0 for an input all fit archs have the same amount of,
such as the single head's op count: the constant takes it; one refit without outlier archs,
relative residual > 4 x the median and > 5 %). Measured here (all timings with the fast-mode
estimator of :mod:`nasopt.hardware.latency`), ``nasopt bench hardware`` over 4 runs under load 3-8, 100
held-out archs: conv1d 100 % within ±10 % (median error 0.4-0.7 %), mobilenet 95-100 %
(0.8-2.9 %), conv1d int8 100 % (0.7-1.2 %). Offline on one set of timings (fit on 80 archs,
tested on the others, 20 random splits of 120-200 archs): conv1d 100 % (median error 0.6 %,
tau 0.98), mobilenet 100 % (0.9 %, 0.97), conv1d int8 100 % (0.8 %, 0.95); without the
isolated timing as an input: 100 %, 99.9-100 % (median error 1.1 %, 1.7 %, 1.8 %); the former
``scale x sum of isolated timings + constant``: 100 %, 99 %, 100 % (1.3 %, 2.4 %, 1.7 %); MACs
and a per-unit count alone: 95 %, 69 %, 98 %. Before the fast-mode estimator, the isolated
timings themselves were 1.3-2x off at random and the former predictor got 40-50 % within ±10 %
on conv1d, 15 % on mobilenet. With fewer than 3 fit archs (tests, a quick table) the entries
are the isolated timings and the constant their mean residual. The prediction is linear per
unit, so :meth:`LatencyTable.expected_latency` gives the expected latency under independent
per-gene categorical distributions (differentiable in torch), for a gradient-based search.

**Validation** (``nasopt hw validate``) measures random archs (other seed, distinct structures)
twice, in two passes minutes apart, and reports the share predicted within ±10 % of the lower
measurement and Kendall's tau, with the machine's noise: the median and 90th percentile of the
two measurements' relative difference, the speed drift of 10 reference archs since the table was
made, the share of timings that never saw the CPU's fast mode, and the fast-mode share of the
windows. Too noisy to trust: median repeat spread or drift above half the profile's
``noise_threshold``, the 90th percentile above it, or more than 5 % unconfirmed timings. Drift
is what limits the validation here: a table fitted 2 minutes before predicted mobilenet archs
2.3 % too slow (95 % within ±10 %, median error 3.2 %), a refit on the same archs measured with
the validation's 100 % (0.9 %).
"""
from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from nasopt.core.arch import Arch, Value
from nasopt.core.errors import NasoptError
from nasopt.hardware.profile import Profile
from nasopt.hardware.memory import deployed_structure, structure_key
from nasopt.supernet.network import depth_position, is_depth_gene
from nasopt.supernet.network import units as network_units

if TYPE_CHECKING:
    from nasopt.hardware.latency import Timing

LUT_VERSION = 2  # 2: feature model (coefficients, features, isolated timings)
FIT_ARCHS = 80  # random archs measured to fit the coefficients
ISOLATED = "isolated_ms"  # the model input that is a unit's isolated timing
REFERENCES = 10  # fit archs re-measured by validate() to see the machine's speed drift
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
    from nasopt.hardware.latency import torch_threads
    from nasopt.deploy.onnx import plain
    with torch_threads(1):
        model = deployed_structure(space, arch) if model is None else model
        targets = network_units(model)
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


def base_arch(space) -> dict[str, Value]:  # noqa: ANN001
    """Every depth gene at its largest option (every unit exists), every other gene at its first."""
    return {g: (max(o) if is_depth_gene(g) else o[0]) for g, o in space.genes.items()}


def local_genes(space) -> dict[str, list[str]]:  # noqa: ANN001
    """Per unit name, the structural genes its key depends on (in the space's gene order), found
    by varying each gene over its options from :func:`base_arch` and from the base with any one
    other gene at any option (a dependency can hide at one base: a head whose input is the last
    active stage's width depends on that width only at that depth). A unit absent at some
    option (a block beyond the depth) does not count as a change: depth genes decide whether a
    unit exists (:func:`nasopt.supernet.network.depth_position`), not its key."""
    structural = [g for g in space.genes if _structural(g) and len(space.genes[g]) > 1]
    base = base_arch(space)
    cache: dict[str, dict[str, str]] = {}

    def keys(arch: Mapping[str, Value]) -> dict[str, str]:
        arch = space.validate(arch)
        if arch.key not in cache:
            cache[arch.key] = {u.name: u.key for u in units(space, arch)}
        return cache[arch.key]

    bases = [base] + [{**base, h: o} for h in structural for o in space.genes[h] if o != base[h]]
    names: dict[str, None] = dict.fromkeys(keys(base))
    deps: dict[str, set[str]] = {}
    for b in bases:
        for g in structural:
            found = [keys({**b, g: o}) for o in space.genes[g]]
            for f in found:
                names.update(dict.fromkeys(f))
            for name in set().union(*found):
                if len({f[name] for f in found if name in f}) > 1:
                    deps.setdefault(name, set()).add(g)
    return {name: [g for g in space.genes if g in deps.get(name, ())] for name in names}


def covering_archs(space, local: Mapping[str, list[str]] | None = None) -> list[Arch]:  # noqa: ANN001
    """Archs whose units include every unit of the space (see the module doc): per unit, one
    arch per combination of its genes' options, the other genes as in :func:`base_arch`."""
    base = base_arch(space)
    archs, seen = [], set()
    for genes in (local_genes(space) if local is None else local).values():
        for combo in itertools.product(*(space.genes[g] for g in genes)):
            arch = space.validate({**base, **dict(zip(genes, combo))})
            if arch.key not in seen:
                seen.add(arch.key)
                archs.append(arch)
    return archs


# ---- graphs, features, timing --------------------------------------------------------------
def _identity_graph(input_shape: Sequence[int]) -> bytes:
    from onnx import TensorProto, helper
    shape = ["batch", *input_shape]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _fresh(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with small random weights (a deployed structure's are random too;
    re-drawn so that no denormal or NaN values slow the kernels)."""
    import copy
    module = copy.deepcopy(module).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.1)
    return module


def unit_graphs(unit: Unit, dtype: str) -> tuple[bytes, bytes]:
    """(float32 graph, the graph the profile runs: the same or its int8 QDQ version)."""
    from nasopt.deploy import onnx as onnx_export
    from nasopt.hardware.latency import torch_threads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = _fresh(unit.module)
    with torch_threads(1):
        fp32 = onnx_export.to_onnx_bytes(module, unit.input_shape)
    if dtype == "fp32":
        return fp32, fp32
    g = torch.Generator().manual_seed(0)
    return fp32, onnx_export.quantize_int8(
        fp32, torch.randn((64, *unit.input_shape), generator=g).numpy())  # as latency.onnx_for


def _counted(graph: bytes) -> dict[str, float]:
    """Per kind of layer: MACs and output elements per sample (``macs_*``, ``out_*``), from the
    float32 ONNX graph with its shapes inferred."""
    import onnx
    from onnx import shape_inference
    model = shape_inference.infer_shapes(onnx.load_from_string(graph))
    shapes: dict[str, list[int]] = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 1
                           for d in vi.type.tensor_type.shape.dim]
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    out: dict[str, float] = {}

    def add(name: str, value: float) -> None:
        out[name] = out.get(name, 0.0) + float(value)

    for node in model.graph.node:
        if node.op_type in ("Identity", "Constant"):
            continue
        elements = math.prod(shapes.get(node.output[0], [1, 0])[1:])
        if node.op_type == "Conv":
            w = weights[node.input[1]]
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            kernel = "x".join(map(str, w[2:]))
            kind = (f"dw{kernel}" if group > 1 and w[1] == 1 else
                    "pw" if all(k == 1 for k in w[2:]) else f"conv{kernel}")
            add(f"macs_{kind}", elements * math.prod(w[1:]))
            add(f"eff_{kind}", _unpadded_taps(node, shapes, w) * w[0] * w[1])
            add(f"in_{kind}", math.prod(shapes[node.input[0]][1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            kind = "fc"
            add("macs_fc", math.prod(weights.get(node.input[1], [0])))
        else:
            kind = node.op_type
        add(f"out_{kind}", elements)
    return out


def _unpadded_taps(node, shapes: Mapping[str, list[int]], w: list[int]) -> int:  # noqa: ANN001
    """Kernel taps of a conv over all output positions that fall inside the input (not on
    padding): a kxk conv on a 4x4 map touches far fewer values than its MACs say."""
    import onnx
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    inner, outer = shapes[node.input[0]][2:], shapes[node.output[0]][2:]
    strides = attrs.get("strides", [1] * len(inner))
    pads = attrs.get("pads", [0] * 2 * len(inner))
    dilations = attrs.get("dilations", [1] * len(inner))
    taps = 1
    for d, (size, out) in enumerate(zip(inner, outer)):
        taps *= sum(0 <= i * strides[d] - pads[d] + j * dilations[d] < size
                    for i in range(out) for j in range(w[2 + d]))
    return taps


def _optimized_ops(graph: bytes, threads: int) -> dict[str, float]:
    """How many of each op ONNX Runtime runs once it has optimized ``graph`` (``o_<op>``;
    ``o_nchwc_<op>`` for its NCHWc kernels and reorders)."""
    import os
    import tempfile

    import onnx
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    fd, path = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        opts.optimized_model_filepath = path
        ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        nodes = onnx.load(path).graph.node
    finally:
        os.unlink(path)
    out: dict[str, float] = {}
    for node in nodes:
        name = "o_" + ("nchwc_" if node.domain.endswith("nchwc") else "") + node.op_type
        out[name] = out.get(name, 0.0) + 1.0
    return out


def unit_features(fp32: bytes, timed: bytes, threads: int = 1) -> dict[str, float]:
    """A unit's features (see the module doc): counted from its float32 graph and from the
    optimized version of the graph the profile runs."""
    return {**_counted(fp32), **_optimized_ops(timed, threads), "units": 1.0}


class UnitTimer:
    """Times units under a profile: unit graph minus the Identity graph on the same input, all
    of a batch measured round robin (:func:`nasopt.hardware.latency.measure_graphs`)."""

    def __init__(self, profile: Profile):
        self.profile = profile
        self._baseline: dict[tuple[int, ...], float] = {}

    def __call__(self, unit: Unit) -> float:
        return self.time([unit], [unit_graphs(unit, self.profile.dtype)[1]])[0]

    def time(self, units_: Sequence[Unit], graphs: Sequence[bytes]) -> list[float]:
        from nasopt.hardware.latency import measure_graphs
        shapes = sorted({u.input_shape for u in units_} - set(self._baseline))
        timings = measure_graphs([*[_identity_graph(s) for s in shapes], *graphs],
                                 [*shapes, *[u.input_shape for u in units_]], self.profile)
        for shape, t in zip(shapes, timings):
            self._baseline[shape] = t.median_ms
        return [max(0.0, t.median_ms - self._baseline[u.input_shape])
                for u, t in zip(units_, timings[len(shapes):])]


#: a measurement of archs: archs -> their timings (the latency and how it was measured)
MeasureArchs = Callable[[Sequence[Arch]], list["Timing"]]


def measure_archs_fn(space, profile: Profile) -> MeasureArchs:  # noqa: ANN001
    """archs -> their timings, measured end to end (round robin, :mod:`nasopt.hardware.latency`)."""
    from nasopt.hardware.latency import measure_graphs, onnx_for

    def measure(archs: Sequence[Arch]) -> list[Timing]:
        graphs = []
        for arch in archs:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = _fresh(deployed_structure(space, arch))
            graphs.append(onnx_for(model, space.input_shape, profile.dtype))
        return measure_graphs(graphs, [space.input_shape] * len(graphs), profile)
    return measure


def measure_arch_fn(space, profile: Profile) -> Callable[[Arch], tuple[float, float]]:  # noqa: ANN001
    """arch -> (latency ms, relative IQR), measured end to end (:mod:`nasopt.hardware.latency`)."""
    many = measure_archs_fn(space, profile)

    def measure(arch: Arch) -> tuple[float, float]:
        t = many([arch])[0]
        return t.median_ms, t.relative_iqr
    return measure


def _batch(measure_arch: Callable[[Arch], tuple[float, float]] | None, space,  # noqa: ANN001
           profile: Profile) -> MeasureArchs:
    """A batch measurement: the profile's, or one from a per-arch function (tests)."""
    if measure_arch is None:
        return measure_archs_fn(space, profile)
    from nasopt.hardware.latency import Timing

    def measure(archs: Sequence[Arch]) -> list[Timing]:
        out = []
        for arch in archs:
            ms, iqr = measure_arch(arch)
            out.append(Timing(ms, ms * (1 - iqr / 2), ms * (1 + iqr / 2), 1, profile.threads))
        return out
    return measure


# ---- the table -----------------------------------------------------------------------------
@dataclass
class LatencyTable:
    space: dict[str, Any]  # the (sub-)space description it covers
    profile: dict[str, Any]
    entries: dict[str, float]  # unit key -> ms: the predictor's per-unit cost
    constant: float = 0.0
    #: unit position (module name) -> {"genes": [...], "keys": {"v1|v2": unit key}}
    positions: dict[str, dict[str, Any]] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    isolated: dict[str, float] = field(default_factory=dict)  # unit key -> ms, timed alone
    features: dict[str, dict[str, float]] = field(default_factory=dict)  # unit key -> features
    coefficients: dict[str, float] = field(default_factory=dict)  # feature -> ms per unit of it

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
        """Predicted latency (ms) = sum of the arch's unit entries + constant."""
        return self.entry_sum(space, arch) + self.constant

    def entry_sum(self, space, arch: Mapping[str, Value]) -> float:  # noqa: ANN001
        return sum(c for _, c in self.unit_costs(space, arch))

    def model_inputs(self) -> dict[str, dict[str, float]]:
        """Per unit key, what its entry is fitted on: its features and its isolated timing
        (``ISOLATED``); entry = sum of coefficients x these."""
        return {k: {**fv, ISOLATED: self.isolated[k]} for k, fv in self.features.items()}

    def isolated_sum(self, space, arch: Mapping[str, Value]) -> float:  # noqa: ANN001
        """Sum of the arch's units' isolated timings (ms)."""
        return sum(self.isolated[u.key] for u in units(space, space.validate(arch)))

    def predict_isolated(self, space, arch: Mapping[str, Value]) -> float | None:  # noqa: ANN001
        """The former predictor, for comparison: scale x sum of isolated timings + constant,
        fitted on the same archs (None when the table has no such fit)."""
        line = self.fit.get("isolated_line")
        return None if line is None else line[0] * self.isolated_sum(space, arch) + line[1]

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
            exists: Any = 1.0
            where = depth_position(name)
            if where is not None and where[0] in genes:
                depth, block = where
                exists = sum(p(depth, d) for d in genes[depth] if int(d) > block)
            cost: Any = 0.0
            for config, key in pos["keys"].items():
                weight: Any = 1.0
                for gene, value in zip(pos["genes"], json.loads(config)):
                    weight = weight * p(gene, value)
                cost = cost + weight * self.entries[key]
            total = total + exists * cost
        return total

    # -- files
    def save(self, path: str | Path) -> Path:
        from nasopt.core.checkpoint import atomic_write_bytes
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": LUT_VERSION, "space": self.space, "profile": self.profile,
                "constant_ms": self.constant, "coefficients_ms": self.coefficients,
                "fit": self.fit, "entries_ms": self.entries, "isolated_ms": self.isolated,
                "features": self.features, "positions": self.positions}
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
                   data["positions"], data.get("fit", {}), data.get("isolated_ms", {}),
                   data.get("features", {}), data.get("coefficients_ms", {}))


def table_path(run_dir: str | Path, space, profile: Profile) -> Path:  # noqa: ANN001
    """``run_dir/hardware/<space>-<profile>-<hash of sub-space and profile>.json``."""
    import hashlib
    blob = json.dumps({"space": space.describe(), "profile": profile.describe()},
                      sort_keys=True).encode()
    digest = hashlib.sha256(blob).hexdigest()[:10]
    return Path(run_dir) / "hardware" / f"{space.name}-{profile.name}-{digest}.json"


def distinct_archs(space, n: int, seed: int) -> list[Arch]:  # noqa: ANN001
    """``n`` random archs with distinct structures (fewer if the space has fewer)."""
    rng = random.Random(seed)
    archs, seen = [], set()
    for _ in range(50 * n):
        if len(archs) >= n:
            break
        arch = space.sample(rng)
        if structure_key(space, arch) not in seen:
            seen.add(structure_key(space, arch))
            archs.append(arch)
    return archs


def build_table(space, profile: Profile, *,  # noqa: ANN001
                time_unit: Callable[[Unit], float] | None = None,
                measure_arch: Callable[[Arch], tuple[float, float]] | None = None,
                features: Callable[[Unit], Mapping[str, float]] | None = None,
                fit_archs: int = FIT_ARCHS, seed: int = 0,
                log: Callable[[str], None] = lambda s: None) -> LatencyTable:
    """Profile every distinct unit of ``space`` once (features, isolated time), then fit the
    feature coefficients and the constant on ``fit_archs`` random archs measured end to end
    (see the module doc). ``time_unit`` / ``measure_arch`` / ``features`` default to ONNX
    Runtime timings under ``profile`` and the counted features (tests pass synthetic ones)."""
    if not profile.has_latency:
        raise NasoptError(f"profile {profile.name!r} has no latency metric (metrics.latency = "
                          f"\"none\"); a latency table needs e.g. --hardware cpu-ort")
    measure = _batch(measure_arch, space, profile)
    locals_ = local_genes(space)
    positions: dict[str, dict[str, Any]] = {}
    archs = covering_archs(space, locals_)
    log(f"latency table for {space.name} under {profile.name}: {len(archs)} covering archs")
    pending: dict[str, Unit] = {}
    for arch in archs:
        for u in units(space, arch):
            genes = locals_[u.name]
            pos = positions.setdefault(u.name, {"genes": genes, "keys": {}})
            pos["keys"][json.dumps([arch[g] for g in genes])] = u.key
            pending.setdefault(u.key, u)
    fit_set = distinct_archs(space, fit_archs, seed)
    feature_model = len(fit_set) >= 3
    log(f"{len(pending)} distinct units: features and isolated timings")
    isolated: dict[str, float] = {}
    feats: dict[str, dict[str, float]] = {}
    timer = UnitTimer(profile)
    items = list(pending.items())
    for start in range(0, len(items), 64):
        chunk = items[start:start + 64]
        graphs = ([] if time_unit is not None and (features is not None or not feature_model)
                  else [unit_graphs(u, profile.dtype) for _, u in chunk])
        if time_unit is not None:
            times = [float(time_unit(u)) for _, u in chunk]
        else:
            times = timer.time([u for _, u in chunk], [g[1] for g in graphs])
        for i, (key, u) in enumerate(chunk):
            isolated[key] = times[i]
            if features is not None:
                feats[key] = {k: float(v) for k, v in features(u).items()}
            elif feature_model:
                feats[key] = unit_features(*graphs[i], profile.threads)
        log(f"  {start + len(chunk)}/{len(items)} units")
    table = LatencyTable(space.describe(), profile.describe(), dict(isolated), 0.0, positions,
                         isolated=isolated, features=feats)
    # measured twice, in two passes, the lower kept (as validate() does: same estimator)
    passes = [np.array([t.median_ms for t in measure(fit_set)]) for _ in range(2 if fit_set
                                                                              else 0)]
    measured = np.minimum(*passes) if passes else np.zeros(0)
    log(f"  {len(fit_set)} fit archs measured twice")
    if feature_model:
        rows = [[u.key for u in units(space, a)] for a in fit_set]
        table.coefficients, table.constant, info = fit_features(table.model_inputs(), rows,
                                                                measured)
        table.entries = {k: sum(table.coefficients.get(f, 0.0) * v for f, v in fv.items())
                         for k, fv in table.model_inputs().items()}
        log(f"fitted {len(table.coefficients)} feature coefficients + constant "
            f"{table.constant * 1000:.2f} us on {info['used']} of {len(fit_set)} archs")
    else:  # too few archs for the feature model: isolated timings + the mean residual
        sums = np.array([table.entry_sum(space, a) for a in fit_set])
        table.constant = float(np.mean(measured - sums)) if len(fit_set) else 0.0
        info = {"model": "isolated unit timings + constant", "used": len(fit_set)}
    if feature_model:  # the isolated timings' best line on the same archs, for comparison
        iso = np.array([table.isolated_sum(space, a) for a in fit_set])
        info["isolated_line"] = list(fit_line(iso, measured))
    predicted = np.array([table.predict(space, a) for a in fit_set])
    residual = measured - predicted
    table.fit = {**info, "archs": len(fit_set), "seed": seed, "residual_rms_ms": float(
        np.sqrt(np.mean(residual ** 2))) if len(fit_set) else 0.0, "units": len(pending),
        # the machine's speed when the table was made: re-measured by validate() to see drift
        "references": [{"arch": dict(a), "ms": float(t)}
                       for a, t in zip(fit_set[:REFERENCES], measured)],
        "repeat_spread": float(np.median(np.abs(passes[0] - passes[1]) / np.maximum(
            (passes[0] + passes[1]) / 2, 1e-12))) if passes else None}
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


def fit_features(features: Mapping[str, Mapping[str, float]], rows: Sequence[Sequence[str]],
                 measured: np.ndarray) -> tuple[dict[str, float], float, dict[str, Any]]:
    """Coefficients (feature -> ms) and constant of ``measured[i] ~ sum over the units of arch i
    of coefficients . features + constant``, least squares on the relative error, features
    standardized (minimum norm where collinear; 0 for a feature without spread over the fit
    archs); one refit without outliers (relative residual > 4 x the median and > 5 %)."""
    names = sorted({f for fv in features.values() for f in fv})
    X = np.array([[sum(features[k].get(f, 0.0) for k in keys) for f in names] for keys in rows])
    scale = X.std(axis=0)
    # a feature every fit arch has the same amount of (one head, one stem) is the constant's:
    # coefficient 0, so that the constant is the fixed cost of every arch
    used = scale > 1e-12 * np.maximum(1.0, np.abs(X).max(axis=0))
    scale[~used] = 1.0
    A = np.c_[np.where(used, X / scale, 0.0), np.ones(len(rows))] / measured[:, None]
    keep = np.ones(len(rows), dtype=bool)
    for _ in range(2):
        solution, *_ = np.linalg.lstsq(A[keep], np.ones(keep.sum()), rcond=None)
        error = np.abs(A @ solution - 1)
        limit = max(4 * float(np.median(error[keep])), 0.05)
        if not (error > limit).any() or (error <= limit).sum() < len(names) + 1:
            break
        keep = error <= limit
    coefficients = {f: float(c) for f, c in zip(names, solution[:-1] / scale)}
    return coefficients, float(solution[-1]), {
        "model": "sum of unit entries (coefficients . features and isolated timing) + constant",
        "used": int(keep.sum()), "outliers": int((~keep).sum()), "features": len(names)}


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
    #: largest relative change (median over the table's reference archs) of their latency
    #: between the table's fit and the start / the end of this validation: the machine's speed
    #: drifting with its load
    drift: float = 0.0
    repeat_spread_p90: float = 0.0
    unconfirmed: float = 0.0  # share of timings without enough fast-mode windows
    fast_share: float = 1.0  # share of all windows taken in the CPU's fast mode
    #: the former predictor (scale x sum of isolated timings + constant, fitted on the same
    #: archs): its share within ±TOLERANCE, Kendall tau, median |error|
    isolated_within: float | None = None
    isolated_tau: float | None = None
    isolated_median_error: float | None = None

    @property
    def too_noisy(self) -> bool:
        """Repeat measurements differ by more than half the profile's noise threshold (median)
        or by more than it (90th percentile), their IQR exceeds it, the machine's speed drifted
        by more than half of it since the table was made, or more than 5 % of the timings never
        saw the CPU's fast mode: a ±10 % verdict is not trustworthy then."""
        return (self.repeat_spread > self.noise_threshold / 2
                or self.repeat_spread_p90 > self.noise_threshold
                or self.median_relative_iqr > self.noise_threshold
                or self.drift > self.noise_threshold / 2
                or self.unconfirmed > 0.05)

    def noise(self) -> str:
        return (f"repeat spread {self.repeat_spread:.1%} (p90 {self.repeat_spread_p90:.1%}), "
                f"relative IQR {self.median_relative_iqr:.1%}, speed drift since the table "
                f"was made {self.drift:.1%}, unconfirmed timings {self.unconfirmed:.0%}, "
                f"fast-mode windows {self.fast_share:.0%} (threshold "
                f"{self.noise_threshold:.0%})")

    def summary(self) -> str:
        verdict = (f"TOO NOISY TO TRUST: {self.noise()}; re-run on a quiet machine"
                   if self.too_noisy else f"measurement noise ok: {self.noise()}")
        return (f"{self.n} archs: {self.within:.1%} predicted within ±{TOLERANCE:.0%} of "
                f"measured, Kendall tau {self.tau:.3f}, median |error| "
                f"{self.median_abs_error:.1%}; {verdict}")


def validate(table: LatencyTable, space, profile: Profile, n: int = 100, seed: int = 1,  # noqa: ANN001
             measure_arch: Callable[[Arch], tuple[float, float]] | None = None,
             log: Callable[[str], None] = lambda s: None) -> Validation:
    """Predicted vs measured latency of ``n`` random archs (distinct structures; seed differs
    from the fit's), each measured twice, in two passes (see the module doc)."""
    from scipy.stats import kendalltau
    measure = _batch(measure_arch, space, profile)
    archs = distinct_archs(space, n, seed)
    references = table.fit.get("references") or []
    ref_archs = [space.validate(r["arch"]) for r in references]
    then = np.array([r["ms"] for r in references])

    def speed_change() -> float:  # median relative change of the references' latencies
        now = np.array([t.median_ms for t in measure(ref_archs)])
        return abs(float(np.median(now / then)) - 1)
    drifts = [speed_change()] if references else []
    first = measure(archs)
    log(f"  {len(archs)} archs measured once")
    second = measure(archs)
    log(f"  {len(archs)} archs measured twice")
    if references:
        drifts.append(speed_change())
    drift = max(drifts, default=0.0)
    rows, spreads, iqrs = [], [], []
    for arch, t1, t2 in zip(archs, first, second):
        a, b = t1.median_ms, t2.median_ms
        spreads.append(abs(a - b) / max((a + b) / 2, 1e-12))
        iqrs.append(min(t1.relative_iqr, t2.relative_iqr))
        rows.append((arch.key, table.predict(space, arch), min(a, b)))
    timings = [*first, *second]
    pred = np.array([r[1] for r in rows])
    meas = np.array([r[2] for r in rows])
    error = np.abs(pred - meas) / meas
    tau = float(kendalltau(pred, meas).statistic) if len(rows) > 1 else float("nan")
    windows = sum(t.windows for t in timings)
    iso = [table.predict_isolated(space, arch) for arch in archs]
    former: list[float | None] = [None, None, None]
    if iso and iso[0] is not None:
        iso_error = np.abs(np.array(iso) - meas) / meas
        former = [float(np.mean(iso_error <= TOLERANCE)),
                  float(kendalltau(iso, meas).statistic) if len(rows) > 1 else float("nan"),
                  float(np.median(iso_error))]
    return Validation(len(rows), float(np.mean(error <= TOLERANCE)),
                      tau if math.isfinite(tau) else float("nan"), float(np.median(error)),
                      float(np.median(spreads)), float(np.median(iqrs)),
                      profile.noise_threshold, rows, drift,
                      float(np.percentile(spreads, 90)),
                      float(np.mean([not t.confirmed for t in timings])),
                      sum(t.fast_windows for t in timings) / windows if windows else 1.0,
                      *former)
