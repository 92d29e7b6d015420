"""``nasopt bench gradient``: DARTS and GDAS on the MNIST-1D conv1d supernet space (architecture +
compression genes), each driven toward packed-size targets, against random search at the same
number of evaluated archs.

Per (variant, target): a fresh relaxed copy of the cached supernet (nasopt.gradient.relaxation), a short
gradient search (nasopt.gradient.search) with the target as the Lagrangian's size target, then the top-k
derived archs scored by the same Evaluator as every strategy (validation accuracy, exact packed
size). Reported: the expected size at the end vs the argmax arch's real packed size, the best
accuracy among derived archs within the target, wall times, and the hypervolume of accuracy vs
size of all archs a variant derived (every target pooled) against random search with as many
evaluations (several seeds).
"""
from __future__ import annotations

import argparse
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nasopt.search.evaluate import Evaluator
from nasopt.gradient.search import VARIANTS, gradient_search, plot_trajectory, save_trajectory
from nasopt.core.objectives import hypervolume, parse_quantity
from nasopt.gradient.relaxation import relax
from nasopt_bench.report import machine, table
from nasopt_bench.setup import conv1d_supernet, supernet_epochs

REFERENCE_KB = 16  # hypervolume reference: accuracy 0 at 16 KB (as in the other MNIST-1D benches)


def add_arguments(q: argparse.ArgumentParser) -> None:
    """The subcommand's options (cli.py calls this)."""
    q.add_argument("--targets", default="2KB,4KB,8KB", help="packed-size targets (default "
                   "2KB,4KB,8KB)")
    q.add_argument("--variants", default=",".join(VARIANTS))
    q.add_argument("--epochs", type=int, default=5)
    q.add_argument("--max-batches", type=int, default=0,
                   help="cap on steps per epoch (default 0: a whole epoch, 27 steps)")
    q.add_argument("--lr-alpha", type=float, default=0.05)
    q.add_argument("--lr-w", type=float, default=1e-3)
    q.add_argument("--dual-lr", type=float, default=0.1)
    q.add_argument("--topk", type=int, default=5, help="derived archs scored per search")
    q.add_argument("--random-seeds", type=int, default=5)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: small "
                   "convolutions; 0: torch's default)")
    q.add_argument("--out", default="results/gradient_mnist1d.md")
    q.add_argument("--run-dir", default="runs", help="where the supernet checkpoint is cached")
    q.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")


