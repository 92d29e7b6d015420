"""``nb201``: the NAS-Bench-201 cell space (Dong & Yang, ICLR 2020), 6 edges x 5 ops = 15,625 cells.

A cell is a DAG of 4 nodes; every edge ``node_j <- node_i`` (i < j) carries one op: ``none``
(zeros), ``skip_connect``, ``nor_conv_1x1``, ``nor_conv_3x3`` (ReLU-Conv-BN) or ``avg_pool_3x3``.
A node sums its incoming edges; the cell outputs node 3. One gene per edge: ``e1_0``, ``e2_0``,
``e2_1``, ``e3_0``, ``e3_1``, ``e3_2`` (``eJ_I`` = edge node_J <- node_I). Archs convert to and from
the NB201 string ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|`` with :func:`to_string` / :func:`from_string`.

``build(arch)`` is the real NB201 network (the benchmark's "TinyNetwork" / "InferCell"): a 3x3
stem conv with 16 channels + BN, three stages of 5 cells (16, 32, 64 channels) joined by residual
reduction blocks (stride 2), BN + ReLU, global average pooling and a linear classifier. Parameter
and MAC counts are therefore counted from the model, never looked up.

Two ways to search it: tabular mode, accuracy from a table of trained results (``nasopt search
--space nb201 --table PATH``); and gradient search (DARTS / GDAS) on :class:`Nb201Relaxation`, the
mixed-op supernet of :meth:`Nb201Space.relaxation` (a small width and depth train on a CPU), with
:func:`collapse_of`, the rule that flags DARTS's known collapse to parameter-free cells.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import Tensor, nn

from nasopt.core.arch import Arch, Value
from nasopt.core.errors import NasoptError
from nasopt.core.metrics import count_macs, count_params
from nasopt.core.space import Genes, SearchSpace

#: NB201's canonical op order (an op's index here is its index in the benchmark's own code)
OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
#: ops ranked by parameters and compute, to define the smallest and largest cell
OP_COST = {"none": 0, "skip_connect": 1, "avg_pool_3x3": 2, "nor_conv_1x1": 3, "nor_conv_3x3": 4}
NODES = 4
EDGES = tuple(f"e{j}_{i}" for j in range(1, NODES) for i in range(j))  # e1_0, e2_0, e2_1, ...
STEM_CHANNELS = 16
CIFAR10_SHAPE = (3, 32, 32)
CELLS_PER_STAGE = 5


def to_string(arch: Mapping[str, Value]) -> str:
    """The NB201 string of ``arch``, e.g. ``|nor_conv_3x3~0|+|skip_connect~0|none~1|+|...|``."""
    nodes = ["|" + "|".join(f"{arch[f'e{j}_{i}']}~{i}" for i in range(j)) + "|"
             for j in range(1, NODES)]
    return "+".join(nodes)


def from_string(text: str) -> Arch:
    """Parse an NB201 string into an arch (one gene per edge)."""
    example = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|none~1|none~2|"
    nodes = text.strip().split("+")
    genes: dict[str, Value] = {}
    if len(nodes) != NODES - 1:
        raise NasoptError(f"NB201 string {text!r} has {len(nodes)} nodes; it needs "
                          f"{NODES - 1} separated by '+', like {example}")
    for j, node in enumerate(nodes, start=1):
        edges = [e for e in node.strip().strip("|").split("|")]
        if len(edges) != j:
            raise NasoptError(f"node {j} of NB201 string {text!r} has {len(edges)} edges; it "
                              f"needs {j}, like {example}")
        for i, edge in enumerate(edges):
            op, sep, source = edge.partition("~")
            if not sep or source != str(i) or op not in OPS:
                raise NasoptError(f"bad edge {edge!r} in NB201 string {text!r}; write OP~{i} "
                                  f"with OP one of {', '.join(OPS)}")
            genes[f"e{j}_{i}"] = op
    return Arch(genes)


class ReLUConvBN(nn.Sequential):
    """NB201's conv op: ReLU -> Conv (no bias) -> BatchNorm (affine, as the benchmark trains)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1):
        super().__init__(nn.ReLU(), nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(cout))


