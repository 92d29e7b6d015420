"""``nasopt bench darts-nb201``: DARTS on the NAS-Bench-201 cell space and its known collapse.

DARTS (first order), DARTS with the DARTS- mitigation and GDAS search the mixed-op supernet of
``nb201`` (:class:`nasopt.spaces.nb201.Nb201Relaxation`, a small width and depth) with
:func:`nasopt.gradient.search.gradient_search` on an offline image dataset (there is no CIFAR-10 offline):
weights on the train split, logits on the validation split; the test split is never read. Every
epoch records the op probabilities of the 6 edges, the share of probability on parameter-free ops,
the derived (argmax) cell, whether the collapse rule (:func:`nasopt.spaces.nb201.collapse_of`)
fires, and what the derived cell is worth on CIFAR-10 by a *lookup* in the NAS-Bench-201 table
(accuracy and rank among the 15,625 cells): the cell was searched on a proxy task, the table only
says what the same cell scores when NB201 trains it on CIFAR-10.

Mitigation ``darts-`` (Chu et al., "DARTS-: Robustly Stepping out of Performance Collapse Without
Indicators", ICLR 2021): every mixed op gets an auxiliary skip connection ``beta * x`` with beta
decaying linearly from ``--beta`` to 0 over the epochs. The residual path it provides takes away
the advantage that lets skip_connect win the softmax; at the end (beta = 0) the supernet is plain
DARTS again.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nasopt.core.config import DEFAULT_METRIC, DEFAULT_TABLE
from nasopt.core.data import Dataset, load_dataset
from nasopt.core.errors import NasoptError
from nasopt.gradient.search import gradient_search
from nasopt.search.tabular import load_table, resolve_table
from nasopt.spaces.nb201 import EDGES, OPS, PARAMETER_FREE, Nb201Space, collapse_of, to_string

from nasopt_bench.report import machine, table

VARIANTS = ("darts", "darts-", "gdas")
#: GDAS's temperature schedule (Dong & Yang, CVPR 2019): 10 -> 0.1
GDAS_TAU = (10.0, 0.1)


def add_arguments(q: argparse.ArgumentParser) -> None:
    """The subcommand's options (cli.py calls this)."""
    q.add_argument("--dataset", default="fashion-mnist", help="an image dataset of nasopt "
                   "(default fashion-mnist; digits works too)")
    q.add_argument("--side", type=int, default=16, help="images are resized to SIDE x SIDE "
                   "(a multiple of 4; default 16)")
    q.add_argument("--train-samples", type=int, default=2000,
                   help="samples of the train split (weights) and of the validation split "
                   "(logits) used (default 2000 each)")
    q.add_argument("--channels", type=int, default=8, help="stem width (NB201: 16; default 8)")
    q.add_argument("--cells", type=int, default=1, help="cells per stage (NB201: 5; default 1)")
    q.add_argument("--epochs", type=int, default=15)
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--lr-w", type=float, default=3e-3, help="Adam, supernet weights")
    q.add_argument("--lr-alpha", type=float, default=3e-2, help="Adam, architecture logits")
    q.add_argument("--beta", type=float, default=1.0, help="DARTS- auxiliary skip weight at the "
                   "first epoch, decaying linearly to 0")
    q.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated among {', '.join(VARIANTS)}")
    q.add_argument("--seeds", type=int, default=3)
    q.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: tiny "
                   "convolutions gain nothing from more, and lose much on a busy machine)")
    q.add_argument("--table", default=DEFAULT_TABLE,
                   help=f"default: the shipped {DEFAULT_TABLE}")
    q.add_argument("--table-metric", default=DEFAULT_METRIC)
    q.add_argument("--out", default="results/darts_nb201.md",
                   help="report path (a PNG and a JSON of the trajectories are written next to it)")


