"""Compression of a standalone model by the compression genes of its arch.

Order of operations (the same in the evaluator, in quantization-aware fine-tuning and in the
packed-file loader):

1. **Low rank** (``<group>.rank`` < 1): a linear layer or a 1x1 conv of the group becomes two
   layers (``r`` = round(ratio x min(out, in)) channels between them), initialised from the
   truncated SVD ``W ~ (U sqrt(S)) (sqrt(S) V^T)``.
2. **Unstructured sparsity** (``sparsity``): global magnitude pruning over every stored weight
   tensor (``torch.nn.utils.prune.global_unstructured`` with L1Unstructured; RandomUnstructured
   for the random-pruning baseline). Exactly ``round(sparsity x N)`` weights become zero.
3. **Fold BatchNorm** into the conv registered just before it (what a deployed model does; the
   conv gains a bias; after step 1 that is the second factor). Every space's network registers
   each BatchNorm right after its conv. Folding scales each output channel, so zeros stay zero.
4. **Quantization** (``<group>.bits``): symmetric per-output-channel scales,
   ``scale = max|w| / (2^(b-1) - 1)``, integers in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``; 32 means
   float32 (no quantization). Biases stay float32.

Factors and masks are taken on the trained weights, before folding, and per-channel quantization
is unchanged by the fold's per-channel scale: so a supernet trained under compression
(:mod:`nasopt.supernet.compressed`) computes, batch statistics aside, the very model deployed.

Structured pruning (fraction of channels kept) is the elastic width of the supernet: the width
genes keep the most L1-important channels, so it needs nothing here.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from nasopt.core.arch import Value

BITS: tuple[int, ...] = (2, 4, 6, 8, 32)
SPARSITIES: tuple[float, ...] = (0.0, 0.5, 0.75, 0.9)
RANKS: tuple[float, ...] = (0.25, 0.5, 1.0)
FLOAT_BITS = 32


def compression_genes(groups: list[str], rank_groups: list[str]) -> dict[str, tuple[Value, ...]]:
    """The compression genes of a space: bits per group, one global sparsity, rank ratios."""
    genes: dict[str, tuple[Value, ...]] = {f"{g}.bits": BITS for g in groups}
    genes["sparsity"] = SPARSITIES
    genes.update({f"{g}.rank": RANKS for g in rank_groups})
    return genes


REFERENCE_BITS = 8  # the usual deployment default: uniform int8, dense, full rank


def uniform_compression(genes: Mapping[str, tuple[Value, ...]], bits: int
                        ) -> dict[str, Value]:
    """The compression genes among ``genes`` set to ``bits``-bit weights everywhere, no sparsity,
    full rank -- or, where a (restricted) gene lacks that option, its closest one."""
    target = {"bits": bits, "sparsity": 0.0, "rank": 1.0}
    out: dict[str, Value] = {}
    for gene, options in genes.items():
        kind = gene.rsplit(".", 1)[-1]
        if kind in target:
            out[gene] = min(options, key=lambda v: abs(float(v) - target[kind]))
    return out


def reference_compression(genes: Mapping[str, tuple[Value, ...]]) -> dict[str, Value]:
    """The usual deployment default for the compression genes among ``genes``: int8 weights, no
    sparsity, full rank -- or, where a (restricted) gene lacks that option, its closest one."""
    return uniform_compression(genes, REFERENCE_BITS)


@dataclass(frozen=True)
class Policy:
    """The compression genes of one arch; groups without a gene are left uncompressed."""

    bits: Mapping[str, int] = field(default_factory=dict)
    rank: Mapping[str, float] = field(default_factory=dict)
    sparsity: float = 0.0
    pruning: str = "magnitude"  # or "random": the baseline the literature compares against

    @classmethod
    def from_arch(cls, arch: Mapping[str, Value], pruning: str = "magnitude") -> "Policy":
        bits = {g[:-5]: int(v) for g, v in arch.items() if g.endswith(".bits")}
        rank = {g[:-5]: float(v) for g, v in arch.items() if g.endswith(".rank")}
        return cls(bits, rank, float(arch.get("sparsity", 0.0)), pruning)

    def bits_of(self, group: str) -> int:
        return self.bits.get(group, FLOAT_BITS)

    def rank_of(self, group: str) -> float:
        return self.rank.get(group, 1.0)


def compresses(policy: Policy) -> bool:
    """Whether ``policy`` changes any weight (fewer bits than float, a rank below 1, sparsity)."""
    return (policy.sparsity > 0 or any(b < FLOAT_BITS for b in policy.bits.values())
            or any(r < 1.0 for r in policy.rank.values()))


GroupOf = Callable[[str], str]


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose weights are stored, in a fixed order (module registration order)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d,
                                                                         nn.Linear))]


# ---------------------------------------------------------------------------------------------
# 3. BatchNorm folding
def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm into the conv registered just before it; BNs become Identity."""
    previous: tuple[str, nn.Module] | None = None
    folds = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            previous = (name, module)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            if previous is None or not isinstance(previous[1], (nn.Conv1d, nn.Conv2d)):
                raise ValueError(f"BatchNorm {name} has no conv before it to fold into")
            folds.append((previous[1], name, module))
            previous = None
    with torch.no_grad():
        for conv, bn_name, bn in folds:
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shape = (-1,) + (1,) * (conv.weight.dim() - 1)
            conv.weight.mul_(scale.view(shape))
            bias = bn.bias - bn.running_mean * scale
            if conv.bias is not None:
                bias = bias + conv.bias * scale
            conv.bias = nn.Parameter(bias.clone())
            _set_module(model, bn_name, nn.Identity())
    return model


