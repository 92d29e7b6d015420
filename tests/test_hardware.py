"""Hardware: profiles, peak activation memory, the latency look-up table, constrained search."""
from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
import torch

from nasopt import api
from nasopt.cli import main as cli
from nasopt.hardware import profile as hardware, lut, memory
from nasopt.core.errors import NasoptError
from nasopt.hardware.evaluate import check_possible, latency_floor
from nasopt.core.objectives import Constraint, parse_quantity

QUICK = ["--set", "supernet.epochs=1", "--set", "supernet.warmup_epochs=1", "--quiet"]


def _space(name: str):
    shape = (1, 40) if name == "conv1d" else (1, 8, 8)
    return api.SPACES[name](shape, 10)


# ---- peak memory -----------------------------------------------------------------------------
def test_peak_memory_of_a_small_conv1d_equals_the_hand_count():
    space = _space("conv1d")
    arch = {**space.smallest(), "s1.depth": 2, "s1.width": 8, "s2.width": 16, "s3.width": 8,
            "head.rank": 1.0}
    steps = {s.op: s.live_bytes for s in memory.trace(memory.deployed_structure(space, arch),
                                                     space.input_shape, "int8")}
    # int8, one byte per value. input 1x40; s1 stride 2 -> 8x20 = 160; s2 -> 16x10 = 160;
    # s3 -> 8x5 = 40; head 40 -> 10
    assert steps["stages_0_blocks_0_conv"] == 40 + 160  # input + output
    # residual block: the skip input (160) stays alive next to the conv output (160); the add
    # writes into the branch buffer, so no third buffer
    assert steps["stages_0_blocks_1_conv"] == 160 + 160
    assert steps["add"] == 160 + 160
    assert steps["stages_1_blocks_0_conv"] == 160 + 160
    assert steps["stages_2_blocks_0_conv"] == 160 + 40
    assert steps["head"] == 40 + 10
    model = memory.deployed_structure(space, arch)
    assert memory.peak_bytes(model, space.input_shape, "int8") == 320
    assert memory.peak_bytes(model, space.input_shape, "fp32") == 4 * 320


def test_peak_memory_counts_the_skip_branch_of_an_inverted_residual():
    space = _space("mobilenet")
    arch = {**space.smallest(), "stem.width": 8, "s1.depth": 2, "s1.expand": 2, "s1.width": 8,
            "s1.rank": 1.0, "s2.rank": 1.0, "s3.rank": 1.0, "head.rank": 1.0}
    steps = {s.op: s.live_bytes for s in memory.trace(memory.deployed_structure(space, arch),
                                                     space.input_shape, "int8")}
    # stem 3x3 stride 1: 1x8x8 (64) -> 8x8x8 (512); block 0 (no skip): expand 8 -> 16 ch at
    # 8x8 (1024), depthwise stride 2 -> 16x4x4 (256), project -> 8x4x4 (128)
    assert steps["stem"] == 64 + 512
    assert steps["stages_0_blocks_0_expand"] == 512 + 1024
    assert steps["stages_0_blocks_0_dw"] == 1024 + 256
    assert steps["stages_0_blocks_0_project"] == 256 + 128
    # block 1 (residual): the skip input (128) lives through the block
    assert steps["stages_0_blocks_1_expand"] == 128 + 256
    assert steps["stages_0_blocks_1_dw"] == 128 + 256 + 256
    assert steps["stages_0_blocks_1_project"] == 128 + 256 + 128
    assert memory.arch_peak_bytes(space, arch, "int8") == 1536


# ---- latency look-up table ---------------------------------------------------------------------
def _cost(key: str) -> float:  # a synthetic cost per unit
    return (zlib.crc32(key.encode()) % 997 + 3) / 1e4


def _coefficient(feature: str) -> float:  # a synthetic device's cost per unit of a feature
    per = 1e-3 if feature.startswith("o_") or feature == "units" else 1e-7
    return (zlib.crc32(feature.encode()) % 97 + 1) * per


