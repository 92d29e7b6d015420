"""``nasopt bench strategies --part mnist1d``: every strategy on the MNIST-1D supernet space,
joint accuracy / packed-size objective, equal budget, several seeds; hypervolume versus
evaluations. All runs share one trained supernet and one evaluator (whose cache only saves time:
an arch scores the same whichever strategy proposes it). Accuracy is validation accuracy.
NNI's strategies (``nni-*``, :mod:`nasopt.strategies.nni_bridge`, extra ``nasopt[nni]``) run in the same
loop with the same budget and seeds, scored by the same evaluator; they optimize the MnasNet
reward (see the bridge), ours the two objectives (or their own scalarization).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import optuna

from nasopt import api
from nasopt.search.evaluate import Evaluator
from nasopt.strategies.nni_bridge import NNI_STRATEGIES, POPULATION, SAMPLE, run_nni_search
from nasopt.core.objectives import MNASNET_W, get_objectives, hypervolume
from nasopt.search.loop import run_search
from nasopt_bench.report import machine, table
from nasopt_bench.setup import conv1d_supernet, supernet_epochs

REFERENCE_KB = 16  # hypervolume reference: accuracy 0 at 16 KB (as in the compression benchmark)


def hv_curve(study: optuna.Study, reference: float) -> np.ndarray:
    """Hypervolume of the (accuracy, packed bytes) front after each evaluation."""
    points, out = [], []
    for t in sorted(study.trials, key=lambda t: t.number):
        if t.state == optuna.trial.TrialState.COMPLETE:
            points.append((t.values[0], t.values[1]))
        out.append(hypervolume(points, reference))
    return np.array(out)


def run(args: argparse.Namespace, names: list[str]) -> Path:
    """Called by :func:`nasopt_bench.strategies.run`, which checked ``names`` and the budget."""
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    cfg, data, space, supernet, _ = conv1d_supernet(args.run_dir, args.set, log)
    evaluator = Evaluator(space, supernet, data, cfg.eval.calib_samples)
    objectives = get_objectives(["accuracy", "size"])
    reference = REFERENCE_KB * 1024
    curves, seconds = {}, {}
    for name in names:
        start, runs = time.perf_counter(), []
        for seed in range(args.seeds):
            nni = name in NNI_STRATEGIES
            study = optuna.create_study(directions=[o.direction for o in objectives], sampler=(
                None if nni else api.STRATEGIES[name].make_sampler(space, seed)))
            if nni:
                run_nni_search(study, space, evaluator, objectives, args.trials, name, seed,
                               show_progress=False)
            else:
                run_search(study, space, evaluator, objectives, args.trials, show_progress=False)
            assert len(study.trials) == args.trials  # the equal budget (no trial failed)
            runs.append(hv_curve(study, reference))
        curves[name] = np.array(runs)
        seconds[name] = (time.perf_counter() - start) / args.seeds
        final = curves[name][:, -1]
        log(f"{name}: HV {final.mean():.4f} ± {final.std(ddof=1):.4f} ({seconds[name]:.1f} s/run)")

    out = Path(args.out).with_name(f"{Path(args.out).stem}_{args.part}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = out.with_suffix(".png")
    _plot(curves, plot)
    checkpoints = [c for c in (25, 50, 100, 200, 400) if c <= args.trials]
    if args.trials not in checkpoints:
        checkpoints.append(args.trials)
    rows = [[name, *[f"{curves[name][:, c - 1].mean():.4f} ± {curves[name][:, c - 1].std(ddof=1):.4f}"
                     for c in checkpoints], f"{seconds[name]:.1f}"] for name in names]
    ranked = sorted(names, key=lambda n: -curves[n][:, -1].mean())
    command = "nasopt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = f"""# Strategies on the MNIST-1D supernet space (joint architecture + compression)

Command: `{command}`
Machine: {machine()}
Data: {data.summary()}; validation accuracy (the test split is not used).
Space: `conv1d` with compression genes ({space.size():,} archs); objectives validation accuracy
(max) and packed bytes (min); one supernet ({supernet_epochs(cfg, data, space)} epochs) shared by all runs.
Budget: {args.trials} evaluations per run, {args.seeds} seeds (0..{args.seeds - 1}) per strategy.
Hypervolume reference point: accuracy 0 at {REFERENCE_KB} KB (sizes divided by {REFERENCE_KB} KB).

![hypervolume vs evaluations]({plot.name})

## Hypervolume after N evaluations (mean ± std over seeds)

{table(["strategy", *[f"N = {c}" for c in checkpoints], "s / run"], rows)}

Ranking at N = {args.trials}: {", ".join(ranked)}.
{_predictor_note(names)}
{_nni_note(names)}
Nondeterminism: runs are seeded (every strategy, ours and NNI's, gets seeds 0..{args.seeds - 1});
floating-point results can differ across machines. The per-run seconds are wall time on a
machine shared with other jobs (noisy, compare them loosely) and depend on the shared
evaluation cache (later strategies re-use earlier evaluations).
"""
    out.write_text(text)
    return out


def _predictor_note(names: list[str]) -> str:
    if "predictor" not in names:
        return ""
    return """
`predictor` on this joint space with two objectives and no budget: after its own 20 random
archs, every ask is `staged`'s (its budget-aimed asks need a budget; `nasopt bench budget`
measures them), so it differs from `staged` by its initial archs and the draws that follow.
"""


def _nni_note(names: list[str]) -> str:
    nni = [n for n in names if n in NNI_STRATEGIES]
    if not nni:
        return "NNI's strategies were not in this run (`--strategies` left them out).\n"
    return f"""## NNI's strategies ({", ".join(nni)})

NNI 3.0's multi-trial strategies ({", ".join(f"{n} = {NNI_STRATEGIES[n]}" for n in nni)}) ran
through `nasopt.strategies.nni_bridge`: the space translated to an NNI model space (one `nni.choice` per
gene), NNI's in-process sequential engine, every sampled arch scored by the same evaluator and
recorded in an Optuna study like ours. NNI's strategies optimize one scalar; here the MnasNet
reward ACC x (size / T)^{MNASNET_W} with T the median packed size of the run's trials so far (no
size budget is given), so they are steered toward the Pareto front only through that trade-off.
Settings: RegularizedEvolution population {POPULATION}, tournament {SAMPLE} (as our `evolution`),
no dedup (Random too); TPE is NNI's TPE tuner without the strategy's 1 s poll per model;
PolicyBasedRL with NNI's defaults (PPO update every 20 samples), seeded through torch's and
numpy's global generators.
"""


def _plot(curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, runs in curves.items():
        x = np.arange(1, runs.shape[1] + 1)
        mean, std = runs.mean(0), runs.std(0, ddof=1)
        ax.plot(x, mean, label=name, linestyle="--" if name in NNI_STRATEGIES else "-")
        ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("evaluations")
    ax.set_ylabel(f"hypervolume (ref: acc 0 at {REFERENCE_KB} KB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
