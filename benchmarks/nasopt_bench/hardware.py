"""``nasopt bench hardware``: latency predictor accuracy and hardware-constrained searches.

1. **Predictor accuracy** on this CPU (profile ``cpu-ort``: ONNX Runtime, float32, batch 1, one
   thread; ``cpu-ort-int8`` for conv1d too): the latency look-up table of the conv1d space
   (MNIST-1D input) and the mobilenet space (digits input) is built (features and isolated time
   per unit, coefficients fitted on measured random archs), then ``--validate-n`` other random
   archs are measured end to end and compared with the prediction (share within ±10 %, Kendall
   tau), with the machine's noise (each arch measured twice, in two passes).
2. **Latency-constrained search** on MNIST-1D (conv1d, inherited supernet weights, validation
   accuracy) under three latency budgets (the 15/35/60 % quantiles of the predicted latency of
   random archs): NSGA-II on (accuracy, latency) with the budget as an Optuna constraint; the
   winner (best validation accuracy among feasible trials) is exported to ONNX and its latency
   re-measured.
3. **The same under the ``mcu`` profile**: flash (packed bytes) and SRAM (peak int8 activation
   memory) budgets; the winner's packed file is written and its bytes and peak memory re-counted.
"""
from __future__ import annotations

import argparse
import os
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import optuna

from nasopt import api
from nasopt.hardware import profile as hardware, latency, lut, memory
from nasopt.compression import packed
from nasopt.search.evaluate import Evaluator
from nasopt.hardware.evaluate import HardwareEvaluator, check_possible, latency_table
from nasopt.core.objectives import get_constraints, get_objectives
from nasopt.search.loop import run_search
from nasopt.search.study import is_feasible
from nasopt_bench.report import LoadSampler, machine, table
from nasopt_bench.setup import conv1d_supernet

LATENCY_QUANTILES = (0.15, 0.35, 0.60)
MCU_BUDGETS = (("2KB", 0.35), ("4KB", 0.6), ("8KB", 0.85))  # flash, SRAM quantile
TARGET_WITHIN = 0.90


def _load() -> tuple[float, float, float]:
    return os.getloadavg()