@pytest.mark.parametrize("name", ["conv1d", "mobilenet"])
def test_lut_predictor_recovers_a_synthetic_cost_model(name):
    space = _space(name)
    if name == "mobilenet":  # a sub-space keeps the enumeration short
        space = space.restrict({"s1.k": (3,), "s2.k": (3,), "s3.k": (3,), "s1.rank": (1.0,),
                                "s2.rank": (1.0,), "s3.rank": (1.0,)})
    profile = hardware.load_profile("cpu-ort")
    constant = 0.0123
    counted: dict[str, dict[str, float]] = {}

    def features(u):  # the counted features of a unit, from its ONNX graphs
        if u.key not in counted:
            counted[u.key] = lut.unit_features(*lut.unit_graphs(u, "fp32"))
        return counted[u.key]

    def measure(arch):  # a "device" whose latency is a known linear function of the features
        return sum(_coefficient(f) * v for u in lut.units(space, arch)
                   for f, v in features(u).items()) + constant, 0.0

    table = lut.build_table(space, profile, time_unit=lambda u: _cost(u.key),
                            measure_arch=measure, fit_archs=60)
    # (coefficients and constant are not each identifiable: every arch has one head, so the
    # head's op counts and the constant are collinear; the predictions are)
    assert table.fit["outliers"] == 0 and table.fit["residual_rms_ms"] < 1e-9
    # the file's contract: one entry per unit = coefficients . its counted features, and the
    # prediction = the sum of the arch's entries + the constant; isolated timings kept
    assert set(table.entries) == set(table.features) == set(table.isolated)
    assert all(table.isolated[k] == _cost(k) for k in table.isolated)
    for key, feats in table.features.items():  # (the isolated timing is one more input)
        assert table.entries[key] == pytest.approx(
            sum(table.coefficients[f] * v for f, v in feats.items())
            + table.coefficients[lut.ISOLATED] * table.isolated[key], rel=1e-12)
    rng = random.Random(7)
    for _ in range(20):  # every random arch's units are in the table, the prediction is exact
        arch = space.sample(rng)
        entries = sum(table.entries[u.key] for u in lut.units(space, arch))
        assert all(table.features[u.key] == features(u) for u in lut.units(space, arch))
        assert table.predict(space, arch) == pytest.approx(entries + table.constant, rel=1e-12)
        assert table.predict(space, arch) == pytest.approx(measure(arch)[0], rel=1e-6)
    result = lut.validate(table, space, profile, n=15, measure_arch=measure)
    assert result.within == 1.0 and result.tau == pytest.approx(1.0)
    assert result.isolated_within is not None and not result.too_noisy
    # expected latency: exact at a point mass; a differentiable average otherwise
    arch = space.sample(rng)
    point = {g: np.array([1.0 if o == arch[g] else 0.0 for o in opts])
             for g, opts in space.genes.items()}
    assert table.expected_latency(point) == pytest.approx(table.predict(space, arch))
    uniform = {g: torch.full((len(o),), 1 / len(o), requires_grad=True)
               for g, o in space.genes.items()}
    expected = table.expected_latency(uniform)
    expected.backward()
    samples = [table.predict(space, space.sample(rng)) for _ in range(400)]
    assert float(expected.detach()) == pytest.approx(np.mean(samples), rel=0.05)
    assert uniform[f"s1.{'k' if name == 'conv1d' else 'expand'}"].grad is not None
    assert latency_floor(table) <= min(samples)
    # a round trip through the JSON file
    table.save(path := lut.Path("/tmp") / f"nasopt-test-lut-{name}.json")
    again = lut.LatencyTable.load(path)
    path.unlink()
    assert again.predict(space, arch) == pytest.approx(table.predict(space, arch))
    assert again.coefficients == table.coefficients and again.isolated == table.isolated


