"""Peak activation memory (SRAM) of a deployed model at a data type, from a liveness analysis.

The model is traced with ``torch.fx`` (its elastic layers made plain first) and its tensors' shapes
propagated for one sample (batch 1). Walking the graph in execution order, every op either

- **aliases** its input (views: flatten/reshape/view/squeeze, ``nn.Identity`` such as a folded
  BatchNorm, dropout): no new buffer;
- works **in place** (element-wise: ReLU/ReLU6/hardtanh/sigmoid, add/mul): it reuses the buffer of
  an input of the same size whose last use is this op (a residual add writes into the branch
  output; a ReLU whose input is still needed elsewhere gets a new buffer);
- or **allocates** a new buffer (convolutions, linear layers, pooling, means: their input is
  still being read while the output is written).

A buffer lives from the op that allocates it to the last op reading it or any alias of it; the
network input is a buffer from the start, the output lives to the end. The peak is the largest
sum of live buffers at any op. So a residual block's skip input stays alive while the block
computes (MobileNet's inverted residual peaks at skip + expanded + depthwise output), and a plain
chain of convs peaks at input + output of its largest layer: the arena a microcontroller runtime
(TFLite Micro, CMSIS-NN) needs, with activations fused into their conv.

Bytes per element follow the profile's data type (``DTYPE_BYTES``). Weights are not counted here:
they live in flash (the packed file, :mod:`nasopt.compression.packed`).
"""
from __future__ import annotations

import itertools
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from nasopt.core.arch import Value
from nasopt.compression.compress import Policy, compressed_structure
from nasopt.core.errors import NasoptError
from nasopt.supernet.network import depth_position, is_depth_gene

DTYPE_BYTES = {"fp32": 4, "int8": 1}

_ALIAS_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_ALIAS_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous"}
_ALIAS_MODULES = (nn.Identity, nn.Dropout, nn.Flatten)
_INPLACE_FUNCTIONS = {F.relu, F.relu6, F.hardtanh, F.sigmoid, F.silu, torch.relu, torch.sigmoid,
                      torch.add, torch.mul, operator.add, operator.mul, operator.iadd}