def run(args: argparse.Namespace) -> Path:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    start = time.perf_counter()
    timings: dict[str, float] = {}
    loads = {"start": _load()}
    sampler = LoadSampler().start()
    cpu = hardware.load_profile("cpu-ort")
    mcu = hardware.load_profile("mcu")

    # ---- 1. predictor accuracy -------------------------------------------------------------
    predictor_rows, validations = [], {}
    cases = [("conv1d", "mnist1d", cpu), ("mobilenet", "digits", cpu)]
    if not args.skip_int8:
        cases.append(("conv1d", "mnist1d", hardware.load_profile("cpu-ort-int8")))
    datasets = {}
    for space_name, dataset, profile in cases:
        t0 = time.perf_counter()
        data = datasets.setdefault(dataset, api.load_dataset(dataset))
        space = api.make_space(space_name, data)
        path = lut.table_path(args.run_dir, space, profile)
        table_ = lut.build_table(space, profile, seed=args.seed, log=log)  # fresh: timed here
        table_.save(path)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        v = lut.validate(table_, space, profile, args.validate_n, seed=args.seed + 1, log=log)
        validations[(space_name, profile.name)] = v
        timings[f"LUT {space_name} {profile.name}: build"] = built
        timings[f"LUT {space_name} {profile.name}: validate {v.n} archs"] = time.perf_counter() - t0
        log(f"{space_name} {profile.name}: {v.summary()}")
        meas = [r[2] for r in v.rows]
        fit = table_.fit
        predictor_rows.append([
            f"{space_name} ({dataset} input)", profile.name, len(table_.entries),
            f"{fit.get('features', 0)} inputs, constant {table_.constant * 1000:.1f} us, "
            f"{fit.get('used')}/{fit.get('archs')} archs", v.n,
            f"**{v.within:.1%}**", f"{v.tau:.3f}", f"{v.median_abs_error:.1%}",
            "" if v.isolated_within is None else f"{v.isolated_within:.1%} / "
            f"{v.isolated_tau:.3f} / {v.isolated_median_error:.1%}",
            f"{min(meas) * 1000:.1f}-{max(meas) * 1000:.1f} us",
            f"{v.repeat_spread:.1%} / {v.repeat_spread_p90:.1%} / {v.drift:.1%} / "
            f"{v.unconfirmed:.0%} / {v.fast_share:.0%}",
            "**too noisy**" if v.too_noisy else "ok"])
    loads["after predictor"] = _load()

    # ---- 2./3. constrained searches on MNIST-1D ---------------------------------------------
    t0 = time.perf_counter()
    cfg, data, space, supernet, _ = conv1d_supernet(args.run_dir, args.set, log)
    timings["supernet (trained or reused)"] = time.perf_counter() - t0
    base = Evaluator(space, supernet, data, cfg.eval.calib_samples)
    table_ = latency_table(space, cpu, args.run_dir, log)
    rng = random.Random(args.seed + 2)
    sample = [space.sample(rng) for _ in range(300)]
    predicted = np.array([table_.predict(space, a) for a in sample])
    latency_rows = []
    cpu_eval = HardwareEvaluator(base, space, cpu, table_)
    for q in LATENCY_QUANTILES:
        budget = float(np.quantile(predicted, q))
        t0 = time.perf_counter()
        constraints = get_constraints({"latency": budget})
        check_possible(space, cpu, constraints, table_)
        study = _search(space, cpu_eval, ["accuracy", "latency"], constraints, args)
        winner = _winner(study)
        row = [f"{budget * 1000:.1f} us (q{q * 100:.0f})", _feasible(study)]
        if winner is None:
            row += ["none feasible", "", "", ""]
        else:
            model, _ = base.compressed(space.validate(winner.params))
            graph = latency.onnx_for(model, space.input_shape, cpu.dtype,
                                     base.calibration_samples[:256])
            remeasured = min(t.median_ms for t in latency.measure_graphs(
                [graph, graph], [space.input_shape] * 2, cpu))
            m = winner.user_attrs["metrics"]
            row += [f"{m['accuracy']:.4f}", f"{m['latency_ms'] * 1000:.1f} us",
                    f"{remeasured * 1000:.1f} us",
                    "yes" if remeasured <= budget else f"no (+{remeasured / budget - 1:.0%})"]
        latency_rows.append(row)
        timings[f"search, latency budget q{q * 100:.0f}"] = time.perf_counter() - t0
        log(f"latency budget {budget * 1000:.1f} us: {row}")
    best_free = max(t.user_attrs["metrics"]["accuracy"] for t in study.trials
                    if "metrics" in t.user_attrs)
    loads["after latency searches"] = _load()

    srams = np.array([memory.arch_peak_bytes(space, a, "int8") for a in sample[:100]])
    mcu_eval = HardwareEvaluator(base, space, mcu)
    mcu_rows = []
    for flash, q in MCU_BUDGETS:
        sram = int(np.quantile(srams, q))
        t0 = time.perf_counter()
        constraints = get_constraints({"size": flash, "sram": f"{sram}B"})
        check_possible(space, mcu, constraints, None)
        study = _search(space, mcu_eval, ["accuracy", "size"], constraints, args)
        winner = _winner(study)
        row = [f"{flash} flash, {sram} B SRAM", _feasible(study)]
        if winner is None:
            row += ["none feasible", "", "", ""]
        else:
            arch = space.validate(winner.params)
            model, stored = base.compressed(arch)
            written = len(packed.pack(space, arch, stored))
            peak = memory.peak_bytes(model, space.input_shape, "int8")
            m = winner.user_attrs["metrics"]
            row += [f"{m['accuracy']:.4f}", f"{written} B", f"{peak} B",
                    "yes" if written <= constraints[0].limit and peak <= sram else "no"]
        mcu_rows.append(row)
        timings[f"search, mcu {flash}"] = time.perf_counter() - t0
        log(f"mcu budget {flash} / {sram} B: {row}")
    loads["end"] = _load()
    sampler.stop()
    total = time.perf_counter() - start

    command = "nasopt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    fp32 = [v for (s, p), v in validations.items() if p == "cpu-ort"]
    met = all(v.within >= TARGET_WITHIN for v in fp32)
    noisy = any(v.too_noisy for v in validations.values())
    load_text = "; ".join(f"{k} {a:.1f}/{b:.1f}/{c:.1f}" for k, (a, b, c) in loads.items())
    load_note = sampler.note() + (" The measurements waited for the CPU's fast mode (see "
                                  "below); the noise columns say how well that worked."
                                  if sampler.shared else "")
    text = f"""# Hardware benchmark: latency predictor and hardware-constrained search

Command: `{command}` ({total / 60:.1f} min)
Machine: {machine()}
Load average (1/5/15 min) during the run: {load_text}; {load_note}

## 1. Latency predictor accuracy on this CPU

Profile `cpu-ort`: ONNX Runtime {_ort_version()}, float32, batch 1, 1 intra-op thread.

**Measuring.** This machine's CPU switches between a fast and a slow speed mode (1.3-2x slower)
in bursts of 0.2-3.4 s, idle or not, so a single median of timed runs is off by 1.3-2x at
random. Every latency here (LUT units, fit and validation archs, re-measured winners) is
therefore the **lowest median among windows taken in the fast mode**: windows of {cpu.repeats}
timed runs ({cpu.warmup} warm-up runs first, a few more before each window), each between two
windows of a fixed probe graph; a window counts when both probes are within 10 % of the
probe's best (fast mode); a graph is measured until {cpu.windows} such windows are in (else,
after {cpu.max_wait_s:g} s, its timing is *unconfirmed*). Many graphs are measured round
robin, so they share the waits for the fast mode. Interference only slows runs, so the lowest
fast-window median is the least disturbed figure.

**Predicting.** The look-up table holds one entry per distinct unit (block, stem, head) of the
space. Each unit is exported once as a small ONNX graph (as the profile runs it), timed alone
(minus an Identity graph) and described by counted features: per kind of layer (1x1, dense kxk,
depthwise kxk per kernel size, linear) its MACs, for convs its MACs over the taps not on padding
and its input elements, output elements, and the ops ONNX Runtime runs once it has optimized the
unit's graph (fused convs, NCHWc convs and the reorders it inserts where channel counts are not
multiples of 8, adds, Gemm). A unit's entry = fitted coefficients . (its features, its isolated
timing); prediction = sum of the arch's entries + a fitted constant, coefficients and constant
fitted by least squares on the relative error over {lut.FIT_ARCHS} random archs (seed
{args.seed}; each measured twice in two passes, the lower kept; one refit without outliers).
For comparison, the former predictor on the same timings: scale x sum of the isolated timings +
constant, fitted on the same archs.

**Validating.** {args.validate_n} *other* random archs with distinct structures (seed
{args.seed + 1}), measured twice in two passes minutes apart (measured = the lower). Noise
columns: repeat spread (median / 90th percentile of the two measurements' relative difference) /
drift (the median relative change of 10 fit archs' latency between the table's fit and the
start or the end of the validation, the larger) / unconfirmed timings / share of all windows
taken in the fast mode. Flagged **too noisy** when the median repeat spread or the drift exceed
half the profile's noise threshold ({cpu.noise_threshold:.0%}), the 90th percentile exceeds it,
or more than 5 % of the timings are unconfirmed.

{table(["space", "profile", "LUT units", "fitted", "archs", "within ±10 %", "Kendall tau",
        "median error", "former predictor: within / tau / median error", "measured range",
        "noise (repeat median / p90 / drift / unconfirmed / fast mode)", "verdict"],
       predictor_rows)}

Target: >= {TARGET_WITHIN:.0%} within ±10 % for conv1d and mobilenet on `cpu-ort`:
{"**met**" if met else "**missed**"}{" (measurements flagged too noisy: see above)" if noisy else ""}.
These networks are tiny (10-100 microseconds per inference), so ±10 % is 1-10 microseconds.
The former predictor's 15-50 % within ±10 % in earlier runs of this benchmark came from the
measurements (one median of 60 runs, 1.3-2x off at random when it fell in the slow mode, the
isolated unit timings included), not from its model: on fast-mode timings it is close too (column
"former predictor"); the feature model's gain is in median error and Kendall tau. What remains
is drift: the table is fitted minutes before the validation, and under load the fast-mode
latency of the larger (mobilenet) graphs moves by 1-4 % in the meantime (column "drift").

## 2. Latency-constrained search on MNIST-1D (conv1d, `cpu-ort`)

NSGA-II, {args.trials} evaluations per budget (seed {args.seed}), objectives (validation accuracy,
predicted latency), latency budget as an Optuna constraint (predicted from the table: fast). Budgets
are quantiles of the predicted latency of 300 random archs. Winner = best validation accuracy
among feasible trials (the only ones reported); its deployed (compressed) model is exported to
ONNX and its latency re-measured (the lower of two measurements, as above). Best
validation accuracy of any trial of the last search, feasible or not: {best_free:.4f}.

{table(["latency budget", "feasible trials", "best val acc", "predicted", "re-measured",
        "within budget"], latency_rows)}

## 3. The same under the `mcu` profile (flash + SRAM budgets, int8)

Budgets: flash = packed file bytes (`nasopt.compression.packed`), SRAM = peak int8 activation memory
(`nasopt.hardware.memory`: live tensors at each layer, residual skips included), at the SRAM quantiles of
100 random archs. NSGA-II on (validation accuracy, packed bytes), {args.trials} evaluations each.
The winner's packed file is written again and its bytes and peak memory re-counted from the
compressed model.

{table(["budgets", "feasible trials", "best val acc", "packed bytes (written)",
        "peak SRAM (re-counted)", "within budgets"], mcu_rows)}

## Wall time

{table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()])}

Nondeterminism: archs, fits and searches are seeded; latency measurements are not repeatable
exactly (they depend on the machine and its load), so the LUT entries, fitted constants,
budgets (quantiles of predicted latency) and the searches under them can differ between runs.
"""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def _ort_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


def _search(space, evaluate, objectives, constraints, args) -> optuna.Study:  # noqa: ANN001
    study = optuna.create_study(directions=[o.direction for o in get_objectives(objectives)],
                                sampler=api.STRATEGIES["nsga2"].make_sampler(space, args.seed))
    run_search(study, space, evaluate, get_objectives(objectives), args.trials,
               show_progress=False, constraints=constraints)
    return study


def _winner(study: optuna.Study):  # noqa: ANN202
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
            and is_feasible(t)]
    return max(done, key=lambda t: t.values[0]) if done else None


def _feasible(study: optuna.Study) -> str:
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return f"{sum(is_feasible(t) for t in done)} of {len(done)}"
