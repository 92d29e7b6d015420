"""The C export (nasopt.deploy.firmware): the integer reference tracks the float model, the host
build of model.c equals the NumPy reference bit for bit, the Cortex-M4 build in QEMU prints the
same classes, and bad input gets one clear line. Archs of both spaces with every compression:
2/4/6/8-bit and float32 layers, sparsity (a mask per layer), low-rank pairs; mobilenet's
max-pooled stem on large inputs."""
from __future__ import annotations

import copy
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from nasopt import api
from nasopt.core.errors import NasoptError
from nasopt.deploy import export as export_mod
from nasopt.deploy.firmware import c_export, reference, toolchain
from nasopt.search.evaluate import Evaluator

REQUIRE = os.environ.get("NASOPT_REQUIRE_FIRMWARE") == "1"


def _archs(space, n, seed=0):
    """``n`` sampled archs, the first ones forced onto each kind of compression."""
    rng = random.Random(seed)
    genes = space.genes
    forced = [{"sparsity": 0.75, "bits": 4, "rank": 0.25, "quant": "uniform"},
              {"sparsity": 0.0, "bits": 2, "rank": 0.5, "quant": "uniform"},
              {"sparsity": 0.5, "bits": 32, "rank": 1.0, "quant": "uniform"},
              {"sparsity": 0.0, "bits": 6, "rank": 1.0, "quant": "uniform"},
              # codebook layers are emitted as 8-bit integers
              {"sparsity": 0.5, "bits": 4, "rank": 0.5, "quant": "codebook"}]
    archs = []
    for i in range(n):
        arch = dict(space.sample(rng))
        if i < len(forced):
            for gene in genes:
                kind = gene.rsplit(".", 1)[-1]
                if kind in forced[i] and forced[i][kind] in genes[gene]:
                    arch[gene] = forced[i][kind]
        archs.append(space.validate(arch))
    return archs


def _plans(trained, n):
    space, supernet, data = trained
    space = space.full_space()  # the opt-in genes too: codebook layers
    evaluator = Evaluator(space, supernet, data, calib_samples=256)
    out = []
    for arch in _archs(space, n):
        model, stored = evaluator.compressed(arch)
        plan = reference.build_plan(model, stored, space, data.preprocess, data.x_train[:256])
        out.append((arch, model, plan))
    return space, data, out


def _raw(data, x):
    return (data.preprocess.raw(x) if data.preprocess else x).numpy()


def test_reference_tracks_the_float_packed_model(trained):
    """int8 activations change the logits a little: on validation samples the reference's
    float logits stay close to the float model's (within a fifth of the logits' spread: the
    fixture's supernet trains 2 epochs, so a heavily compressed subnet's logits spread little)
    and mostly pick the same class."""
    space, data, plans = _plans(trained, 4)
    x = data.x_val[:200]
    for arch, model, plan in plans:
        with torch.no_grad():
            want = model(x).numpy()
        got = reference.float_logits(plan, reference.run(plan, _raw(data, x)))
        spread = want.std() + 1e-9
        err = np.abs(got - want).mean() / spread
        agree = (got.argmax(1) == want.argmax(1)).mean()
        assert err < 0.2, (dict(arch), err)
        assert agree >= 0.8, (dict(arch), agree)


def test_host_c_equals_the_reference_bit_for_bit(trained, tmp_path):
    space, data, plans = _plans(trained, 5)
    x = _raw(data, data.x_val[:150])
    kinds = set()
    for i, (arch, _, plan) in enumerate(plans):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        for name, text in c_export.generate(plan).items():
            (folder / name).write_text(text)
        host = toolchain.host_logits(folder, x, plan["num_classes"])
        ref = reference.run(plan, x)
        assert np.array_equal(host, ref), (dict(arch), int((host != ref).sum()))
        kinds |= {(op["op"], op.get("kind"), op.get("bits"), op.get("mask") is not None)
                  for op in plan["ops"]}
    bits = {k[2] for k in kinds if k[0] == "conv"}
    assert {2, 4, 6, 8} <= bits and any(k[3] for k in kinds)  # every bit-width, a sparse layer
    if space.name == "mobilenet":
        assert {("conv", "2d"), ("conv", "dw"), ("conv", "1d")} <= {k[:2] for k in kinds}
        assert {"add", "mean"} <= {k[0] for k in kinds}


