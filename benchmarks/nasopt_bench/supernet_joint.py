"""``nasopt bench supernet --joint``: does a joint trial's score predict the deployed model?

A joint trial scores an arch *with its compression* (bit-widths, sparsity, rank) on weights
inherited from the supernet. This report measures, for the compression-aware recipe (the
default) and the float recipe beside it, trained fresh in one run on the same data:

- the share of random joint archs scoring below twice the majority-class rate (near chance);
- Kendall tau between the inherited compressed validation accuracy of joint archs spread over
  size and the validation accuracy of the same archs after the pipeline's own fine-tuning
  (quantization-aware, :func:`nasopt.deploy.finetune.finetune`, one recipe for all, several
  seeds), each recipe's archs fine-tuned from its own supernet as ``nasopt run`` does;
- the training time of each recipe.

Only the training and validation splits are read.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

import torch
from scipy.stats import kendalltau, spearmanr

from nasopt import api
from nasopt.compression.compress import Policy
from nasopt.core.errors import NasoptError
from nasopt.deploy.finetune import FinetuneConfig, finetune, prepare_qat
from nasopt.search.evaluate import Evaluator
from nasopt.supernet.train import accuracy
from nasopt_bench.report import LoadSampler, machine, table
from nasopt_bench.supernet import train_fresh

TAU_TARGET = 0.8
NEAR_CHANCE_TARGET = 0.02
TIME_RATIO_TARGET = 1.5
NEW, OLD = "compression-aware (default)", "float (compression after the fact)"


def spread_joint(space, pool, metrics, n: int) -> list:  # noqa: ANN001
    """``n`` joint archs of ``pool`` at evenly spaced quantiles of their compressed size."""
    if n < 4:
        raise NasoptError("--archs must be at least 4 (a rank correlation needs several)")
    ranked = sorted(pool, key=lambda a: metrics[a.key].compressed_bytes)
    return [ranked[round(i * (len(ranked) - 1) / (n - 1))] for i in range(n)]


def _step_cost(space, data, recipes: dict, steps: int) -> dict[str, float]:  # noqa: ANN001
    """Median seconds of one sandwich step (forward + backward, after the warmup phase) per
    recipe, the recipes' steps alternating on the same batches, so that a machine's changing
    load touches both alike (the training wall times above are taken one after the other)."""
    import random

    from nasopt.core.task import task_of
    from nasopt.supernet.elastic import sandwich_loss, training_compression
    from nasopt.supernet.train import minibatches
    supernet = space.supernet()
    recipes = {name: r.resolve(len(data.x_train), space) for name, r in recipes.items()}
    losses = {name: sandwich_loss(supernet, random.Random(i), r.n_random, r.kd_temperature,
                                  task_of(data), training_compression(space, r), space.group_of,
                                  r.compressed_share)
              for i, (name, r) in enumerate(recipes.items())}
    batch = next(iter(recipes.values())).batch_size
    times: dict[str, list[float]] = {name: [] for name in recipes}
    batches = minibatches(data.x_train, data.y_train, batch, seed=0)
    for i in range(steps):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = minibatches(data.x_train, data.y_train, batch, seed=i)
            x, y = next(batches)
        for name, loss in losses.items():
            supernet.zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss(x, y).backward()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def run(args: argparse.Namespace) -> Path:
    if args.threads:
        torch.set_num_threads(args.threads)
    args.archs = 24 if args.archs is None else args.archs
    if args.finetune_seeds < 1 or args.random_archs < 1:
        raise NasoptError("--finetune-seeds and --random-archs must be at least 1")
    overrides = [f"data.dataset={args.dataset}", f"search.space={args.space}", *args.set]
    cfg = api.load_config(None, overrides)
    data = api.load_data(cfg)
    space = api.make_space(args.space, data)
    if not space.compression_genes():
        raise NasoptError(f"space {args.space!r} has no compression genes: nothing joint to rank")
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    recipes = {NEW: dataclasses.replace(cfg.supernet, compression_aware=True),
               OLD: dataclasses.replace(cfg.supernet, compression_aware=False)}
    load = LoadSampler().start()
    trained = train_fresh(space, data, recipes, log)
    evaluators = {name: Evaluator(space, sn, data, cfg.eval.calib_samples)
                  for name, (sn, _) in trained.items()}
    step_cost = _step_cost(space, data, recipes, args.cost_steps)

    import random
    rng = random.Random(1)
    pool = list({a.key: a for a in (space.sample(rng) for _ in range(args.random_archs))}.values())
    majority = float(torch.bincount(data.y_val).max()) / len(data.y_val)
    chance = {name: [] for name in recipes}
    metrics = {name: {} for name in recipes}
    for name, ev in evaluators.items():
        for arch in pool:
            m = ev(arch)
            metrics[name][arch.key] = m
            chance[name].append(m.accuracy < 2 * majority)
    picked = spread_joint(space, pool, metrics[NEW], args.archs)

    seeds = list(range(args.finetune_seeds))
    ft = FinetuneConfig()
    inherited = {name: [] for name in recipes}
    tuned = {name: [] for name in recipes}
    rows = []
    for i, arch in enumerate(picked):
        row = [i + 1, f"{metrics[NEW][arch.key].compressed_bytes:,}"]
        for name, ev in evaluators.items():
            policy = Policy.from_arch(arch, ev.pruning)
            t0 = time.perf_counter()
            accs = []
            for seed in seeds:
                qat = prepare_qat(ev.calibrated_model(arch), policy, space.group_of)
                model, _, _ = finetune(qat, policy, space.group_of, data,
                                       dataclasses.replace(ft, seed=seed))
                accs.append(accuracy(model, data.x_val, data.y_val))
            inherited[name].append(ev(arch).accuracy)
            tuned[name].append(sum(accs) / len(accs))
            row += [f"{inherited[name][-1]:.4f}", f"{tuned[name][-1]:.4f}"]
            log(f"[{i + 1}/{len(picked)}] {name}: inherited {inherited[name][-1]:.4f}, "
                f"fine-tuned {tuned[name][-1]:.4f} ({time.perf_counter() - t0:.1f} s)")
        row.append(", ".join(f"{g}={v}" for g, v in arch.items()
                             if g not in space.architecture_genes()))
        rows.append(row)
    load.stop()

    verdict = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    base_time = trained[OLD][1]
    summary = []
    for name in recipes:
        tau = float(kendalltau(inherited[name], tuned[name]).statistic)
        rho = float(spearmanr(inherited[name], tuned[name]).statistic)
        near = sum(chance[name]) / len(chance[name])
        ratio = step_cost[name] / step_cost[OLD]
        summary.append([name, f"{trained[name][1]:.0f} s ({trained[name][1] / base_time:.2f}x)",
                        f"{1000 * step_cost[name]:.1f} ms ({ratio:.2f}x)"
                        + (f": {verdict(ratio <= TIME_RATIO_TARGET)}" if name == NEW else ""),
                        f"{near:.1%}" + (f": {verdict(near < NEAR_CHANCE_TARGET)}"
                                         if name == NEW else ""),
                        f"{sum(m.accuracy for m in metrics[name].values()) / len(pool):.4f}",
                        f"{tau:.3f}" + (f": {verdict(tau >= TAU_TARGET)}" if name == NEW else ""),
                        f"{rho:.3f}", f"{sum(tuned[name]) / len(picked):.4f}"])
    n_train = len(data.x_train)
    command = "nasopt bench supernet " + " ".join(
        shlex.quote(a) for a in sys.argv[3:]) if sys.argv[1:3] == ["bench", "supernet"] else ""
    text = f"""# Joint-space ranking: `{space.name}` on `{data.name}`

