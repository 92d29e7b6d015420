"""Compression of a standalone model by the compression genes of its arch.

Order of operations (the same in the evaluator, in quantization-aware fine-tuning and in the
packed-file loader):

1. **Low rank** (``<group>.rank`` < 1): a linear layer or a (non-grouped) convolution of the
   group becomes two layers, initialised from the truncated SVD ``W ~ (U sqrt(S)) (sqrt(S) V^T)``
   of its weight unfolded to ``out x (in * kernel taps)``, ``r`` = round(ratio x min(out,
   in * taps)) channels between them: a linear layer gives two linear layers; a k-tap (k x k)
   convolution gives a k-tap convolution into ``r`` channels (same stride, padding, dilation)
   followed by a 1x1 convolution (the channel decomposition of Zhang et al., "Accelerating Very
   Deep Convolutional Networks", TPAMI 2016). Depthwise convolutions are not factorized.
2. **Unstructured sparsity** (``sparsity``): global pruning over every stored weight tensor
   (``torch.nn.utils.prune.global_unstructured``). Exactly ``round(sparsity x N)`` weights
   become zero: those of lowest score, where a weight's score is its LAMP score (``lamp``, the
   default: Lee et al., "Layer-adaptive Sparsity for the Magnitude-based Pruning", ICLR 2021),
   its magnitude (``magnitude``, the criterion of studies scored before LAMP), or random
   (``random``, the baseline the literature compares against). LAMP divides a weight's square
   by the sum of the squares of the weights of its layer at least as large, so scores compare
   across layers whose scales differ (a convolution followed by BatchNorm computes the same
   function at any weight scale) and every layer keeps its largest weights; plain magnitudes
   strip the layers of small weights first (in a BatchNorm network, the wide ones).
3. **Fold BatchNorm** into the conv registered just before it (what a deployed model does; the
   conv gains a bias; after step 1 that is the second factor). Every space's network registers
   each BatchNorm right after its conv. Folding scales each output channel, so zeros stay zero.
4. **Quantization** (``<group>.bits``, ``<group>.quant``): ``uniform`` is symmetric
   per-output-channel scales, ``scale = max|w| / (2^(b-1) - 1)``, integers in
   ``[-(2^(b-1) - 1), 2^(b-1) - 1]``; ``codebook`` (Deep Compression's weight sharing, Han et al.,
   ICLR 2016, with a scale per output row) divides each row by its entry of largest magnitude
   (signed, :func:`row_scales`), replaces each kept weight by the nearest of 2^b levels shared by
   the layer, found by k-means (Lloyd's algorithm from a linear initialisation) on those
   normalised weights, and stores the scales, the levels and each weight's b-bit index: a
   non-uniform grid that, like the uniform one, is unchanged by BatchNorm folding. 32 bits means float32 (no
   quantization, either way). Biases stay float32.

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
QUANTS: tuple[str, ...] = ("uniform", "codebook")
FLOAT_BITS = 32
#: the value a file written before a gene kind existed means (no factorization, uniform
#: quantization): :meth:`nasopt.core.space.SearchSpace.gene_defaults`
ABSENT: dict[str, Value] = {"rank": 1.0, "quant": "uniform"}


def compression_genes(groups: list[str], rank_groups: list[str]) -> dict[str, tuple[Value, ...]]:
    """The compression genes of a space: bits per group, one global sparsity, rank ratios, then
    the quantizer per group (``uniform`` or ``codebook``).

    Genes added to a space go after the others, so that the arch indices of a packed file written
    without them still read (:mod:`nasopt.compression.packed`)."""
    genes: dict[str, tuple[Value, ...]] = {f"{g}.bits": BITS for g in groups}
    genes["sparsity"] = SPARSITIES
    genes.update({f"{g}.rank": RANKS for g in rank_groups})
    genes.update({f"{g}.quant": QUANTS for g in groups})
    return genes


def absent_value(gene: str) -> Value | None:
    """What a missing ``gene`` means in a description, arch or packed file written before genes
    of its kind existed (:data:`ABSENT`); None: the gene is required."""
    group, dot, kind = gene.rpartition(".")
    return ABSENT.get(kind) if dot and group else None


REFERENCE_BITS = 8  # the usual deployment default: uniform int8, dense, full rank


def uniform_compression(genes: Mapping[str, tuple[Value, ...]], bits: int
                        ) -> dict[str, Value]:
    """The compression genes among ``genes`` set to ``bits``-bit weights everywhere, no sparsity,
    full rank -- or, where a (restricted) gene lacks that option, its closest one."""
    target = {"bits": bits, "sparsity": 0.0, "rank": 1.0}
    out: dict[str, Value] = {}
    for gene, options in genes.items():
        kind = gene.rsplit(".", 1)[-1]
        if kind == "quant":
            out[gene] = "uniform" if "uniform" in options else options[0]
        elif kind in target:
            out[gene] = min(options, key=lambda v: abs(float(v) - target[kind]))
    return out


def reference_compression(genes: Mapping[str, tuple[Value, ...]]) -> dict[str, Value]:
    """The usual deployment default for the compression genes among ``genes``: int8 weights, no
    sparsity, full rank -- or, where a (restricted) gene lacks that option, its closest one."""
    return uniform_compression(genes, REFERENCE_BITS)


#: the global pruning criteria (:func:`prune_global`); the first is the default
PRUNINGS = ("lamp", "magnitude", "random")
PRUNING = PRUNINGS[0]


@dataclass(frozen=True)
class Policy:
    """The compression genes of one arch; groups without a gene are left uncompressed."""

    bits: Mapping[str, int] = field(default_factory=dict)
    rank: Mapping[str, float] = field(default_factory=dict)
    sparsity: float = 0.0
    pruning: str = PRUNING  # one of PRUNINGS (:func:`prune_global`)
    quant: Mapping[str, str] = field(default_factory=dict)  # group -> "codebook" (else uniform)

    @classmethod
    def from_arch(cls, arch: Mapping[str, Value], pruning: str = PRUNING) -> "Policy":
        bits = {g[:-5]: int(v) for g, v in arch.items() if g.endswith(".bits")}
        rank = {g[:-5]: float(v) for g, v in arch.items() if g.endswith(".rank")}
        quant = {g[:-6]: str(v) for g, v in arch.items() if g.endswith(".quant")}
        return cls(bits, rank, float(arch.get("sparsity", 0.0)), pruning, quant)

    def bits_of(self, group: str) -> int:
        return self.bits.get(group, FLOAT_BITS)

    def codebook_of(self, group: str) -> bool:
        """Whether ``group``'s weights are stored as a codebook (a codebook at 32 bits is float)."""
        return self.quant.get(group, "uniform") == "codebook" and self.bits_of(group) < FLOAT_BITS

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
    """Linear layers and non-grouped convolutions (any kernel) can be factorized."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1


def rank_for(module: nn.Module, ratio: float) -> int:
    """Channels between the two factors: ``round(ratio x min(out, in x taps))``, at least 1."""
    rows = module.weight.shape[0]
    return max(1, round(ratio * min(rows, module.weight[0].numel())))


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
    return nn.Sequential(conv(in_f, rank, module.kernel_size, stride=module.stride,
                              padding=module.padding, dilation=module.dilation, bias=False,
                              padding_mode=module.padding_mode),
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
def lamp_scores(weight: Tensor) -> Tensor:
    """The LAMP score of every entry of one stored tensor: its square over the sum of the
    squares of the entries at least as large in magnitude (the largest entry scores 1; equal
    magnitudes are ordered by position, a stable sort). Float64 sums, float32 scores."""
    squares = weight.detach().reshape(-1).double() ** 2
    ordered, order = torch.sort(squares, stable=True)
    above = torch.flip(torch.cumsum(torch.flip(ordered, [0]), 0), [0])  # sum of those >= each
    scores = torch.zeros_like(squares)
    scores[order] = torch.where(above > 0, ordered / above.clamp_min(1e-300),
                                torch.zeros_like(ordered))
    return scores.float().view_as(weight)


def pruning_scores(weight: Tensor, method: str) -> Tensor:
    """The score by which ``method`` (``lamp`` or ``magnitude``) ranks the entries of a stored
    tensor for global pruning: the lowest go first."""
    if method == "lamp":
        return lamp_scores(weight)
    if method == "magnitude":
        return weight.detach().abs()
    raise ValueError(f"unknown pruning criterion {method!r}; use one of {', '.join(PRUNINGS)}")


def prune_global(model: nn.Module, sparsity: float, method: str = PRUNING,
                 seed: int = 0) -> None:
    """Zero exactly round(sparsity x N) of all stored weights (N over every weight layer), those
    of lowest :func:`pruning_scores` (``method`` ``lamp`` or ``magnitude``) or random ones."""
    if sparsity <= 0:
        return
    if method not in PRUNINGS:
        raise ValueError(f"unknown pruning method {method!r}; use one of {', '.join(PRUNINGS)}")
    layers = weight_layers(model)
    total = sum(m.weight.numel() for _, m in layers)
    amount = round(sparsity * total)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if method == "random":
            prune.global_unstructured([(m, "weight") for _, m in layers],
                                      pruning_method=prune.RandomUnstructured, amount=amount)
        else:
            prune.global_unstructured(
                [(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured,
                amount=amount, importance_scores={(m, "weight"): pruning_scores(m.weight, method)
                                                  for _, m in layers})
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


#: Lloyd iterations at most (1-D k-means converges in a few dozen on a layer's weights)
KMEANS_ITERATIONS = 50


def kmeans_1d(values: Tensor, k: int, iterations: int = KMEANS_ITERATIONS
              ) -> tuple[Tensor, Tensor]:
    """1-D k-means of ``values``: (``k`` sorted float32 centroids, the index of each value's
    nearest centroid). Lloyd's algorithm in float64 from ``k`` points spaced evenly over
    ``[min, max]`` (Deep Compression's linear initialisation), deterministic. With at most ``k``
    distinct values the centroids are those values (the last repeated), so a codebook-quantized
    tensor quantizes to itself."""
    v = values.detach().reshape(-1).double()
    device = v.device
    if v.numel() == 0:
        return torch.zeros(k, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    distinct = torch.unique(v)
    if distinct.numel() <= k:
        centroids = torch.cat([distinct, distinct[-1:].expand(k - distinct.numel())])
    else:
        centroids = torch.linspace(float(v.min()), float(v.max()), k, dtype=torch.float64,
                                   device=device)
        for _ in range(iterations):
            index = _nearest(v, centroids)
            sums = torch.zeros(k, dtype=torch.float64, device=device).index_add_(0, index, v)
            counts = torch.bincount(index, minlength=k)
            moved = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
            moved = torch.sort(moved).values  # an empty cluster keeps its place
            if torch.equal(moved, centroids):
                break
            centroids = moved
    centroids = centroids.float()
    return centroids, _nearest(v, centroids.double())


def _nearest(v: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest of the sorted ``centroids`` for every value (ties: the lower)."""
    return torch.bucketize(v, (centroids[1:] + centroids[:-1]) / 2, right=False)


def row_scales(weight: Tensor) -> Tensor:
    """A codebook layer's scale per output row: the row's entry of largest magnitude, with its
    sign (1 for an all-zero row). Scaling a row by any factor scales its scale alike, so a
    codebook of ``weight / scale`` is unchanged by BatchNorm folding (as per-channel uniform
    quantization is)."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    peak = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    return torch.where(peak != 0, peak, torch.ones_like(peak)).float()


def codebook_quantize(weight: Tensor, bits: int, mask: Tensor | None = None
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """(index per weight (int64, 0 where ``mask`` drops it), the 2^bits float32 shared levels,
    the float32 scale per output row) of ``weight``: k-means over the kept entries of ``weight``
    divided by their row's scale (:func:`row_scales`), which all lie in [-1, 1]."""
    scale = row_scales(weight)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    normal = weight.detach().float() / scale.view(shape)
    kept = normal if mask is None else normal[mask]
    levels, index = kmeans_1d(kept, 2 ** bits)
    full = torch.zeros(weight.numel(), dtype=torch.int64, device=weight.device)
    if mask is None:
        full = index
    else:
        full[mask.reshape(-1)] = index
    return full.reshape(weight.shape), levels, scale


def decode(index: Tensor, levels: Tensor, scale: Tensor, mask: Tensor | None = None) -> Tensor:
    """The weights of a codebook record: ``scale[row] * levels[index]``, zero where ``mask``
    drops them."""
    w = levels[index] * scale.view((-1,) + (1,) * (index.dim() - 1))
    return w if mask is None else torch.where(mask, w, torch.zeros_like(w))


# ---------------------------------------------------------------------------------------------
@dataclass
class StoredTensor:
    """One weight tensor as the packed file stores it."""

    bits: int
    shape: tuple[int, ...]
    masked: bool  # whether a sparsity mask is stored (the arch prunes)
    q: Tensor | None  # integers (bits < 32); the level indices of a codebook layer
    scale: Tensor | None  # per output row (bits < 32)
    values: Tensor | None  # float32 values (bits == 32)
    mask: Tensor | None = None  # kept weights (when masked); a kept weight may quantize to 0
    codebook: Tensor | None = None  # the 2^bits shared levels (bits < 32, codebook)

    def dense(self) -> Tensor:
        if self.values is not None:
            return self.values
        if self.codebook is not None:
            return decode(self.q, self.codebook, self.scale, self.mask)
        return dequantize(self.q, self.scale)


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


def store_layers(model: nn.Module, policy: Policy, group_of: GroupOf,
                 codebooks: Mapping[str, tuple[Tensor, Tensor, Tensor]] | None = None
                 ) -> list[StoredLayer]:
    """Quantize the weights of a model already in deployed structure (factorized, pruned, BN
    folded) in place, and return its stored layers: the last step of :func:`compress`, also
    used after quantization-aware fine-tuning (:mod:`nasopt.deploy.finetune`). A zero weight counts as
    pruned when the policy prunes. ``codebooks``: a codebook layer's (index, levels, scale) by
    layer name, stored as given instead of found by k-means (fine-tuned levels)."""
    stored = []
    with torch.no_grad():
        for name, module in weight_layers(model):
            group = group_of(name)
            bits = policy.bits_of(group)
            w = module.weight.detach()
            masked = policy.sparsity > 0
            mask = w != 0 if masked else None
            if bits >= FLOAT_BITS:
                tensor = StoredTensor(bits, tuple(w.shape), masked, None, None, w.clone().float())
            elif policy.codebook_of(group):
                given = (codebooks or {}).get(name)
                index, levels, scale = given if given else codebook_quantize(w, bits, mask)
                tensor = StoredTensor(bits, tuple(w.shape), masked, index, scale, None,
                                      codebook=levels)
            else:
                q, scale = quantize(w, bits)
                tensor = StoredTensor(bits, tuple(w.shape), masked, q, scale, None)
            tensor.mask = mask
            module.weight.copy_(tensor.dense())
            bias = None if module.bias is None else module.bias.detach().clone().float()
            stored.append(StoredLayer(name, tensor, bias))
    return stored


def nonzero_params(stored: list[StoredLayer]) -> int:
    return sum(int((s.weight.dense() != 0).sum()) + (0 if s.bias is None else s.bias.numel())
               for s in stored)
