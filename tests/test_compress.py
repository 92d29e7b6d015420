"""Per-gene compression tests with numbers, exact size accounting, packed round trips."""
from __future__ import annotations

import copy
import random

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from nasopt import api
from nasopt.compression import packed
from nasopt.compression.compress import (
    Policy, compress, dequantize, fold_batchnorm, lamp_scores, prune_global, quantize,
    svd_factors, weight_layers,
)
from nasopt.search.evaluate import Evaluator
from nasopt.core.objectives import get_objectives
from nasopt.search.loop import run_search
from nasopt.supernet.elastic import recalibrate_bn

SHAPES = {"conv1d": (1, 40), "mobilenet": (1, 8, 8)}
SPACES = sorted(SHAPES)


def test_4bit_per_channel_quantization_on_a_known_tensor():
    w = torch.tensor([[-1.4, -0.7, 0.0, 0.35, 0.7], [0.1, 0.2, -0.05, 0.0, 0.0]])
    q, scale = quantize(w, 4)
    assert torch.allclose(scale, torch.tensor([1.4 / 7, 0.2 / 7]))
    assert q.tolist() == [[-7, -4, 0, 2, 4], [4, 7, -2, 0, 0]]  # round-half-even on x.5
    err = (dequantize(q, scale) - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-7)  # the per-channel error bound
    # 8 bits: 127 levels; error bound shrinks accordingly
    q8, s8 = quantize(w, 8)
    assert q8.abs().max() == 127 and torch.all((dequantize(q8, s8) - w).abs() <= s8[:, None] / 2 + 1e-7)


def test_all_zero_row_quantizes_to_zero():
    q, scale = quantize(torch.zeros(2, 3), 4)
    assert torch.all(q == 0) and torch.all(scale == 1)


@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_global_sparsity_fraction_is_exact(sparsity, method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 8, 5), nn.Conv1d(8, 7, 3), nn.Linear(9, 4))
    total = sum(m.weight.numel() for _, m in weight_layers(model))
    before = [m.weight.detach().clone() for _, m in weight_layers(model)]
    prune_global(model, sparsity, method)
    zeros = sum(int((m.weight == 0).sum()) for _, m in weight_layers(model))
    assert zeros == round(sparsity * total)
    if method == "magnitude":  # every kept weight is at least as large as every pruned one
        flat_before = torch.cat([b.flatten() for b in before]).abs()
        kept = torch.cat([m.weight.flatten() for _, m in weight_layers(model)]) != 0
        assert flat_before[kept].min() >= flat_before[~kept].max()


def test_random_pruning_is_not_magnitude_pruning():
    torch.manual_seed(0)
    a = nn.Linear(50, 40)
    b = nn.Linear(50, 40)
    b.load_state_dict(a.state_dict())
    prune_global(a, 0.5, "magnitude")
    prune_global(b, 0.5, "random")
    assert not torch.equal(a.weight == 0, b.weight == 0)


def test_svd_rank_r_reconstruction_equals_numpy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(12, 7)).astype(np.float32)
    a, b = svd_factors(torch.from_numpy(w), 3)
    u, s, vh = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    expected = (u[:, :3] * s[:3]) @ vh[:3]
    assert a.shape == (12, 3) and b.shape == (3, 7)
    assert np.allclose((a @ b).numpy(), expected, atol=1e-5)


def test_batchnorm_folding_keeps_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    recalibrate_bn(model, torch.randn(64, 2, 6, 6))
    model[1].weight.data.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(5, 2, 6, 6)
    expected = model(x)
    fold_batchnorm(model)
    assert isinstance(model[1], nn.Identity)
    assert torch.allclose(model(x), expected, atol=1e-5)


def _random_models(name: str, n: int):
    space = api.SPACES[name](SHAPES[name], 10)
    rng = random.Random(1)
    torch.manual_seed(0)
    for _ in range(n):
        arch = space.sample(rng)
        model = space.build(arch)
        recalibrate_bn(model, torch.randn(128, *SHAPES[name]))
        yield space, arch, model.eval()


@pytest.mark.parametrize("name", SPACES)
def test_predicted_size_equals_the_written_file(name, tmp_path):
    for i, (space, arch, model) in enumerate(_random_models(name, 12)):
        _, stored = compress(model, Policy.from_arch(arch), space.group_of)
        path = tmp_path / f"{i}.packed"
        packed.write(path, packed.pack(space, arch, stored))
        assert path.stat().st_size == packed.predicted_size(space, arch, stored)


