"""DARTS on NAS-Bench-201: the mixed-op supernet (nasopt.spaces.nb201.Nb201Relaxation), its
expected cost, the collapse rule and the DARTS- mitigation."""
from __future__ import annotations

import random

import pytest
import torch
from torch.nn import functional as F

from nasopt.core.errors import NasoptError
from nasopt.core.metrics import count_macs, count_params
from nasopt.spaces.nb201 import (
    CIFAR10_SHAPE, EDGES, OPS, MixedOp, Nb201Space, collapse_of, from_string,
)

TINY = dict(channels=4, cells_per_stage=1)
ALL_SKIP = "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"
BEST = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"


def one_hot(arch, genes) -> dict[str, torch.Tensor]:
    return {e: F.one_hot(torch.tensor(genes[e].index(arch[e])), len(genes[e])).float()
            for e in EDGES}


@pytest.fixture(scope="module")
def small() -> Nb201Space:
    return Nb201Space((1, 8, 8), 10)


def test_one_hot_mixture_is_the_discrete_network(small):
    """At a one-hot, the supernet computes exactly the discrete network whose weights it holds."""
    torch.manual_seed(0)
    relax = small.relaxation(**TINY)
    # non-trivial BN statistics: a few training-mode passes through random mixtures
    relax.train()
    with torch.no_grad():
        for _ in range(3):
            relax(torch.randn(16, 1, 8, 8), {e: torch.rand(5).softmax(0) for e in EDGES})
    relax.eval()
    x = torch.randn(4, 1, 8, 8)
    rng = random.Random(0)
    archs = [small.sample(rng) for _ in range(6)] + [from_string(BEST), from_string(ALL_SKIP)]
    for arch in archs:
        net = relax.discretize(arch).eval()
        with torch.no_grad():
            assert torch.allclose(relax(x, one_hot(arch, relax.genes)), net(x), atol=1e-6)
    # a soft mixture is not any one of them
    with torch.no_grad():
        soft = relax(x, {e: torch.full((5,), 0.2) for e in EDGES})
        assert not torch.allclose(soft, relax.discretize(archs[0]).eval()(x), atol=1e-3)


def test_none_gives_zeros_and_keeps_the_graph():
    op = MixedOp(3, OPS)
    x = torch.randn(2, 3, 5, 5)
    logits = torch.zeros(5, requires_grad=True)
    soft = logits.softmax(0)
    hard = F.one_hot(torch.tensor(0), 5).float() - soft.detach() + soft  # straight-through
    out = op(x, hard)
    assert torch.equal(out, torch.zeros_like(x))
    out.sum().backward()  # no error: the output still depends on the logits
    # a mixture with p(none) = 1/2 is half the other op
    p = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0])
    assert torch.allclose(op(x, p), 0.5 * x)


def test_hard_one_hot_runs_only_the_chosen_op():
    op = MixedOp(3, OPS)
    calls = []
    for name, module in op.ops.items():
        module.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    op(torch.randn(1, 3, 4, 4), torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]))
    assert calls == ["nor_conv_3x3"]
    calls.clear()
    op(torch.randn(1, 3, 4, 4), torch.full((5,), 0.2))
    assert sorted(calls) == sorted(o for o in OPS if o != "none")


def test_expected_cost_at_one_hot_is_the_counted_cost():
    """At the default width and depth the relaxation's network is NB201's: expected params/MACs at
    a one-hot equal the counts of space.build(arch); at a tiny width those of discretize(arch)."""
    space = Nb201Space(CIFAR10_SHAPE, 10)
    with torch.device("meta"):
        relax = space.relaxation()
    rng = random.Random(1)
    for arch in [space.sample(rng) for _ in range(3)] + [space.largest(), space.smallest()]:
        cost = relax.expected_cost(one_hot(arch, relax.genes))
        with torch.device("meta"):
            model = space.build(arch)
        assert cost["params"].item() == count_params(model)
        assert cost["macs"].item() == count_macs(model, CIFAR10_SHAPE)
        assert cost["size"].item() == 4 * count_params(model)
    small = Nb201Space((1, 8, 8), 10)
    tiny = small.relaxation(**TINY)
    for arch in [small.sample(rng) for _ in range(4)]:
        cost = tiny.expected_cost(one_hot(arch, tiny.genes))
        assert cost["params"].item() == count_params(tiny.discretize(arch))
        assert cost["macs"].item() == count_macs(tiny.discretize(arch), (1, 8, 8))


def test_expected_cost_is_differentiable_and_linear(small):
    relax = small.relaxation(**TINY)
    logits = {e: torch.zeros(5, requires_grad=True) for e in EDGES}
    cost = relax.expected_cost({e: v.softmax(0) for e, v in logits.items()})["params"]
    cost.backward()
    # raising a conv's logit raises the expected params; a parameter-free op's lowers them
    g = logits["e1_0"].grad
    assert g[OPS.index("nor_conv_3x3")] > 0 > g[OPS.index("skip_connect")]
    # the mean of the two extremes' costs at the uniform mixture is between them
    lo = relax.expected_cost(one_hot(small.smallest(), relax.genes))["params"]
    hi = relax.expected_cost(one_hot(small.largest(), relax.genes))["params"]
    assert lo < cost < hi