def proxy_data(name: str, side: int, samples: int, seed: int = 0) -> Dataset:
    """``samples`` train and validation images of ``name`` (seeded subsets of nasopt's splits),
    resized to ``side`` x ``side`` and standardized by the train subset's mean and std."""
    if side < 4 or side % 4:
        raise NasoptError(f"--side must be a multiple of 4 (the NB201 network halves the "
                          f"resolution twice), got {side}")
    if samples < 1:
        raise NasoptError(f"--train-samples must be positive, got {samples}")
    full = load_dataset(name, seed=seed)
    if len(full.input_shape) != 3:
        raise NasoptError(f"dataset {name!r} holds {full.input_shape} samples; nb201 needs images")
    gen = torch.Generator().manual_seed(seed)
    pick = lambda n: torch.randperm(n, generator=gen)[:samples]  # noqa: E731
    it, iv = pick(len(full.x_train)), pick(len(full.x_val))

    def resize(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (side, side):
            return x
        return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True,
                             align_corners=False)

    xt, xv = resize(full.x_train[it]), resize(full.x_val[iv])
    mean, std = xt.mean(), xt.std()
    empty = torch.empty(0, *xt.shape[1:])
    return Dataset(f"{name} {side}x{side}", (xt - mean) / std, full.y_train[it], (xv - mean) / std,
                   full.y_val[iv], empty, torch.empty(0, dtype=torch.long), full.num_classes,
                   full.fingerprint)


class Lookup:
    """CIFAR-10 accuracy and rank of NB201 cells from the table (a lookup, not a training)."""

    def __init__(self, path: str, metric: str):
        self.path = resolve_table(path)
        self.metric = metric
        acc = load_table(self.path, metric)
        self.acc = {k: 100 * v for k, v in acc.items()}
        self.sorted = np.sort(np.array([v for v in self.acc.values() if v == v]))[::-1]

    def __call__(self, cell: str) -> tuple[float, int]:
        acc = self.acc[cell]
        return acc, int(np.searchsorted(-self.sorted, -acc, side="left")) + 1


def one_search(args: argparse.Namespace, space: Nb201Space, data: Dataset, lookup: Lookup,
               variant: str, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    relax = space.relaxation(args.channels, args.cells)
    epochs: list[dict[str, Any]] = []

    def on_epoch(record: dict[str, Any]) -> None:
        probs = {e: torch.tensor(record["probs"][e]) for e in EDGES}
        arch = relax.derive(probs)
        c = collapse_of(arch, probs, options=relax.genes)
        # epoch 0 is the uniform start: its argmax (the first op everywhere) is no choice yet
        collapsed = c.collapsed if record["epoch"] > 0 else None
        cell = to_string(arch)
        acc, rank = lookup(cell)
        epochs.append({"epoch": record["epoch"], "cell": cell, "cifar10_acc": acc, "rank": rank,
                       "skip_edges": c.skip_edges, "free_edges": c.free_edges,
                       "free_mass": c.free_mass, "skip_mass": c.skip_mass,
                       "collapsed": collapsed, "val_loss": record["val_loss"],
                       "probs": record["probs"], "beta": relax.aux_skip})
        if variant == "darts-":  # DARTS-: beta for the next epoch, linear decay to 0
            relax.aux_skip = args.beta * max(0.0, 1 - record["epoch"] / args.epochs)

    if variant == "darts-":
        relax.aux_skip = args.beta
    start = time.perf_counter()
    gradient_search(relax, data, variant="gdas" if variant == "gdas" else "darts",
                    epochs=args.epochs, lr_w=args.lr_w, lr_alpha=args.lr_alpha, cost=None,
                    seed=seed, on_epoch=on_epoch, batch_size=args.batch_size, tau=GDAS_TAU)
    first = next((r["epoch"] for r in epochs if r["collapsed"]), None)
    return {"variant": variant, "seed": seed, "seconds": time.perf_counter() - start,
            "epochs": epochs, "first_collapse": first}


def run(args: argparse.Namespace) -> Path:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise NasoptError(f"unknown variants {unknown}; choose among {', '.join(VARIANTS)}")
    if args.seeds < 1 or args.epochs < 1:
        raise NasoptError("--seeds and --epochs must be at least 1")
    if args.threads < 1:
        raise NasoptError(f"--threads must be at least 1, got {args.threads}")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, variants, log)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, variants: list[str], log) -> Path:  # noqa: ANN001
    args.load_start = os.getloadavg()[0]
    data = proxy_data(args.dataset, args.side, args.train_samples)
    space = Nb201Space(data.input_shape, data.num_classes)
    lookup = Lookup(args.table, args.table_metric)
    log(f"{data.name}: {len(data.x_train)} train / {len(data.x_val)} val images; supernet "
        f"{args.channels} channels, {args.cells} cell(s) per stage; "
        f"{sum(p.numel() for p in space.relaxation(args.channels, args.cells).weight_parameters()):,}"
        f" weights")
    start = time.perf_counter()
    runs = []
    for variant in variants:
        for seed in range(args.seeds):
            r = one_search(args, space, data, lookup, variant, seed)
            last = r["epochs"][-1]
            log(f"{variant} seed {seed}: {last['cell']} CIFAR-10 {last['cifar10_acc']:.2f}% "
                f"(rank {last['rank']}), {last['free_edges']}/6 parameter-free, "
                f"{'COLLAPSED' if last['collapsed'] else 'not collapsed'} ({r['seconds']:.0f} s)")
            runs.append(r)
    total = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = out.with_suffix(".png")
    _plot(runs, variants, args, plot)
    out.with_suffix(".json").write_text(json.dumps(runs, indent=1))
    out.write_text(_report(args, data, runs, variants, lookup, total, plot))
    return out