def test_unit_features_count_macs_padding_and_the_ops_onnx_runtime_runs():
    space = _space("mobilenet")
    arch = {**space.smallest(), "stem.width": 8, "s1.depth": 1, "s1.expand": 2, "s1.k": 7,
            "s1.width": 12, "s1.rank": 1.0}
    block = next(u for u in lut.units(space, arch) if u.name == "stages.0.blocks.0")
    f = lut.unit_features(*lut.unit_graphs(block, "fp32"))
    # input 8x8x8: expand 1x1 8 -> 16 (8x8), depthwise 7x7 stride 2 (16 x 4x4), project 16 -> 12
    assert f["macs_pw"] == 16 * 64 * 8 + 12 * 16 * 16
    assert f["macs_dw7x7"] == 16 * 16 * 49
    # the 7x7 taps inside the 8x8 map: per axis, output i reads rows 2i-3..2i+3 (pad 3), of
    # which 4, 6, 7, 5 are inside rows 0..7
    assert f["eff_dw7x7"] == 16 * (4 + 6 + 7 + 5) ** 2
    assert f["out_dw7x7"] == 16 * 16 and f["in_pw"] == 8 * 64 + 16 * 16
    assert f["units"] == 1 and sum(v for k, v in f.items() if "Conv" in k) == 3


def test_lut_without_fit_archs_uses_the_isolated_timings():
    space = _space("conv1d").restrict({"s1.k": (3,), "s2.k": (3,)})
    table = lut.build_table(space, hardware.load_profile("cpu-ort"),
                            time_unit=lambda u: _cost(u.key),
                            measure_arch=lambda a: (1.0, 0.0), fit_archs=0)
    assert table.entries == table.isolated and table.constant == 0.0 and not table.features
    arch = space.smallest()
    assert table.predict(space, arch) == pytest.approx(
        sum(_cost(u.key) for u in lut.units(space, arch)))


def test_lut_lookup_outside_its_space_is_a_clear_error():
    space = _space("conv1d")
    small = space.restrict({"s1.k": (3,)})
    table = lut.build_table(small, hardware.load_profile("cpu-ort"),
                            time_unit=lambda u: _cost(u.key),
                            measure_arch=lambda a: (1.0, 0.0), fit_archs=0)
    with pytest.raises(NasoptError, match="no entry for unit"):
        table.predict(space, {**space.smallest(), "s1.k": 7})


# ---- measured latency ----------------------------------------------------------------------------
def test_latency_is_the_lowest_median_of_fast_mode_windows():
    from nasopt.hardware.latency import _Target

    class Probe:  # the probe's best median is 1.0: a window is fast when both probes are <= 1.1
        best = 1.0

        def is_fast(self, median):
            return median <= 1.1 * self.best

    target = _Target.__new__(_Target)
    # (probe before, probe after, q1, median, q3): two slow-mode windows, three fast ones
    target.records = [(1.6, 1.7, 2.9, 3.0, 3.1), (1.0, 1.02, 1.95, 2.0, 2.05),
                      (1.01, 1.5, 1.7, 1.8, 1.9), (1.02, 1.0, 1.95, 2.02, 2.1),
                      (1.0, 1.01, 1.96, 2.01, 2.05), (1.3, 1.4, 2.7, 2.8, 2.9)]
    t = target.timing(Probe(), repeats=40, threads=1, need=3)
    # the window after which the probe was slow (1.5) does not count, though its median is lower
    assert (t.median_ms, t.q1_ms, t.q3_ms) == (2.0, 1.95, 2.05)
    assert t.confirmed and t.fast_windows == 3 and t.windows == 6 and not t.noisy(0.1)
    target.records = [r for r in target.records if r[0] > 1.1]  # no fast window at all
    t = target.timing(Probe(), repeats=40, threads=1, need=3)
    assert t.median_ms == 2.8 and not t.confirmed and t.noisy(0.1)


