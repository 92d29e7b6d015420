"""Codebook (non-uniform) quantization and the decomposition of k-tap convolutions: the k-means,
the packed records, training-time and fine-tuning forms, files written before these genes existed,
and a search restricted to uniform quantization at full rank equal to one without the genes."""
from __future__ import annotations

import copy
import random
import struct
import zlib

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from nasopt import api
from nasopt.compression import packed
from nasopt.compression.compress import (
    Policy, codebook_quantize, compress, decode, factorize, kmeans_1d, svd_factors,
)
from nasopt.core.errors import NasoptError
from nasopt.core.space import space_from_description
from nasopt.deploy.finetune import CodebookWeight, finalize, prepare_qat
from nasopt.search.loop import suggest_arch
from nasopt.spaces import SPACES
from nasopt.supernet.compressed import compressed_forward

SHAPES = {"conv1d": (1, 40), "mobilenet": (1, 12, 12)}


def _space(name: str):
    return SPACES[name](SHAPES[name], 5).full_space()


def _with_bn_stats(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 4 - 2)  # signs too
    return model.eval()


def _codebook_archs(name: str, n: int):
    space = _space(name)
    rng = random.Random(7)
    torch.manual_seed(0)
    for i in range(n):
        arch = dict(space.sample(rng))
        arch.update({g: "codebook" for g in space.genes if g.endswith(".quant")})
        arch.update({g: (2, 4, 8)[i % 3] for g in space.genes if g.endswith(".bits")})
        arch["sparsity"] = (0.0, 0.75)[i % 2]
        arch = space.validate(arch)
        yield space, arch, _with_bn_stats(space.build(arch))


def test_codebook_and_stage_ranks_are_searched_when_asked():
    space = SPACES["conv1d"]((1, 40), 5)
    assert space.genes["s1.quant"] == ("uniform",) and space.genes["s2.rank"] == (1.0,)
    assert space.genes["head.rank"] == (0.25, 0.5, 1.0)
    wide = space.restrict({"s1.quant": ["uniform", "codebook"], "s2.rank": ["0.5", "1"]})
    assert wide.genes["s1.quant"] == ("uniform", "codebook") and wide.genes["s2.rank"] == (0.5, 1.0)
    assert space.full_space().genes["s3.rank"] == (0.25, 0.5, 1.0)
    mobile = SPACES["mobilenet"]((1, 12, 12), 5)
    assert all(mobile.genes[g] == ("uniform",) for g in mobile.genes if g.endswith(".quant"))
    assert mobile.genes["s1.rank"] == (0.25, 0.5, 1.0)


# ---- k-means --------------------------------------------------------------------------------
def test_kmeans_finds_the_centres_of_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    values = (centres.repeat_interleave(50) + 0.01 * torch.randn(200, generator=g))
    found, index = kmeans_1d(values, 4)
    expected = torch.stack([values[i * 50:(i + 1) * 50].mean() for i in range(4)])
    assert torch.allclose(found, expected, atol=1e-6)
    assert torch.equal(index, torch.arange(4).repeat_interleave(50))


def test_kmeans_keeps_few_distinct_values_exactly():
    values = torch.tensor([0.25, -1.0, 0.25, 0.75, -1.0])
    found, index = kmeans_1d(values, 4)
    assert torch.equal(found, torch.tensor([-1.0, 0.25, 0.75, 0.75]))
    assert torch.equal(found[index], values)


def test_codebook_levels_are_unchanged_by_scaling_rows():
    w = torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(1))
    s = torch.tensor([2.0, -0.5, 1.0, 3.0, -1.5, 0.25])
    i1, l1, sc1 = codebook_quantize(w, 3)
    i2, l2, sc2 = codebook_quantize(w * s.view(-1, 1, 1), 3)
    assert torch.equal(i1, i2) and torch.allclose(l1, l2, atol=1e-6)
    assert torch.allclose(sc2, sc1 * s)
    assert len(torch.unique(decode(i1, l1, torch.ones(6)))) <= 8


