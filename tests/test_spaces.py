"""Contract tests run over every registered search space."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from nasopt import api
from nasopt.core.arch import Arch
from nasopt.core.errors import NasoptError
from nasopt.core.metrics import count_macs, count_params
from nasopt.supernet.elastic import importance

SPACE_NAMES = sorted(api.SPACES)
SHAPES = {"conv1d": (1, 40), "mobilenet": (1, 8, 8), "nb201": (3, 32, 32)}
#: spaces with a weight-sharing supernet (the others refuse supernet() with a NasoptError)
SUPERNET_SPACES = ["conv1d", "mobilenet"]

# Counted by hand (see the comments) for the smallest arch of each space, 10 classes.
HAND_COUNTS = {
    # s1..s3: conv k3 -> 8 ch + BN(8): 24+16, 192+16, 192+16; head 8*5*10+10 = 410
    # MACs: 20*8*3 + 10*8*8*3 + 5*8*8*3 + 400
    "conv1d": (40 + 208 + 208 + 410, 480 + 1920 + 960 + 400),
    # stem 1->8 k3 (72) + BN 16; s1 8->16->8 (128+32+144+32+128+16); s2 8->16->16
    # (128+32+144+32+256+32); s3 16->32->24 (512+64+288+64+768+48); head 24*10+10
    # MACs: stem 64*8*9; s1 expand 64*8*16, dw 16*16*9 (stride 2), project 16*16*8;
    # s2 16*8*16, 16*16*9, 16*16*16; s3 16*16*32, 16*32*9, 16*32*24; head 240
    "mobilenet": (88 + 480 + 624 + 1744 + 250,
                  4608 + 8192 + 2304 + 2048 + 2048 + 2304 + 4096 + 8192 + 4608 + 12288 + 240),
    # all-none cells hold no weights: stem 3->16 k3 (432) + BN 32; reduction 16->32: convs
    # 16*32*9 + 32*32*9, 2 BN(32), shortcut 1x1 16*32; reduction 32->64 likewise; BN(64) 128;
    # linear 64*10+10. MACs at 32x32: stem 1024*16*27; reductions at 16x16 (256 px) and 8x8
    # (64 px): 256*(32*16*9 + 32*32*9 + 32*16) + 64*(64*32*9 + 64*64*9 + 64*32); linear 640
    "nb201": (432 + 32 + (4608 + 9216 + 64 + 64 + 512) + (18432 + 36864 + 128 + 128 + 2048)
              + 128 + 650,
              442368 + 256 * (4608 + 9216 + 512) + 64 * (18432 + 36864 + 2048) + 640),
}


def test_every_space_has_a_hand_count():
    assert set(HAND_COUNTS) == set(api.SPACES) == set(SHAPES)


@pytest.mark.parametrize("name", SPACE_NAMES)
def test_a_space_without_supernet_says_how_to_search_it(name):
    space = api.SPACES[name](SHAPES[name], 10)
    if name in SUPERNET_SPACES:
        assert count_params(space.supernet()) >= count_params(space.build(space.largest()))
    else:
        with pytest.raises(NasoptError, match="tabular mode"):
            space.supernet()


@pytest.mark.parametrize("name", SPACE_NAMES)
def test_params_and_macs_equal_hand_count(name):
    space = api.SPACES[name](SHAPES[name], 10)
    model = space.build(space.smallest())
    assert (count_params(model), count_macs(model, SHAPES[name])) == HAND_COUNTS[name]


@pytest.mark.parametrize("name", SPACE_NAMES)
def test_sample_build_forward(name):
    space = api.SPACES[name](SHAPES[name], 7)
    rng = random.Random(0)
    for _ in range(5):
        arch = space.sample(rng)
        assert set(arch) == set(space.genes)
        out = space.build(arch)(torch.randn(3, *SHAPES[name]))
        assert out.shape == (3, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", SPACE_NAMES)
def test_arch_json_round_trip(name):
    space = api.SPACES[name](SHAPES[name], 10)
    arch = space.sample(random.Random(3))
    back = space.validate(Arch.from_json(arch.to_json()))
    assert back == arch and back.key == arch.key


def test_extract_matches_activated_supernet(trained, rng):
    space, supernet, data = trained
    x = data.x_val[:64]
    supernet.eval()
    worst = 0.0
    for _ in range(20):
        arch = space.sample(rng)
        with torch.no_grad(), supernet.activate(arch):
            expected = supernet(x)
        got = supernet.extract(arch).eval()(x)
        worst = max(worst, (expected - got).abs().max().item())
    assert worst < 1e-5


def test_activate_is_scoped(trained):
    space, supernet, data = trained
    x = data.x_val[:16]
    supernet.eval()
    with torch.no_grad():
        full = supernet(x)
        with supernet.activate(space.smallest()):
            small = supernet(x)
        again = supernet(x)
    assert torch.equal(full, again)
    assert not torch.allclose(full, small)


def test_sorting_channels_keeps_function_and_orders_by_l1(trained):
    space, supernet, data = trained
    supernet = copy.deepcopy(supernet)  # the fixture is shared: leave it as it was
    x = data.x_val[:32]
    supernet.eval()
    with torch.no_grad():
        before = supernet(x)
        supernet.sort_channels()
        after = supernet(x)
    assert (before - after).abs().max().item() < 1e-4
    # the stage-producing conv of the last stage is sorted by (summed) L1 importance
    stage = supernet.net.stages[-1]
    producer = "conv" if hasattr(stage.blocks[0], "conv") else "project"
    total = sum(importance(getattr(b, producer)) for b in stage.blocks)
    assert torch.all(total[:-1] >= total[1:] - 1e-6)


@pytest.mark.parametrize("name", SUPERNET_SPACES)
def test_restrict_carves_a_subspace(name):
    space = api.SPACES[name](SHAPES[name], 10)
    sub = space.restrict({"s1.k": ["3", "5"], "s2.depth": [1]})
    assert sub.genes["s1.k"] == (3, 5) and sub.genes["s2.depth"] == (1,)
    rng = random.Random(0)
    for _ in range(30):
        arch = sub.sample(rng)
        assert arch["s1.k"] in (3, 5) and arch["s2.depth"] == 1
    assert sub.size() == space.size() * 2 // 3 // 3
    # the supernet of a sub-space is sized for its largest options only
    assert count_params(sub.restrict({"s3.depth": [1]}).supernet()) < count_params(space.supernet())


@pytest.mark.parametrize("bad, message", [
    ({"nope": [1]}, "unknown gene 'nope'"),
    ({"s1.k": [4]}, "not available for gene 's1.k'"),
    ({"s1.k": []}, "no option"),
    ({"s1.k": ["x"]}, "takes int values"),
])
def test_bad_restrictions_name_the_fix(bad, message):
    space = api.SPACES["conv1d"](SHAPES["conv1d"], 10)
    with pytest.raises(NasoptError, match=message):
        space.restrict(bad)


def test_validate_rejects_unknown_genes_and_options():
    space = api.SPACES["conv1d"](SHAPES["conv1d"], 10)
    arch = dict(space.smallest())
    with pytest.raises(NasoptError, match="choose among"):
        space.validate({**arch, "s1.k": 9})
    with pytest.raises(NasoptError, match="unknown gene"):
        space.validate({**arch, "s9.k": 3})
    with pytest.raises(NasoptError, match="lacks gene"):
        space.validate({k: v for k, v in arch.items() if k != "s1.k"})


def test_space_rejects_data_of_the_wrong_rank():
    with pytest.raises(NasoptError, match="choose a space made for this data"):
        api.SPACES["conv1d"]((1, 8, 8), 10)


@pytest.mark.parametrize("name", SPACE_NAMES)
def test_hook_mac_count_agrees_with_pytorchs_flop_counter(name):
    from nasopt.compression.compress import Policy, compress
    from nasopt.core.metrics import count_macs_reference
    shape = SHAPES[name]
    space = api.SPACES[name](shape, 10)
    rng = random.Random(2)
    for _ in range(2 if name == "nb201" else 6):
        arch = space.sample(rng)
        model = space.build(arch).eval()
        assert count_macs(model, shape) == count_macs_reference(model, shape)
        if space.compression_genes():  # factorized, folded deployed models too
            deployed, _ = compress(model, Policy.from_arch(arch), space.group_of)
            assert count_macs(deployed, shape) == count_macs_reference(deployed, shape)
