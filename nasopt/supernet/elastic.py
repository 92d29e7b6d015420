"""Weight-sharing supernets: elastic layers, activate / extract, channel sorting, BN recalibration,
and sandwich-rule training with in-place distillation.

A space writes its network once, from the elastic layers below. Built at the largest dimensions it
is the supernet; built at an arch's dimensions it is that arch's standalone model. Elastic layers
subclass the plain torch layers, so a standalone model is an ordinary ``nn.Conv*`` / ``nn.Linear``
network to every tool (ONNX export, pruning utilities, state dicts).

Slicing rule shared by the elastic forward and :meth:`Supernet.extract`: channel dimensions keep a
prefix (channels are sorted by L1 importance, so the prefix is the most important ones), kernel
dimensions keep the centre.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nasopt.core import checkpoint
from nasopt.core.arch import Value
from nasopt.core.errors import NasoptError
from nasopt.supernet.network import ElasticNetwork

if TYPE_CHECKING:
    from nasopt.core.config import SupernetConfig
    from nasopt.core.task import Task
    from nasopt.supernet.distributed import Group
    from nasopt.supernet.split import Split
    from nasopt.core.data import Dataset
    from nasopt.core.space import SearchSpace


# ---------------------------------------------------------------------------------------------
# slicing
def centre_crop(weight: Tensor, kernel: int) -> Tensor:
    """Keep the central ``kernel`` taps of every spatial dimension (dims >= 2) of a conv weight."""
    index: list[slice] = [slice(None), slice(None)]
    for size in weight.shape[2:]:
        start = (size - kernel) // 2
        index.append(slice(start, start + kernel))
    return weight[tuple(index)]


def slice_like(source: Tensor, shape: Sequence[int]) -> Tensor:
    """Cut ``source`` to ``shape``: prefix on channel dims, centre crop on conv kernel dims."""
    index = []
    for dim, (have, want) in enumerate(zip(source.shape, shape)):
        if want > have:
            raise ValueError(f"cannot take {tuple(shape)} from a tensor of {tuple(source.shape)}")
        if source.dim() >= 3 and dim >= 2:
            start = (have - want) // 2
            index.append(slice(start, start + want))
        else:
            index.append(slice(0, want))
    return source[tuple(index)]


# ---------------------------------------------------------------------------------------------
# elastic layers
class _ElasticConv:
    """Mixin for nn.Conv1d / nn.Conv2d: ``active_out`` output channels, ``active_k`` kernel.

    Input channels follow the incoming tensor. A depthwise conv (groups == in_channels) follows
    the incoming channels for its outputs too.
    """

    active_out: int | None = None
    active_k: int | None = None
    #: set by :func:`nasopt.supernet.compressed.compressed_forward`: the active weight's
    #: compressed form
    compression: Callable[[nn.Module, Tensor], Tensor] | None = None

    def forward(self, x: Tensor, channel_major_out: bool = False  # type: ignore[override]
                ) -> Tensor:
        """``channel_major_out``: a 1x1 conv computed as a matrix product in training writes a
        channel-major map (:func:`pointwise_matmul`): what a dense depthwise layer after it
        reads without a copy."""
        weight, bias = self.weight, self.bias
        cin = x.shape[1]
        depthwise = self.groups > 1
        if depthwise:
            out, groups = cin, cin
            weight = weight[:cin]
        else:
            out, groups = (self.active_out or weight.shape[0]), 1
            weight = weight[:out, :cin]
        k = self.active_k or weight.shape[-1]
        if k != weight.shape[-1]:
            weight = centre_crop(weight, k)
        if self.compression is not None:
            weight = self.compression(self, weight)
        if bias is not None:
            bias = bias[:out]
        if x.dim() == 4 and self.training and torch.is_grad_enabled():
            if depthwise and use_dense_depthwise(x.shape[2], x.shape[3], k, self.stride,
                                                 self.dilation, _is_channels_last(x)
                                                 or _is_channel_major(x)):
                return depthwise_dense(x, weight, bias, self.stride[0], k // 2)
            if not depthwise and k == 1 and use_pointwise_matmul(x, self.stride):
                return pointwise_matmul(x, weight, bias, channel_major_out)
        return self._conv(x, weight, bias, self.stride, k // 2, self.dilation, groups)


# ---------------------------------------------------------------------------------------------
# 1x1 convolutions on channels-last maps as one matrix product
#: False: always the convolution (benchmarks compare both paths)
POINTWISE_MATMUL = True


def use_pointwise_matmul(x: Tensor, stride: Any) -> bool:
    """Whether a training step computes a 1x1 convolution of ``x`` as a matrix product
    (:func:`pointwise_matmul`): on channels-last (or channel-major) maps, where a 1x1
    convolution is exactly a linear layer over the channels of every position. Measured on the
    mobilenet supernet of digits (8x8 and 4x4 maps, 1 thread): a sandwich step about 9 % faster
    than the convolution's forward and backward; on Fashion-MNIST's larger maps no faster, no
    slower."""
    return (POINTWISE_MATMUL and tuple(stride) == (1, 1)
            and (x.is_contiguous(memory_format=torch.channels_last) or _is_channel_major(x)))


#: False: dense depthwise layers read and write channels-last maps, with a layout copy each way
#: (benchmarks compare both)
CHANNEL_MAJOR = True


def _is_channel_major(x: Tensor) -> bool:
    """Whether the B x C x H x W map ``x`` lies in memory channel by channel, each channel's
    B x H x W values contiguous (the layout of a per-channel batched product)."""
    return (x.dim() == 4 and x.shape[0] > 1 and x.shape[1] > 1
            and x.transpose(0, 1).is_contiguous() and not x.is_contiguous())


def pointwise_matmul(x: Tensor, weight: Tensor, bias: Tensor | None,
                     channel_major_out: bool = False) -> Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 ``weight`` on a channels-last or channel-major
    ``x``, as one matrix product over the channels (equal up to float rounding). The output is
    channels-last, or channel-major with ``channel_major_out`` (and :data:`CHANNEL_MAJOR`): the
    product's operands are views of ``x`` either way, so no layout is copied."""
    batch, cin, height, width = x.shape
    w2 = weight.flatten(1)  # cout x cin
    if _is_channel_major(x):
        columns = x.transpose(0, 1).reshape(cin, -1)  # cin x (B*H*W), a view
    else:
        columns = x.permute(0, 2, 3, 1).reshape(-1, cin).t()  # a view of the channels-last map
    if channel_major_out and CHANNEL_MAJOR:
        y = torch.mm(w2, columns) if bias is None else torch.addmm(bias[:, None], w2, columns)
        return y.view(-1, batch, height, width).transpose(0, 1)
    return F.linear(columns.t(), w2, bias).view(batch, height, width, -1).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# depthwise convolution on small feature maps as a per-channel dense matrix
