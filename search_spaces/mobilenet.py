"""``mobilenet``: MobileNetV2-style image networks (digits, Fashion-MNIST, user images).

A stem (3x3 conv) and three stages of inverted-residual blocks: 1x1 expand -> kxk depthwise ->
1x1 project, each followed by BatchNorm (ReLU6 after the first two). A stage's first block may
downsample (stride 2 while the feature map is larger than 4x4) and changes width; further blocks
are residual. The head is global average pooling and a linear classifier.

Large inputs (side >= ``STEM_STRIDE_FROM`` = 16, e.g. Fashion-MNIST's 28x28) are halved after the
stem (28 -> 14 -> 7 -> 4 -> 4: about 4x fewer MACs in every later layer; a supernet training
step about 6x faster on 28x28, 1 thread). The gene ``stem.pool`` says how: 2 (the default) runs
the stem at full resolution and takes the maximum of each 2x2 window, 1 runs it at stride 2.
Trained alone for 8 epochs on Fashion-MNIST, the max-pooled stem gave 0.8-0.9 points more
validation accuracy (largest subnet 91.6 against 90.8 %; a 10K-parameter subnet 91.1 against
90.2 %) for about 20 % more training time; a learned stride-2 depthwise conv in its place
gave nothing (90.2 %). ``stem.pool=1`` is what models saved before the gene existed use
(:meth:`MobileNetSpace.gene_defaults`). Smaller inputs (digits 8x8) keep their resolution
and have no ``stem.pool`` gene. Every input runs channels-last after the stem: on CPU the
depthwise convolutions' backward pass is 2-5x faster in that memory format, BatchNorm on small
maps 2-4x, and training computes the 1x1 convolutions as matrix products over the channels
(:func:`nasopt.supernet.elastic.pointwise_matmul`); same results, ONNX ignores the format.

Genes: ``stem.width`` (and ``stem.pool`` for large inputs, an opt-in gene: one value unless
restricted to both); per stage ``sN``: ``depth`` {1,2,3}, ``k`` {3,5,7} (centre-cropped shared
kernels), ``expand`` (hidden = expand x input channels), ``width`` (output channels). Every
channel choice keeps the most L1-important channels (structured pruning). Compression genes:
``stem.bits``, ``sN.bits``, ``head.bits``, ``stem.quant``, ``sN.quant``, ``head.quant``
(``uniform`` or ``codebook``), ``sparsity``, and ``sN.rank`` / ``head.rank`` (low-rank ratio of
the 1x1 convs of a stage, of the linear head).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nasopt.core.arch import Value
from nasopt.compression.compress import compression_genes
from nasopt.core.errors import NasoptError
from nasopt.core.metrics import shape_count_key
from nasopt.core.space import Genes, SearchSpace
from nasopt.supernet.elastic import (
    ElasticBatchNorm2d, ElasticConv2d, ElasticLinear, dense_depthwise_follows, importance,
    permute_, permute_bn_,
)
from nasopt.supernet.network import ElasticNetwork

STEM_WIDTHS = (8, 16)
DEPTHS = (1, 2, 3)
KERNELS = (3, 5, 7)
EXPANDS = (2, 3, 4)
WIDTHS = ((8, 12, 16), (16, 24, 32), (24, 32, 48))


#: inputs at least this large are halved after the stem (28x28 -> 14x14); smaller ones (digits
#: 8x8) keep their resolution
STEM_STRIDE_FROM = 16
#: ``stem.pool``: 1: the stem conv at stride 2; 2: the stem conv at stride 1, then 2x2 max pooling
#: (ceil mode: the same map size as stride 2)
STEM_POOLS = (1, 2)


def halves_input(size: int) -> bool:
    return size >= STEM_STRIDE_FROM


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int, residual: bool):
        super().__init__()
        hidden = cin * expand
        self.expand = ElasticConv2d(cin, hidden, 1)
        self.bn1 = ElasticBatchNorm2d(hidden)
        self.dw = ElasticConv2d(hidden, hidden, k, stride, depthwise=True)
        self.bn2 = ElasticBatchNorm2d(hidden)
        self.project = ElasticConv2d(hidden, cout, 1)
        self.bn3 = ElasticBatchNorm2d(cout)
        # decided by position, not by sizes: a subnet must keep the supernet's topology
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        # a training step whose depthwise conv takes the dense form keeps the hidden maps
        # channel-major, the layout of its per-channel product: no layout copies around it
        if (self.training and torch.is_grad_enabled() and isinstance(self.expand, ElasticConv2d)
                and dense_depthwise_follows(self.dw, x)):  # not a factorized or plain layer
            out = F.relu6(self.bn1(self.expand(x, channel_major_out=True)))
        else:
            out = F.relu6(self.bn1(self.expand(x)))
        out = F.relu6(self.bn2(self.dw(out)))
        out = self.bn3(self.project(out))
        return x + out if self.residual else out


class Stage(nn.Module):
    def __init__(self, cin: int, width: int, depth: int, expand: int, k: int, stride: int):
        super().__init__()
        self.blocks = nn.ModuleList([
            InvertedResidual(cin if i == 0 else width, width, expand, k, stride if i == 0 else 1,
                             residual=i > 0)
            for i in range(depth)])
        self.active_depth: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks[: self.active_depth or len(self.blocks)]:
            x = block(x)
        return x


class MobileNet(ElasticNetwork):
    def __init__(self, in_channels: int, size: int, num_classes: int, dims: Mapping[str, Value]):
        super().__init__()
        stem = int(dims["stem.width"])
        halve = halves_input(size)
        #: 2x2 max pooling after the stem (stem.pool = 2) or a stride-2 stem (1); None: neither
        self.pool = self._built_pool = int(dims.get("stem.pool", 1)) if halve else None
        self.stem = ElasticConv2d(in_channels, stem, 3, 2 if self.pool == 1 else 1)
        size = (size - 1) // 2 + 1 if halve else size
        self.stem_bn = ElasticBatchNorm2d(stem)
        # channels-last after the stem: depthwise backward and BatchNorm on CPU are faster so
        self.channels_last = True
        stages, cin = [], stem
        for s in range(1, len(WIDTHS) + 1):
            stride = 2 if size > 4 else 1
            size = (size - 1) // stride + 1
            width = int(dims[f"s{s}.width"])
            stages.append(Stage(cin, width, int(dims[f"s{s}.depth"]), int(dims[f"s{s}.expand"]),
                                int(dims[f"s{s}.k"]), stride))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.head = ElasticLinear(cin, num_classes)
        # the stem, then each stage, computes the same function when its genes and those of
        # the parts before it are the same (ElasticNetwork.parts)
        keys = [(("stem.width", dims["stem.width"]),
                 *((("stem.pool", self.pool),) if self.pool is not None else ()))]
        for s in range(1, len(WIDTHS) + 1):
            keys.append(keys[-1] + tuple((f"s{s}.{g}", dims[f"s{s}.{g}"])
                                         for g in ("depth", "k", "expand", "width")))
        self._part_keys = keys

    def _stem(self, x: Tensor) -> Tensor:
        x = F.relu6(self.stem_bn(self.stem(x)))
        if self.pool == 2:
            x = F.max_pool2d(x, 2, ceil_mode=True)
        if self.channels_last:  # the later convs keep the memory format of their input
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self._stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean(dim=(2, 3)))

    def parts(self) -> list[tuple[tuple, object, nn.Module]]:
        return [(self._part_keys[0], self._stem, self.stem_bn),
                *((key, stage, stage) for key, stage in zip(self._part_keys[1:], self.stages))]

    def configure(self, arch: Mapping[str, Value] | None) -> None:
        full = arch is None
        if self.pool is not None:  # both stems share the conv's weights
            self.pool = self._built_pool if full else int(arch.get("stem.pool", self._built_pool))
            self.stem.stride = (2, 2) if self.pool == 1 else (1, 1)
        self.stem.active_out = None if full else int(arch["stem.width"])
        cin = None if full else int(arch["stem.width"])
        for s, stage in enumerate(self.stages, start=1):
            stage.active_depth = None if full else int(arch[f"s{s}.depth"])
            for block in stage.blocks:
                if full:
                    block.expand.active_out = block.dw.active_k = block.project.active_out = None
                    continue
                block.expand.active_out = cin * int(arch[f"s{s}.expand"])
                block.dw.active_k = int(arch[f"s{s}.k"])
                block.project.active_out = cin = int(arch[f"s{s}.width"])

    def sort_channels(self, optimizer: torch.optim.Optimizer | None) -> None:
        # hidden channels of each block: expand out -> depthwise -> project in
        for stage in self.stages:
            for b in stage.blocks:
                perm = torch.argsort(importance(b.expand), descending=True)
                permute_(b.expand.weight, perm, 0, optimizer)
                permute_bn_(b.bn1, perm, optimizer)
                permute_(b.dw.weight, perm, 0, optimizer)
                permute_bn_(b.bn2, perm, optimizer)
                permute_(b.project.weight, perm, 1, optimizer)
        # stem channels feed the first block's expand
        perm = torch.argsort(importance(self.stem), descending=True)
        permute_(self.stem.weight, perm, 0, optimizer)
        permute_bn_(self.stem_bn, perm, optimizer)
        permute_(self.stages[0].blocks[0].expand.weight, perm, 1, optimizer)
        # a stage's output channels are shared along its residual chain
        for s, stage in enumerate(self.stages):
            blocks = list(stage.blocks)
            perm = torch.argsort(sum(importance(b.project) for b in blocks), descending=True)
            for i, b in enumerate(blocks):
                permute_(b.project.weight, perm, 0, optimizer)
                permute_bn_(b.bn3, perm, optimizer)
                if i > 0:
                    permute_(b.expand.weight, perm, 1, optimizer)
            if s + 1 < len(self.stages):
                permute_(self.stages[s + 1].blocks[0].expand.weight, perm, 1, optimizer)
            else:
                permute_(self.head.weight, perm, 1, optimizer)


class MobileNetSpace(SearchSpace):
    name = "mobilenet"
    input_rank = 3
    #: a quarter of the random subnets train compressed: on digits, a tenth left 2.5-4 % of
    #: random joint archs near chance, a quarter 1 % (results/README.md)
    compressed_share = 0.25

    def architecture_genes(self) -> Genes:
        genes: Genes = {"stem.width": STEM_WIDTHS}
        if halves_input(self.input_shape[1]):
            genes["stem.pool"] = STEM_POOLS
        for s, widths in enumerate(WIDTHS, start=1):
            genes[f"s{s}.depth"] = DEPTHS
            genes[f"s{s}.k"] = KERNELS
            genes[f"s{s}.expand"] = EXPANDS
            genes[f"s{s}.width"] = widths
        return genes

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.input_shape[1] != self.input_shape[2]:
            raise NasoptError(f"mobilenet takes square images, got {self.input_shape[1]}x"
                              f"{self.input_shape[2]}; pad or crop them to a square")

    def opt_in_genes(self) -> dict[str, Value]:
        # the max-pooled stem unless a search asks for both (--restrict stem.pool=1,2)
        extra = {"stem.pool": 2} if "stem.pool" in self.architecture_genes() else {}
        return {**super().opt_in_genes(), **extra}

    def gene_defaults(self) -> dict[str, Value]:
        # spaces, archs and packed files written before stem.pool existed had the stride-2 stem
        extra = {"stem.pool": 1} if "stem.pool" in self.architecture_genes() else {}
        return {**super().gene_defaults(), **extra}

    def compression_genes(self) -> Genes:
        # bits and quantizer per stage (and stem, head); the non-depthwise convs of each stage (1x1)
        # and the head may be low rank
        stages = [f"s{s}" for s in range(1, len(WIDTHS) + 1)]
        return compression_genes(["stem", *stages, "head"], [*stages, "head"])

    def count_key(self, arch: Mapping[str, Value]) -> str:
        return shape_count_key(self.validate(arch))

    def network(self, dims: Mapping[str, Value]) -> nn.Module:
        channels, height, _ = self.input_shape
        return MobileNet(channels, height, self.num_classes, dims)