_INPLACE_METHODS = {"relu", "relu_", "add", "add_", "mul", "mul_", "sigmoid", "clamp"}
_INPLACE_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Sigmoid, nn.SiLU,
                    nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class Step:
    """One op of the walk: its name, the bytes of the buffers live while it runs, and, for a
    module call that allocates its output (a conv, a linear layer), the module's path."""

    op: str
    live_bytes: int
    module: str | None = None


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise NasoptError(f"unknown data type {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def _kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, _ALIAS_MODULES):
            return "alias"
        return "inplace" if isinstance(module, _INPLACE_MODULES) else "new"
    if node.op == "call_function":
        if node.target in _ALIAS_FUNCTIONS:
            return "alias"
        return "inplace" if node.target in _INPLACE_FUNCTIONS else "new"
    if node.op == "call_method":
        if node.target in _ALIAS_METHODS:
            return "alias"
        return "inplace" if node.target in _INPLACE_METHODS else "new"
    return "new"


def trace(model: nn.Module, input_shape: Sequence[int], dtype: str = "int8") -> list[Step]:
    """Live activation bytes at each op of ``model`` for one sample shaped ``input_shape``."""
    from nasopt.deploy.onnx import plain
    size_of = dtype_bytes(dtype)
    try:
        gm = fx.symbolic_trace(plain(model))
    except Exception as exc:  # data-dependent control flow and the like
        raise NasoptError(f"cannot trace the model for the memory analysis ({type(exc).__name__}:"
                          f" {str(exc)[:200]}); the space's network must be fx-traceable") from None
    ShapeProp(gm).propagate(torch.zeros((1, *input_shape)))
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    buffer_of: dict[fx.Node, int] = {}  # node -> buffer id
    sizes: list[int] = []
    members: list[list[fx.Node]] = []  # nodes whose value lives in each buffer
    born: list[int] = []

    def last_use(b: int) -> int:
        end = max(index[m] for m in members[b])
        for m in members[b]:
            for user in m.users:
                end = max(end, len(nodes) if user.op == "output" else index[user])
        return end

    def tensor_numel(node: fx.Node) -> int | None:
        meta = node.meta.get("tensor_meta")
        return None if meta is None or not hasattr(meta, "shape") else int(meta.shape.numel())

    for i, node in enumerate(nodes):
        numel = tensor_numel(node)
        if node.op in ("output", "get_attr") or numel is None:
            continue
        inputs = [a for a in node.all_input_nodes if a in buffer_of]
        kind = _kind(gm, node) if node.op != "placeholder" else "new"
        target = None
        if kind == "alias" and inputs:
            target = buffer_of[inputs[0]]
        elif kind == "inplace":
            target = next((buffer_of[a] for a in inputs
                           if sizes[buffer_of[a]] == numel * size_of
                           and last_use(buffer_of[a]) == i), None)
        if target is None:
            target = len(sizes)
            sizes.append(numel * size_of)
            members.append([])
            born.append(i)
        buffer_of[node] = target
        members[target].append(node)
    ends = [last_use(b) for b in range(len(sizes))]
    steps = []
    for i, node in enumerate(nodes):
        if node.op in ("output", "get_attr", "placeholder") or node not in buffer_of:
            continue
        live = sum(s for s, b0, e in zip(sizes, born, ends) if b0 <= i <= e)
        allocating = node.op == "call_module" and born[buffer_of[node]] == i
        steps.append(Step(node.name, live, str(node.target) if allocating else None))
    return steps


def peak_bytes(model: nn.Module, input_shape: Sequence[int], dtype: str = "int8") -> int:
    """Peak activation memory of ``model`` at ``dtype`` for batch 1 (see the module doc)."""
    steps = trace(model, input_shape, dtype)
    return max(s.live_bytes for s in steps) if steps else 0


def structure_key(space, arch: Mapping[str, Value]) -> str:  # noqa: ANN001
    """What activation memory (and latency) depends on: the architecture genes and the low-rank
    ratios (factorized layers add a tensor); not bit-widths, quantizers or sparsity (dense
    kernels)."""
    return ",".join(f"{g}={v}" for g, v in arch.items()
                    if not g.endswith((".bits", ".quant")) and g != "sparsity")


def deployed_structure(space, arch: Mapping[str, Value]) -> nn.Module:  # noqa: ANN001
    """The deployed (BN-folded, factorized) model of ``arch``, random weights: what is run."""
    arch = space.validate(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = space.build(arch)
    return compressed_structure(model, Policy.from_arch(arch), space.group_of).eval()


def arch_peak_bytes(space, arch: Mapping[str, Value], dtype: str = "int8") -> int:  # noqa: ANN001
    """Peak activation memory of ``arch``'s deployed model at ``dtype``."""
    return peak_bytes(deployed_structure(space, arch), space.input_shape, dtype)


class ExpectedPeak:
    """A differentiable stand-in for the peak activation memory of a space's archs when each gene
    is drawn independently (gradient search's SRAM cost), exact at a point mass. Live bytes only
    grow when a buffer is allocated, so the peak is reached at an allocating op; the allocating
    module calls (convs, linear layers) have stable names (module paths) across archs. For each
    of them the genes its live bytes depend on are found by varying one gene at a time from a
    base arch (every stage at its largest depth, so every block exists) and from the base with
    one other gene changed (a dependency hidden at one base shows at another; one that shows only
    with two other genes changed, as in a head that follows a network-wide depth, is not found:
    a space's relaxation checks exactness against brute force), and its live bytes are
    tabulated over the joint options of those genes (0 where the module does not exist, e.g. the
    factors of a full-rank layer); a module that a depth gene switches off
    (:func:`nasopt.supernet.network.depth_position`: block j of a stage, or stage j under a
    network-wide depth) exists with probability P(depth > j). The cost is the largest expected
    live bytes over those modules: max_m E[live_m] (a lower bound of E[max], equal to the peak
    at a one-hot; a test checks it against :func:`arch_peak_bytes` for random archs)."""

    def __init__(self, space, dtype: str = "int8", fixed: Mapping[str, Value] | None = None):  # noqa: ANN001
        self.space, self.dtype = space, dtype
        self.fixed = dict(fixed or {})
        self.genes = {g: tuple(o) for g, o in space.genes.items() if g not in self.fixed}
        varied = [g for g in self.genes if not g.endswith(".bits") and not is_depth_gene(g)
                  and g != "sparsity" and len(self.genes[g]) > 1]
        base = {g: (max(o) if is_depth_gene(g) else o[0]) for g, o in space.genes.items()}
        base.update(self.fixed)
        cache: dict[str, dict[str, int]] = {}

        def live(arch: Mapping[str, Value]) -> dict[str, int]:
            arch = space.validate(arch)
            if arch.key not in cache:
                steps = trace(deployed_structure(space, arch), space.input_shape, dtype)
                cache[arch.key] = {st.module: st.live_bytes for st in steps if st.module}
            return cache[arch.key]

        # one gene varied at a time, from the base and from the base with any other gene at any
        # option (a dependency can hide at one base: a layer absent at one rank ratio)
        bases = [base] + [{**base, h: o} for h in varied for o in self.genes[h]]
        modules: set[str] = set()
        deps_of: dict[str, set[str]] = {}
        for b in bases:
            for g in varied:
                found = [live({**b, g: o}) for o in self.genes[g]]
                for f in found:
                    modules |= set(f)
                for m in set().union(*found):
                    if len({f.get(m, 0) for f in found}) > 1:
                        deps_of.setdefault(m, set()).add(g)
        #: module -> (genes, its live bytes over their joint options)
        self.tables: dict[str, tuple[list[str], torch.Tensor]] = {}
        for m in sorted(modules):
            deps = [g for g in varied if g in deps_of.get(m, ())]
            table = torch.zeros([len(self.genes[g]) for g in deps])
            for idx in itertools.product(*(range(len(self.genes[g])) for g in deps)):
                combo = {g: self.genes[g][i] for g, i in zip(deps, idx)}
                table[idx] = float(live({**base, **combo}).get(m, 0))
            self.tables[m] = (deps, table)

    def __call__(self, probs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """max over allocating modules of the expected live bytes under ``probs`` (per gene, over
        its options in the space's order; genes not given: first option)."""
        device = next(iter(probs.values())).device if probs else torch.device("cpu")

        def p(g: str) -> torch.Tensor:
            if g in probs:
                return probs[g]
            return F.one_hot(torch.tensor(0, device=device), len(self.genes[g])).float()

        values = []
        for m, (deps, table) in self.tables.items():
            e = table.to(device)
            for g in reversed(deps):  # contract the last axis with its gene's probabilities
                e = e @ p(g).to(e.dtype)
            where = depth_position(m)
            if where is not None and where[0] in self.genes:
                depth, position = where
                opts = self.genes[depth]
                e = e * sum(p(depth)[i] for i, d in enumerate(opts) if int(d) > position)
            values.append(e)
        return torch.stack(values).max()
