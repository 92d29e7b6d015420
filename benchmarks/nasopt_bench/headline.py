"""``nasopt bench headline``: the whole pipeline, through the public CLI, on MNIST-1D and
Fashion-MNIST, against the published baselines; writes results/headline.md.

Per dataset and seed, ``nasopt run configs/headline_<dataset>.toml`` runs in a fresh run folder
(supernet trained, searched, picked, distilled, fine-tuned with QAT, exported and verified) with
every seed of the recipe set to the run's seed (supernet, search, distillation, fine-tuning; the
data split stays fixed, so the test set is the same). From each model card: the test accuracy of
the exported artifacts (the packed file loaded by ``nasopt.load``, ONNX fp32 and int8 run in ONNX
Runtime), packed size, MACs and the wall time of each stage; the latency of ``model.onnx`` and
``model.int8.onnx`` is measured afterwards in ONNX Runtime under the ``cpu-ort`` /
``cpu-ort-int8`` profiles (:mod:`nasopt.hardware.latency`). Figures are medians over the seeds with min
and max.

On MNIST-1D it also compares, in the same run, our best strategy against NNI's best multi-trial
strategy through the bridge (``--ours``, ``--nni``): equal evaluations, the same space, budget,
supernet and evaluator, several seeds; hypervolume of the feasible front and best validation
accuracy under the budget.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import optuna

from nasopt import api
from nasopt.core.errors import NasoptError
from nasopt.pipeline import int8_not_written
from nasopt_bench.report import LoadSampler, machine, table

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Target:
    dataset: str
    config: str  # relative to the repository
    max_bytes: int  # packed-size budget
    min_accuracy: float  # test accuracy target
    max_minutes: float  # wall time of one pipeline run
    baselines: tuple[tuple[str, str, str], ...]  # (model, test accuracy, size) as published
    source: str  # where the baselines were published


TARGETS = {
    "mnist1d": Target(
        "mnist1d", "configs/headline_mnist1d.toml", 3072, 0.960, 20,
        (("CNN (3 conv of 25 channels + linear; Greydanus & Kobak)", "94 %",
          "5,210 float32 params, ~20 KB"),
         ("GRU", "91 %", "-"), ("MLP", "68 %", "-"), ("logistic regression", "32 %", "-")),
        "Greydanus & Kobak, the README of the public repository greydanus/mnist1d"),
    "fashion-mnist": Target(
        "fashion-mnist", "configs/headline_fashion-mnist.toml", 16384, 0.925, 60,
        (("2 Conv with < 100K parameters (Fashion-MNIST README)", "92.5 %",
          "< 100K params, < 400 KB as float32"),
         ("2 Conv + pooling", "87.6-91.6 %", "-"), ("MLP 256-128-100", "88.3 %", "-"),
         ("ResNet18", "94.9 %", "11M params")),
        "the benchmark table in the README of zalandoresearch/fashion-mnist"),
}
ARTIFACTS = (("packed file (nasopt.load)", "model.packed via nasopt.load"),
             ("ONNX fp32 (ORT)", "model.onnx via ONNX Runtime"),
             ("ONNX int8 (ORT)", "model.int8.onnx via ONNX Runtime"))
#: wall-time columns of the model cards ("pick" only where the config re-ranks: pick.rerank)
STAGES = ("supernet", "search", "pick", "distill", "fine-tune", "export", "total")
#: the steps whose seed is the run's
SEEDED = ("supernet", "search", "distill", "finetune")


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("--datasets", default="mnist1d,fashion-mnist",
                   help=f"comma-separated among {', '.join(TARGETS)}")
    q.add_argument("--seeds", type=int, default=3)
    q.add_argument("--jobs", type=int, default=1, help="pipelines run at once, each pinned to "
                   "its own CPU core (the configs use one torch thread); latencies are measured "
                   "afterwards, one at a time")
    q.add_argument("--run-root", default="runs/headline", help="run folders (one per dataset "
                   "and seed; they must not exist yet: a reused supernet or study would make the "
                   "wall times cover less than the whole pipeline)")
    q.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of every pipeline config")
    q.add_argument("--ours", default="staged,tpe", help="our strategies in the NNI "
                   "comparison (comma-separated; default: our best two on MNIST-1D in "
                   "results/strategies_mnist1d.md)")
    q.add_argument("--nni", default="nni-evolution", help="NNI's strategies in the comparison "
                   "(default: NNI's best on MNIST-1D in results/strategies_mnist1d.md)")
    q.add_argument("--evaluations", type=int, default=300,
                   help="evaluations per search in the NNI comparison (0: skip it)")
    q.add_argument("--out", default="results/headline.md")


def _median(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} [{format(min(values), fmt)}, {format(max(values), fmt)}]"


def _pipeline(target: Target, seed: int, args: argparse.Namespace, log,  # noqa: ANN001
              cores: set[int] | None = None) -> dict:
    """One `nasopt run` (a subprocess, as a user runs it, on ``cores`` when given): its model
    card, or the end of its stderr under ``error`` when it failed; :func:`_latency` adds the
    ORT latencies."""
    folder = Path(args.run_root) / target.dataset / f"seed{seed}"
    out = folder / "model"
    command = [sys.executable, "-m", "nasopt.cli", "run", str(ROOT / target.config), "--quiet",
               "--set", f"run_dir={json.dumps(str(folder / 'run'))}",
               "--set", f"export.out={json.dumps(str(out))}",
               *[x for key in SEEDED for x in ("--set", f"{key}.seed={seed}")],
               *[x for item in args.set for x in ("--set", item)]]
    # taskset, not preexec_fn: this runs in a thread, where preexec_fn is unsafe
    pin = [] if cores is None else ["taskset", "-c", ",".join(map(str, sorted(cores)))]
    start = time.perf_counter()
    done = subprocess.run([*pin, *command], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:  # reported with the finished runs, which are kept
        return {"seed": seed, "error": done.stderr[-3000:].strip() or f"exit {done.returncode}"}
    card = json.loads((out / "metrics.json").read_text())
    log(f"{target.dataset} seed {seed}: {wall:.0f} s, packed {card['packed_bytes']} B, test "
        f"{card['test_accuracy'].get('model.packed via nasopt.load', float('nan')):.4f}")
    return {"seed": seed, "card": card, "out": out,
            "command": "nasopt run " + " ".join(shlex.quote(a) for a in command[4:])}


def _latency(run: dict) -> dict:
    """The run's exported ONNX files timed in ONNX Runtime (``cpu-ort``, ``cpu-ort-int8``)."""
    from nasopt.hardware import profile as hardware
    from nasopt.hardware.latency import measure_export
    latency = {}
    for profile in ("cpu-ort", "cpu-ort-int8"):
        if profile == "cpu-ort-int8" and not (run["out"] / "model.int8.onnx").exists():
            continue  # failed its check (the card says why): no int8 latency to report
        timing, what = measure_export(run["out"], hardware.load_profile(profile), api.SPACES)
        latency[profile] = (timing.median_ms, what)
    return {**run, "latency": latency}


