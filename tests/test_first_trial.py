"""The supernet recipe sized by the data, its cache key, the fast depthwise path and the
evaluation pipeline's results."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

from nasopt import api
from nasopt.core.config import (
    DEFAULT_EPOCHS, MAX_STEPS, MIN_STEPS, SupernetConfig, load_config,
)
from nasopt.core.errors import NasoptError
from nasopt.supernet import elastic
from nasopt.compression.compress import Policy
from nasopt.supernet.compressed import compressed_forward
from nasopt.supernet.elastic import depthwise_dense, supernet_key, train_supernet


# --------------------------------------------------------------------------------------------
# the recipe's length
@pytest.mark.parametrize("n_train, epochs, warmup", [
    (1222, DEFAULT_EPOCHS, 20),    # digits: 10 steps an epoch, 1,000 steps
    (3400, DEFAULT_EPOCHS, 20),    # MNIST-1D: 27 steps an epoch, 2,700 steps
    (51000, MAX_STEPS // 399, 3),  # Fashion-MNIST: capped at MAX_STEPS (15 epochs, 5,985)
    (200, 150, 30),                # a tiny set: raised to MIN_STEPS (2 steps an epoch)
])
def test_default_recipe_is_sized_by_the_training_set(n_train, epochs, warmup):
    r = SupernetConfig().resolve(n_train)
    assert (r.epochs, r.warmup_epochs, r.steps) == (epochs, warmup, None)
    steps = epochs * SupernetConfig().steps_per_epoch(n_train)
    assert MIN_STEPS <= steps <= MAX_STEPS
    assert f"{epochs} epochs = {steps} steps of 128 (sized by the data" in \
        SupernetConfig().describe(n_train)


def test_explicit_epochs_and_steps_and_which_wins():
    # explicit epochs keep the old recipe exactly: 100 epochs, a fifth of them warmup
    assert SupernetConfig(epochs=100).resolve(3400).warmup_epochs == 20
    assert SupernetConfig(epochs=14, warmup_epochs=3).resolve(51000).epochs == 14
    # steps are rounded up to whole epochs (27 steps an epoch on 3,400 samples)
    r = SupernetConfig(steps=500).resolve(3400)
    assert (r.epochs, r.warmup_epochs) == (19, 4)
    assert SupernetConfig(steps=2700).resolve(3400).epochs == 100
    # both set: one line naming the fix
    with pytest.raises(NasoptError, match=r"both set; set one of them .*supernet.epochs=none"):
        SupernetConfig(epochs=10, steps=100)
    cfg = load_config(None, ["supernet.epochs=none", "supernet.steps=270"])
    assert cfg.supernet.resolve(3400).epochs == 10


@pytest.mark.parametrize("value, message", [
    ("0", "supernet.steps must be a positive number of optimizer steps, got 0"),
    ("-5", "supernet.steps must be a positive number of optimizer steps, got -5"),
    ("many", "config key supernet.steps takes an integer, got 'many'"),
    ("1.5", "config key supernet.steps takes an integer, got 1.5"),
])
def test_bad_steps_are_one_clear_line(value, message):
    with pytest.raises(NasoptError) as err:
        load_config(None, [f"supernet.steps={value}"])
    assert str(err.value) == message


def test_configs_under_configs_still_load():
    from nasopt.pipeline import load_run_config
    for name, epochs in (("mnist1d", 40), ("headline_mnist1d", 100),
                         ("headline_fashion-mnist", 18)):
        cfg = load_run_config(f"configs/{name}.toml")
        assert cfg.supernet.resolve(3400).epochs == epochs


# --------------------------------------------------------------------------------------------
# the cache key
def test_cache_key_follows_the_resolved_recipe(datasets):
    data = datasets["mnist1d"]
    space = api.make_space("conv1d", data)
    n = len(data.x_train)

    def key(cfg: SupernetConfig) -> str:
        return supernet_key(space, data.fingerprint, cfg, n)

    old_default = SupernetConfig(epochs=100, warmup_epochs=20, compression_aware=False)
    # the key of the float recipe that was the default (100 epochs) is what it was before the
    # recipe could be sized by the data or trained under compression: its checkpoints are
    # still found by configs that name it
    assert supernet_key(space, "fingerprint", old_default) == "5d9c4fd534d0bc7b"
    float_default = SupernetConfig(compression_aware=False)
    # the float default on MNIST-1D is that recipe (100 epochs, 20 warmup): the same checkpoint
    assert key(float_default) == key(old_default)
    # training under compression is another recipe, and so is another compression sub-space
    assert key(SupernetConfig()) != key(old_default)
    assert supernet_key(space.restrict({"sparsity": [0.0]}), data.fingerprint, SupernetConfig(),
                        n) != key(SupernetConfig())
    assert supernet_key(space.restrict({"sparsity": [0.0]}), data.fingerprint, float_default,
                        n) == key(float_default)
    # on a set large enough to be capped it is another recipe: it never finds a 100-epoch one
    big = 60000
    assert supernet_key(space, "fp", float_default, big) != \
        supernet_key(space, "fp", old_default, big)
    assert key(SupernetConfig(steps=2700, compression_aware=False)) == key(old_default)
    assert key(SupernetConfig(steps=2701, compression_aware=False)) != key(old_default)
    assert key(SupernetConfig(epochs=100, warmup_epochs=10, compression_aware=False)) != \
        key(old_default)
    # the same default recipe on another training-set size is another length, another key
    assert supernet_key(space, data.fingerprint, SupernetConfig(), 60000) != key(SupernetConfig())
    assert key(SupernetConfig(steps=1080)) != key(SupernetConfig())  # 40 epochs
    with pytest.raises(TypeError, match="n_train"):
        supernet_key(space, data.fingerprint, SupernetConfig())


def test_training_logs_and_keys_the_resolved_recipe(datasets, tmp_path):
    full = datasets["mnist1d"]
    data = dataclasses.replace(full, x_train=full.x_train[:256], y_train=full.y_train[:256])
    space = api.make_space("conv1d", data, {"s1.depth": [1], "s2.depth": [1], "s3.depth": [1]})
    logs: list[str] = []
    cfg = SupernetConfig(steps=4, n_random=0)  # 2 steps an epoch: 2 epochs, no warmup
    _, path = train_supernet(space, data, cfg, tmp_path, show_progress=False, log=logs.append)
    assert "2 epochs = 4 steps of 128 (supernet.steps=4, rounded up to whole epochs)" in logs[0]
    assert ("each random subnet trains compressed with probability 0.1 "
            "(supernet.compressed_share)") in logs[0]  # conv1d's share
    same = SupernetConfig(epochs=2, warmup_epochs=0, n_random=0)
    assert supernet_key(space, data.fingerprint, same) in path.name
    logs.clear()
    train_supernet(space, data, same, tmp_path, show_progress=False, log=logs.append)
    assert any("reusing" in line for line in logs)


# --------------------------------------------------------------------------------------------
# the fast training paths equal the convolution
def assert_same_as_convolution(conv, fast, x, w, b) -> torch.Tensor:  # noqa: ANN001
    """``fast(x, w, b)`` gives ``conv(x, w, b)``'s output, memory format and gradients."""
    x1, w1, b1 = (t.clone().requires_grad_() for t in (x, w, b))
    x2, w2, b2 = (t.clone().requires_grad_() for t in (x, w, b))
    plain, out = conv(x1, w1, b1), fast(x2, w2, b2)
    assert out.shape == plain.shape
    assert out.is_contiguous(memory_format=torch.channels_last) == \
        plain.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(plain)
    plain.backward(g)
    out.backward(g)
    for a, b_ in ((x1, x2), (w1, w2), (b1, b2)):
        torch.testing.assert_close(b_.grad, a.grad, rtol=1e-4, atol=1e-4)
    for layout in (torch.contiguous_format, torch.channels_last):  # the input's gradient layout
        assert x2.grad.is_contiguous(memory_format=layout) == \
            x1.grad.is_contiguous(memory_format=layout)
    return out