def _plot(runs: list[dict[str, Any]], variants: list[str], args: argparse.Namespace,
          path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.3 * (len(EDGES) + 1), 2.2 * len(variants)))
    FigureCanvasAgg(fig)
    colors = {"none": "0.6", "skip_connect": "tab:red", "nor_conv_1x1": "tab:blue",
              "nor_conv_3x3": "tab:green", "avg_pool_3x3": "tab:orange"}
    for row, variant in enumerate(variants):
        mine = [r for r in runs if r["variant"] == variant]
        first = mine[0]
        x = [e["epoch"] for e in first["epochs"]]
        for col, edge in enumerate(EDGES):
            ax = fig.add_subplot(len(variants), len(EDGES) + 1, row * (len(EDGES) + 1) + col + 1)
            for k, op in enumerate(OPS):
                ax.plot(x, [e["probs"][edge][k] for e in first["epochs"]], color=colors[op],
                        label=op)
            ax.set_ylim(0, 1)
            ax.set_title(f"{variant} seed 0: {edge}", fontsize=8)
            ax.tick_params(labelsize=7)
            if row == 0 and col == 0:
                ax.legend(fontsize=5)
        ax = fig.add_subplot(len(variants), len(EDGES) + 1, (row + 1) * (len(EDGES) + 1))
        for r in mine:
            ax.plot(x, [e["free_mass"] for e in r["epochs"]], label=f"seed {r['seed']}")
        ax.axhline(len(PARAMETER_FREE) / len(OPS), color="0.7", linestyle=":", linewidth=1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{variant}: parameter-free mass", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=5)
    fig.supxlabel("epoch", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _report(args: argparse.Namespace, data: Dataset, runs: list[dict[str, Any]],
            variants: list[str], lookup: Lookup, total: float, plot: Path) -> str:
    command = (f"nasopt bench darts-nb201 --dataset {args.dataset} --side {args.side} "
               f"--train-samples {args.train_samples} --channels {args.channels} --cells "
               f"{args.cells} --epochs {args.epochs} --batch-size {args.batch_size} --lr-w "
               f"{args.lr_w} --lr-alpha {args.lr_alpha} --beta {args.beta} --variants "
               f"{','.join(variants)} --seeds {args.seeds}")
    accs = lookup.sorted
    lines = [
        "# DARTS on NAS-Bench-201 and its collapse",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Wall time: {total:.0f} s for {len(runs)} searches (load average "
        f"{args.load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end: other jobs "
        "shared the cores).",
        "",
        "What was measured: first-order gradient search (nasopt.gradient.search.gradient_search) on the "
        f"NB201 mixed-op supernet, {args.channels} stem channels and {args.cells} cell(s) per "
        f"stage (NB201: 16 and 5), on **{data.name}** ({len(data.x_train)} train images for the "
        f"weights, {len(data.x_val)} validation images for the logits; the test split is not "
        "read). There is no CIFAR-10 offline: the search runs on this proxy task, and the "
        f"derived cells are then **looked up** in the NAS-Bench-201 CIFAR-10 table "
        f"({lookup.path.name}, column {lookup.metric}; {len(accs):,} cells, best "
        f"{accs[0]:.2f}%, mean {accs.mean():.2f}%). The table accuracy is what NB201's own "
        "CIFAR-10 training gives the cell, not an accuracy of the proxy search.",
        "",
        "Variants: `darts` = DARTS (softmax mixture, Adam on weights "
        f"lr {args.lr_w} and logits lr {args.lr_alpha}); `darts-` = the same with DARTS-'s "
        f"auxiliary skip `beta * x` on every mixed op, beta decaying linearly from {args.beta} "
        "to 0 (Chu et al., ICLR 2021); `gdas` = hard Gumbel-softmax samples with straight-through "
        f"gradients, temperature {GDAS_TAU[0]} -> {GDAS_TAU[1]} (Dong & Yang, CVPR 2019).",
        "",
        "Collapse rule (nasopt.spaces.nb201.collapse_of): a derived cell is *collapsed* when at "
        "least 3 of its 6 edges are skip_connect (DARTS+, Liang et al. 2019, stops DARTS once "
        "skip connections take over a cell) or at least 5 are parameter-free (none, "
        "skip_connect, avg_pool_3x3: at most one conv left). In the CIFAR-10 table the rule "
        "flags 4,345 of the 15,625 cells, whose mean accuracy is 80.1% against 89.7% for the "
        "others; the all-skip cell DARTS converges to in NB201's paper scores 54.30%. "
        "'parameter-free mass' is the probability on the 3 parameter-free ops averaged over "
        "the edges (0.60 at the uniform start).",
        "",
        "## Final cells",
        "",
    ]
    rows = []
    for r in runs:
        last = r["epochs"][-1]
        rows.append([r["variant"], r["seed"], f"`{last['cell']}`", f"{last['cifar10_acc']:.2f}",
                     last["rank"], f"{last['skip_edges']} / {last['free_edges']}",
                     f"{last['free_mass']:.2f}",
                     "yes" if last["collapsed"] else "no",
                     "-" if r["first_collapse"] is None else r["first_collapse"],
                     f"{r['seconds']:.0f}"])
    lines.append(table(["variant", "seed", "derived cell (NB201 string)",
                        "CIFAR-10 acc (table lookup) %", "rank of 15,625",
                        "skip / param-free edges", "param-free mass", "collapsed",
                        "first collapsed epoch", "s"], rows))
    lines += ["", "## Summary per variant", ""]
    srows = []
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        acc = np.array([r["epochs"][-1]["cifar10_acc"] for r in mine])
        srows.append([v, len(mine), f"{acc.mean():.2f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.2f}",
                      f"{np.mean([r['epochs'][-1]['free_mass'] for r in mine]):.2f}",
                      f"{sum(r['epochs'][-1]['collapsed'] for r in mine)} / {len(mine)}",
                      f"{sum(any(e['collapsed'] for e in r['epochs']) for r in mine)} / {len(mine)}"])
    lines.append(table(["variant", "seeds", "CIFAR-10 acc of the final cell (lookup), mean ± std",
                        "final param-free mass", "final cell collapsed",
                        "collapsed at some epoch"], srows))
    lines += ["", "## Per epoch (seed 0)", "",
              "Derived cell, its CIFAR-10 table accuracy, skip / parameter-free edges, "
              "parameter-free probability mass, collapse flag; epoch 0 is before any step "
              "(uniform logits: the argmax is the first op, `none`, everywhere; not judged)."]
    for v in variants:
        r = next(r for r in runs if r["variant"] == v)
        lines += ["", f"**{v}**", ""]
        lines.append(table(["epoch", "cell", "acc %", "skip/free", "free mass", "collapsed",
                            "beta" if v == "darts-" else "val loss"],
                           [[e["epoch"], f"`{e['cell']}`", f"{e['cifar10_acc']:.2f}",
                             f"{e['skip_edges']}/{e['free_edges']}", f"{e['free_mass']:.2f}",
                             {True: "yes", False: "no", None: "-"}[e["collapsed"]],
                             f"{e['beta']:.2f}" if v == "darts-" else
                             ("-" if e["val_loss"] is None else f"{e['val_loss']:.3f}")]
                            for e in r["epochs"]]))
    lines += ["", f"![per-edge op probabilities]({plot.name})", "",
              f"Per-edge op probabilities over epochs (seed 0 of each variant) and the "
              f"parameter-free mass of every seed: `{plot.name}`. Trajectories of every run: "
              f"`{Path(args.out).with_suffix('.json').name}`.", "",
              "Nondeterminism: none on CPU with these seeds (minibatch order, Gumbel noise and "
              "initialization are seeded); thread scheduling can change the last float bits.", ""]
    return "\n".join(lines)