def test_restricted_space_mixes_only_its_options():
    space = Nb201Space((1, 8, 8), 10).restrict({e: ["skip_connect", "nor_conv_3x3"] for e in EDGES})
    relax = space.relaxation(**TINY)
    assert relax.genes["e2_1"] == ("skip_connect", "nor_conv_3x3")
    arch = {e: "nor_conv_3x3" for e in EDGES}
    assert relax.expected_cost(one_hot(arch, relax.genes))["params"].item() == \
        count_params(relax.discretize(arch))
    with pytest.raises(ValueError, match="shaped"):
        relax(torch.randn(1, 1, 8, 8), {e: torch.full((5,), 0.2) for e in EDGES})
    with pytest.raises(NasoptError, match="channels"):
        space.relaxation(channels=0)


def test_collapse_rule_on_hand_made_cells():
    assert collapse_of(from_string(ALL_SKIP)).collapsed
    best = collapse_of(from_string(BEST))
    assert not best.collapsed and best.skip_edges == 1 and best.free_edges == 1
    # three skips: collapsed (DARTS+ count); two skips and two pools: 4 free, not collapsed
    three = "|skip_connect~0|+|skip_connect~0|skip_connect~1|+|nor_conv_3x3~0|nor_conv_1x1~1|nor_conv_3x3~2|"
    assert collapse_of(from_string(three)).collapsed
    four = "|skip_connect~0|+|skip_connect~0|avg_pool_3x3~1|+|avg_pool_3x3~0|nor_conv_1x1~1|nor_conv_3x3~2|"
    c = collapse_of(from_string(four))
    assert (c.skip_edges, c.free_edges, c.collapsed) == (2, 4, False)
    # five parameter-free edges (one conv left): collapsed
    five = "|none~0|+|avg_pool_3x3~0|avg_pool_3x3~1|+|skip_connect~0|none~1|nor_conv_3x3~2|"
    assert collapse_of(from_string(five)).collapsed
    # probability mass: 0.7 on skip, 0.1 on none on every edge -> free mass 0.8, skip 0.7
    probs = {e: torch.tensor([0.1, 0.7, 0.1, 0.1, 0.0]) for e in EDGES}
    c = collapse_of(from_string(ALL_SKIP), probs)
    assert c.free_mass == pytest.approx(0.8) and c.skip_mass == pytest.approx(0.7)
    assert "COLLAPSED" in c.describe() and "0.80" in c.describe()
    # thresholds are parameters
    assert not collapse_of(from_string(three), skip_edges=4, free_edges=6).collapsed


def test_darts_minus_aux_skip_adds_beta_x(small):
    """DARTS- (Chu et al., ICLR 2021): every mixed op outputs mixture + beta * x."""
    op = MixedOp(3, OPS)
    x = torch.randn(2, 3, 4, 4)
    p = torch.tensor([0.0, 0.0, 0.3, 0.7, 0.0])
    assert torch.allclose(op(x, p, aux_skip=0.5), op(x, p) + 0.5 * x)
    relax = small.relaxation(**TINY).eval()
    probs = {e: torch.full((5,), 0.2) for e in EDGES}
    xb = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        plain = relax(xb, probs)
        relax.aux_skip = 1.0
        assert relax.aux_skip == 1.0
        assert not torch.allclose(relax(xb, probs), plain)
        relax.aux_skip = 0.0
        assert torch.equal(relax(xb, probs), plain)


def test_odd_image_sides_are_refused_with_the_fix():
    with pytest.raises(NasoptError, match="multiples of 4"):
        Nb201Space((1, 14, 14), 10).relaxation(**TINY)


def test_bench_runs_darts_and_darts_minus_with_the_beta_schedule(tmp_path):
    """The bench end to end on a tiny proxy (digits 8x8, 2 epochs): the report names the lookup,
    DARTS-'s beta decays 1 -> 0.5 -> 0 (recorded per epoch), plain DARTS has beta 0."""
    import json

    from nasopt.cli import main as cli
    out = tmp_path / "darts.md"
    assert cli.main(["bench", "darts-nb201", "--dataset", "digits", "--side", "8",
                     "--train-samples", "128", "--channels", "2", "--epochs", "2", "--seeds", "1",
                     "--variants", "darts,darts-", "--batch-size", "64", "--out", str(out)]) == 0
    text = out.read_text()
    assert "looked up" in text and "CIFAR-10" in text and out.with_suffix(".png").stat().st_size
    runs = json.loads(out.with_suffix(".json").read_text())
    betas = {r["variant"]: [e["beta"] for e in r["epochs"]] for r in runs}
    assert betas == {"darts": [0.0, 0.0, 0.0], "darts-": [1.0, 1.0, 0.5]}
    for r in runs:
        assert [e["epoch"] for e in r["epochs"]] == [0, 1, 2]
        assert r["epochs"][0]["collapsed"] is None  # the uniform start is not judged
        assert all(isinstance(e["collapsed"], bool) for e in r["epochs"][1:])
        assert all(0 < e["cifar10_acc"] <= 100 and 1 <= e["rank"] <= 15625 for e in r["epochs"])
    # the two variants saw the same data and seed: the auxiliary skip changed the search
    assert runs[0]["epochs"][1]["probs"] != runs[1]["epochs"][1]["probs"]
    assert cli.main(["bench", "darts-nb201", "--side", "6", "--out", str(out)]) == 2