# ---- the packed file -------------------------------------------------------------------------
@pytest.mark.parametrize("name", SHAPES)
def test_codebook_records_round_trip_exactly(name):
    x = torch.randn(8, *SHAPES[name])
    for space, arch, model in _codebook_archs(name, 6):
        deployed, stored = compress(model, Policy.from_arch(arch), space.group_of)
        data = packed.pack(space, arch, stored)
        assert len(data) == packed.predicted_size(space, arch, stored)
        _, back_arch, loaded, back = packed.unpack_stored(data, api.SPACES)
        assert back_arch == arch
        for a, b in zip(stored, back):
            assert a.weight.codebook is not None and b.weight.codebook is not None
            assert torch.equal(a.weight.codebook, b.weight.codebook)
            assert torch.equal(a.weight.scale, b.weight.scale)
            assert torch.equal(a.weight.dense(), b.weight.dense())
            levels = torch.unique(a.weight.q[a.weight.mask] if a.weight.masked else a.weight.q)
            assert levels.numel() <= 2 ** a.weight.bits
        with torch.no_grad():
            assert torch.equal(deployed(x), loaded(x))


def test_codebook_costs_its_levels_and_saves_nothing_else():
    space, arch, model = next(_codebook_archs("conv1d", 1))
    uniform = space.validate({**arch, **{g: "uniform" for g in space.genes if g.endswith(".quant")}})
    _, cb = compress(model, Policy.from_arch(arch), space.group_of)
    _, un = compress(model, Policy.from_arch(uniform), space.group_of)
    levels = sum(4 * 2 ** s.weight.bits for s in cb)
    assert packed.predicted_size(space, arch, cb) == packed.predicted_size(space, uniform, un) + levels


def test_codebook_beats_uniform_at_two_bits_on_the_same_weights():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    from nasopt.compression.compress import dequantize, quantize
    uniform = dequantize(*quantize(w, 2))
    index, levels, scale = codebook_quantize(w, 2)
    assert (decode(index, levels, scale) - w).pow(2).mean() < (uniform - w).pow(2).mean()


# ---- decomposition of k-tap convolutions --------------------------------------------------------
@pytest.mark.parametrize("conv", [nn.Conv1d(6, 8, 5, padding=2, stride=2),
                                  nn.Conv2d(4, 10, 3, padding=1)], ids=["1d", "2d"])
