"""``conv1d``: 1-D CNNs for signals such as MNIST-1D.

Three stages; each stage's first block halves the length (stride 2), further blocks are residual.
A block is conv -> BatchNorm -> ReLU. The head flattens (channels x length) into a linear layer,
like the reference MNIST-1D CNN (3 conv layers of 25 channels + linear, 5,210 parameters).

Genes per stage ``sN``: ``depth`` (blocks), ``k`` (kernel, centre-cropped from 7), ``width``
(channels, the most L1-important ones: structured pruning). Compression genes: ``sN.bits`` and
``head.bits`` (weight bit-width, 32 = float), ``sN.quant`` and ``head.quant`` (``uniform`` or
``codebook`` quantization), ``sparsity`` (global magnitude pruning), ``head.rank`` (low-rank ratio
of the linear head) and ``sN.rank`` (of each stage's convolutions: a k-tap conv into ``r``
channels, then a 1x1 conv).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nasopt.core.arch import Value
from nasopt.compression.compress import compression_genes
from nasopt.core.metrics import shape_count_key
from nasopt.core.space import Genes, SearchSpace
from nasopt.supernet.elastic import (
    ElasticBatchNorm1d, ElasticConv1d, ElasticLinear, Supernet, importance, permute_, permute_bn_,
)
from nasopt.supernet.network import ElasticNetwork

STAGES = 3
DEPTHS = (1, 2, 3)
KERNELS = (3, 5, 7)
WIDTHS = (8, 16, 24, 32)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int):
        super().__init__()
        self.conv = ElasticConv1d(cin, cout, k, stride)
        self.bn = ElasticBatchNorm1d(cout)
        self.residual = stride == 1

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.conv(x)))
        return x + out if self.residual else out


class Stage(nn.Module):
    def __init__(self, cin: int, width: int, depth: int, k: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            [Block(cin if i == 0 else width, width, k, 2 if i == 0 else 1) for i in range(depth)])
        self.active_depth: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks[: self.active_depth or len(self.blocks)]:
            x = block(x)
        return x


class Conv1dNet(ElasticNetwork):
    def __init__(self, in_channels: int, length: int, num_classes: int, dims: Mapping[str, Value]):
        super().__init__()
        stages, cin = [], in_channels
        for s in range(1, STAGES + 1):
            width = int(dims[f"s{s}.width"])
            stages.append(Stage(cin, width, int(dims[f"s{s}.depth"]), int(dims[f"s{s}.k"])))
            cin = width
        self.stages = nn.ModuleList(stages)
        # a stage computes the same function when its genes and those of the stages before it
        # are the same (ElasticNetwork.parts)
        self._part_keys = [tuple((f"s{i}.{g}", dims[f"s{i}.{g}"]) for i in range(1, s + 1)
                                 for g in ("depth", "k", "width"))
                           for s in range(1, STAGES + 1)]
        self.out_length = _out_length(length)
        self.head = ElasticLinear(cin * self.out_length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.head(torch.flatten(x, 1))

    def parts(self) -> list[tuple[tuple, nn.Module, nn.Module]]:
        return [(key, stage, stage) for key, stage in zip(self._part_keys, self.stages)]

    def configure(self, arch: Mapping[str, Value] | None) -> None:
        for s, stage in enumerate(self.stages, start=1):
            stage.active_depth = None if arch is None else int(arch[f"s{s}.depth"])
            for block in stage.blocks:
                block.conv.active_out = None if arch is None else int(arch[f"s{s}.width"])
                block.conv.active_k = None if arch is None else int(arch[f"s{s}.k"])

    def sort_channels(self, optimizer: torch.optim.Optimizer | None) -> None:
        # A stage's channels are shared along its residual chain: one permutation per stage.
        for s, stage in enumerate(self.stages):
            blocks = list(stage.blocks)
            perm = torch.argsort(sum(importance(b.conv) for b in blocks), descending=True)
            for i, b in enumerate(blocks):
                permute_(b.conv.weight, perm, 0, optimizer)
                if i > 0:
                    permute_(b.conv.weight, perm, 1, optimizer)
                permute_bn_(b.bn, perm, optimizer)
            if s + 1 < len(self.stages):
                permute_(self.stages[s + 1].blocks[0].conv.weight, perm, 1, optimizer)
            else:
                permute_(self.head.weight, perm, 1, optimizer, group=self.out_length)


def _out_length(length: int) -> int:
    for _ in range(STAGES):
        length = (length - 1) // 2 + 1  # stride 2, padding k // 2, odd k
    return length


class Conv1dSpace(SearchSpace):
    name = "conv1d"
    input_rank = 2

    def architecture_genes(self) -> Genes:
        genes: Genes = {}
        for s in range(1, STAGES + 1):
            genes[f"s{s}.depth"] = DEPTHS
            genes[f"s{s}.k"] = KERNELS
            genes[f"s{s}.width"] = WIDTHS
        return genes

    def compression_genes(self) -> Genes:
        # bits and quantizer per stage and for the head; the head (a linear layer) and each
        # stage's convs may be low rank (head.rank first: the order packed files were written in)
        stages = [f"s{s}" for s in range(1, STAGES + 1)]
        return compression_genes(stages + ["head"], ["head", *stages])

    def opt_in_genes(self) -> dict[str, Value]:
        # the stage convolutions' rank too: searched when a restriction asks for it
        return {**super().opt_in_genes(),
                **{f"s{s}.rank": 1.0 for s in range(1, STAGES + 1) if self.compression}}

    def count_key(self, arch: Mapping[str, Value]) -> str:
        return shape_count_key(self.validate(arch))

    def network(self, dims: Mapping[str, Value]) -> nn.Module:
        channels, length = self.input_shape
        return Conv1dNet(channels, length, self.num_classes, dims)

    def relax(self, supernet: Supernet, sparsity: float | None = None, latency: Any = None,
              sram_dtype: str | None = None) -> nn.Module:
        """The relaxed conv1d supernet for gradient search (DARTS, GDAS)."""
        from nasopt.gradient.relaxation import Conv1dRelaxation
        return Conv1dRelaxation(self, supernet, sparsity, latency, sram_dtype)