def test_the_arena_holds_every_live_tensor_apart(trained):
    _, _, plans = _plans(trained, 3)
    for _, _, plan in plans:
        offsets, arena, peak = c_export.plan_arena(plan)
        buffer_of, buffers = c_export.lifetimes(plan)
        assert peak <= arena
        for a in range(len(buffers)):
            for b in range(a + 1, len(buffers)):
                ta = buffer_of.index(a)
                tb = buffer_of.index(b)
                live = buffers[a][1] <= buffers[b][2] and buffers[b][1] <= buffers[a][2]
                apart = (offsets[ta] + buffers[a][0] <= offsets[tb]
                         or offsets[tb] + buffers[b][0] <= offsets[ta])
                assert apart or not live


def test_export_format_c_writes_verified_files(trained, tmp_path):
    space, supernet, data = trained
    evaluator = Evaluator(space, supernet, data, calib_samples=256)
    arch = _archs(space, 1, seed=3)[0]
    model, stored = evaluator.compressed(arch)
    out = export_mod.export_model(
        model, stored, arch, space, tmp_path / "exp", {"weights": "inherited"}, api.SPACES,
        ("packed", "c"), (evaluator.calibration_samples, data.x_val[:100], data.y_val[:100]),
        data.preprocess)
    card = export_mod.read_card(out)
    assert card["files"]["c"] == "model.c"
    assert card["c"]["verified"]["host_equals_reference"] is True
    assert {"model.h", "model.c", "model.plan.json"} <= set(export_mod.files_of(out))
    header = (out / "model.h").read_text()
    assert f"#define NASOPT_INPUT_SIZE {int(np.prod(space.input_shape))}" in header
    assert "int nasopt_predict(const float *x);" in header
    assert "void nasopt_logits(const float *x, int32_t *out);" in header
    source = (out / "model.c").read_text()
    assert "malloc" not in source and "#include <stdio.h>" not in source
    # the plan of the folder's packed file is the same model
    plan = reference.load(out / "model.plan.json")
    space2, _, model2, stored2 = reference.read_packed(out / "model.packed", api.SPACES)
    again = reference.build_plan(model2, stored2, space2, data.preprocess,
                                 evaluator.calibration_samples)
    x = _raw(data, data.x_val[:50])
    assert np.array_equal(reference.run(plan, x), reference.run(again, x))


def test_clear_lines(trained, tmp_path, monkeypatch):
    space, supernet, data = trained
    evaluator = Evaluator(space, supernet, data, calib_samples=256)
    arch = _archs(space, 1, seed=5)[0]
    model, stored = evaluator.compressed(arch)
    # a layer the generator cannot emit
    odd = copy.deepcopy(model)
    folded = next(name for name, m in odd.named_modules() if isinstance(m, nn.Identity))
    parent, _, child = folded.rpartition(".")
    setattr(odd.get_submodule(parent), child, nn.Sigmoid())
    with pytest.raises(NasoptError, match="cannot emit layer .*Sigmoid"):
        reference.build_plan(odd, stored, space, data.preprocess, data.x_train[:32])
    plan = reference.build_plan(model, stored, space, data.preprocess, data.x_train[:64])
    # an arena over the RAM allowed
    arena = c_export.plan_arena(plan)[1]
    with pytest.raises(NasoptError, match=f"arena needs {arena} B, more than the 16 B"):
        toolchain.check_ram(plan, 16)
    toolchain.check_ram(plan, arena)
    # the c format without calibration samples
    with pytest.raises(NasoptError, match="calibrates its int8 activations on training"):
        export_mod.export_model(model, stored, arch, space, tmp_path / "e", {}, api.SPACES,
                                ("packed", "c"), None, data.preprocess)
    # a missing toolchain: the apt-get line
    folder = tmp_path / "c"
    folder.mkdir()
    for name, text in c_export.generate(plan).items():
        (folder / name).write_text(text)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(toolchain.ToolchainMissing, match="apt-get install -y gcc-arm-none-eabi "
                       "libnewlib-arm-none-eabi qemu-system-arm"):
        toolchain.m4_run(folder, _raw(data, data.x_val[:2]))
    with pytest.raises(toolchain.ToolchainMissing, match="no C compiler"):
        toolchain.host_logits(folder, _raw(data, data.x_val[:2]), plan["num_classes"])