#: the dense form for kernels at least this large (3x3 stays a convolution: its backward is
#: not slow, and its dense matrix is mostly zeros); see :func:`use_dense_depthwise`
DENSE_MIN_KERNEL = 5
#: ... on feature maps whose side is at most this many kernel sizes
DENSE_MAX_SIDE_PER_K = 2
#: ... or, channels-last, this many: the dense form's layout changes there cost about as much
#: as its products, and the convolution is fast in that format. Measured (forward and backward,
#: batch 128, 32-192 channels, 1 thread): 5x5 is faster dense on 4x4 maps, about even on 5x5
#: and faster as a convolution from 6x6; 7x7 is faster dense up to 8x8 (8x8 at stride 2:
#: 1.0-1.4x)
DENSE_MAX_SIDE_PER_K_CHANNELS_LAST = 8 / 7
#: False: always the convolution (benchmarks compare both paths)
DENSE_DEPTHWISE = True

_DENSE_INDEX: dict[tuple[Any, ...], tuple[Tensor, int, int]] = {}


def _is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def use_dense_depthwise(height: int, width: int, k: int, stride: Any, dilation: Any,
                        channels_last: bool = False) -> bool:
    """Whether a training step computes a kxk depthwise convolution on a ``height`` x ``width``
    map as a dense matrix per channel (:func:`depthwise_dense`). On CPU the backward pass of a
    depthwise convolution with k >= 5 is 10-50x its forward pass, and on small maps most of
    its taps fall on padding (a 7x7 kernel on a 4x4 map: 16 of 49 taps per output); the dense
    matrix multiplies only the taps that touch the map. Measured (1 thread, batch 128, forward
    + backward, CPU time): 7x7 on 4x4 with 192 channels 26.4 ms -> 2.5 ms (channels-last: 9.9
    -> 5.2 ms); channels-last, the convolution is the faster one from maps larger than the
    kernel (5x5 on 8x8 with stride 2: 2.6 ms against 5.4 ms dense); 3x3 keeps the
    convolution."""
    limit = DENSE_MAX_SIDE_PER_K_CHANNELS_LAST if channels_last else DENSE_MAX_SIDE_PER_K
    return (DENSE_DEPTHWISE and k >= DENSE_MIN_KERNEL and tuple(dilation) == (1, 1)
            and stride[0] == stride[1] and max(height, width) <= limit * k)