def test_measuring_an_onnx_graph_in_windows():
    from nasopt.hardware import latency
    profile = hardware.profile_from_dict({"name": "quick", "runtime": {
        "repeats": 10, "windows": 2, "max_wait_s": 2, "window_pause_ms": 1}})
    timings = latency.measure_graphs([lut._identity_graph((4, 8))] * 2, [(4, 8)] * 2, profile)
    for t in timings:
        assert t.median_ms > 0 and t.fast_windows <= t.windows
        assert t.confirmed == (t.fast_windows >= 2)
    assert latency.probe(1).best > 0


def test_the_cli_default_fit_archs_is_the_library_default():
    from nasopt.cli import hw as cli_hw
    assert cli_hw.FIT_ARCHS == lut.FIT_ARCHS


# ---- profiles and budgets ------------------------------------------------------------------------
def test_shipped_profiles_load():
    for name in hardware.shipped():
        profile = hardware.load_profile(name)
        assert profile.name == name and profile.dtype in memory.DTYPE_BYTES
    assert hardware.load_profile("mcu").limits == {"size": 65536, "sram": 16384}


@pytest.mark.parametrize("text, message", [
    ('name = "x"\n[runtime]\nthread = 2\n', "unknown key 'runtime.thread' (did you mean "
     "'runtime.threads'?)"),
    ('name = "x"\n[limit]\nsram = "1KB"\n', "unknown section 'limit' (did you mean 'limits'?)"),
    ('name = "x"\n[runtime]\ndtype = "int4"\n', "runtime.dtype = 'int4' is not one of"),
    ('name = "x"\n[limits]\nsram = "-4KB"\n', "must be positive"),
    ('name = "x"\n[limits]\nlatency = "fast"\n', "cannot read the latency budget"),
    ('name = "x"\n[runtime]\nengine = "none"\n', "needs runtime.engine"),
    ('[runtime]\nthreads = 1\n', "name is missing"),
    ('name = "x"\n[runtime]\nthreads = "two"\n', "must be a int"),
    ('name = "x"\n[runtime\n', "cannot read hardware profile"),
    ('name = "x"\n[runtime]\nwindows = 0\n', "runtime.windows must be at least 1"),
    ('name = "x"\n[runtime]\nmax_wait_s = 0\n', "runtime.max_wait_s > 0"),
    ('name = "x"\n[runtime]\nwindow_pause_ms = -1\n', "window_pause_ms must be >= 0"),
    # the name is part of the latency table's file name: no way out of RUN_DIR/hardware/
    ('name = "x/../../../../tmp/ESCAPED"\n', "is not a plain name"),
    ('name = "' + 'n' * 300 + '"\n', "is too long"),
])
def test_profile_errors_are_clear(tmp_path, text, message):
    path = tmp_path / "my.toml"
    path.write_text(text)
    with pytest.raises(NasoptError, match="hardware profile") as info:
        hardware.load_profile(path)
    assert message in str(info.value)


def test_unknown_profile_name_suggests_a_shipped_one():
    with pytest.raises(NasoptError, match="did you mean 'cpu-ort'"):
        hardware.load_profile("cpu-ortt")


def test_latency_budget_parsing():
    assert parse_quantity("0.3ms", "latency") == pytest.approx(0.3)
    assert parse_quantity("250us", "latency") == pytest.approx(0.25)
    with pytest.raises(NasoptError, match="0.3ms"):
        parse_quantity("0.3 parsecs", "latency")