def _pipelines(targets: list[Target], args: argparse.Namespace, log) -> dict[str, list[dict]]:  # noqa: ANN001
    """Every (dataset, seed) pipeline, ``args.jobs`` at a time, the longest datasets first, each
    job pinned to its own core; then the latencies, one run at a time on a quiet machine."""
    jobs = [(t, seed) for t in targets for seed in range(args.seeds)]
    if args.jobs == 1:
        runs = [_pipeline(t, seed, args, log) for t, seed in jobs]
    else:
        if shutil.which("taskset") is None:
            raise NasoptError("--jobs > 1 pins each pipeline with taskset, which is missing; "
                              "install util-linux or use --jobs 1")
        cores = sorted(os.sched_getaffinity(0))
        if args.jobs > len(cores):
            raise NasoptError(f"--jobs {args.jobs} needs as many CPU cores; this process may "
                              f"use {len(cores)}")
        free: queue.Queue = queue.Queue()
        for core in cores[:args.jobs]:
            free.put(core)

        def one(job: tuple[Target, int]) -> dict:
            core = free.get()
            try:
                return _pipeline(job[0], job[1], args, log, {core})
            finally:
                free.put(core)
        with ThreadPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(one, jobs))
    runs = [r if "error" in r else _latency(r) for r in runs]
    return {t.dataset: [r for (tt, _), r in zip(jobs, runs) if tt is t] for t in targets}


