"""Continuous relaxation of a trained weight-sharing supernet, for gradient search
(:mod:`nasopt.gradient.search`): the exact expected packed size, and the relaxed ``conv1d`` network.

**Expected packed size** (:class:`ExpectedSize`, for a space's relaxation). The packed file is a
header of fixed length plus one record per stored weight layer
(:mod:`nasopt.compression.packed`); a record's bytes depend only on that layer's deployed shape
(width, kernel, depth = whether the layer exists, low rank = whether it is split in two), its
group's bit-width and the sparsity. For every weight layer of the standalone model ("slot") we
find the genes its shape depends on (vary one gene at a time from the largest arch, where every
slot exists: a dependency that shows only away from the largest arch, as in a network whose head
follows a network-wide depth, is not found, so a space's relaxation checks exactness against
brute force), enumerate their joint options (other genes at the largest), build the deployed
structure on the meta device and count the record's bytes with
:func:`nasopt.compression.packed.layer_size` for every bit-width. Under independent per-gene
distributions the expectation is then ``header + sum_slots sum_combos P(combo) * bytes``: exact
(a one-hot gives ``packed.predicted_size`` of that arch; a test checks it, and checks the
expectation against brute force over a small space), differentiable, float64.

**Sparsity is not relaxed.** Global pruning splits the zeros between layers by the trained
weights (their LAMP scores), so a record's size at sparsity > 0 is not a function of the arch. The
relaxation fixes ``sparsity`` (default: its smallest allowed option, 0 in the full space) and the
derived archs carry that value. At a fixed sparsity > 0 the expected size assumes every layer
keeps the same fraction (an approximation: exact only at sparsity 0).

**The relaxed conv1d network** (:class:`Conv1dRelaxation`) runs the supernet's shared weights
(a private copy) with, per gene, a probability-weighted mixture of its options:

* width (FBNetV2): a channel mask ``sum_w p_w [c < w]`` on every block's output (and on the head's
  input columns); at a one-hot it is the subnet's channel prefix;
* kernel: the weight times ``sum_k p_k [tap in the centre k]`` = the mixture of centre-cropped,
  zero-padded kernels;
* depth: ``sum_d p_d`` (the stage's output after d blocks);
* bits: ``sum_b p_b fake_quantize_b(W)`` with a straight-through gradient, per output channel as
  the packer quantizes (before BatchNorm folding, which scales rows: symmetric per-row
  quantization commutes with that, so a one-hot computes the compressed model up to float
  rounding);
* head rank: ``sum_r p_r fq(A_r) fq(B_r)`` with the SVD factors of the (masked) head weight as
  :func:`nasopt.compression.compress.svd_factors` makes them; the basis comes from the detached weight,
  the gradient reaches the weight through ``B = S^-1/2 U^T W``.

At a one-hot the relaxed network computes the extracted subnet (a test checks it).

**Genes fixed besides sparsity** (:func:`fixed_genes`): the quantizer (``uniform``; a codebook's
levels come from k-means, not a function of the logits) and the rank of the stages' convolutions
(1: only the head's rank is relaxed). Derived archs carry those values.
"""
from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nasopt.core.arch import Arch, Value
from nasopt.compression.compress import (
    FLOAT_BITS, Policy, StoredLayer, StoredTensor, absent_value, factorize, fold_batchnorm,
    weight_layers,
)
from nasopt.core.errors import NasoptError
from nasopt.deploy.finetune import fake_quantize
from nasopt.compression.packed import fixed_size, layer_size
from nasopt.core.space import SearchSpace
from nasopt.supernet.elastic import Supernet

NOT_RELAXED = ("sparsity",)


def fixed_sparsity(space: SearchSpace, sparsity: float | None = None) -> dict[str, Value]:
    """The values of the genes the relaxation does not relax (``sparsity``): ``sparsity`` if
    given (it must be an allowed option), else the smallest allowed option."""
    if "sparsity" not in space.genes:
        return {}
    opts = space.genes["sparsity"]
    if sparsity is None:
        return {"sparsity": min(opts)}
    value = space._coerce("sparsity", sparsity)
    if value not in opts:
        raise NasoptError(f"sparsity {sparsity} is not an allowed option; choose among "
                          f"{list(opts)}")
    return {"sparsity": value}