@pytest.mark.skipif(not toolchain.arm_available() and not REQUIRE,
                    reason="no arm-none-eabi-gcc / qemu-system-arm (NASOPT_REQUIRE_FIRMWARE=1 "
                           "makes this a failure)")
def test_cortex_m4_in_qemu_prints_the_reference_classes(trained, tmp_path):
    space, data, plans = _plans(trained, 1)
    _, _, plan = plans[0]
    folder = tmp_path / "m4"
    folder.mkdir()
    for name, text in c_export.generate(plan).items():
        (folder / name).write_text(text)
    reference.save(plan, folder / c_export.PLAN)
    n = 40 if space.name == "conv1d" else 12
    x = _raw(data, data.x_val[:n])
    result = toolchain.verify(folder, x, data.y_val[:n].numpy(), emulator=True)
    assert result["m4_equals_host"] and result["m4_samples"] == n
    assert 0 < result["flash_bytes"] < result["image_text_bytes"]
    assert result["ram_bytes"] >= c_export.plan_arena(plan)[1] + result["stack_bytes"]
    assert result["stack_bytes"] > 0 and result["instructions"] > 1000


def test_the_published_mnist1d_cnn_goes_through_plan_and_host_c_bit_exactly(tmp_path):
    """A fixed model (no search space): the published MNIST-1D CNN, untrained, int8 by
    ``compress``; its plan from a PlanInput, model.c on the host equals the NumPy reference."""
    from nasopt.compression.compress import Policy, compress
    from nasopt.core.data import Preprocess
    from nasopt_bench.compression import ReferenceCNN
    torch.manual_seed(0)
    cnn = ReferenceCNN(40, 10)
    model, stored = compress(cnn, Policy(bits={"all": 8}), lambda name: "all")
    preprocess = Preprocess(mean=0.5, std=2.0)
    g = torch.Generator().manual_seed(1)
    calib = torch.randn((256, 1, 40), generator=g)
    raw = preprocess.raw(torch.randn((200, 1, 40), generator=g)).numpy()
    spec = reference.PlanInput("mnist1d-cnn", (1, 40), 10)
    record = c_export.write(tmp_path, model, stored, spec, preprocess, calib, raw)
    assert record["verified"] == {**record["verified"], "samples": 200,
                                  "host_equals_reference": True}
    plan = reference.load(tmp_path / c_export.PLAN)
    assert plan["space"] == "mnist1d-cnn" and plan["input_shape"] == [1, 40]
    convs = [op for op in plan["ops"] if op["op"] == "conv"]
    assert [(op["cin"], op["cout"], op["k"], op["stride"]) for op in convs] == [
        (1, 25, 5, 2), (25, 25, 3, 2), (25, 25, 3, 2), (125, 10, 1, 1)]
    assert [op["act"] for op in convs] == ["relu", "relu", "relu", None]
    assert {op["bits"] for op in convs} == {8}
    host = toolchain.host_logits(tmp_path, raw, 10)
    ref = reference.run(plan, raw)
    assert np.array_equal(host, ref)
    assert len(np.unique(ref.argmax(1))) > 1  # the logits depend on the input