def test_rank_r_factors_reconstruct_as_numpy(conv):
    w = conv.weight.detach().reshape(conv.out_channels, -1)
    u, s, vh = np.linalg.svd(w.double().numpy(), full_matrices=False)
    for r in (1, 3):
        a, b = svd_factors(w, r)
        expected = (u[:, :r] * s[:r]) @ vh[:r]
        assert np.allclose((a @ b).double().numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("conv", [nn.Conv1d(6, 8, 5, padding=2, stride=2),
                                  nn.Conv2d(4, 10, 3, padding=1)], ids=["1d", "2d"])
def test_factorized_conv_computes_the_rank_r_kernel(conv):
    model = nn.Sequential(conv)
    x = torch.randn(3, conv.in_channels, *([11] * (conv.weight.dim() - 2)))
    pair = factorize(copy.deepcopy(model), Policy(rank={"0": 0.5}), lambda n: n.split(".")[0])[0]
    assert isinstance(pair, nn.Sequential) and pair[0].kernel_size == conv.kernel_size
    r = pair[0].out_channels
    w = conv.weight.detach().reshape(conv.out_channels, -1)
    a, b = svd_factors(w, r)
    low = copy.deepcopy(conv)
    with torch.no_grad():
        low.weight.copy_((a @ b).reshape(conv.weight.shape))
        assert torch.allclose(pair(x), low(x), atol=1e-5)


def test_stage_rank_factorizes_the_stage_convs_and_round_trips():
    space = _space("conv1d")
    arch = space.validate({**space.largest(), "s2.rank": 0.25, "s2.bits": 4, "sparsity": 0.5})
    model = _with_bn_stats(space.build(arch))
    deployed, stored = compress(model, Policy.from_arch(arch), space.group_of)
    names = [s.name for s in stored]
    assert "stages.1.blocks.0.conv.0" in names and "stages.1.blocks.0.conv.1" in names
    assert "stages.0.blocks.0.conv" in names  # s1 keeps full rank
    data = packed.pack(space, arch, stored)
    assert len(data) == packed.predicted_size(space, arch, stored)
    loaded, _ = packed.unpack(data, api.SPACES)
    x = torch.randn(4, 1, 40)
    with torch.no_grad():
        assert torch.equal(deployed(x), loaded(x))
    full = space.validate({**arch, "s2.rank": 1.0})
    assert packed.predicted_size(space, arch, stored) < packed.predicted_size(
        space, full, compress(model, Policy.from_arch(full), space.group_of)[1])


# ---- training-time and fine-tuning forms --------------------------------------------------------
@pytest.mark.parametrize("name", SHAPES)
def test_compressed_forward_is_the_deployed_codebook_model(name):
    space = _space(name)
    supernet = space.supernet()
    for _, arch, _ in _codebook_archs(name, 3):
        arch = space.validate({**arch, **{g: 0.5 for g in space.genes if g.endswith(".rank")}})
        sub = _with_bn_stats(supernet.extract(arch))
        x = torch.randn(8, *SHAPES[name])
        deployed, _ = compress(sub, Policy.from_arch(arch), space.group_of)
        with torch.no_grad(), compressed_forward(sub, Policy.from_arch(arch), space.group_of, x):
            trained = sub(x)
        with torch.no_grad():
            assert torch.allclose(trained, deployed(x), atol=1e-4)


def test_finetuning_trains_the_levels_and_stores_them():
    space, arch, model = next(_codebook_archs("conv1d", 1))
    arch = space.validate({**arch, "head.rank": 1.0})
    policy = Policy.from_arch(arch)
    qat = prepare_qat(model, policy, space.group_of)
    books = [m for m in qat.modules() if isinstance(m, CodebookWeight)]
    assert books and all(b.levels.requires_grad for b in books)
    head = qat.head.parametrizations.weight[0]
    x = torch.randn(16, 1, 40)
    qat(x).pow(2).sum().backward()
    assert head.levels.grad is not None and head.levels.grad.abs().sum() > 0
    before = head.index.clone()
    with torch.no_grad():
        for b in books:
            b.levels.add_(0.01)
    deployed, stored = finalize(qat, policy, space.group_of)
    back = {s.name: s for s in stored}["head"].weight
    assert torch.equal(back.q, before)
    assert torch.equal(back.codebook, head.levels.detach())
    loaded, _ = packed.unpack(packed.pack(space, arch, stored), api.SPACES)
    with torch.no_grad():
        assert torch.equal(deployed(x), loaded(x))


def test_level_gradient_is_the_sum_of_its_weights_gradients():
    w = torch.randn(4, 10, generator=torch.Generator().manual_seed(5))
    p = CodebookWeight(w, 2, None)
    latent = w.clone()
    out = p(latent)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    scaled = g * p.scale.view(-1, 1)
    expected = torch.zeros(4).index_add_(0, p.index.reshape(-1), scaled.reshape(-1))
    assert torch.allclose(p.levels.grad, expected, atol=1e-6)


# ---- files written before the genes, and the uniform restriction ----------------------------
def _old_bytes(space, arch, stored) -> bytes:
    """The file an earlier nasopt wrote: version 2, the header's genes without the new ones."""
    data = packed.pack(space, arch, stored)[:-4]
    old = [g for g in space.genes if not g.endswith(".quant")
           and not (g.endswith(".rank") and g != "head.rank")]
    name = space.name.encode()
    at = 4 + 2 + len(name) + 1 + 2 * len(space.input_shape) + 2 + 1  # the gene count byte
    head = bytearray(data[:at + 1 + len(space.genes)])
    head[4] = 2
    head[at] = len(old)
    head = bytes(head[:at + 1 + len(old)])
    body = head + data[at + 1 + len(space.genes):]
    return body + struct.pack("<I", zlib.crc32(body))


def test_a_file_written_before_the_new_genes_still_loads():
    space = _space("conv1d")
    arch = space.validate({**space.largest(), "s1.bits": 4, "sparsity": 0.5})
    model = _with_bn_stats(space.build(arch))
    deployed, stored = compress(model, Policy.from_arch(arch), space.group_of)
    loaded, back = packed.unpack(_old_bytes(space, arch, stored), api.SPACES)
    assert back == arch
    x = torch.randn(4, 1, 40)
    with torch.no_grad():
        assert torch.equal(deployed(x), loaded(x))


def test_descriptions_and_archs_without_the_new_genes_read_as_before():
    space = _space("conv1d")
    desc = space.describe()
    desc["genes"] = {g: o for g, o in desc["genes"].items() if not g.endswith(".quant")
                     and g not in ("s1.rank", "s2.rank", "s3.rank")}
    old = space_from_description(desc, api.SPACES)
    assert old.genes["s1.quant"] == ("uniform",) and old.genes["s2.rank"] == (1.0,)
    arch = {g: o[0] for g, o in desc["genes"].items()}
    assert old.validate(arch)["head.quant"] == "uniform"
    codebook_only = space.restrict({"s1.quant": ["codebook"]})
    with pytest.raises(NasoptError, match="lacks gene"):
        codebook_only.validate({g: v for g, v in codebook_only.sample(random.Random(0)).items()
                                if g != "s1.quant"})


class _BeforeTheGenes(SPACES["conv1d"]):
    """conv1d as it was before codebook quantization and stage ranks."""

    name = "conv1d"

    def compression_genes(self):
        return {g: o for g, o in super().compression_genes().items()
                if not g.endswith(".quant") and g not in ("s1.rank", "s2.rank", "s3.rank")}


@pytest.mark.parametrize("sampler", ["random", "tpe", "nsga2"])
def test_uniform_full_rank_restriction_searches_as_without_the_genes(sampler):
    new = _space("conv1d").restrict({**{f"{g}.quant": ["uniform"] for g in ("s1", "s2", "s3", "head")},
                                     **{f"s{i}.rank": [1.0] for i in (1, 2, 3)}})
    old = _BeforeTheGenes(SHAPES["conv1d"], 5)
    torch.manual_seed(0)
    model_of = {}
    runs = []
    for space in (new, old):
        make = {"random": optuna.samplers.RandomSampler, "tpe": optuna.samplers.TPESampler,
                "nsga2": optuna.samplers.NSGAIISampler}[sampler]
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=make(seed=3))
        seen = []
        for _ in range(12):
            trial = study.ask()
            arch = suggest_arch(trial, space)
            key = space.architecture_of(arch).key
            if key not in model_of:
                model_of[key] = _with_bn_stats(space.build(arch))
            _, stored = compress(model_of[key], Policy.from_arch(arch), space.group_of)
            size = sum(packed.layer_size(s) for s in stored)
            first = float(stored[0].weight.dense().abs().sum())
            study.tell(trial, [first, size])
            seen.append(({g: v for g, v in arch.items() if g in old.genes}, size, first))
        runs.append(seen)
    assert runs[0] == runs[1]


