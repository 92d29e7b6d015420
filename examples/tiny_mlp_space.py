"""TinyMLPSpace: a family of small MLPs, written outside nasopt as a user writes a space.

Any input shape (it is flattened): signals, images, a table's rows. Genes: ``depth`` (1-3 hidden
layers) and each hidden layer's width ``sN.width``; compression genes (bits per layer and for
the head, global sparsity, the head's rank) come from :func:`nasopt.compression_genes`.

    nasopt check-space examples/tiny_mlp_space.py:TinyMLPSpace
    nasopt search --space examples/tiny_mlp_space.py:TinyMLPSpace --dataset digits --max-size 2KB

What a space provides: ``architecture_genes`` (and optionally ``compression_genes``) and
``network(dims)``, a :class:`nasopt.ElasticNetwork` sized for ``dims`` and built from nasopt's
elastic layers, with ``configure(arch | None)`` (activate a subnet: the active depth and
widths; None: everything) and, optionally, ``sort_channels(optimizer)`` (reorder hidden units so
that every prefix keeps the most important ones). Module names group the compression genes:
``stages.<i>`` is group ``s<i+1>``, ``head`` is ``head``; the network-wide gene ``depth`` keeps
the first ``depth`` stages (docs/writing-a-space.md).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from nasopt import (
    ElasticLinear, ElasticNetwork, SearchSpace, compression_genes, importance, permute_,
)

LAYERS = 3
WIDTHS = (16, 32, 64)


class TinyMLP(ElasticNetwork):
    def __init__(self, in_features: int, num_classes: int, dims: Mapping[str, int]):
        super().__init__()
        depth = int(dims["depth"])
        widths = [int(dims[f"s{i}.width"]) for i in range(1, depth + 1)]
        sizes = [in_features, *widths]
        self.stages = nn.ModuleList(ElasticLinear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.head = ElasticLinear(sizes[-1], num_classes)
        self.active_depth: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(x, 1)
        for layer in self.stages[: self.active_depth or len(self.stages)]:
            x = torch.relu(layer(x))
        return self.head(x)

    def configure(self, arch: Mapping[str, int] | None) -> None:
        self.active_depth = None if arch is None else int(arch["depth"])
        for i, layer in enumerate(self.stages, start=1):
            layer.active_out = None if arch is None else int(arch[f"s{i}.width"])

    def sort_channels(self, optimizer: torch.optim.Optimizer | None) -> None:
        for i, layer in enumerate(self.stages):
            perm = torch.argsort(importance(layer), descending=True)
            permute_(layer.weight, perm, 0, optimizer)
            permute_(layer.bias, perm, 0, optimizer)
            after = self.stages[i + 1] if i + 1 < len(self.stages) else self.head
            permute_(after.weight, perm, 1, optimizer)


class TinyMLPSpace(SearchSpace):
    name = "tiny-mlp"
    input_rank = None  # any sample shape: flattened

    def architecture_genes(self) -> dict[str, tuple[int, ...]]:
        return {"depth": tuple(range(1, LAYERS + 1)),
                **{f"s{i}.width": WIDTHS for i in range(1, LAYERS + 1)}}

    def compression_genes(self) -> dict:
        return compression_genes([f"s{i}" for i in range(1, LAYERS + 1)] + ["head"], ["head"])

    def network(self, dims: Mapping[str, int]) -> nn.Module:
        return TinyMLP(math.prod(self.input_shape), self.num_classes, dims)