def _dataset_section(target: Target, runs: list[dict], jobs: int) -> tuple[str, list[str]]:
    rows = []
    for r in runs:
        c = r["card"]
        rows.append([r["seed"], c["trial"], c["packed_bytes"], f"{c['macs']:,}",
                     *[f"{100 * c['test_accuracy'][key]:.2f}" if key in c["test_accuracy"]
                       else "-" for _, key in ARTIFACTS],
                     *[f"{r['latency'][p][0] * 1000:.1f}" if p in r["latency"] else "-"
                       for p in ("cpu-ort", "cpu-ort-int8")],
                     *[f"{c['timings_s'][s]:.0f}" if s in c["timings_s"] else "-"
                       for s in STAGES]])

    def column(get) -> list[float]:  # noqa: ANN001
        out = []
        for r in runs:
            try:
                out.append(float(get(r)))
            except KeyError:
                pass
        return out

    acc = {label: column(lambda r, k=key: 100 * r["card"]["test_accuracy"][k])
           for label, key in ARTIFACTS}
    size = column(lambda r: r["card"]["packed_bytes"])
    total = column(lambda r: r["card"]["timings_s"]["total"])
    rows.append(["**median [min, max]**", "", _median(size, ".0f"),
                 _median(column(lambda r: r["card"]["macs"]), ",.0f"),
                 *[_median(acc[label], ".2f") for label, _ in ARTIFACTS],
                 _median(column(lambda r: 1000 * r["latency"]["cpu-ort"][0]), ".1f"),
                 _median(column(lambda r: 1000 * r["latency"]["cpu-ort-int8"][0]), ".1f"),
                 *[_median(column(lambda r, s=s: r["card"]["timings_s"][s]), ".0f")
                   for s in STAGES]])
    packed = acc["packed file (nasopt.load)"]
    med_acc, med_size = statistics.median(packed) / 100, statistics.median(size)
    med_min = statistics.median(total) / 60
    ok_acc, ok_size = med_acc >= target.min_accuracy, med_size <= target.max_bytes
    ok_time = med_min <= target.max_minutes
    verdicts = [
        f"| test accuracy of the packed model >= {100 * target.min_accuracy:.1f} % | "
        f"{100 * med_acc:.2f} % | {'met' if ok_acc else f'**missed** by {100 * (target.min_accuracy - med_acc):.2f} points'} |",
        f"| packed weights <= {target.max_bytes // 1024} KB | {med_size:.0f} B | "
        f"{'met' if ok_size else '**missed**'} |",
        f"| whole pipeline <= {target.max_minutes:.0f} min on 2 cores | {med_min:.1f} min"
        f"{' (on 1 core each)' if jobs > 1 else ''} | "
        f"{'met' if ok_time else f'**missed** by {med_min - target.max_minutes:.1f} min'} |"]
    c0 = runs[0]["card"]
    # the pipelines' own torch threads (the config's `threads`), not the bench process's
    threads = " / ".join(f"{n} torch thread(s)"
                         for n in sorted({r["card"]["torch_threads"] for r in runs}))
    text = f"""## {target.dataset}

Config: `{target.config}`; {len(runs)} seeds; data: {c0['dataset']}. One row per seed (the
seed of the supernet, the search, distillation and fine-tuning), then the median [min, max].
Test accuracy (%) of each exported artifact, read back from its file; latency: batch 1 in ONNX
Runtime (`cpu-ort`: fp32, `cpu-ort-int8`: the int8 QDQ graph; 1 thread, `nasopt.hardware.latency`);
wall times in seconds{
    f", each pipeline pinned to one core while {jobs - 1} other pipeline(s) ran on the other "
    f"core(s) (`--jobs {jobs}`); latencies measured after all pipelines, one at a time"
    if jobs > 1 else ", one pipeline at a time"}, each with {threads}.

{table(["seed", "trial", "packed B", "MACs", *[label for label, _ in ARTIFACTS],
        "latency fp32 (us)", "latency int8 (us)", *[f"{s} s" for s in STAGES]], rows)}

| target | median | verdict |
|---|---|---|
{chr(10).join(verdicts)}

Published baselines ({target.source}; their figures, not re-run here):

{table(["model", "test accuracy", "size"], target.baselines)}

Timed for latency: {", ".join(sorted({f"`{w}`" for r in runs for _, w in r["latency"].values()}))}.{
    "".join(f"{chr(10)}Seed {r['seed']}: model.int8.onnx not written ({reason})" for r in runs
            if (reason := int8_not_written(r["card"])))}
Picked archs: {"; ".join(f"seed {r['seed']}: `{json.dumps(r['card']['arch'])}`" for r in runs)}.
Command of seed {runs[0]['seed']}: `{runs[0]['command']}`.
"""
    missed = [] if ok_acc and ok_size and ok_time else [target.dataset]
    return text, missed