def fixed_genes(space: SearchSpace, sparsity: float | None = None,
                relaxed: Sequence[str] = ()) -> dict[str, Value]:
    """The genes a relaxation does not relax, with their values: ``sparsity``
    (:func:`fixed_sparsity`); every ``<group>.quant`` at ``uniform`` (the expected size counts
    uniform records); every ``<group>.rank`` not in ``relaxed`` at 1 (no factorization). A gene
    restricted so that it lacks that value is refused in one line."""
    fixed = fixed_sparsity(space, sparsity)
    for gene, options in space.genes.items():
        kind = gene.rpartition(".")[2]
        if gene in fixed or gene in relaxed or kind not in ("quant", "rank"):
            continue
        value = absent_value(gene)
        if value not in options:
            raise NasoptError(
                f"gradient search relaxes uniform quantization and the rank of "
                f"{', '.join(relaxed) or 'no layer'} only, but gene {gene!r} is restricted to "
                f"{list(options)}: allow {value!r} (e.g. --restrict {gene}={value}) or use a "
                f"sampling strategy")
        fixed[gene] = value
    return fixed


class ExpectedSize:
    """Expected packed bytes of ``space``'s archs under independent per-gene distributions;
    ``fixed`` holds the values of genes without logits (sparsity). See the module docstring."""

    def __init__(self, space: SearchSpace, fixed: Mapping[str, Value] | None = None):
        self.space = space
        self.fixed = dict(fixed or {})
        self.genes = {g: tuple(o) for g, o in space.genes.items() if g not in self.fixed}
        arch_genes = set(space.architecture_genes())
        base = dict(space.largest())
        base.update(self.fixed)
        self._base = base
        self._header = fixed_size(space, Arch(base))  # header and checksum
        self._sparsity = float(self.fixed.get("sparsity", 0.0))
        self._structs: dict[str, dict[str, list[tuple[tuple[int, ...], int]]]] = {}
        # the weight layers that BN folding gives a bias (those followed by a BatchNorm): the same
        # in every arch, found once by folding the largest model (every layer exists) for real
        small = space.build(Arch(base))
        had = {n for n, m in weight_layers(small) if m.bias is not None}
        self._folded = {n for n, m in weight_layers(fold_batchnorm(small))
                        if m.bias is not None and n not in had}
        slots = self._slots(Arch({g: base[g] for g in arch_genes if g in base}))
        deps: dict[str, set[str]] = {s: set() for s in slots}
        for g in arch_genes & set(self.genes):
            for o in self.genes[g]:
                if o == base[g]:
                    continue
                varied = self._slots(Arch({**{k: base[k] for k in arch_genes}, g: o}))
                for s, shape in slots.items():
                    if varied.get(s) != shape:
                        deps[s].add(g)
        # one table per slot: bytes over the joint options of its genes (then its bits gene)
        self._terms: list[tuple[list[str], Tensor]] = []
        for slot in slots:
            group = space.group_of(slot)
            genes = [g for g in self.genes if g in deps[slot]]
            rank = f"{group}.rank"
            if rank in self.genes and len(self.genes[rank]) > 0:
                genes.append(rank)
            bits = f"{group}.bits"
            bit_opts = self.genes.get(bits, (FLOAT_BITS,))
            shape = [len(self.genes[g]) for g in genes] + [len(bit_opts)]
            table = torch.zeros(shape, dtype=torch.float64)
            for idx in itertools.product(*(range(len(self.genes[g])) for g in genes)):
                arch = {**base, **{g: self.genes[g][i] for g, i in zip(genes, idx)}}
                layers = self._deployed(arch).get(slot, [])
                for bi, b in enumerate(bit_opts):
                    table[idx + (bi,)] = sum(self._bytes(shape_, bias, int(b))
                                             for shape_, bias in layers)
            names = genes + ([bits] if bits in self.genes else [])
            if bits not in self.genes:
                table = table[..., 0]
            self._terms.append((names, table))

    # ---- structure on the meta device --------------------------------------------------------
    def _slots(self, arch: Arch) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            model = self.space.build(arch)
        return {n: tuple(m.weight.shape) for n, m in weight_layers(model)}

    def _deployed(self, arch: Mapping[str, Value]) -> dict[str, list[tuple[tuple[int, ...], int]]]:
        """slot -> [(deployed weight shape, bias length)] of the deployed structure of ``arch``:
        :func:`nasopt.compression.compress.compressed_structure` without its arithmetic (BN folding only
        adds a bias to the layers in ``_folded``; factorization builds modules only), on the meta
        device."""
        key = Arch(arch).key
        if key not in self._structs:
            with torch.device("meta"):
                model = self.space.build(arch)
                for name, m in weight_layers(model):
                    if name in self._folded and m.bias is None:
                        m.bias = nn.Parameter(torch.empty(m.weight.shape[0]))
                factorize(model, Policy.from_arch(arch), self.space.group_of, init=False)
            out: dict[str, list] = {}
            for name, m in weight_layers(model):
                parts = name.split(".")
                # a factorized layer ``x`` becomes ``x.0`` / ``x.1`` (nn.Sequential)
                slot = ".".join(parts[:-1]) if parts[-1] in ("0", "1") and isinstance(
                    model.get_submodule(".".join(parts[:-1])), nn.Sequential) else name
                out.setdefault(slot, []).append(
                    (tuple(m.weight.shape), 0 if m.bias is None else m.bias.numel()))
            self._structs[key] = out
        return self._structs[key]

    def _bytes(self, shape: tuple[int, ...], bias: int, bits: int) -> int:
        n = math.prod(shape)
        masked = self._sparsity > 0
        mask = None
        if masked:  # approximation: every layer keeps the same fraction (module docstring)
            mask = torch.zeros(n, dtype=torch.bool)
            mask[: n - round(self._sparsity * n)] = True
        tensor = StoredTensor(bits, shape, masked, None, None, None, mask)
        return layer_size(StoredLayer("", tensor, torch.empty(bias, device="meta")
                                      if bias else None))

    # ---- the expectation ---------------------------------------------------------------------
    def __call__(self, probs: Mapping[str, Tensor]) -> Tensor:
        device = next(iter(probs.values())).device if probs else torch.device("cpu")
        total = torch.tensor(float(self._header), dtype=torch.float64, device=device)
        for names, table in self._terms:
            e = table.to(device)
            for g in reversed(names):
                e = e @ probs[g].to(device=device, dtype=torch.float64)
            total = total + e
        return total

    def exact(self, arch: Mapping[str, Value]) -> int:
        """The size of one arch from the same tables (a one-hot expectation), as an int."""
        probs = {g: F.one_hot(torch.tensor(opts.index(arch[g])), len(opts)).double()
                 for g, opts in self.genes.items()}
        return int(round(float(self(probs))))