@pytest.mark.parametrize("name", SPACES)
def test_packed_round_trip_reproduces_the_compressed_model(name):
    x = torch.randn(16, *SHAPES[name])
    for space, arch, model in _random_models(name, 8):
        compressed, stored = compress(model, Policy.from_arch(arch), space.group_of)
        loaded, loaded_arch = packed.unpack(packed.pack(space, arch, stored), api.SPACES)
        assert loaded_arch == arch
        with torch.no_grad():
            assert (compressed(x) - loaded(x)).abs().max().item() < 1e-6


def test_compression_shrinks_and_costs_accuracy_in_the_expected_direction():
    space, arch, model = next(_random_models("conv1d", 1))
    arch = space.validate({**arch, "sparsity": 0.0,
                           **{f"{g}.rank": 1.0 for g in ("s1", "s2", "s3", "head")},
                           **{f"{g}.bits": 32 for g in ("s1", "s2", "s3", "head")}})
    x = torch.randn(32, 1, 40)
    float_model, float_stored = compress(model, Policy.from_arch(arch), space.group_of)
    with torch.no_grad():
        assert torch.allclose(float_model(x), model(x), atol=1e-5)  # only BN folded
    sizes = []
    for bits in (8, 4, 2):
        a = space.validate({**arch, **{f"{g}.bits": bits for g in ("s1", "s2", "s3", "head")}})
        sizes.append(packed.predicted_size(space, a, compress(model, Policy.from_arch(a),
                                                               space.group_of)[1]))
    assert packed.predicted_size(space, arch, float_stored) > sizes[0] > sizes[1] > sizes[2]