def counting(monkeypatch, name: str) -> list[int]:  # noqa: ANN001
    """Each call of ``elastic.<name>`` appends to the list returned."""
    calls: list[int] = []
    real = getattr(elastic, name)
    monkeypatch.setattr(elastic, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("channels, side, k, stride", [
    (12, 4, 7, 1), (12, 4, 5, 1), (8, 8, 7, 2), (8, 7, 7, 2), (6, 3, 7, 1), (5, 14, 7, 2),
    (4, 5, 5, 2), (3, 1, 7, 1),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dense_depthwise_equals_the_convolution(channels, side, k, stride, channels_last):
    torch.manual_seed(0)
    x = torch.randn(5, channels, side, side)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert_same_as_convolution(
        lambda x, w, b: F.conv2d(x, w, b, stride, k // 2, 1, channels),
        lambda x, w, b: depthwise_dense(x, w, b, stride, k // 2),
        x, torch.randn(channels, 1, k, k), torch.randn(channels))


@pytest.mark.parametrize("side", [4, 1])
def test_pointwise_matmul_equals_the_convolution(side):
    torch.manual_seed(0)
    x = torch.randn(5, 12, side, side).contiguous(memory_format=torch.channels_last)
    out = assert_same_as_convolution(F.conv2d, elastic.pointwise_matmul, x,
                                     torch.randn(7, 12, 1, 1), torch.randn(7))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_elastic_pointwise_uses_the_matmul_only_training_on_channels_last(monkeypatch):
    conv = elastic.ElasticConv2d(16, 16, 1)
    conv.active_out = 9
    x = torch.randn(3, 12, 4, 4)  # 12 channels arrive: a prefix of the 16
    calls = counting(monkeypatch, "pointwise_matmul")
    conv.train()
    plain = conv(x)  # the default memory format: the convolution
    last = x.contiguous(memory_format=torch.channels_last)
    fast = conv(last)
    with torch.no_grad():
        slow = conv(last)
    conv.eval()
    evaluated = conv(last)
    assert calls == [1] and fast.shape == (3, 9, 4, 4)
    for other in (plain, slow, evaluated):
        torch.testing.assert_close(fast, other, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k, dense_up_to", [(5, 5), (7, 8)])
def test_channels_last_maps_beyond_the_measured_side_keep_the_depthwise_convolution(
        monkeypatch, k, dense_up_to):
    conv = elastic.ElasticConv2d(8, 8, k, depthwise=True).train()
    calls = counting(monkeypatch, "depthwise_dense")
    for side, dense in ((dense_up_to, True), (dense_up_to + 1, False)):
        x = torch.randn(3, 8, side, side)
        conv(x)  # the default format: the dense form up to twice the kernel
        conv(x.contiguous(memory_format=torch.channels_last))
        assert len(calls) == 1 + dense
        calls.clear()


def test_elastic_depthwise_uses_the_dense_path_only_when_training(monkeypatch):
    conv = elastic.ElasticConv2d(16, 16, 7, depthwise=True)
    conv.active_k = 5
    x = torch.randn(3, 12, 4, 4)  # 12 channels arrive: a prefix of the 16
    calls = counting(monkeypatch, "depthwise_dense")
    conv.train()
    fast = conv(x)
    with torch.no_grad():  # BN recalibration, evaluation, export: the convolution itself
        slow = conv(x)
    conv.eval()
    evaluated = conv(x)
    assert calls == [1]
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    assert torch.equal(slow, evaluated)
    monkeypatch.setattr(elastic, "DENSE_DEPTHWISE", False)
    conv.train()
    assert torch.equal(conv(x), evaluated)


def test_supernet_step_gradients_equal_with_and_without_the_dense_path(datasets, monkeypatch):
    """The dense depthwise form, with its hidden maps channel-major or copied to and from
    channels-last, gives a sandwich step the convolution's gradients (float64: float32 rounding
    differs between the paths' kernels and reduction orders)."""
    data = datasets["digits"]
    space = api.make_space("mobilenet", data)
    torch.manual_seed(0)
    supernet = space.supernet().train().double()
    x, y = data.x_train[:32].double(), data.y_train[:32]
    grads, layouts = [], []
    real = elastic.depthwise_dense
    for dense, channel_major in ((True, True), (True, False), (False, False)):
        monkeypatch.setattr(elastic, "DENSE_DEPTHWISE", dense)
        monkeypatch.setattr(elastic, "CHANNEL_MAJOR", channel_major)
        seen = []
        monkeypatch.setattr(elastic, "depthwise_dense", lambda x, *a: (
            seen.append(elastic._is_channel_major(x)), real(x, *a))[1])
        supernet.zero_grad()
        loss = elastic.sandwich_loss(supernet, random.Random(0), 2, 1.0)(x, y)
        loss.backward()
        grads.append([p.grad.clone() for p in supernet.parameters()])
        layouts.append(set(seen))
    assert layouts == [{True}, {False}, set()]  # each path taken where it should be
    for path in grads[:2]:
        for a, b in zip(path, grads[2]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# evaluation: part-wise recalibration and count caching give the same results
def _reference(space, supernet, data, arch, calib_samples):
    """An arch's metrics as evaluated before parts and counts were reused: a fresh evaluator,
    the whole model recalibrated in one go."""
    from nasopt.search.evaluate import Evaluator
    evaluator = Evaluator(space, supernet, data, calib_samples)
    evaluator._recalibrate = lambda model, compression: elastic.recalibrate_bn(model, evaluator._x_calib)
    return evaluator(arch)


@pytest.mark.parametrize("space_name, dataset, calib", [
    ("conv1d", "mnist1d", 1024), ("conv1d", "mnist1d", 1500), ("mobilenet", "digits", 1024)])
def test_evaluation_results_are_unchanged(datasets, space_name, dataset, calib):
    from nasopt.search.evaluate import Evaluator
    data = datasets[dataset]
    # mobilenet: narrow expansions keep the test quick; depth, kernels and widths still vary
    space = api.make_space(space_name, data, {} if space_name == "conv1d" else {
        "stem.width": [8], **{f"s{s}.expand": [2] for s in (1, 2, 3)}})
    torch.manual_seed(0)
    supernet = space.supernet().eval()
    rng = random.Random(3)
    archs = [space.sample(rng) for _ in range(2)]
    # archs that share their first parts, their architecture, or differ only in compression
    base = archs[0]
    for gene in ("s3.width", "s3.k", "sparsity", "s1.bits", "s1.depth"):
        value = next(v for v in space.genes[gene] if v != base[gene])
        archs.append(space.validate({**base, gene: value}))
    evaluator = Evaluator(space, supernet, data, calib)
    for arch in archs:
        got = evaluator(arch).to_dict()
        assert got == _reference(space, supernet, data, arch, calib).to_dict(), arch
        # the float model (as exported) holds the same BN statistics as well: those of the
        # whole model recalibrated under the arch's compression
        new, old = evaluator.calibrated_model(arch), supernet.extract(arch)
        with compressed_forward(old, Policy.from_arch(arch), space.group_of,
                                evaluator.calibration_samples):
            elastic.recalibrate_bn(old, evaluator.calibration_samples)
        for (name, a), b in zip(new.state_dict().items(), old.state_dict().values()):
            assert torch.equal(a, b), name
    assert evaluator._parts and len(evaluator._counts) < len(archs)  # both were reused


def test_a_network_without_parts_is_recalibrated_whole(datasets, monkeypatch):
    from nasopt.search.evaluate import Evaluator
    from nasopt.supernet.network import ElasticNetwork
    data = datasets["mnist1d"]
    space = api.make_space("conv1d", data)
    torch.manual_seed(0)
    supernet = space.supernet().eval()
    arch = space.sample(random.Random(0))
    parted = Evaluator(space, supernet, data)(arch)
    monkeypatch.setattr(type(supernet.net), "parts", ElasticNetwork.parts)  # the default
    whole = Evaluator(space, supernet, data)
    assert whole(arch) == parted and not whole._parts


def test_cache_key_records_the_pruning_criterion_of_a_recipe_that_prunes(datasets, monkeypatch):
    """Training masks follow the pruning criterion: a supernet trained under magnitude masks is
    not found by a recipe that prunes by LAMP scores, and a recipe that never prunes keeps its
    key whichever criterion is the default."""
    from nasopt.compression import compress
    data = datasets["mnist1d"]
    space = api.make_space("conv1d", data)
    dense = space.restrict({"sparsity": [0.0]})
    n = len(data.x_train)

    def keys() -> tuple[str, str]:
        return (supernet_key(space, data.fingerprint, SupernetConfig(), n),
                supernet_key(dense, data.fingerprint, SupernetConfig(), n))

    lamp = keys()
    monkeypatch.setattr(compress, "PRUNING", "magnitude")
    magnitude = keys()
    assert lamp[0] != magnitude[0] and lamp[1] == magnitude[1]


def test_an_unset_compressed_share_is_the_spaces_own(datasets):
    """The share of random subnets trained compressed defaults to the space's; setting the same
    value explicitly is the same recipe (one checkpoint), another value another recipe."""
    n = 1000
    digits = api.make_space("mobilenet", datasets["digits"])
    mnist1d = api.make_space("conv1d", datasets["mnist1d"])
    assert SupernetConfig().resolve(n, digits).compressed_share == digits.compressed_share == 0.25
    assert SupernetConfig().resolve(n, mnist1d).compressed_share == mnist1d.compressed_share == 0.1
    assert SupernetConfig(compressed_share=0.5).resolve(n, digits).compressed_share == 0.5
    assert SupernetConfig().resolve(n).compressed_share is None  # no space: left unset

    def key(space, cfg: SupernetConfig) -> str:  # noqa: ANN001
        return supernet_key(space, "fp", cfg, n)

    for space in (digits, mnist1d):
        own = SupernetConfig(compressed_share=space.compressed_share)
        assert key(space, SupernetConfig()) == key(space, own)
        assert key(space, SupernetConfig()) != key(space, SupernetConfig(compressed_share=0.5))


def test_a_space_with_a_share_outside_0_1_fails_the_contract():
    from search_spaces.conv1d import Conv1dSpace
    from nasopt.testing import check_space

    class Bad(Conv1dSpace):
        compressed_share = 1.5

    failures = check_space(Bad)
    assert [f.rule for f in failures] == ["construct"]
    assert "compressed_share is a probability; set it within 0..1, got 1.5" in failures[0].message