# ---------------------------------------------------------------------------------------------
# 1. low rank
def low_rank_eligible(module: nn.Module) -> bool:
    """Linear layers and 1x1 (non-grouped) convolutions can be factorized."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1
            and all(k == 1 for k in module.kernel_size))


def rank_for(module: nn.Module, ratio: float) -> int:
    out_f, in_f = module.weight.shape[:2]
    return max(1, round(ratio * min(out_f, in_f)))


def svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``W (out x in) ~ A @ B`` with ``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T``."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = torch.sqrt(s[:rank])
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


def _factorized(module: nn.Module, rank: int) -> nn.Sequential:
    out_f, in_f = module.weight.shape[:2]
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear):
        return nn.Sequential(nn.Linear(in_f, rank, bias=False), nn.Linear(rank, out_f, bias=has_bias))
    conv = nn.Conv1d if isinstance(module, nn.Conv1d) else nn.Conv2d
    return nn.Sequential(conv(in_f, rank, 1, stride=module.stride, bias=False),
                         conv(rank, out_f, 1, bias=has_bias))


def factorize(model: nn.Module, policy: Policy, group_of: GroupOf, *, init: bool = True) -> nn.Module:
    """Replace eligible layers of groups with rank < 1 by two layers (SVD-initialised if
    ``init``; the loader only needs the structure)."""
    for name, module in weight_layers(model):
        ratio = policy.rank_of(group_of(name))
        if ratio >= 1.0 or not low_rank_eligible(module):
            continue
        rank = rank_for(module, ratio)
        pair = _factorized(module, rank).to(module.weight.device)
        if init:
            with torch.no_grad():
                w = module.weight.reshape(module.weight.shape[0], -1)
                a, b = svd_factors(w, rank)
                pair[0].weight.copy_(b.reshape(pair[0].weight.shape))
                pair[1].weight.copy_(a.reshape(pair[1].weight.shape))
                if module.bias is not None:
                    pair[1].bias.copy_(module.bias)
        _set_module(model, name, pair)
    return model


# ---------------------------------------------------------------------------------------------
# 2. sparsity and 4. quantization
def prune_global(model: nn.Module, sparsity: float, method: str = "magnitude",
                 seed: int = 0) -> None:
    """Zero exactly round(sparsity x N) of all stored weights (N over every weight layer)."""
    if sparsity <= 0:
        return
    layers = weight_layers(model)
    total = sum(m.weight.numel() for _, m in layers)
    amount = round(sparsity * total)
    kinds = {"magnitude": prune.L1Unstructured, "random": prune.RandomUnstructured}
    if method not in kinds:
        raise ValueError(f"unknown pruning method {method!r}; use magnitude or random")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        prune.global_unstructured([(m, "weight") for _, m in layers],
                                  pruning_method=kinds[method], amount=amount)
    for _, m in layers:
        prune.remove(m, "weight")


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def quantize(weight: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel quantization: (integers, float32 scale per output row)."""
    rows = weight.reshape(weight.shape[0], -1)
    peak = rows.abs().amax(dim=1)
    scale = torch.where(peak > 0, peak / qmax(bits), torch.ones_like(peak)).float()
    q = torch.clamp(torch.round(rows / scale[:, None]), -qmax(bits), qmax(bits))
    return q.to(torch.int32).reshape(weight.shape), scale


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    shape = (-1,) + (1,) * (q.dim() - 1)
    return q.float() * scale.view(shape)