def test_a_cut_or_changed_packed_file_is_refused(tmp_path):
    space, arch, model = next(_random_models("conv1d", 1))
    data = packed.pack(space, arch, compress(model, Policy.from_arch(arch), space.group_of)[1])
    from nasopt.core.errors import NasoptError
    with pytest.raises(NasoptError, match="checksum does not match"):
        packed.unpack(data[:-7], api.SPACES)
    with pytest.raises(NasoptError, match="not a nasopt packed file"):
        packed.unpack(b"garbage" + data, api.SPACES)
    header = len(packed.header(space, arch))
    for byte in range(header, len(data), max(1, (len(data) - header) // 40)):
        for bit in (0, 7):  # every flipped bit of the weights, scales, masks or checksum
            flipped = bytearray(data)
            flipped[byte] ^= 1 << bit
            with pytest.raises(NasoptError, match="checksum does not match"):
                packed.unpack(bytes(flipped), api.SPACES)


def test_a_version_1_packed_file_without_checksum_still_loads():
    space, arch, model = next(_random_models("conv1d", 1))
    compressed, stored = compress(model, Policy.from_arch(arch), space.group_of)
    data = packed.pack(space, arch, stored)
    v1 = bytearray(data[:-packed.CHECKSUM_BYTES])
    v1[4] = 1
    loaded, loaded_arch = packed.unpack(bytes(v1), api.SPACES)
    x = torch.randn(4, *SHAPES["conv1d"])
    with torch.no_grad():
        assert loaded_arch == arch and torch.equal(loaded(x), packed.unpack(data, api.SPACES)[0](x))
    from nasopt.core.errors import NasoptError
    with pytest.raises(NasoptError, match="truncated"):
        packed.unpack(bytes(v1[:-7]), api.SPACES)


def test_fixing_all_compression_genes_equals_the_uncompressed_search(trained):
    space_full, supernet, data = trained
    space = api.SPACES[space_full.name](space_full.input_shape, space_full.num_classes)
    fixed = space.restrict({g: [{"bits": 32, "rank": 1.0, "sparsity": 0.0,
                                 "quant": "uniform"}[g.split(".")[-1]]]
                            for g in space.compression_genes()})
    plain = space.architecture_space()
    results = []
    for sp in (plain, fixed):
        study = optuna.create_study(directions=["maximize", "minimize"],
                                    sampler=optuna.samplers.RandomSampler(seed=5))
        run_search(study, sp, Evaluator(sp, supernet, data), get_objectives(["accuracy", "size"]),
                   trials=6, show_progress=False)
        results.append(study.trials)
    for a, b in zip(*results):
        assert {g: b.params[g] for g in a.params} == a.params
        ma, mb = a.user_attrs["metrics"], b.user_attrs["metrics"]
        for key in ("accuracy", "params", "macs", "float_bytes", "nonzero_params"):
            assert ma[key] == mb[key], key
        # the packed header stores one option index per gene, nothing else differs
        assert mb["compressed_bytes"] - ma["compressed_bytes"] == len(space.compression_genes())


@pytest.mark.parametrize("name", SPACES)
def test_folding_keeps_the_outputs_of_every_space(name):
    """BN folding relies on each space registering a BatchNorm right after its conv."""
    x = torch.randn(8, *SHAPES[name])
    for space, arch, model in _random_models(name, 5):
        plain = space.validate({**arch, **{g: [32, 1.0, 0.0, "uniform"][
            ["bits", "rank", "sparsity", "quant"].index(g.split(".")[-1])]
            for g in space.compression_genes()}})
        folded, _ = compress(model, Policy.from_arch(plain), space.group_of)
        with torch.no_grad():
            assert (folded(x) - model(x)).abs().max().item() < 1e-4


def test_index_list_encoding_round_trips():
    """A layer left with very few weights is stored as an index list, not a bitmask."""
    space, arch, model = next(_random_models("conv1d", 1))
    arch = space.validate({**arch, "sparsity": 0.9, "head.rank": 1.0, "head.bits": 8})
    with torch.no_grad():  # make the head tiny but for five weights: pruning keeps only those
        model.head.weight.mul_(1e-6)
        model.head.weight.view(-1)[:5] = 10.0
    compressed, stored = compress(model, Policy.from_arch(arch), space.group_of)
    head = [s for s in stored if s.name == "head"][0]
    assert int(head.weight.mask.sum()) == 5
    data = packed.pack(space, arch, stored)
    assert len(data) == packed.predicted_size(space, arch, stored)
    loaded, _ = packed.unpack(data, api.SPACES)
    x = torch.randn(4, 1, 40)
    with torch.no_grad():
        assert (compressed(x) - loaded(x)).abs().max().item() < 1e-6


def test_evaluation_never_reads_the_test_split(trained):
    import dataclasses
    space, supernet, data = trained
    poisoned = dataclasses.replace(data, x_test=torch.full_like(data.x_test, float("nan")),
                                   y_test=torch.full_like(data.y_test, -1))
    evaluator = Evaluator(space, supernet, poisoned)
    m = evaluator(space.sample(random.Random(0)))
    assert m.accuracy == Evaluator(space, supernet, data)(space.sample(random.Random(0))).accuracy


def test_lamp_scores_follow_their_definition():
    w = torch.tensor([[3.0, -1.0], [0.0, 2.0]])
    scores = lamp_scores(w)
    # squares 9, 1, 0, 4: each over the sum of the squares at least as large
    expected = torch.tensor([[9 / 9, 1 / 14], [0.0, 4 / 13]])
    assert torch.allclose(scores, expected)
    assert scores.shape == w.shape and scores.max() == 1.0


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_lamp_pruning_keeps_the_exact_fraction_and_every_layer_alive(sparsity):
    """A layer of small weights (a wide layer whose BatchNorm undoes its scale) loses all but a
    sliver of its weights to magnitude pruning; LAMP keeps the largest weights of every layer
    and, within a layer, the larger weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10))
    with torch.no_grad():
        model[0].weight.mul_(0.01)  # the same function after a normalisation, tiny magnitudes
    before = [m.weight.detach().clone() for _, m in weight_layers(model)]
    total = sum(b.numel() for b in before)
    magnitude = copy.deepcopy(model)
    prune_global(magnitude, sparsity, "magnitude")
    prune_global(model, sparsity, "lamp")
    zeros = sum(int((m.weight == 0).sum()) for _, m in weight_layers(model))
    assert zeros == round(sparsity * total)
    kept_lamp = [int((m.weight != 0).sum()) for _, m in weight_layers(model)]
    kept_magnitude = [int((m.weight != 0).sum()) for _, m in weight_layers(magnitude)]
    assert kept_magnitude[0] < kept_lamp[0]
    assert kept_lamp[0] > 0.5 * (1 - sparsity) * before[0].numel()
    if sparsity == 0.9:
        assert kept_magnitude[0] == 0  # the whole layer gone: the model is dead
    for b, (_, m) in zip(before, weight_layers(model)):
        kept = m.weight != 0
        assert b[kept].abs().min() >= b[~kept].abs().max()  # within a layer: the larger stay


def test_an_unknown_pruning_criterion_is_refused():
    with pytest.raises(ValueError, match="lamp, magnitude, random"):
        prune_global(nn.Linear(4, 4), 0.5, "l1")