def _nni_comparison(args: argparse.Namespace, log) -> str:  # noqa: ANN001
    """Our strategy vs NNI's at equal evaluations on the MNIST-1D space under the 4 KB budget."""
    from nasopt.search.evaluate import Evaluator
    from nasopt.strategies.nni_bridge import NNI_STRATEGIES, run_nni_search
    from nasopt.core.objectives import get_constraints, get_objectives, hypervolume
    from nasopt.search.loop import run_search
    from nasopt.supernet.elastic import train_supernet
    from nasopt.pipeline import load_run_config
    ours, theirs = args.ours.split(","), args.nni.split(",")  # checked by _check
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    budget = TARGETS["mnist1d"].max_bytes
    # the pipeline's data, space and supernet recipe; seed 0's supernet is reused when cached
    cfg = load_run_config(ROOT / TARGETS["mnist1d"].config, args.set).base()
    data = api.load_data(cfg)
    space = api.make_space(cfg.search.space, data, dict(cfg.search.restrict))
    supernet, _ = train_supernet(space, data, cfg.supernet,
                                 Path(args.run_root) / "mnist1d" / "seed0" / "run" / "supernets",
                                 log=log)
    evaluator = Evaluator(space, supernet, data, cfg.eval.calib_samples)
    objectives = get_objectives(["accuracy", "size"])
    constraints = get_constraints({"size": budget})
    rows, medians = [], {}
    for name in (*ours, *theirs):
        hvs, bests, seconds = [], [], []
        for seed in range(args.seeds):
            start = time.perf_counter()
            nni = name in NNI_STRATEGIES
            study = optuna.create_study(directions=["maximize", "minimize"], sampler=(
                None if nni else api.STRATEGIES[name].make_sampler(space, seed)))
            if nni:
                run_nni_search(study, space, evaluator, objectives, args.evaluations, name, seed,
                               show_progress=False, constraints=constraints)
            else:
                run_search(study, space, evaluator, objectives, args.evaluations,
                           show_progress=False, constraints=constraints)
            seconds.append(time.perf_counter() - start)
            points = [(t.values[0], t.values[1]) for t in study.trials
                      if t.state == optuna.trial.TrialState.COMPLETE and t.values[1] <= budget]
            hvs.append(hypervolume(points, budget))
            bests.append(max((a for a, _ in points), default=0.0))
            log(f"{name} seed {seed}: HV {hvs[-1]:.4f}, best <= 4 KB {bests[-1]:.4f}")
        rows.append([name, args.evaluations, args.seeds, _median(hvs, ".4f"),
                     _median([100 * b for b in bests], ".2f"), f"{statistics.mean(seconds):.0f}"])
        medians[name] = (statistics.median(hvs), statistics.median(bests))
    top_hv = max(medians, key=lambda n: medians[n][0])
    top_acc = max(medians, key=lambda n: medians[n][1])
    return f"""## Our strategy against NNI's, same space and budget (MNIST-1D)

`conv1d` space with compression genes on MNIST-1D, objectives validation accuracy and packed
bytes, budget packed size <= 4 KB; the supernet of the seed-0 pipeline above (its recipe), one
evaluator; {args.evaluations} evaluations per search, seeds 0..{args.seeds - 1}. Hypervolume of the
feasible trials with the reference point accuracy 0 at 4 KB (1 = 100 % at 0 bytes); best
validation accuracy under 4 KB (%). Ours see the budget as an Optuna constraint
(`trial.set_constraint`); NNI 3.0's strategies ({", ".join(theirs)}) run in NNI's in-process
engine through `nasopt.strategies.nni_bridge` and optimize one scalar, the MnasNet reward
ACC x (size / 4 KB)^-0.07 (a soft constraint: they have no constraint of their own).

{table(["strategy", "evaluations", "seeds", "hypervolume, median [min, max]",
        "best val acc <= 4 KB (%)", "s / search"], rows)}

Highest median hypervolume: `{top_hv}`; highest median best accuracy under 4 KB: `{top_acc}`.
{"" if top_hv == top_acc else "They differ: a scalar reward aimed at the budget finds the most "
 "accurate arch near it, a multi-objective search spreads its evaluations over the front."}
"""


