"""The cortex-m4 hardware profile: the firmware's flash predicted from the plan equals the flash of
the linked Cortex-M4 image exactly (archs of both spaces with every compression), its static RAM
too, and the stack and RAM equal QEMU's; a search under the profile records the firmware's flash,
RAM and integer accuracy and honours a flash budget."""
from __future__ import annotations

import os
import random

import pytest

from nasopt.cli import main as cli
from nasopt.core.errors import NasoptError
from nasopt.deploy.firmware import c_export, footprint, reference, toolchain
from nasopt.hardware import profile as hardware
from nasopt.search.evaluate import Evaluator
from tests.test_firmware import _archs, _raw

REQUIRE = os.environ.get("NASOPT_REQUIRE_FIRMWARE") == "1"
needs_arm = pytest.mark.skipif(not toolchain.arm_available() and not REQUIRE,
                               reason="no arm-none-eabi-gcc / qemu-system-arm "
                                      "(NASOPT_REQUIRE_FIRMWARE=1 makes this a failure)")
PROFILE = hardware.load_profile("cortex-m4")
COSTS = footprint.load_costs(hardware.costs_path(PROFILE.source))


def _write(plan, folder):
    folder.mkdir()
    for name, text in c_export.generate(plan).items():
        (folder / name).write_text(text)
    reference.save(plan, folder / c_export.PLAN)
    return folder


def test_profile_and_its_checks(tmp_path):
    assert PROFILE.firmware and PROFILE.dtype == "int8"
    assert PROFILE.metrics == {"latency": "none", "sram": "firmware", "flash": "firmware",
                               "accuracy": "firmware"}
    assert PROFILE.limits == {"size": 256 * 1024, "sram": 64 * 1024}
    bad = {"name": "x", "runtime": {"engine": "none", "dtype": "fp32"},
           "metrics": {"latency": "none", "flash": "firmware"}}
    with pytest.raises(NasoptError, match='needs runtime.dtype = "int8"'):
        hardware.profile_from_dict(bad, str(PROFILE.source))
    floor = footprint.flash_floor(COSTS)
    from nasopt import api
    from nasopt.core.objectives import Constraint
    from nasopt.hardware.evaluate import check_possible
    space = api.SPACES["conv1d"]((1, 40), 10)
    check_possible(space, PROFILE, [Constraint("size", floor)], None)
    with pytest.raises(NasoptError, match=f"impossible budget: size .* at least {floor} B"):
        check_possible(space, PROFILE, [Constraint("size", floor - 1)], None)
    bad["runtime"]["dtype"] = "int8"
    with pytest.raises(NasoptError, match="needs the cost table"):
        hardware.profile_from_dict(bad, str(tmp_path / "x.toml"))


@needs_arm
def test_the_shipped_cost_table_is_the_cross_compilers():
    fresh = footprint.measure_costs()
    if fresh["compiler"] != COSTS["compiler"]:
        pytest.skip(f"cost table of {COSTS['compiler']}, installed: {fresh['compiler']}")
    for part in ("code", "records", "stack", "flags"):
        assert fresh[part] == COSTS[part], part