def test_the_default_space_trains_and_keys_the_supernet_as_without_the_genes():
    from nasopt.core.config import SupernetConfig
    from nasopt.supernet.elastic import supernet_key, training_compression
    new, old = SPACES["conv1d"](SHAPES["conv1d"], 5), _BeforeTheGenes(SHAPES["conv1d"], 5)
    cfg = SupernetConfig(steps=10)
    assert training_compression(new, cfg) == training_compression(old, cfg)
    assert supernet_key(new, "data", cfg, 100) == supernet_key(old, "data", cfg, 100)
    asked = new.restrict({"s1.quant": ["uniform", "codebook"]})
    assert "s1.quant" in training_compression(asked, cfg)
    assert supernet_key(asked, "data", cfg, 100) != supernet_key(new, "data", cfg, 100)


def test_a_study_recorded_without_the_genes_goes_on(tmp_path):
    from nasopt.search.study import open_storage, open_study
    new, old = SPACES["conv1d"](SHAPES["conv1d"], 5), _BeforeTheGenes(SHAPES["conv1d"], 5)
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    setup = {"objectives": ["accuracy", "size"], "packed_format": packed.SIZE_FORMAT}
    open_study(storage, "s", {**setup, "space": old.describe()}, ["maximize", "minimize"])
    open_study(storage, "s", {**setup, "space": new.describe()}, ["maximize", "minimize"])
    asked = new.restrict({"s1.quant": ["uniform", "codebook"]})
    with pytest.raises(NasoptError, match="different setup"):
        open_study(storage, "s", {**setup, "space": asked.describe()}, ["maximize", "minimize"])
