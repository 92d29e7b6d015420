"""Compression in the forward pass of elastic layers: a supernet trains, and an extracted subnet
recalibrates its BatchNorm, under an arch's compression genes.

Within :func:`compressed_forward` every weight layer of an elastic network computes with the
weights the arch's compressed model stores (:mod:`nasopt.compression.compress`):

- **low rank** (``<group>.rank`` < 1 on a linear layer or a 1x1 convolution): the truncated SVD
  factors of the active weight, ``r = round(ratio x min(out, in))``, as two stored tensors;
- **sparsity**: one global mask over every active stored tensor (the factors in place of a
  factorized weight) by the policy's pruning criterion (LAMP scores by default, or magnitudes):
  exactly ``round(sparsity x N)`` weights are zero, the very ones deployment prunes. The mask is
  chosen on a probe pass of one sample, because a global threshold needs every layer's active
  weights before the first layer runs;
- **bits** and **quant**: symmetric per-output-channel quantization of each stored tensor, the
  packed file's quantizer (:func:`nasopt.compression.compress.quantize`), or its codebook
  (k-means levels over the row-normalised kept weights, recomputed each step:
  :func:`nasopt.compression.compress.codebook_quantize`).

The gradient is the straight-through estimator: the latent weight receives the gradient of the
compressed one, so training moves the shared float weights towards values whose compressed
forms work (quantization-aware training; the literature's OQAT / BatchQuant direction).

Factors and masks are taken on the unfolded weights, as deployment takes them (it folds
BatchNorm after pruning, :mod:`nasopt.compression.compress`), and per-channel quantization is
unchanged by the fold: with BatchNorm in eval mode the compressed forward is the deployed model.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from nasopt.compression.compress import (
    FLOAT_BITS, PRUNING, GroupOf, Policy, codebook_quantize, decode, dequantize,
    low_rank_eligible, pruning_scores, quantize, svd_factors, weight_layers,
)


def quantized(weight: Tensor, bits: int, codebook: bool = False, mask: Tensor | None = None
              ) -> Tensor:
    """The decoded ``bits``-bit weight the packed file stores (no gradient): uniform, or with
    ``codebook`` the codebook of the entries ``mask`` keeps (all without one)."""
    if bits >= FLOAT_BITS:
        return weight
    if codebook:
        index, levels, scale = codebook_quantize(weight, bits, mask)
        return decode(index, levels, scale, mask).to(weight.dtype)
    return dequantize(*quantize(weight, bits))


def stored_tensors(module: nn.Module, weight: Tensor, ratio: float) -> list[Tensor]:
    """The tensors the deployed model stores for a layer's active ``weight``: the weight itself,
    or at a rank ratio below 1 on an eligible layer the SVD factors of its ``out x (in x taps)``
    unfolding, ``[B (r x in x taps), A (out x r)]``
    (first layer, then second, as :func:`nasopt.compression.compress.factorize` builds them)."""
    if ratio >= 1.0 or not low_rank_eligible(module):
        return [weight]
    rows = weight.reshape(weight.shape[0], -1)
    rank = max(1, round(ratio * min(rows.shape)))
    a, b = svd_factors(rows.detach(), rank)
    return [b.to(weight.dtype), a.to(weight.dtype)]


def global_masks(tensors: list[Tensor], sparsity: float, method: str = PRUNING) -> list[Tensor]:
    """Keep-masks over ``tensors`` (the stored tensors of every layer) that zero exactly
    ``round(sparsity x N)`` of the N entries, those of lowest
    :func:`~nasopt.compression.compress.pruning_scores` (as
    :func:`~nasopt.compression.compress.prune_global` with the same ``method``)."""
    if method not in ("lamp", "magnitude"):
        raise ValueError(f"a compressed forward prunes by lamp or magnitude scores, not "
                         f"{method!r}")
    flat = torch.cat([pruning_scores(t, method).reshape(-1) for t in tensors])
    drop = round(sparsity * flat.numel())
    keep = torch.ones_like(flat, dtype=torch.bool)
    if drop > 0:
        keep[torch.topk(flat, drop, largest=False).indices] = False
    masks, start = [], 0
    for t in tensors:
        masks.append(keep[start:start + t.numel()].view_as(t))
        start += t.numel()
    return masks


class _Compressor:
    """Installed as ``compression`` on every weight layer of a network for a forward pass:
    returns the compressed form of the active weight a layer passes to it."""

    def __init__(self, names: dict[int, str], policy: Policy, group_of: GroupOf):
        self.names, self.policy, self.group_of = names, policy, group_of
        #: the probe pass collects (layer, its stored tensors) here
        self.probe: list[tuple[int, list[Tensor]]] | None = None
        self.masks: dict[int, list[Tensor]] = {}
        #: a layer's stored tensors as the probe pass took them (the weights do not change
        #: before the forward pass that follows): each SVD is taken once
        self.taken: dict[int, tuple[torch.Size, list[Tensor]]] = {}

    def __call__(self, module: nn.Module, weight: Tensor) -> Tensor:
        group = self.group_of(self.names[id(module)])
        shape, tensors = self.taken.get(id(module), (None, None))
        if tensors is None or shape != weight.shape:
            tensors = [t.detach() for t in
                       stored_tensors(module, weight, self.policy.rank_of(group))]
        if self.probe is not None:
            self.probe.append((id(module), tensors))
            self.taken[id(module)] = (weight.shape, tensors)
            return weight
        masks = self.masks.get(id(module))
        bits, codebook = self.policy.bits_of(group), self.policy.codebook_of(group)
        with torch.no_grad():
            kept = tensors if masks is None else [t * m for t, m in zip(tensors, masks)]
            stored = [quantized(t, bits, codebook, None if masks is None else m)
                      for t, m in zip(kept, masks or [None] * len(kept))]
            dense = stored[0] if len(stored) == 1 else (stored[1] @ stored[0]).reshape(weight.shape)
        return weight + (dense - weight).detach()  # straight-through estimator

    def choose_masks(self) -> None:
        assert self.probe is not None
        found = self.probe
        self.probe = None
        if self.policy.sparsity <= 0 or not found:
            return
        masks = global_masks([t for _, ts in found for t in ts], self.policy.sparsity,
                             self.policy.pruning)
        at = 0
        for layer, ms in found:
            self.masks[layer] = masks[at:at + len(ms)]
            at += len(ms)


@contextlib.contextmanager
def compressed_forward(network: nn.Module, policy: Policy, group_of: GroupOf,
                       probe: Tensor) -> Iterator[None]:
    """Within the block, forward passes of ``network`` (built from the elastic layers, with its
    active subnet configured) use the compressed weights of ``policy``; ``probe`` (a batch whose
    first sample is used) runs once first to choose the sparsity masks."""
    layers = [(name, m) for name, m in weight_layers(network) if hasattr(m, "compression")]
    compressor = _Compressor({id(m): name for name, m in layers}, policy, group_of)
    for _, m in layers:
        m.compression = compressor
    try:
        if policy.sparsity > 0:
            compressor.probe = []
            was_training = network.training
            network.eval()  # the probe only reads weights: no batch statistics are touched
            with torch.no_grad():
                network(probe[:1])
            network.train(was_training)
            compressor.choose_masks()
        yield
    finally:
        for _, m in layers:
            del m.compression  # back to the class default: no compression