Command: `{command or f'nasopt bench supernet --joint --space {args.space} --dataset {args.dataset}'}`
Machine: {machine()}
Load: {load.note()}
Data: {data.summary()} (every accuracy here is on the validation split; the test split is not
used). Majority-class rate on validation: {majority:.1%}.

Does a joint trial's score (inherited weights, *with* the arch's bit-widths, sparsity and rank)
predict the model a user gets after fine-tuning? Two supernet recipes, trained fresh in this run
one after the other ({recipes[NEW].describe(n_train)}):

- **{NEW}**: each sandwich step's random subnets also draw compression genes and train under
  them (fake quantization, global pruning masks by LAMP scores, factorized weights, straight-through
  gradients; `nasopt.supernet.compressed`); evaluation recalibrates BatchNorm under the arch's
  compression;
- **{OLD}**: float training, `--set supernet.compression_aware=false`.

## Results

{table(["recipe", "training wall time (vs float)", f"sandwich step, median of {args.cost_steps} alternating (vs float)", f"near chance (< {2 * majority:.1%}) among {len(pool)} random joint archs", "mean inherited val acc (same archs)", f"Kendall tau, inherited vs fine-tuned ({len(picked)} archs)", "Spearman rho", "mean fine-tuned val acc"], summary)}

Targets: Kendall tau >= {TAU_TARGET}, fewer than {NEAR_CHANCE_TARGET:.0%} near chance, training
time at most {TIME_RATIO_TARGET}x the float recipe's. The training time is judged by the cost of
a sandwich step: the two recipes' steps measured alternating on the same batches (forward and
backward of the largest, the smallest and the random subnets, after the warmup phase), since
the wall times of the two trainings, taken one after the other, move with the machine's load.

Fine-tuning (one recipe for all, as `nasopt run`'s finetune step): quantization-aware training of
the arch's compressed model from the inherited weights, Adam lr {ft.lr}, batch {ft.batch_size},
up to {ft.epochs} epochs with early stopping (patience {ft.patience}) on validation accuracy;
the mean over seeds {seeds}. Archs: evenly spaced quantiles of compressed size (packed bytes)
among the {len(pool)} random joint archs, so every bit-width, sparsity and rank option occurs.

## Archs

{table(["#", "packed bytes", *(f"{h}, {n.split(' (')[0]}" for n in recipes for h in ("inherited", "fine-tuned")), "compression genes"], rows)}

Nondeterminism: training, sampling and fine-tuning are seeded; PyTorch CPU kernels may differ in
the last bits between machines and thread counts; timings depend on the machine's load.
"""
    out = Path(args.out or f"results/supernet_joint_{data.name.replace('.', '_')}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out