@needs_arm
def test_predicted_flash_equals_the_linked_images(trained, tmp_path):
    """Exact for random archs of the space (the first four forced onto 2/4/6-bit, float32,
    sparse and low-rank layers)."""
    space, supernet, data = trained
    evaluator = Evaluator(space, supernet, data, calib_samples=128)
    kinds = set()
    for i, arch in enumerate(_archs(space, 6, seed=11)):
        model, stored = evaluator.compressed(arch)
        plan = reference.build_plan(model, stored, space, data.preprocess, data.x_train[:128])
        want = footprint.predict(plan, COSTS)
        got = toolchain.m4_sizes(_write(plan, tmp_path / f"m{i}"))
        assert want["flash_bytes"] == got["flash"], dict(arch)
        assert want["code_bytes"] == got["code"] and sum(want["data_bytes"].values()) == \
            got["const"], dict(arch)
        assert want["static_ram_bytes"] == got["static_ram"], dict(arch)
        kinds |= {(op.get("bits"), op.get("mask") is not None) for op in plan["ops"]}
    assert {2, 4, 8} <= {b for b, _ in kinds} and any(m for _, m in kinds)
    # the stack and the RAM on the emulated board
    result = toolchain.m4_run(tmp_path / "m0", _raw(data, data.x_val[:2]))
    plan = reference.load(tmp_path / "m0" / c_export.PLAN)
    want = footprint.predict(plan, COSTS)
    assert want["flash_bytes"] == result.flash_bytes
    assert want["stack_bytes"] == result.stack_bytes
    assert want["ram_bytes"] == result.ram_bytes


@pytest.mark.parametrize("trained", ["conv1d"], indirect=True)
def test_search_records_firmware_figures_and_honours_a_flash_budget(trained):
    import optuna
    from nasopt.core.objectives import get_constraints, get_objectives
    from nasopt.hardware.evaluate import HardwareEvaluator
    from nasopt.search.loop import run_search
    space, supernet, data = trained
    evaluator = Evaluator(space, supernet, data, calib_samples=128)
    evaluate = HardwareEvaluator(evaluator, space, PROFILE)
    rng = random.Random(1)  # a budget that about half of the space's archs meet
    sampled = sorted(evaluate.firmware.figures(space.validate(dict(space.sample(rng))))
                     ["flash_bytes"] for _ in range(9))
    budget = sampled[4]
    constraints = get_constraints({**PROFILE.limits, "size": f"{budget}B"})
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    run_search(study, space, evaluate, get_objectives(["accuracy", "size"]), 8,
               show_progress=False, constraints=constraints)
    flashes = []
    for t in study.trials:
        m = t.user_attrs["metrics"]
        assert m["compressed_bytes"] == m["flash_bytes"] == t.values[1]
        assert m["packed_bytes"] > 0 and 0 <= m["float_accuracy"] <= 1
        assert m["sram_bytes"] > m["arena_bytes"] > 0 and m["stack_bytes"] > 0
        assert t.user_attrs["feasible"] == (m["flash_bytes"] <= budget
                                            and m["sram_bytes"] <= 64 * 1024)
        flashes.append(m["flash_bytes"])
    assert any(f > budget for f in flashes) and any(f <= budget for f in flashes)
    # the accuracy is the integer reference's on the validation inputs
    t = study.trials[0]
    arch = space.validate(dict(t.params))
    model, stored = evaluator.compressed(arch)
    plan = reference.build_plan(model, stored, space, None, evaluator.calibration_samples)
    classes = reference.run(plan, data.x_val.numpy()).argmax(1)
    want = float((classes == data.y_val.numpy()).mean())
    assert t.user_attrs["metrics"]["accuracy"] == want
    assert t.values[1] == footprint.predict(plan, COSTS)["flash_bytes"]


def test_cli_search_under_cortex_m4(tmp_path, capsys):
    code = cli.main(["search", "--space", "conv1d", "--dataset", "mnist1d", "--trials", "2",
                     "--hardware", "cortex-m4", "--max-size", "9KB", "--run-dir", str(tmp_path),
                     "--set", "eval.calib_samples=128", "--set", "supernet.epochs=1",
                     "--set", "supernet.warmup_epochs=1", "--quiet"])
    assert code == 0, capsys.readouterr().err
    import optuna
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    assert len(study.trials) == 2
    for t in study.trials:
        m = t.user_attrs["metrics"]
        assert m["compressed_bytes"] == m["flash_bytes"] and "float_accuracy" in m
        assert t.user_attrs["feasible"] == (m["flash_bytes"] <= 9 * 1024
                                            and m["sram_bytes"] <= 64 * 1024)