def dense_depthwise_follows(dw: nn.Module, x: Tensor) -> bool:
    """Whether the depthwise conv ``dw``, given the map a 1x1 conv makes of ``x`` (same size,
    channels-last), takes the dense form in a training step: then that 1x1 conv may write its
    output channel-major (:func:`pointwise_matmul`)."""
    if not isinstance(dw, _ElasticConv):  # a plain or wrapped layer keeps the convolution
        return False
    k = dw.active_k or dw.kernel_size[0]
    return (CHANNEL_MAJOR and x.is_contiguous(memory_format=torch.channels_last)
            and use_dense_depthwise(x.shape[2], x.shape[3], k, dw.stride, dw.dilation, True))


def _dense_index(height: int, width: int, k: int, stride: int, padding: int,
                 device: torch.device) -> tuple[Tensor, int, int]:
    """For every (input position, output position) pair the flat kernel tap that joins them,
    or ``k * k`` (a zero appended to the kernel) where none does; and the output size."""
    key = (height, width, k, stride, padding, str(device))
    if key not in _DENSE_INDEX:
        out_h = (height + 2 * padding - k) // stride + 1
        out_w = (width + 2 * padding - k) // stride + 1
        oy = torch.arange(out_h).view(-1, 1, 1, 1) * stride - padding
        ox = torch.arange(out_w).view(1, -1, 1, 1) * stride - padding
        dy = torch.arange(height).view(1, 1, -1, 1) - oy  # tap row joining output and input
        dx = torch.arange(width).view(1, 1, 1, -1) - ox
        inside = (dy >= 0) & (dy < k) & (dx >= 0) & (dx < k)
        index = torch.where(inside, dy * k + dx, torch.full_like(dy * dx, k * k))
        # inputs x outputs: the gathered matrix is laid out as the batched product reads it
        _DENSE_INDEX[key] = (index.reshape(out_h * out_w, height * width).t().contiguous()
                             .to(device), out_h, out_w)
    return _DENSE_INDEX[key]


def depthwise_dense(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int,
                    padding: int) -> Tensor:
    """The depthwise convolution ``F.conv2d(x, weight, bias, stride, padding, groups=C)`` (C
    channels, a C x 1 x k x k weight) as one (outputs x inputs) matrix per channel, gathered
    from the kernel: the same products and sums, in another order (equal up to float
    rounding; a test compares outputs and gradients). The output keeps the input's memory
    format."""
    batch, channels, height, width = x.shape
    k = weight.shape[-1]
    index, out_h, out_w = _dense_index(height, width, k, stride, padding, x.device)
    taps = torch.cat([weight.reshape(channels, k * k), weight.new_zeros(channels, 1)], 1)
    matrix = taps[:, index]  # C x inputs x outputs
    if _is_channel_major(x):  # the product reads and writes views: no layout copy
        out = torch.bmm(x.transpose(0, 1).reshape(channels, batch, height * width), matrix)
        out = out.view(channels, batch, out_h, out_w).transpose(0, 1)
        return out if bias is None else out + bias.view(1, -1, 1, 1)
    channels_last = _is_channels_last(x)
    flat = _ChannelMajor.apply(x, channels_last)  # C x B x inputs
    out = _FromChannelMajor.apply(torch.bmm(flat, matrix), (batch, channels, out_h, out_w),
                                  channels_last)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def _channel_major(x: Tensor) -> Tensor:
    """The B x C x H x W map ``x`` (channels-last or contiguous) as a contiguous C x B x (H*W)
    tensor."""
    batch, channels, height, width = x.shape
    return x.reshape(batch, channels, height * width).transpose(0, 1).contiguous()


