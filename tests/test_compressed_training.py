"""Training with compression in the loop (nasopt.supernet.compressed): the compressed forward of an
elastic network equals the model the packed file stores, per gene, and gradients reach the latent
weights."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nasopt.compression.compress import Policy, compress, dequantize, prune_global, quantize
from nasopt.supernet.compressed import compressed_forward, global_masks
from nasopt.supernet.elastic import ElasticConv1d, ElasticLinear


class _Net(nn.Module):
    """A 1x1 conv (low-rank eligible), a 3-tap conv, a linear head: groups a, b, head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = ElasticConv1d(3, 12, 1, bias=True)
        self.b = ElasticConv1d(12, 10, 3)
        self.head = ElasticLinear(10 * 16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(torch.relu(self.b(torch.relu(self.a(x)))), 1))


def _group(name: str) -> str:
    return name.split(".")[0]


@pytest.fixture
def net() -> _Net:
    torch.manual_seed(0)
    return _Net().eval()


X = torch.randn(32, 3, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("policy", [
    Policy(bits={"a": 4, "b": 2, "head": 8}),  # quantization alone
    Policy(rank={"a": 0.5, "head": 0.25}),  # factorized forward alone
    Policy(sparsity=0.75),  # masks alone
    Policy(bits={"a": 2, "b": 6, "head": 4}, rank={"a": 0.25, "head": 0.5}, sparsity=0.5),
], ids=["bits", "rank", "sparsity", "joint"])
def test_compressed_forward_equals_the_stored_model(net, policy):
    # the model compress() stores (what the packed file holds and the exporter writes)
    deployed, _ = compress(copy.deepcopy(net), policy, _group)
    with torch.no_grad(), compressed_forward(net, policy, _group, X):
        trained = net(X)
    assert torch.allclose(trained, deployed(X), atol=1e-5)
    with torch.no_grad():  # and outside the block the float network is back
        assert torch.equal(net(X), _Net.forward(net, X))
    assert all("compression" not in vars(m) for m in net.modules())


def test_fake_quantization_is_the_packed_quantizer(net):
    captured = {}

    def keep(module, inputs, output):  # noqa: ANN001
        captured[module] = (inputs[0], output)

    net.head.register_forward_hook(keep)
    with torch.no_grad(), compressed_forward(net, Policy(bits={"head": 3}), _group, X):
        net(X)
    flat, out = captured[net.head]
    w = dequantize(*quantize(net.head.weight, 3))
    assert torch.allclose(out, flat @ w.t() + net.head.bias, atol=1e-6)
    assert len(torch.unique(w[0])) <= 2 ** 3 - 1  # at most 7 levels per output row


@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_masks_keep_exactly_the_drawn_fraction(sparsity):
    torch.manual_seed(0)
    mags = [torch.rand(7, 5), torch.rand(13), torch.rand(4, 4, 3)]
    masks = global_masks(mags, sparsity, "magnitude")
    total = sum(m.numel() for m in mags)
    assert sum(int((~m).sum()) for m in masks) == round(sparsity * total)
    dropped = torch.cat([v[~m] for v, m in zip(mags, masks)])
    kept = torch.cat([v[m] for v, m in zip(mags, masks)])
    assert dropped.max() <= kept.min()  # the smallest magnitudes go, across layers


@pytest.mark.parametrize("method", ["lamp", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_training_masks_are_the_masks_deployment_prunes(method, sparsity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 30), nn.Linear(30, 20), nn.Linear(20, 10))
    with torch.no_grad():
        model[1].weight.mul_(0.05)  # layers of unequal scales
    weights = [m.weight.detach().clone() for m in model]
    masks = global_masks(weights, sparsity, method)
    prune_global(model, sparsity, method)
    for mask, layer in zip(masks, model):
        assert torch.equal(mask, layer.weight != 0)


def test_gradients_reach_the_latent_weights_straight_through(net):
    policy = Policy(bits={"a": 4, "b": 4, "head": 4}, rank={"head": 0.5}, sparsity=0.5)
    with compressed_forward(net, policy, _group, X):
        net(X).square().mean().backward()
    for p in net.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name, shape", [("conv1d", (1, 40)), ("mobilenet", (1, 8, 8))])
def test_with_batchnorm_in_eval_mode_the_compressed_forward_is_the_deployed_model(name, shape):
    from nasopt import api
    from nasopt.supernet.elastic import recalibrate_bn
    space = api.SPACES[name](shape, 10)
    rng = __import__("random").Random(3)
    torch.manual_seed(0)
    x = torch.randn(64, *shape)
    for _ in range(4):
        arch = space.sample(rng)
        model = space.build(arch)
        recalibrate_bn(model, x)
        model.eval()
        policy = Policy.from_arch(arch)
        deployed, _ = compress(model, policy, space.group_of)
        with torch.no_grad(), compressed_forward(model, policy, space.group_of, x):
            ours = model(x)
        assert torch.allclose(ours, deployed(x), atol=1e-4, rtol=1e-4), arch


def test_a_supernet_trained_under_compression_scores_compressed_subnets_higher(datasets,
                                                                               tmp_path):
    """A small supernet (1,024 MNIST-1D samples, 200 steps) trained both ways: the harshly
    compressed subnets of the compression-aware one score well above chance, and clearly above
    the same subnets of the float-trained one."""
    import dataclasses

    from nasopt import api
    from nasopt.core.config import SupernetConfig
    from nasopt.search.evaluate import Evaluator
    from nasopt.supernet.elastic import train_supernet
    full = datasets["mnist1d"]
    data = dataclasses.replace(full, x_train=full.x_train[:1024], y_train=full.y_train[:1024])
    space = api.make_space("conv1d", data, {**{f"s{s}.depth": [1] for s in (1, 2, 3)},
                                            **{f"s{s}.k": [5] for s in (1, 2, 3)}})
    two_bit = {f"{g}.bits": 2 for g in ("s1", "s2", "s3", "head")}
    harsh = [{**two_bit, "sparsity": 0.9, "head.rank": 0.25}, {**two_bit, "sparsity": 0.75},
             {**two_bit, "sparsity": 0.0}, {**two_bit, "s1.bits": 4, "s2.bits": 4,
                                            "s3.bits": 4, "head.bits": 4, "sparsity": 0.9}]
    archs = [space.validate({**space.largest(), **genes}) for genes in harsh]
    chance = 2 * float(torch.bincount(data.y_val).max()) / len(data.y_val)
    scores = {}
    for aware in (False, True):
        torch.manual_seed(0)
        cfg = SupernetConfig(steps=200, compression_aware=aware, compressed_share=1.0)
        supernet, _ = train_supernet(space, data, cfg, tmp_path / str(aware),
                                     show_progress=False)
        evaluator = Evaluator(space, supernet, data)
        scores[aware] = [evaluator(arch).accuracy for arch in archs]
    assert min(scores[True]) > chance + 0.1, scores
    assert sum(scores[True]) / len(archs) - sum(scores[False]) / len(archs) >= 0.06, scores


def test_a_study_scored_before_compression_aware_training_is_not_continued(tmp_path):
    from nasopt.core.errors import NasoptError
    from nasopt.search.evaluate import SCORING
    from nasopt.search.study import open_storage, open_study
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    old = {"space": {"name": "conv1d"}, "objectives": ["accuracy", "size"],
           "supernet": {"epochs": 10}}  # no scoring: made by an older nasopt
    open_study(storage, "s", old, ["maximize", "minimize"])
    new = {**old, "scoring": SCORING, "supernet": {"epochs": 10, "compression_aware": True}}
    with pytest.raises(NasoptError, match=f"scoring 1.*scoring {SCORING}.*new --study name"):
        open_study(storage, "s", new, ["maximize", "minimize"])
    # a study that pruned by magnitude (scoring 2) is told so
    open_study(storage, "m", {**new, "scoring": 2}, ["maximize", "minimize"])
    with pytest.raises(NasoptError, match=f"magnitude \\(scoring 2\\).*LAMP.*scoring {SCORING}"):
        open_study(storage, "m", new, ["maximize", "minimize"])


def test_an_older_study_is_re_scored_as_it_was_scored(datasets):
    """Export re-scores a trial before writing it: a study without a recorded scoring gets the
    evaluation it was made with (BatchNorm recalibrated float, folded before pruning)."""
    from nasopt import api
    from nasopt.search.evaluate import Evaluator
    from nasopt.supernet.elastic import recalibrate_bn
    data = datasets["mnist1d"]
    space = api.make_space("conv1d", data)
    torch.manual_seed(0)
    supernet = space.supernet().eval()
    arch = space.validate({**space.sample(__import__("random").Random(2)), "sparsity": 0.75,
                           "s1.bits": 4, "head.rank": 0.5})
    old, new = Evaluator(space, supernet, data, scoring=1), Evaluator(space, supernet, data)
    model = supernet.extract(arch)
    recalibrate_bn(model, old.calibration_samples)
    expected, _ = compress(model, Policy.from_arch(arch, "magnitude"), space.group_of,
                           fold_first=True)
    got, _ = old.compressed(arch)
    x = data.x_val[:64]
    with torch.no_grad():
        assert torch.equal(got(x), expected(x))
        assert not torch.allclose(new.compressed(arch)[0](x), expected(x))


def test_a_study_that_pruned_by_magnitude_is_re_scored_by_magnitude(datasets):
    """Scoring 2 pruned by weight magnitude: its evaluator (export, `nasopt run`) still does,
    while new studies prune by LAMP scores."""
    from nasopt import api
    from nasopt.search.evaluate import Evaluator
    data = datasets["mnist1d"]
    space = api.make_space("conv1d", data)
    torch.manual_seed(0)
    supernet = space.supernet().eval()
    arch = space.validate({**space.sample(__import__("random").Random(2)), "sparsity": 0.9})
    old, new = Evaluator(space, supernet, data, scoring=2), Evaluator(space, supernet, data)
    assert (old.pruning, new.pruning) == ("magnitude", "lamp")
    expected, _ = compress(old.calibrated_model(arch), Policy.from_arch(arch, "magnitude"),
                           space.group_of)
    got, _ = old.compressed(arch)
    x = data.x_val[:64]
    with torch.no_grad():
        assert torch.equal(got(x), expected(x))
    zeros = lambda m: [l.weight == 0 for l in m.modules() if hasattr(l, "weight")  # noqa: E731
                       and isinstance(l, (nn.Conv1d, nn.Linear))]
    assert any(not torch.equal(a, b) for a, b in zip(zeros(got), zeros(new.compressed(arch)[0])))


def test_an_unknown_pruning_criterion_is_one_clear_error(datasets):
    from nasopt import api
    from nasopt.core.errors import NasoptError
    from nasopt.search.evaluate import Evaluator
    data = datasets["mnist1d"]
    space = api.make_space("conv1d", data)
    with pytest.raises(NasoptError, match="unknown pruning criterion 'l1'; use one of lamp, "
                                          "magnitude, random"):
        Evaluator(space, space.supernet(), data, pruning="l1")