# ---------------------------------------------------------------------------------------------
@dataclass
class StoredTensor:
    """One weight tensor as the packed file stores it."""

    bits: int
    shape: tuple[int, ...]
    masked: bool  # whether a sparsity mask is stored (the arch prunes)
    q: Tensor | None  # integers (bits < 32)
    scale: Tensor | None  # per output row (bits < 32)
    values: Tensor | None  # float32 values (bits == 32)
    mask: Tensor | None = None  # kept weights (when masked); a kept weight may quantize to 0

    def dense(self) -> Tensor:
        return self.values if self.values is not None else dequantize(self.q, self.scale)


@dataclass
class StoredLayer:
    name: str
    weight: StoredTensor
    bias: Tensor | None


def compressed_structure(model: nn.Module, policy: Policy, group_of: GroupOf) -> nn.Module:
    """The deployed structure of a standalone model (low-rank layers split, BN folded), without
    meaningful weights: what the packed-file loader fills."""
    return fold_batchnorm(factorize(model, policy, group_of, init=False))


def compress(model: nn.Module, policy: Policy, group_of: GroupOf, seed: int = 0,
             inplace: bool = False, fold_first: bool = False
             ) -> tuple[nn.Module, list[StoredLayer]]:
    """Apply ``policy`` to ``model`` (a standalone model with final BN statistics), or to a copy
    of it unless ``inplace``.

    Returns the compressed model (its weights are exactly the dequantized stored values, so its
    outputs equal those of the model loaded from the packed file) and the stored layers.
    ``fold_first``: BatchNorm folded before factorizing and pruning, the order studies scored
    before compression-aware training used (:data:`nasopt.search.evaluate.SCORING` 1)."""
    model = model if inplace else copy.deepcopy(model)
    if fold_first:
        model.eval()
        factorize(fold_batchnorm(model), policy, group_of)
        prune_global(model, policy.sparsity, policy.pruning, seed)
    else:
        deployed_float(model, policy, group_of, seed)
    return model, store_layers(model, policy, group_of)


def deployed_float(model: nn.Module, policy: Policy, group_of: GroupOf, seed: int = 0
                   ) -> nn.Module:
    """Steps 1-3 in place: ``model`` factorized, pruned and BatchNorm-folded, not yet quantized
    (what quantization-aware fine-tuning starts from)."""
    model.eval()
    factorize(model, policy, group_of)
    prune_global(model, policy.sparsity, policy.pruning, seed)
    return fold_batchnorm(model)


def store_layers(model: nn.Module, policy: Policy, group_of: GroupOf) -> list[StoredLayer]:
    """Quantize the weights of a model already in deployed structure (factorized, pruned, BN
    folded) in place, and return its stored layers: the last step of :func:`compress`, also
    used after quantization-aware fine-tuning (:mod:`nasopt.deploy.finetune`). A zero weight counts as
    pruned when the policy prunes."""
    stored = []
    with torch.no_grad():
        for name, module in weight_layers(model):
            bits = policy.bits_of(group_of(name))
            w = module.weight.detach()
            if bits >= FLOAT_BITS:
                tensor = StoredTensor(bits, tuple(w.shape), policy.sparsity > 0, None, None,
                                      w.clone().float())
            else:
                q, scale = quantize(w, bits)
                tensor = StoredTensor(bits, tuple(w.shape), policy.sparsity > 0, q, scale, None)
            if tensor.masked:
                tensor.mask = w != 0
            module.weight.copy_(tensor.dense())
            bias = None if module.bias is None else module.bias.detach().clone().float()
            stored.append(StoredLayer(name, tensor, bias))
    return stored


def nonzero_params(stored: list[StoredLayer]) -> int:
    return sum(int((s.weight.dense() != 0).sum()) + (0 if s.bias is None else s.bias.numel())
               for s in stored)