def test_impossible_budgets_are_one_clear_error(capsys, tmp_path):
    space = _space("mobilenet")
    mcu = hardware.load_profile("mcu")
    need = memory.arch_peak_bytes(space, space.smallest(), "int8")
    check_possible(space, mcu, [Constraint("sram", need)], None)  # just possible: fine
    with pytest.raises(NasoptError, match=f"impossible budget.*needs {need} B"):
        check_possible(space, mcu, [Constraint("sram", need - 1)], None)
    # through the command line, before any supernet training: one message, exit code 2
    code = cli.main(["search", "--space", "mobilenet", "--dataset", "digits", "--hardware",
                     "mcu", "--max-sram", "100B", "--run-dir", str(tmp_path), *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("nasopt: error: impossible budget")
    code = cli.main(["search", "--space", "mobilenet", "--dataset", "digits", "--hardware",
                     "mcu", "--max-latency", "1ms", "--run-dir", str(tmp_path), *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and "metrics.latency = \"none\"" in err


# ---- constrained search ----------------------------------------------------------------------------
@pytest.mark.parametrize("trained", ["conv1d"], indirect=True)  # mobilenet: the CLI test below
def test_constrained_search_reports_only_feasible_winners(trained):
    """The search loop with the hardware evaluator and an sram budget (mcu profile): every trial
    records sram_bytes, some archs miss the budget, and the Pareto set holds feasible ones only."""
    import optuna
    from nasopt.search.evaluate import Evaluator
    from nasopt.hardware.evaluate import HardwareEvaluator
    from nasopt.core.objectives import get_constraints, get_objectives
    from nasopt.search.loop import run_search
    space, supernet, data = trained
    mcu = hardware.load_profile("mcu")
    low = memory.arch_peak_bytes(space, space.smallest(), "int8")
    high = memory.arch_peak_bytes(space, space.largest(), "int8")
    budget = (low + high) // 2  # between the smallest and the largest arch's needs
    constraints = get_constraints({**mcu.limits, "sram": f"{budget}B"})
    check_possible(space, mcu, constraints, None)
    evaluate = HardwareEvaluator(Evaluator(space, supernet, data, calib_samples=128), space, mcu)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.NSGAIISampler(seed=0))
    run_search(study, space, evaluate, get_objectives(["accuracy", "size"]), 10,
               show_progress=False, constraints=constraints)
    srams = [t.user_attrs["metrics"]["sram_bytes"] for t in study.trials]
    assert all(isinstance(v, int) and v > 0 for v in srams)
    assert any(v > budget for v in srams) and any(v <= budget for v in srams)
    from nasopt.search.study import pareto_numbers
    winners = pareto_numbers(study)
    assert winners
    for t in study.trials:
        feasible = (t.user_attrs["metrics"]["sram_bytes"] <= budget
                    and t.user_attrs["metrics"]["compressed_bytes"] <= 65536)
        assert feasible == t.user_attrs["feasible"]
        if t.number in winners:
            assert feasible


def test_search_without_a_feasible_arch_says_so_and_shows_the_closest(tmp_path, capsys):
    space = _space("mobilenet")
    # a small supernet (kernels and expansions fixed) keeps this end-to-end run short
    restrict = [f"s{s}.{g}={v}" for s in (1, 2, 3) for g, v in (("k", 3), ("expand", 2))]
    sub = space.restrict({r.split("=")[0]: (int(r.split("=")[1]),) for r in restrict})
    budget = memory.arch_peak_bytes(sub, sub.smallest(), "int8") + 1  # possible, not likely
    code = cli.main(["search", "--space", "mobilenet", "--dataset", "digits", "--trials", "3",
                     "--hardware", "mcu", "--max-sram", f"{budget}B", "--run-dir",
                     str(tmp_path), "--set", "eval.calib_samples=128",
                     *[a for r in restrict for a in ("--restrict", r)], *QUICK])
    out = capsys.readouterr().out
    assert code == 0
    assert "no completed trial meets the budgets" in out and "the closest is trial" in out


def test_reinforce_gives_an_infeasible_trial_the_lowest_reward():
    import optuna
    from optuna.study import StudyDirection
    from nasopt.strategies.reinforce import rewards_of
    trials = [optuna.trial.create_trial(values=[v], constraints={"latency": c})
              for v, c in ((0.9, 0.0), (0.95, 0.2), (0.6, -1.0))]
    assert rewards_of(trials, [StudyDirection.MAXIMIZE]) == [0.9, 0.6, 0.6]
    free = [optuna.trial.create_trial(values=[v]) for v in (0.9, 0.95)]
    assert rewards_of(free, [StudyDirection.MAXIMIZE]) == [0.9, 0.95]