class Zero(nn.Module):
    """The ``none`` op: zeros shaped like its input (NB201 multiplies by 0, which keeps NaNs)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mul(0.0)


def make_op(op: str, channels: int) -> nn.Module:
    # inside a cell every edge keeps the stage's channels and resolution, so no op needs the
    # 1x1 "preprocess" conv NB201 adds when channels change
    if op == "none":
        return Zero()
    if op == "skip_connect":
        return nn.Identity()
    if op == "nor_conv_1x1":
        return ReLUConvBN(channels, channels, 1)
    if op == "nor_conv_3x3":
        return ReLUConvBN(channels, channels, 3)
    if op == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    raise ValueError(f"unknown NB201 op {op!r}")


class Cell(nn.Module):
    def __init__(self, channels: int, dims: Mapping[str, Value]):
        super().__init__()
        self.edges = nn.ModuleDict({e: make_op(str(dims[e]), channels) for e in EDGES})

    def forward(self, x: Tensor) -> Tensor:
        nodes = [x]
        for j in range(1, NODES):
            nodes.append(sum(self.edges[f"e{j}_{i}"](nodes[i]) for i in range(j)))
        return nodes[-1]


class MixedOp(nn.Module):
    """DARTS's mixed op on one edge: ``sum_k p_k op_k(x)`` over the edge's options, one set of
    weights per op. Ops whose probability is exactly 0 are not run: with a hard (straight-through)
    one-hot only the chosen op runs, as in GDAS, and its gradient still reaches every logit through
    the softmax. ``none`` contributes zeros and is never run. ``aux_skip`` is DARTS-'s auxiliary
    skip connection: ``beta * x`` added to the mixture (0 = off)."""

    def __init__(self, channels: int, options: Sequence[Value]):
        super().__init__()
        self.options = tuple(str(o) for o in options)
        self.ops = nn.ModuleDict({o: make_op(o, channels) for o in self.options if o != "none"})

    def forward(self, x: Tensor, p: Tensor, aux_skip: float = 0.0) -> Tensor:
        if p.shape != (len(self.options),):
            raise ValueError(f"mixed op over {self.options} got probabilities shaped "
                             f"{tuple(p.shape)}")
        out = x.mul(aux_skip) if aux_skip else None
        for k, (op, nonzero) in enumerate(zip(self.options, (p != 0).tolist())):
            if op == "none" or not nonzero:
                continue
            term = p[k] * self.ops[op](x)
            out = term if out is None else out + term
        # only `none` (or all-zero weights): zeros that still carry the graph of p
        return x.mul(0.0) * p.sum() if out is None else out


class MixedCell(nn.Module):
    """An NB201 cell whose edges are :class:`MixedOp` s; ``forward(x, probs)`` with ``probs[edge]``
    over that edge's options."""

    def __init__(self, channels: int, options: Mapping[str, Sequence[Value]]):
        super().__init__()
        self.edges = nn.ModuleDict({e: MixedOp(channels, options[e]) for e in EDGES})
        self.aux_skip = 0.0

    def forward(self, x: Tensor, probs: Mapping[str, Tensor]) -> Tensor:
        nodes = [x]
        for j in range(1, NODES):
            nodes.append(sum(self.edges[f"e{j}_{i}"](nodes[i], probs[f"e{j}_{i}"],
                                                     self.aux_skip) for i in range(j)))
        return nodes[-1]