# ---- the relaxed conv1d network ------------------------------------------------------------------

def _mix_quant(w: Tensor, p: Tensor | None, options: Sequence[int]) -> Tensor:
    """``sum_b p_b fake_quantize(w, b)`` (straight-through); ``w`` when the group has no bits gene."""
    if p is None:
        return w
    out = 0
    for pb, b in zip(p, options):
        out = out + pb * fake_quantize(w, int(b))
    return out


def _prefix_mask(p: Tensor, options: Sequence[int], size: int) -> Tensor:
    """``sum_i p_i [c < options[i]]`` over ``c < size``."""
    c = torch.arange(size, device=p.device)
    keep = torch.stack([(c < int(o)).to(p.dtype) for o in options])  # (options, size)
    return p @ keep


def _centre_mask(p: Tensor, options: Sequence[int], size: int) -> Tensor:
    """``sum_i p_i [tap in the centre options[i]]`` over ``size`` taps."""
    t = torch.arange(size, device=p.device)
    mid = size // 2
    keep = torch.stack([((t - mid).abs() <= int(o) // 2).to(p.dtype) for o in options])
    return p @ keep


class Conv1dRelaxation(nn.Module):
    """The relaxed ``conv1d`` supernet (module docstring): ``genes`` are the space's genes but
    ``sparsity``, the quantizers and the stage ranks (fixed, see :func:`fixed_genes`); weights start as a copy of ``supernet``'s.
    Implements :class:`nasopt.gradient.search.Relaxation`; ``expected_cost`` gives ``{"size": bytes}``,
    plus ``"latency"`` (ms, :meth:`nasopt.hardware.lut.LatencyTable.expected_latency`: exact, the
    prediction is a sum over units) when a latency table of the space is given, and ``"sram"``
    (bytes at ``sram_dtype``, :class:`nasopt.hardware.memory.ExpectedPeak`: exact at a one-hot) when a
    data type is given."""

    def __init__(self, space: SearchSpace, supernet: Supernet, sparsity: float | None = None,
                 latency: Any = None, sram_dtype: str | None = None):
        super().__init__()
        if space.name != "conv1d":
            raise NasoptError(f"Conv1dRelaxation relaxes the conv1d space, not {space.name!r}")
        self.space = space
        self.fixed = fixed_genes(space, sparsity, relaxed=("head.rank",))
        self.genes: dict[str, tuple] = {g: tuple(o) for g, o in space.genes.items()
                                        if g not in self.fixed}
        self.net = copy.deepcopy(supernet.net)  # never touches the supernet's own weights
        self.net.configure(None)
        self.size = ExpectedSize(space, self.fixed)
        self.latency = latency  # a nasopt.hardware.lut.LatencyTable of this (sub-)space, or None
        self.sram = None
        if sram_dtype is not None:
            from nasopt.hardware.memory import ExpectedPeak
            self.sram = ExpectedPeak(space, sram_dtype, self.fixed)

    def weight_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def expected_cost(self, probs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {"size": self.size(probs)}
        if self.latency is not None:
            # every relaxed gene at its options, the fixed ones (a stage's rank changes its
            # units) one-hot at their value
            given = {g: p for g, p in probs.items() if g in self.genes}
            like = next(iter(given.values()))
            for gene, value in self.fixed.items():
                options = self.latency.space["genes"].get(gene)
                if options is not None:
                    given[gene] = torch.tensor([float(o == value) for o in options],
                                               dtype=like.dtype, device=like.device)
            out["latency"] = self.latency.expected_latency(given)
        if self.sram is not None:
            out["sram"] = self.sram(probs)
        return out

    def full_arch(self, arch: Mapping[str, Value]) -> Arch:
        """A derived arch (relaxed genes) completed with the fixed genes, checked."""
        return self.space.validate({**arch, **self.fixed})

    def _p(self, probs: Mapping[str, Tensor], gene: str) -> Tensor | None:
        return probs[gene] if gene in self.genes else None

    def forward(self, x: Tensor, probs: Mapping[str, Tensor]) -> Tensor:
        genes = self.genes
        in_mask: Tensor | None = None
        h = x
        for s, stage in enumerate(self.net.stages, start=1):
            blocks = list(stage.blocks)
            width = blocks[0].conv.out_channels
            ksize = blocks[0].conv.kernel_size[0]
            mask = _prefix_mask(probs[f"s{s}.width"], genes[f"s{s}.width"], width)
            kmask = _centre_mask(probs[f"s{s}.k"], genes[f"s{s}.k"], ksize)
            pb = self._p(probs, f"s{s}.bits")
            outs = []
            for j, block in enumerate(blocks):
                w = block.conv.weight * kmask
                m_in = in_mask if j == 0 else mask
                if m_in is not None:
                    w = w * m_in[None, :, None]
                w = _mix_quant(w, pb, genes.get(f"s{s}.bits", ()))
                y = F.conv1d(h, w, block.conv.bias, block.conv.stride, ksize // 2)
                y = F.relu(block.bn(y)) * mask[None, :, None]
                h = h + y if block.residual else y
                outs.append(h)
            pd = probs[f"s{s}.depth"]
            h = sum(p * outs[int(d) - 1] for p, d in zip(pd, genes[f"s{s}.depth"]))
            in_mask = mask
        feats = torch.flatten(h, 1)
        head = self.net.head
        cols = in_mask.repeat_interleave(self.net.out_length)
        w = head.weight * cols[None, :]
        pb = self._p(probs, "head.bits")
        bits = genes.get("head.bits", ())
        if "head.rank" not in genes:
            return F.linear(feats, _mix_quant(w, pb, bits), head.bias)
        weight = 0
        svd = None
        for pr, ratio in zip(probs["head.rank"], genes["head.rank"]):
            if float(ratio) >= 1.0:
                weight = weight + pr * _mix_quant(w, pb, bits)
                continue
            rank = max(1, round(float(ratio) * min(w.shape)))
            if svd is None:  # one decomposition for every ratio
                svd = torch.linalg.svd(w.detach().double(), full_matrices=False)
            u, sv, _ = svd
            root = torch.sqrt(sv[:rank]).clamp_min(1e-12)
            a = (u[:, :rank] * root).float()  # as compress.svd_factors
            b = ((u[:, :rank] / root).T.float()) @ w  # = sqrt(S) V^T, gradient to w
            weight = weight + pr * (_mix_quant(a, pb, bits) @ _mix_quant(b, pb, bits))
        return F.linear(feats, weight, head.bias)


def check_space(cls: type[SearchSpace]) -> None:
    """Refuse, before any training, a space that gradient search cannot relax (one whose class
    does not define :meth:`SearchSpace.relax <nasopt.core.space.SearchSpace.relax>`)."""
    cls.check_relaxable()


def relax(space: SearchSpace, supernet: Supernet, sparsity: float | None = None,
          latency: Any = None, sram_dtype: str | None = None) -> nn.Module:
    """The relaxation of ``space``'s supernet for gradient search (:meth:`SearchSpace.relax`),
    with the expected latency of ``latency`` (a :class:`nasopt.hardware.lut.LatencyTable`) and
    the expected peak activation memory at ``sram_dtype`` among its costs."""
    check_space(type(space))
    return space.relax(supernet, sparsity, latency, sram_dtype)