def _check(args: argparse.Namespace, names: list[str]) -> None:
    """Every mistake in the arguments found before hours of pipelines, not after."""
    if args.seeds < 1:
        raise NasoptError("--seeds must be at least 1")
    if args.jobs < 1:
        raise NasoptError("--jobs must be at least 1")
    seeded = [item for item in args.set if item.split("=", 1)[0] in {f"{k}.seed" for k in SEEDED}]
    if seeded:
        raise NasoptError(f"--set {seeded[0]}: the headline sets every step's seed to the run's "
                          f"(--seeds N runs seeds 0..N-1); drop it")
    for name in names:
        if not (ROOT / TARGETS[name].config).exists():
            raise NasoptError(f"{TARGETS[name].config} is missing: the headline config of {name}")
        for seed in range(args.seeds):
            folder = Path(args.run_root) / name / f"seed{seed}"
            if folder.exists():
                raise NasoptError(f"{folder} exists: a re-run would reuse its supernet and trials"
                                  f" and its wall times would not cover the whole pipeline; "
                                  f"remove it or pass another --run-root")
    if "mnist1d" in names and args.evaluations > 0:
        from nasopt.strategies.nni_bridge import NNI_STRATEGIES, import_nni
        ours, theirs = args.ours.split(","), args.nni.split(",")
        if not set(theirs) <= set(NNI_STRATEGIES) or not set(ours) <= set(api.STRATEGIES):
            raise NasoptError(f"--ours takes {', '.join(api.STRATEGIES)}; --nni takes "
                              f"{', '.join(NNI_STRATEGIES)}")
        import_nni()  # the NNI extra: a clear error now, not after the pipelines


def run(args: argparse.Namespace) -> Path:
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    names = [d for d in args.datasets.split(",") if d]
    unknown = [d for d in names if d not in TARGETS]
    if unknown:
        raise NasoptError(f"unknown datasets {unknown}; the headline covers {', '.join(TARGETS)}")
    start = time.perf_counter()
    _check(args, names)
    return _report([TARGETS[n] for n in names], args, log, start)


def _report(targets: list[Target], args: argparse.Namespace, log, start: float) -> Path:  # noqa: ANN001
    """Runs the pipelines and writes the report. A failed pipeline does not stop the others;
    the report shows every finished one, then names the failed ones (with their error), and
    the command exits with that error after writing it."""
    sections, missed, failed = [], [], []
    names = [t.dataset for t in targets]
    # the slowest dataset first, so that the quick ones fill the cores
    order = sorted(targets, key=lambda t: t.max_minutes, reverse=True)
    with LoadSampler() as load:
        results = _pipelines(order, args, log)
        for target in targets:
            done = [r for r in results[target.dataset] if "error" not in r]
            failed += [(target.dataset, r) for r in results[target.dataset] if "error" in r]
            if done:
                text, miss = _dataset_section(target, done, args.jobs)
                sections.append(text)
                missed += miss
        if "mnist1d" in names and args.evaluations > 0:
            sections.append(_nni_comparison(args, log))
    if failed:
        sections.append("## Failed pipelines\n\nThese runs failed; the figures above are the "
                        "other seeds' only (each run's folder under the run root is kept).\n\n"
                        + "\n".join(f"- {d} seed {r['seed']}:\n\n```\n{r['error']}\n```\n"
                                     for d, r in failed))
    not_run = [d for d in TARGETS if d not in names]
    command = "nasopt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"""# Headline results: the whole nasopt pipeline, end to end

Command: `{command}` ({(time.perf_counter() - start) / 60:.0f} min)
Machine: {machine()} in the bench process (each pipeline's threads: its section); {load.note()}

Everything below ran through the public CLI (`nasopt run` with the committed configs): supernet
training, joint architecture + compression search on the validation split, pick, distillation
from the supernet's largest subnet, QAT fine-tuning with the arch's compression policy, export
(each file verified), and one measurement of every artifact on the test split at the end.
{"**Not in this run:** " + ", ".join(not_run) + " (not measured by this command: `--datasets` chose)." if not_run else ""}
{"Targets missed: " + ", ".join(missed) + " (see each section)." if missed else ""}

""" + "\n".join(sections))
    if failed:
        last = failed[0][1]["error"].splitlines()[-1]  # the error is never empty
        raise NasoptError(f"{len(failed)} pipeline(s) failed ("
                          + ", ".join(f"{d} seed {r['seed']}" for d, r in failed)
                          + f"; last line of the first: {last}); {out} has the finished "
                          "ones and each failure's error")
    return out
