"""``mobilenet`` on large inputs (Fashion-MNIST's 28x28): halved after the stem, by 2x2 max
pooling (``stem.pool=2``, the default) or a stride-2 stem (``stem.pool=1``, what spaces saved
before the gene existed mean); small inputs (digits 8x8) keep the stride-1 stem and have no
``stem.pool``; both run channels-last after the stem."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nasopt import api
from nasopt.core.metrics import count_macs, count_params
from nasopt.supernet.elastic import recalibrate_bn

SHAPE = (1, 28, 28)


def _space(shape=SHAPE):
    return api.SPACES["mobilenet"](shape, 10)


def test_small_inputs_keep_the_stride_1_stem_and_run_channels_last():
    assert "stem.pool" not in _space((1, 8, 8)).full_genes()
    net = _space((1, 8, 8)).build(_space((1, 8, 8)).smallest())
    assert net.stem.stride == (1, 1) and net.pool is None and net.channels_last
    with torch.no_grad():
        out = net.eval()(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 10) and out.is_contiguous()


@pytest.mark.parametrize("pool", [1, 2])
def test_large_inputs_are_halved_after_the_stem_with_the_hand_counted_macs(pool):
    space = _space().restrict({"stem.pool": [1, 2]})
    model = space.build({**space.smallest(), "stem.pool": pool})
    assert model.stem.stride == ((2, 2) if pool == 1 else (1, 1)) and model.channels_last
    # 28 -> 14 (stem) -> 7 (s1) -> 4 (s2) -> 4 (s3, no stride on a 4x4 map). Params as digits'
    # (HAND_COUNTS in test_spaces.py). MACs: stem 196*8*9 at stride 2, 784*8*9 at stride 1
    # before the pooling (which counts none); s1 expand 196*8*16, dw 49*16*9, project 49*16*8;
    # s2 49*8*16, 16*16*9, 16*16*16; s3 16*16*32, 16*32*9, 16*32*24; head 240
    stem = 14112 if pool == 1 else 56448
    macs = (stem + 25088 + 7056 + 6272 + 6272 + 2304 + 4096 + 8192 + 4608 + 12288 + 240)
    assert count_params(model) == 88 + 480 + 624 + 1744 + 250
    assert count_macs(model, SHAPE) == macs
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        out = model.eval()(x)
        stem_out = model._stem(x)
    assert out.shape == (2, 10) and out.is_contiguous() and stem_out.shape[2:] == (14, 14)


def test_the_pooled_stem_is_the_default_and_older_spaces_keep_the_stride_2_stem():
    from nasopt.core.space import space_from_description
    space = _space()
    assert space.genes["stem.pool"] == (2,) and space.full_genes()["stem.pool"] == (1, 2)
    assert space.build(space.largest()).pool == 2
    # a description, arch or packed file from before the gene: the stride-2 stem it was built with
    old = space.describe()
    del old["genes"]["stem.pool"]
    older = space_from_description(old, api.SPACES)
    assert older.genes["stem.pool"] == (1,)
    arch = {g: v for g, v in older.largest().items() if g != "stem.pool"}
    assert older.build(older.validate(arch)).stem.stride == (2, 2)


def test_both_stems_share_the_supernet_weights_when_searched_together():
    space = _space().restrict({"stem.pool": [1, 2]})
    supernet = space.supernet()
    x = torch.randn(32, *SHAPE)
    recalibrate_bn(supernet, x)
    supernet.eval()
    outs = []
    for pool in (1, 2):
        arch = {**space.sample(random.Random(0)), "stem.pool": pool}  # one arch, two stems
        model = supernet.extract(arch).eval()
        assert model.stem.stride == ((2, 2) if pool == 1 else (1, 1))
        with torch.no_grad(), supernet.activate(arch):
            outs.append(supernet(x))
            assert torch.allclose(outs[-1], model(x), atol=1e-4)
    assert not torch.allclose(outs[0], outs[1])


def test_extract_matches_the_activated_supernet_and_gradients_match_contiguous():
    space = _space()
    supernet = space.supernet()
    x = torch.randn(64, *SHAPE)
    recalibrate_bn(supernet, x)
    supernet.eval()
    for arch in [space.sample(random.Random(s)) for s in range(3)] + [space.largest()]:
        model = supernet.extract(arch).eval()
        with torch.no_grad(), supernet.activate(arch):
            assert torch.allclose(supernet(x), model(x), atol=1e-4)
    # channels-last changes speed, not results: the same loss and gradients either way (float64:
    # float32 rounding differs between the two memory formats' kernels)
    model = space.build(space.sample(random.Random(7))).train().double()
    x = x.double()
    grads = []
    for channels_last in (True, False):
        model.channels_last = channels_last
        model.zero_grad()
        loss = F.cross_entropy(model(x), torch.arange(64) % 10)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-10)


def test_large_models_export_to_torchscript_and_onnx(tmp_path):
    from nasopt.deploy import onnx as onnx_export
    from nasopt.deploy.torchscript import write
    space = _space()
    model = space.build(space.sample(random.Random(1))).eval()
    x = torch.randn(16, *SHAPE)
    with torch.no_grad():
        ref = model(x).numpy()
    write(model, tmp_path / "model.ts", SHAPE)  # verified on a batch of another size
    got = torch.jit.load(str(tmp_path / "model.ts"))(x).detach().numpy()
    assert np.abs(ref - got).max() < 1e-4
    record = onnx_export.write(model, tmp_path, SHAPE, ("onnx",), x, x)
    assert record["onnx"]["max_abs_diff"] < onnx_export.FP32_TOLERANCE


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 32, 32)])
def test_other_large_sizes_build_and_run(shape):
    space = _space(shape)
    out = space.build(space.largest())(torch.randn(2, *shape))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_nasopt_spaces_says_which_inputs_have_the_pool_gene(capsys):
    from nasopt.cli.main import main
    assert main(["spaces"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "stem.pool" in l)
    assert "opt-in: 2" in line and "not on 8x8" in line