class ResidualReduction(nn.Module):
    """NB201's ResNetBasicblock with stride 2: two ReLU-Conv-BN 3x3 convs, and a shortcut of
    2x2 average pooling followed by a 1x1 conv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv_a = ReLUConvBN(cin, cout, 3, stride=2)
        self.conv_b = ReLUConvBN(cout, cout, 3)
        self.downsample = nn.Sequential(nn.AvgPool2d(2, stride=2),
                                        nn.Conv2d(cin, cout, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(x) + self.conv_b(self.conv_a(x))


class Nb201Network(nn.Module):
    """The NB201 skeleton around ``cell(width)`` modules: stem, three stages of
    ``cells_per_stage`` cells joined by residual reductions, BN + ReLU, pooling, classifier.

    With ``dims`` (one op per edge) the cells are discrete :class:`Cell` s: NB201's network at the
    default ``channels=16, cells_per_stage=5``. With ``mixed`` (options per edge) they are
    :class:`MixedCell` s and ``forward(x, probs)`` takes the op probabilities (the DARTS
    supernet, see :class:`Nb201Relaxation`). Module names are the same in both, except the
    mixed op's extra ``ops.<op>`` level, so weights copy from one to the other."""

    def __init__(self, in_channels: int, num_classes: int, dims: Mapping[str, Value] | None = None,
                 channels: int = STEM_CHANNELS, cells_per_stage: int = CELLS_PER_STAGE,
                 mixed: Mapping[str, Sequence[Value]] | None = None):
        super().__init__()
        if (dims is None) == (mixed is None):
            raise ValueError("give exactly one of dims (a discrete cell) or mixed (a mixed cell)")
        c = channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c))
        layers: list[nn.Module] = []
        for stage in range(3):
            width = c * 2 ** stage
            if stage > 0:
                layers.append(ResidualReduction(width // 2, width))
            layers += [Cell(width, dims) if dims is not None else MixedCell(width, mixed)
                       for _ in range(cells_per_stage)]
        self.cells = nn.Sequential(*layers)
        width = c * 4
        self.lastact = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU())
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor, probs: Mapping[str, Tensor] | None = None) -> Tensor:
        x = self.stem(x)
        for layer in self.cells:
            x = layer(x, probs) if isinstance(layer, MixedCell) else layer(x)
        x = self.lastact(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


#: ops without weights: a cell made of them cannot learn features (DARTS's collapse mode)
PARAMETER_FREE = ("none", "skip_connect", "avg_pool_3x3")
#: the collapse rule's thresholds (see :func:`collapse_of`)
COLLAPSE_SKIP_EDGES = 3
COLLAPSE_FREE_EDGES = 5


@dataclass(frozen=True)
class Collapse:
    """How far a cell (and, optionally, the op probabilities it was derived from) has gone toward
    parameter-free ops. ``collapsed`` applies the rule of :func:`collapse_of` to the derived cell."""

    skip_edges: int  # edges of the derived cell that are skip_connect
    free_edges: int  # edges of the derived cell that are parameter-free (none, skip, avg pool)
    free_mass: float | None  # mean over edges of the probability on parameter-free ops
    skip_mass: float | None  # mean over edges of the probability on skip_connect
    collapsed: bool

    def describe(self) -> str:
        mass = ("" if self.free_mass is None else
                f", parameter-free probability mass {self.free_mass:.2f} (skip {self.skip_mass:.2f})")
        verdict = "COLLAPSED" if self.collapsed else "not collapsed"
        return (f"{verdict}: {self.skip_edges}/6 edges skip_connect, {self.free_edges}/6 "
                f"parameter-free{mass}")


def collapse_of(arch: Mapping[str, Value], probs: Mapping[str, Tensor] | None = None, *,
                options: Mapping[str, Sequence[Value]] | None = None,
                skip_edges: int = COLLAPSE_SKIP_EDGES, free_edges: int = COLLAPSE_FREE_EDGES
                ) -> Collapse:
    """The collapse rule: a derived NB201 cell is *collapsed* when at least ``skip_edges`` (3) of
    its 6 edges are skip_connect, or at least ``free_edges`` (5) are parameter-free (none,
    skip_connect, avg_pool_3x3), i.e. at most one conv is left.

    The skip count follows DARTS+ (Liang et al. 2019, arXiv:1909.06035), which stops DARTS once
    skip connections take over a cell (2 of the 8 kept edges of a DARTS cell; half of NB201's 6
    edges here); the parameter-free count catches the other form of DARTS's collapse, to
    none/pooling. Dong & Yang (NAS-Bench-201, ICLR 2020) report DARTS converging to the all-skip
    cell (54.30% on CIFAR-10). In the CIFAR-10 table the rule flags 4,345 of the 15,625 cells,
    whose mean accuracy is 80.1% against 89.7% for the others. ``probs`` (per edge, over
    ``options[edge]``, default every op) adds the probability mass on parameter-free ops."""
    ops = [str(arch[e]) for e in EDGES]
    skips = sum(o == "skip_connect" for o in ops)
    free = sum(o in PARAMETER_FREE for o in ops)
    free_mass = skip_mass = None
    if probs is not None:
        free_total = skip_total = 0.0
        for e in EDGES:
            opts = [str(o) for o in (options[e] if options is not None else OPS)]
            p = probs[e].detach().float().cpu()
            free_total += float(sum(p[k] for k, o in enumerate(opts) if o in PARAMETER_FREE))
            skip_total += float(sum(p[k] for k, o in enumerate(opts) if o == "skip_connect"))
        free_mass, skip_mass = free_total / len(EDGES), skip_total / len(EDGES)
    return Collapse(skips, free, free_mass, skip_mass, skips >= skip_edges or free >= free_edges)


class Nb201Relaxation(nn.Module):
    """The DARTS supernet of NB201 (Liu et al. 2019; Dong & Yang 2020): every edge of every cell is
    a :class:`MixedOp` over the edge's options, all cells of the network sharing one set of
    architecture logits per edge (NB201's search setting). Implements nasopt.gradient.search's
    ``Relaxation`` protocol: ``genes``, ``weight_parameters()``, ``forward(x, probs)``,
    ``expected_cost(probs)``.

    ``channels`` / ``cells_per_stage`` size the skeleton (NB201: 16 and 5; a few channels and one
    cell per stage train on a CPU). ``expected_cost`` gives the expected params and MACs of the
    network this relaxation discretizes to (``discretize(arch)``): counted once per op from real
    networks on the meta device, exact at one-hot since every edge of a stage maps C channels to C
    at one resolution. ``aux_skip`` (DARTS-'s beta) adds ``beta * x`` to every mixed op."""

    def __init__(self, space: "Nb201Space", channels: int = STEM_CHANNELS,
                 cells_per_stage: int = CELLS_PER_STAGE):
        super().__init__()
        if channels < 1 or cells_per_stage < 1:
            raise NasoptError(f"the NB201 supernet needs channels >= 1 and cells_per_stage >= 1, "
                              f"got {channels} and {cells_per_stage}")
        if any(side % 4 for side in space.input_shape[1:]):
            raise NasoptError(f"the NB201 network halves the resolution twice: image sides must "
                              f"be multiples of 4, got {space.input_shape[1:]}; resize or crop "
                              f"the images (e.g. 28 -> 28, 14 -> 16)")
        self.space = space
        self.genes: dict[str, tuple] = {e: tuple(space.genes[e]) for e in EDGES}
        self.channels, self.cells_per_stage = channels, cells_per_stage
        self.net = Nb201Network(space.input_shape[0], space.num_classes, mixed=self.genes,
                                channels=channels, cells_per_stage=cells_per_stage)
        self._base, self._costs = self._count_costs()

    # ---- the Relaxation protocol -------------------------------------------------------------
    def weight_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def forward(self, x: Tensor, probs: Mapping[str, Tensor]) -> Tensor:
        return self.net(x, probs)

    def expected_cost(self, probs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Expected ``params``, ``macs`` (one sample) and ``size`` (float32 bytes: NB201 has no
        compression genes) of ``discretize(arch)`` under ``probs``; float64, differentiable."""
        out = {}
        for metric, base in self._base.items():
            device = probs[EDGES[0]].device
            total = torch.tensor(float(base), dtype=torch.float64, device=device)
            for e in EDGES:
                total = total + (probs[e].double() * self._costs[metric][e].to(device)).sum()
            out[metric] = total
        out["size"] = out["params"] * 4
        return out

    # ---- DARTS- ------------------------------------------------------------------------------
    @property
    def aux_skip(self) -> float:
        return next(m.aux_skip for m in self.net.modules() if isinstance(m, MixedCell))

    @aux_skip.setter
    def aux_skip(self, beta: float) -> None:
        for m in self.net.modules():
            if isinstance(m, MixedCell):
                m.aux_skip = float(beta)

    # ---- deriving and discretizing -------------------------------------------------------------
    def derive(self, probs: Mapping[str, Tensor]) -> Arch:
        """The discrete cell: the most probable option of every edge (DARTS's argmax; ``none``
        may win, as in NB201's protocol)."""
        return Arch({e: self.genes[e][int(torch.argmax(probs[e]))] for e in EDGES})

    def discretize(self, arch: Mapping[str, Value]) -> nn.Module:
        """The discrete network of ``arch`` at this relaxation's width and depth, with the chosen
        ops' weights (and BN statistics) copied from the supernet."""
        arch = self.space.validate(arch)
        net = self._discrete(arch).to(next(self.net.parameters()).device)
        state = self.net.state_dict()
        own = {}
        for name in net.state_dict():
            parts = name.split(".")
            if parts[0] == "cells" and parts[2] == "edges":  # cells.<i>.edges.<e>.<rest>
                parts[4:4] = ["ops", str(arch[parts[3]])]
            own[name] = state[".".join(parts)]
        net.load_state_dict(own)
        return net

    def _discrete(self, dims: Mapping[str, Value]) -> Nb201Network:
        return Nb201Network(self.space.input_shape[0], self.space.num_classes, dict(dims),
                            channels=self.channels, cells_per_stage=self.cells_per_stage)

    def _count_costs(self) -> tuple[dict[str, int], dict[str, dict[str, Tensor]]]:
        # params and MACs of real networks on the meta device (shapes only, no storage): the
        # all-none network, plus what one edge with op o adds (the same on every edge)
        def counts(dims: Mapping[str, Value]) -> dict[str, int]:
            with torch.device("meta"):
                model = self._discrete(dims)
            return {"params": count_params(model),
                    "macs": count_macs(model, self.space.input_shape)}

        base = counts({e: "none" for e in EDGES})
        added = {op: {m: v - base[m] for m, v in counts({**{e: "none" for e in EDGES},
                                                          EDGES[0]: op}).items()}
                 for op in OPS}
        costs = {m: {e: torch.tensor([float(added[str(o)][m]) for o in self.genes[e]],
                                     dtype=torch.float64, device="cpu") for e in EDGES}
                 for m in base}
        return base, costs


class Nb201Space(SearchSpace):
    """NAS-Bench-201 cells; the benchmark's networks take CIFAR-10 inputs: ``Nb201Space(CIFAR10_SHAPE,
    10)``."""

    name = "nb201"
    input_rank = 3
    #: no weight-sharing supernet: search it in tabular mode (api.search checks this flag)
    weight_sharing = False
    #: input shape and classes of the networks whose trained results the tables hold (CIFAR-10)
    table_input = (CIFAR10_SHAPE, 10)

    def architecture_genes(self) -> Genes:
        # NB201's canonical op order rather than "smallest first": ops have no natural order,
        # and keeping the benchmark's indices avoids a translation table
        return {e: OPS for e in EDGES}

    def full_genes(self) -> Genes:
        # no compression genes: the tabulated accuracies are those of float32 networks
        return self.architecture_genes()

    def network(self, dims: Mapping[str, Value]) -> nn.Module:
        return Nb201Network(self.input_shape[0], self.num_classes, dims)

    def largest(self) -> Arch:
        return Arch({g: max(opts, key=OP_COST.__getitem__) for g, opts in self.genes.items()})

    def smallest(self) -> Arch:
        return Arch({g: min(opts, key=OP_COST.__getitem__) for g, opts in self.genes.items()})

    def arch_string(self, arch: Mapping[str, Value]) -> str:
        """The NB201 string of ``arch`` (checked against this space): the key of a table row."""
        return to_string(self.validate(arch))

    def count_key(self, arch: Mapping[str, Value]) -> str:
        """Archs with equal keys have equal params and MACs: the ops of the 6 edges as a sorted
        multiset. Every edge maps a stage's channels to themselves at one resolution, so an op
        costs the same on any edge; counters may cache by this key (210 keys, not 15,625)."""
        arch = self.validate(arch)
        return ",".join(sorted(str(arch[e]) for e in EDGES))

    def parse_arch(self, text: str) -> Arch:
        """The arch of an NB201 string, checked against this (possibly restricted) space."""
        return self.validate(from_string(text))

    def relaxation(self, channels: int = STEM_CHANNELS,
                   cells_per_stage: int = CELLS_PER_STAGE) -> Nb201Relaxation:
        """The DARTS supernet (mixed op per edge) for gradient search; see
        :class:`Nb201Relaxation`."""
        return Nb201Relaxation(self, channels, cells_per_stage)

    def supernet(self) -> NoReturn:
        """Not available: refuses with the ways to search this space instead.

        nasopt's shared supernet slices one network's tensors by width and kernel size; an NB201
        edge chooses between different ops, which needs separate weights per op: the mixed-op
        supernet of :meth:`relaxation`, searched by gradient (DARTS / GDAS).
        """
        raise NasoptError(
            "space 'nb201' has no width/kernel-slicing supernet (its edges choose between "
            "different ops); search it in tabular mode: nasopt search --space nb201 --table "
            "[PATH.csv], or by gradient on its mixed-op supernet: nasopt bench darts-nb201")