def _batch_major(y: Tensor, shape: tuple[int, int, int, int], channels_last: bool) -> Tensor:
    """The inverse of :func:`_channel_major`: a C x B x (H*W) tensor as the B x C x H x W map of
    ``shape``, channels-last or contiguous. Channels-last, that is one transpose of a C x
    (B*H*W) matrix: torch copies it 2.5-5x faster than the same permutation of a 4-D tensor
    (1-2 threads, 192 channels of 128 4x4 maps: 0.22 ms against 0.59-1.14 ms)."""
    batch, channels, height, width = shape
    if channels_last:
        return (y.reshape(channels, batch * height * width).t().contiguous()
                .view(batch, height, width, channels).permute(0, 3, 1, 2))
    return y.transpose(0, 1).reshape(shape).contiguous()


class _ChannelMajor(torch.autograd.Function):
    """:func:`_channel_major`, whose gradient goes back in the input's memory format (a
    strided gradient makes the layers before this one slow)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, channels_last: bool) -> Tensor:  # noqa: D102
        ctx.shape, ctx.channels_last = tuple(x.shape), channels_last
        return _channel_major(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return _batch_major(grad.contiguous(), ctx.shape, ctx.channels_last), None


class _FromChannelMajor(torch.autograd.Function):
    """:func:`_batch_major`, whose gradient goes back as a contiguous C x B x (H*W) tensor (a
    batched product given a strided gradient falls back to one small product per channel)."""

    @staticmethod
    def forward(ctx: Any, y: Tensor, shape: tuple[int, int, int, int],  # noqa: D102
                channels_last: bool) -> Tensor:
        return _batch_major(y, shape, channels_last)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: D102
        return _channel_major(grad), None, None


class ElasticConv1d(_ElasticConv, nn.Conv1d):
    _conv = staticmethod(F.conv1d)

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, depthwise: bool = False,
                 bias: bool = False):
        nn.Conv1d.__init__(self, cin, cout, k, stride, k // 2, groups=cin if depthwise else 1,
                           bias=bias)


class ElasticConv2d(_ElasticConv, nn.Conv2d):
    _conv = staticmethod(F.conv2d)

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, depthwise: bool = False,
                 bias: bool = False):
        nn.Conv2d.__init__(self, cin, cout, k, stride, k // 2, groups=cin if depthwise else 1,
                           bias=bias)


class _ElasticBatchNorm:
    """Mixin for BatchNorm: normalises however many channels arrive, using a prefix of its stats."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        c = x.shape[1]
        if _is_channel_major(x):  # normalised as the contiguous 1 x C x (B*H*W) view it is
            flat = x.transpose(0, 1).reshape(1, c, -1)
            return self._batch_norm(flat).view(c, x.shape[0], *x.shape[2:]).transpose(0, 1)
        if c == self.num_features:
            return super().forward(x)  # type: ignore[misc]
        return self._batch_norm(x)

    def _batch_norm(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
        use_batch_stats = self.training or self.running_mean is None
        # slices of the buffers are views: running statistics update in place
        return F.batch_norm(x, self.running_mean[:c], self.running_var[:c], self.weight[:c],
                            self.bias[:c], use_batch_stats, factor, self.eps)


class ElasticBatchNorm1d(_ElasticBatchNorm, nn.BatchNorm1d):
    pass


class ElasticBatchNorm2d(_ElasticBatchNorm, nn.BatchNorm2d):
    pass


class ElasticLinear(nn.Linear):
    """Linear layer whose input features follow the incoming tensor (a prefix of its columns)
    and whose outputs are the first ``active_out`` (None: all), as the elastic convolutions."""

    active_out: int | None = None
    compression: Callable[[nn.Module, Tensor], Tensor] | None = None  # as the convolutions'

    def forward(self, x: Tensor) -> Tensor:
        out = self.active_out or self.out_features
        bias = None if self.bias is None else self.bias[:out]
        weight = self.weight[:out, : x.shape[1]]
        if self.compression is not None:
            weight = self.compression(self, weight)
        return F.linear(x, weight, bias)


# ---------------------------------------------------------------------------------------------
# channel permutation by L1 importance
def importance(conv: nn.Module) -> Tensor:
    """L1 norm of each output channel's weights."""
    return conv.weight.detach().abs().flatten(1).sum(1)


def permute_(param: Tensor, perm: Tensor, dim: int, optimizer: torch.optim.Optimizer | None,
             group: int = 1) -> None:
    """Reorder ``param`` along ``dim`` (in blocks of ``group`` entries) and its optimizer state."""
    if group > 1:
        perm = (perm[:, None] * group + torch.arange(group, device=perm.device)).flatten()
    tensors = [param.data]
    if optimizer is not None and param in optimizer.state:
        tensors += [t for t in optimizer.state[param].values()
                    if isinstance(t, Tensor) and t.shape == param.shape]
    for t in tensors:
        t.copy_(t.index_select(dim, perm.to(t.device)))


def permute_bn_(bn: nn.modules.batchnorm._BatchNorm, perm: Tensor,
                optimizer: torch.optim.Optimizer | None) -> None:
    for tensor in (bn.weight, bn.bias):
        permute_(tensor, perm, 0, optimizer)
    for buf in (bn.running_mean, bn.running_var):
        buf.copy_(buf.index_select(0, perm.to(buf.device)))


# ---------------------------------------------------------------------------------------------
class Supernet(nn.Module):
    """The weight-sharing network of a space: ``activate(arch)``, ``extract(arch)``, sorting.

    The space's network is an :class:`~nasopt.supernet.network.ElasticNetwork`.
    """

    def __init__(self, space: "SearchSpace"):
        super().__init__()
        self.space = space.architecture_space()  # compression genes never shape the supernet
        self.net = self.space.network(self.space.largest())
        if not isinstance(self.net, ElasticNetwork):
            raise NasoptError(f"space {space.name!r}: network() returned a "
                              f"{type(self.net).__name__}; a weight-sharing space's network "
                              f"subclasses nasopt.ElasticNetwork and defines configure(arch)")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @contextlib.contextmanager
    def activate(self, arch: Mapping[str, Value]) -> Iterator["Supernet"]:
        """Within the block, the supernet computes exactly the subnet ``arch``."""
        self.net.configure(self.space.validate(self.space.architecture_of(arch)))
        try:
            yield self
        finally:
            self.net.configure(None)

    def extract(self, arch: Mapping[str, Value]) -> nn.Module:
        """A standalone model of ``arch`` holding the inherited weights (and BN statistics)."""
        model = self.space.build(self.space.architecture_of(arch)).to(
            next(self.parameters()).device)
        source = self.net.state_dict()
        model.load_state_dict({name: slice_like(source[name], t.shape).clone()
                               for name, t in model.state_dict().items()})
        return model

    def sort_channels(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Reorder channels so that every prefix keeps the most important (L1) ones."""
        with torch.no_grad():
            self.net.sort_channels(optimizer)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: Tensor, batch_size: int = 1024) -> None:
    """Re-estimate BatchNorm statistics of ``model`` on ``x`` (a cumulative average over batches).

    Inherited statistics belong to whatever subnets trained the supernet last, so every subnet is
    recalibrated before it is evaluated. The default batch takes the evaluator's whole
    calibration set in one pass: per-call overhead, not arithmetic, dominates for small models.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    was_training = model.training
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for start in range(0, len(x), batch_size):
        model(x[start:start + batch_size])
    for bn, momentum in zip(bns, saved):
        bn.momentum = momentum
    model.train(was_training)


def sandwich_loss(supernet: Supernet, rng: random.Random, n_random: int, temperature: float,
                  task: "Task | None" = None, compression: "Mapping[str, Sequence[Value]] | None" = None,
                  group_of: "Callable[[str], str] | None" = None, compressed_share: float = 1.0,
                  split: "Split | None" = None):
    """Loss of one sandwich-rule step: the largest subnet learns from labels, the smallest and
    ``n_random`` random subnets from the largest one's outputs (in-place distillation: soft
    logits for classification, the outputs themselves for regression; ``task``).

    With ``compression`` (the space's compression genes and their options) each random subnet,
    with probability ``compressed_share``, also draws a value of every compression gene and
    computes under it (:func:`nasopt.supernet.compressed.compressed_forward`: fake quantization,
    pruning masks by the default criterion, factorized weights); the others, the largest and
    the smallest stay float. Every draw comes from ``rng``.

    With ``split`` (subnet-parallel processes, :mod:`nasopt.supernet.split`) every process makes
    the same draws and computes its share: rank 0 the teacher and its students, the others
    their students against rank 0's teacher outputs; the ranks' losses and gradients add up to
    the one-process step's (:meth:`~nasopt.supernet.split.Split.reduce`)."""
    from nasopt.compression.compress import Policy
    from nasopt.core.task import CLASSIFICATION
    from nasopt.supernet.compressed import compressed_forward
    task = task or CLASSIFICATION
    space = supernet.space
    largest, smallest = space.largest(), space.smallest()
    genes = dict(compression or {})
    if genes and group_of is None:
        raise TypeError("sandwich_loss needs group_of with compression genes")

    def draws() -> list[tuple[Mapping[str, Value], "Policy | None"]]:
        """The step's students: (arch, compression policy or None for float), smallest first."""
        found: list[tuple[Mapping[str, Value], Policy | None]] = [(smallest, None)]
        for _ in range(n_random):
            arch = space.sample(rng)
            compressed = bool(genes) and rng.random() < compressed_share
            found.append((arch, Policy.from_arch({g: rng.choice(options)
                                                  for g, options in genes.items()})
                          if compressed else None))
        return found

    def student(arch: Mapping[str, Value], policy: "Policy | None", x: Tensor) -> Tensor:
        with supernet.activate(arch):
            if policy is None:
                return supernet(x)
            with compressed_forward(supernet.net, policy, group_of, x):
                return supernet(x)

    def loss(x: Tensor, y: Tensor) -> Tensor:
        students = draws()
        if split is not None and not split.is_main:
            outs = [student(arch, policy, x) for i, (arch, policy) in enumerate(students)
                    if split.owns(i)]
            teacher = split.teacher(None, outs[0])
            total = torch.zeros((), device=x.device)
            for out in outs:
                total = total + task.distillation_loss(out, teacher, temperature)
            return total
        with supernet.activate(largest):
            teacher = supernet(x)
        if split is not None:
            split.teacher(teacher, teacher)
        total = task.loss(teacher, y)
        for i, (arch, policy) in enumerate(students):
            if split is None or split.owns(i):
                total = total + task.distillation_loss(student(arch, policy, x), teacher,
                                                       temperature)
        return total

    return loss


def load_weights(supernet: "Supernet", state: Any, path: Path,
                 needs: tuple[str, ...] = ()) -> None:
    """Load the checkpoint ``state`` (read from ``path``) into ``supernet``; a checkpoint of
    another space or shape, or one missing ``needs`` (a partial one's optimizer state), is one
    error that says to delete it (it is retrained or resumed from scratch)."""
    fix = f"delete {path} and re-run the same command to train it again"
    if not isinstance(state, dict) or "net" not in state or any(k not in state for k in needs):
        missing = [k for k in ("net", *needs) if not isinstance(state, dict) or k not in state]
        raise NasoptError(f"checkpoint {path} is not a whole nasopt supernet checkpoint (no "
                          f"{', '.join(missing)}); {fix}")
    try:
        supernet.net.load_state_dict(state["net"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        detail = str(exc).strip().splitlines()[0][:160]
        raise NasoptError(f"checkpoint {path} does not fit the supernet of {supernet.space.name} "
                          f"({detail}); {fix}") from None


#: the recipe fields that key a checkpoint: those of the resolved recipe (whole epochs), as they
#: were before the recipe could be given in steps, so a checkpoint trained by an equal recipe
#: keeps its key and a different recipe never finds it
KEY_FIELDS = ("epochs", "warmup_epochs", "batch_size", "lr", "weight_decay", "n_random",
              "kd_temperature", "seed")
#: settings of how a recipe runs, not of what it trains: never in the key
RUN_FIELDS = ("processes",)


def training_compression(space: "SearchSpace", cfg: Any) -> dict[str, tuple[Value, ...]]:
    """The compression genes a recipe draws during training: the space's, when the recipe is
    compression-aware (``supernet.compression_aware``); none otherwise. A gene held at its absent
    value (an opt-in gene not asked for) compresses nothing and is left out, so the recipe, its
    draws and its checkpoint key are those of a space without it."""
    if not getattr(cfg, "compression_aware", False) or not space.compression:
        return {}
    from nasopt.compression.compress import absent_value
    names = space.compression_genes()
    return {g: tuple(o) for g, o in space.genes.items()
            if g in names and tuple(o) != (absent_value(g),)}


def supernet_key(space: "SearchSpace", data_fingerprint: str, cfg: Any,
                 n_train: int | None = None) -> str:
    """Hash of everything the trained supernet depends on: the (sub-)space, the data, the recipe.

    A :class:`~nasopt.core.config.SupernetConfig` is keyed by its recipe resolved for the
    training split (``n_train`` samples) and the space (:meth:`SupernetConfig.resolve`): the
    default recipe sized by the data, ``steps`` and ``epochs`` that give the same whole epochs
    share a key, and so do an unset ``compressed_share`` and the space's own value set
    explicitly; any other length, warmup or setting gives another key."""
    if hasattr(cfg, "resolve"):
        if cfg.epochs is None or cfg.warmup_epochs is None:
            if n_train is None:
                raise TypeError("supernet_key needs n_train for a recipe sized by the data")
        cfg = cfg.resolve(n_train if n_train is not None else 1, space)
    train = dataclasses.asdict(cfg)
    if hasattr(cfg, "resolve"):
        extra = {k: v for k, v in train.items()
                 if k not in KEY_FIELDS + RUN_FIELDS and v is not None and v is not False}
        if not train.get("compression_aware"):  # the float recipe keys as it always did
            extra.pop("compressed_share", None)
        train = {**{k: train[k] for k in KEY_FIELDS}, **extra}
    described = {"space": space.architecture_space().describe(), "data": data_fingerprint,
                 "train": train}
    drawn = training_compression(space, cfg)
    if drawn:  # a compression-aware recipe trains for the (sub-)space's compression options
        described["compression"] = {g: list(o) for g, o in drawn.items()}
        if any(float(v) > 0 for v in drawn.get("sparsity", ())):
            from nasopt.compression.compress import PRUNING
            described["pruning"] = PRUNING  # the criterion of the masks it trains under
    payload = json.dumps(described, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def train_supernet(space: "SearchSpace", data: "Dataset", cfg: "SupernetConfig", folder: Path, *,
                   device: torch.device | str = "cpu", show_progress: bool = True,
                   log: Callable[[str], None] = lambda s: None,
                   group: "Group | None" = None) -> tuple[Supernet, Path]:
    """Train (or reuse) the supernet of ``space`` on ``data``.

    The recipe's length is resolved for the training split first
    (:meth:`~nasopt.core.config.SupernetConfig.resolve`: explicit epochs, steps rounded up to
    whole epochs, or the default sized by the data). The checkpoint
    ``folder/<space>-<key>.pt`` is keyed by :func:`supernet_key` of that resolved recipe, so the
    same space, data and recipe reuse it. A per-epoch checkpoint lets a killed training resume.
    Phase 1 (``warmup_epochs``) trains the largest subnet alone, then channels are sorted by L1
    importance; phase 2 applies the sandwich rule with in-place distillation.

    With ``group`` (several processes under torchrun, :mod:`nasopt.supernet.distributed`) each rank trains
    on its shard with averaged gradients and batches of ``batch_size / world_size``; rank 0
    alone reads and writes the checkpoints (same key: a search reuses them) and sends what it
    read to the others, so they need not share its file system.

    Without ``group``, on a CPU, the training runs in ``supernet.processes`` forked processes
    (by default one per torch thread), each computing a share of every sandwich step's subnets
    with one thread (:mod:`nasopt.supernet.split`): the same recipe and key as one process.
    """
    from nasopt.supernet import distributed, split
    from nasopt.core.task import task_of
    from nasopt.supernet.train import TrainConfig, fit  # train imports nothing from here; keep the edge one-way

    n_train = len(data.x_train)
    length = cfg.describe(n_train)
    cfg = cfg.resolve(n_train, space)  # whole epochs, the space's compressed share: what runs
    key = supernet_key(space, data.fingerprint, cfg)
    final = folder / f"{space.name}-{key}.pt"
    partial = folder / f"{space.name}-{key}.partial.pt"
    torch.manual_seed(cfg.seed)
    supernet = space.supernet().to(device)
    full_space, space = space, supernet.space  # space: the architecture genes only
    main = group is None or group.is_main

    def read(path: Path) -> dict | None:
        """The checkpoint as rank 0 reads it (on the CPU when it travels to the other ranks)."""
        state = checkpoint.load(path, device if group is None else "cpu") \
            if main and path.exists() else None
        return distributed.from_main(state, group)

    state = read(final)
    if state is not None:
        load_weights(supernet, state, final)
        log(f"reusing trained supernet {final}")
        return supernet.eval(), final

    start, resume = 0, None
    state = read(partial)
    if state is not None:
        load_weights(supernet, state, partial, ("epoch", "optimizer", "scheduler"))
        start, resume = state["epoch"] + 1, state
        log(f"resuming supernet training at epoch {start + 1} from {partial}")
    elif main:
        drawn = (f"; each random subnet trains compressed with probability "
                 f"{cfg.compressed_share:g} (supernet.compressed_share)"
                 if training_compression(full_space, cfg) else "")
        log(f"training supernet {space.name}: {length}{drawn}; saved to {final}, reused by "
            f"later runs with this space, data and recipe")
    rng = random.Random()
    largest = space.largest()
    task = task_of(data)
    processes = 1 if group is not None or start >= cfg.epochs else split.processes_for(
        cfg.processes, cfg.n_random, torch.device(device), torch.get_num_threads())
    if processes > 1:
        log(f"training on {processes} processes of one thread, each computing a share of every "
            f"sandwich step's subnets (supernet.processes=1: one process)")
    epoch_now = [start]
    supernet.train()
    distributed.broadcast_(supernet.net, group)
    x, y = distributed.shard(data.x_train, data.y_train, group)
    batch = cfg.batch_size if group is None else max(1, cfg.batch_size // group.world_size)
    train_cfg = TrainConfig(cfg.epochs, batch, cfg.lr, cfg.weight_decay, cfg.seed)
    params = list(supernet.parameters())
    with split.forked(processes, cfg.n_random) as share:
        writes = main and (share is None or share.is_main)  # the one process that saves
        sandwich = sandwich_loss(supernet, rng, cfg.n_random, cfg.kd_temperature, task,
                                 training_compression(full_space, cfg), full_space.group_of,
                                 cfg.compressed_share, share)

        def loss(x: Tensor, y: Tensor) -> Tensor:
            if epoch_now[0] < cfg.warmup_epochs:
                if share is not None and not share.is_main:  # rank 0 trains the largest alone
                    return torch.zeros((), device=x.device, requires_grad=True)
                with supernet.activate(largest):
                    return task.loss(supernet(x), y)
            return sandwich(x, y)

        def on_start(epoch: int) -> None:
            epoch_now[0] = epoch
            rng.seed(cfg.seed * 1_000_003 + epoch)  # subnet draws depend on (seed, epoch) only
            if share is not None and share.is_main:  # the others wait in the warmup: their cores
                torch.set_num_threads(share.threads if epoch < cfg.warmup_epochs else 1)

        def on_end(epoch: int, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
            distributed.average_buffers_(supernet.net, group)
            if epoch + 1 == cfg.warmup_epochs:
                supernet.sort_channels(optimizer)
            if writes:
                checkpoint.save({"epoch": epoch, "net": supernet.net.state_dict(),
                                 "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict()}, partial)
            distributed.barrier(group)

        with distributed.averaged_gradients(params, group):
            fit(params, loss, x, y, train_cfg, start_epoch=start, resume_state=resume,
                on_epoch_start=on_start, on_epoch_end=on_end,
                after_backward=None if share is None else lambda l: share.reduce(l, params),
                desc=f"supernet {space.name}", show_progress=show_progress and writes)
    if cfg.warmup_epochs >= cfg.epochs:  # never reached the sandwich phase: still sort
        supernet.sort_channels()
    if main:
        checkpoint.save({"net": supernet.net.state_dict(), "space": space.describe(),
                         "data": data.fingerprint, "config": dataclasses.asdict(cfg),
                         "world_size": 1 if group is None else group.world_size}, final)
        partial.unlink(missing_ok=True)
    distributed.barrier(group)
    return supernet.eval(), final
