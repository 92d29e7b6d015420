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

The space has no weight-sharing supernet in nasopt (see :meth:`Nb201Space.supernet`): accuracy
comes from a table of trained results (``nasopt search --space nb201 --table PATH``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NoReturn

import torch
from torch import Tensor, nn

from nasopt.arch import Arch, Value
from nasopt.errors import NasoptError
from nasopt.space import Genes, SearchSpace

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
    def __init__(self, in_channels: int, num_classes: int, dims: Mapping[str, Value]):
        super().__init__()
        c = STEM_CHANNELS
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c))
        layers: list[nn.Module] = []
        for stage in range(3):
            width = c * 2 ** stage
            if stage > 0:
                layers.append(ResidualReduction(width // 2, width))
            layers += [Cell(width, dims) for _ in range(CELLS_PER_STAGE)]
        self.cells = nn.Sequential(*layers)
        width = c * 4
        self.lastact = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU())
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.lastact(self.cells(self.stem(x)))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


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

    def supernet(self) -> NoReturn:
        """Not available: refuses with the way to search this space instead.

        nasopt's shared supernet slices one network's tensors by width and kernel size; an NB201
        edge chooses between different ops, which needs separate weights per op (a mixed-op
        supernet) and CIFAR-10 training data, neither of which nasopt has yet.
        """
        raise NasoptError(
            "space 'nb201' has no weight-sharing supernet in nasopt (its edges choose between "
            "different ops, which the width/kernel-slicing supernet cannot share); search it in "
            "tabular mode: nasopt search --space nb201 --table [PATH.csv]")