def run(args: argparse.Namespace) -> Path:
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    targets = [(t, parse_quantity(t, "size")) for t in args.targets.split(",") if t]
    cfg, data, space, supernet, ckpt = conv1d_supernet(args.run_dir, args.set, log)
    evaluator = Evaluator(space, supernet, data, cfg.eval.calib_samples)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    traj_dir = out.with_suffix("")  # results/gradient_mnist1d/: trajectories JSON/CSV
    reference = REFERENCE_KB * 1024
    rows, pooled, plots = [], {v: [] for v in variants}, []
    for variant in variants:
        for label, target in targets:
            start = time.perf_counter()
            relaxation = relax(space, supernet)
            result = gradient_search(relaxation, data, variant=variant, epochs=args.epochs,
                                     lr_w=args.lr_w, lr_alpha=args.lr_alpha, cost="size",
                                     target=float(target), seed=args.seed,
                                     max_batches=args.max_batches or None,
                                     dual_lr=args.dual_lr)
            search_s = time.perf_counter() - start
            stem = f"{variant}-{label}"
            save_trajectory(result, traj_dir, stem)
            png = out.with_name(f"{out.stem}_{stem}.png")
            plot_trajectory(result, png, f"{variant}, target {label}: P(option) per epoch")
            plots.append((stem, png))
            start = time.perf_counter()
            derived = [(relaxation.full_arch(a), p) for a, p in result.derive(args.topk)]
            scored = [(a, p, evaluator(a)) for a, p in derived]
            eval_s = time.perf_counter() - start
            pooled[variant] += [(m.accuracy, m.compressed_bytes) for _, _, m in scored]
            first = result.trajectory[0]["expected"]["size"]
            last = result.trajectory[-1]["expected"]["size"]
            arch0, p0, m0 = scored[0]
            feasible = [m for _, _, m in scored if m.compressed_bytes <= target]
            best = max(feasible, key=lambda m: m.accuracy) if feasible else None
            rows.append([variant, label, f"{first:,.0f}", f"{last:,.0f}",
                         f"{m0.compressed_bytes:,}", f"{m0.accuracy:.4f}", f"{p0:.3g}",
                         f"{len(feasible)}/{len(scored)}",
                         f"{best.accuracy:.4f} ({best.compressed_bytes:,} B)" if best else "none",
                         f"{search_s:.0f}", f"{eval_s:.1f}"])
            log(f"{variant} {label}: E[size] {first:.0f} -> {last:.0f} B; argmax arch "
                f"{m0.compressed_bytes} B, acc {m0.accuracy:.4f}; {search_s:.0f}s")
    budget = len(targets) * args.topk
    rng_hv = []
    start = time.perf_counter()
    for seed in range(args.random_seeds):
        rng = random.Random(seed)
        points = [(m.accuracy, m.compressed_bytes) for m in
                  (evaluator(space.sample(rng)) for _ in range(budget))]
        rng_hv.append(hypervolume(points, reference))
    random_s = (time.perf_counter() - start) / max(args.random_seeds, 1)
    hv_rows = [[v, budget, f"{hypervolume(pooled[v], reference):.4f}"] for v in variants]
    hv_rows.append([f"random ({args.random_seeds} seeds)", budget,
                    f"{np.mean(rng_hv):.4f} ± {np.std(rng_hv, ddof=1) if len(rng_hv) > 1 else 0:.4f}"])
    command = "nasopt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    images = "\n".join(f"![{stem}]({png.name})" for stem, png in plots
                       if stem.endswith(targets[len(targets) // 2][0]))
    text = f"""# Gradient search (DARTS, GDAS) on the MNIST-1D conv1d supernet space

Command: `{command}`
Machine: {machine()}
Data: {data.summary()}; the search reads train (weights) and validation (logits) only;
derived archs are scored on validation by the search's Evaluator (the test split is not used).
Space: `conv1d` with compression genes ({space.size():,} archs). The supernet
(`{ckpt.name}`, {supernet_epochs(cfg, data, space)} epochs) is the cached one; each search fine-tunes its own
relaxed copy ({args.epochs} epochs x {args.max_batches or 'all'} steps of 128 samples; Adam lr_w
{args.lr_w}, lr_alpha {args.lr_alpha}), and derived archs are scored with the supernet's own
weights, like every trial of every strategy. `sparsity` is not relaxed (fixed at 0).
Cost: Lagrangian mu log(E[size]/target), mu <- max(0, mu + {args.dual_lr} log(E[size]/target)) per
logits step (nasopt.gradient.search). GDAS temperature 5 -> 0.2.

## Per search

E[size]: expected packed bytes under the gene distributions at the start (uniform) and the end;
argmax: the most probable arch (its real packed size, validation accuracy, joint probability);
within target: derived archs (top {args.topk} by joint probability) whose real size meets it, and the
best of them.

{table(["variant", "target", "E[size] start", "E[size] end", "argmax size", "argmax acc",
        "P(argmax)", "within target", "best within target", "search s", "eval s"], rows)}

## Hypervolume at equal evaluations

All archs a variant derived ({len(targets)} targets x top {args.topk}) against random search with
as many evaluations; reference accuracy 0 at {REFERENCE_KB} KB (as in results/strategies_mnist1d.md).
Random search: {random_s:.1f} s per run (evaluations only; no search cost).

{table(["strategy", "evaluations", "hypervolume"], hv_rows)}

## Logits trajectories

Probability of every option of every gene per epoch (target {targets[len(targets) // 2][0]});
every search's trajectory is in `{traj_dir.name}/` (JSON and CSV) and `{out.stem}_*.png`.

{images}
"""
    out.write_text(text)
    return out