@pytest.fixture(scope="module")
def pooled(datasets):
    """A mobilenet on 16x16 images (digits upscaled 2x): its stem is max-pooled (stem.pool=2),
    trained briefly as a plain model so its logits mean something."""
    import dataclasses

    import torch.nn.functional as F

    from nasopt.compression.compress import Policy, compress
    from nasopt.supernet.train import TrainConfig, train_model
    digits = datasets["digits"]
    up = lambda x: F.interpolate(x, scale_factor=2, mode="nearest")  # noqa: E731
    data = dataclasses.replace(digits, x_train=up(digits.x_train[:512]),
                               y_train=digits.y_train[:512], x_val=up(digits.x_val[:200]),
                               y_val=digits.y_val[:200])
    space = api.SPACES["mobilenet"](data.input_shape, 10)
    assert space.genes["stem.pool"] == (2,)
    torch.manual_seed(0)
    arch = space.validate({**space.sample(random.Random(3)), "stem.width": 8})
    model = train_model(space.build(arch), data.x_train, data.y_train,
                        TrainConfig(epochs=8, batch_size=64, lr=1e-2, seed=0))
    model, stored = compress(model.eval(), Policy(bits={"stem": 8, "s1": 6, "s2": 4, "s3": 8,
                                                        "head": 8}), space.group_of)
    return space, data, model, stored


def test_a_max_pooled_stem_is_one_maxpool_op_bit_exact_in_c_and_on_the_m4(pooled, tmp_path):
    """Large inputs pool after the stem: the plan gets a maxpool op (the stem's ReLU6 fused into
    the conv before it, the pooled tensor sharing the stem output's quantization); the
    reference tracks the float model, the host build of model.c equals it bit for bit, and so
    does the Cortex-M4 build in QEMU."""
    space, data, model, stored = pooled
    plan = reference.build_plan(model, stored, space, data.preprocess, data.x_train[:256])
    pools = [op for op in plan["ops"] if op["op"] == "maxpool"]
    assert [(p["channels"], p["in_h"], p["out_h"], p["k"], p["stride"]) for p in pools] == [
        (8, 16, 8, 2, 2)]
    stem = plan["ops"][plan["ops"].index(pools[0]) - 1]
    assert stem["op"] == "conv" and stem["stride"] == 1 and stem["act"] == "relu6"
    t_in, t_out = plan["tensors"][pools[0]["in"]], plan["tensors"][pools[0]["out"]]
    assert (t_in["scale"], t_in["zp"]) == (t_out["scale"], t_out["zp"])
    x = data.x_val
    with torch.no_grad():
        want = model(x).numpy()
    raw = _raw(data, x)
    got = reference.float_logits(plan, reference.run(plan, raw))
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9
    assert (want.argmax(1) == data.y_val.numpy()).mean() > 0.5  # trained: the logits mean something
    folder = tmp_path / "c"
    folder.mkdir()
    for name, text in c_export.generate(plan).items():
        (folder / name).write_text(text)
    assert np.array_equal(toolchain.host_logits(folder, raw, 10), reference.run(plan, raw))
    if not toolchain.arm_available() and not REQUIRE:
        pytest.skip("no arm-none-eabi-gcc / qemu-system-arm for the M4 half")
    reference.save(plan, folder / c_export.PLAN)
    result = toolchain.verify(folder, raw[:12], data.y_val[:12].numpy(), emulator=True)
    assert result["m4_equals_host"] and result["m4_samples"] == 12
    # the footprint predicted from the plan (the max-pool kernel's cost included) is the image's
    from nasopt.deploy.firmware import footprint
    from nasopt.hardware import profile as hardware
    costs = footprint.load_costs(hardware.costs_path(hardware.load_profile("cortex-m4").source))
    want, got = footprint.predict(plan, costs), toolchain.m4_sizes(folder)
    assert "nq_maxpool" in want["functions"]
    assert (want["flash_bytes"], want["static_ram_bytes"]) == (got["flash"], got["static_ram"])


def test_max_pooling_the_reference_cannot_emit_is_one_clear_line():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            x = torch.nn.functional.max_pool2d(self.conv(x), (2, 3))
            return self.fc(x.mean(dim=(2, 3)))

    from nasopt.compression.compress import Policy, compress
    model, stored = compress(Odd().eval(), Policy(bits={"all": 8}), lambda name: "all")
    spec = reference.PlanInput("odd", (1, 8, 8), 3)
    with pytest.raises(NasoptError, match="cannot emit layer .*max pooling with an unequal"):
        reference.build_plan(model, stored, spec, None, torch.randn(16, 1, 8, 8))
