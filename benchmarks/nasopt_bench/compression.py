"""``nasopt bench compression``: the joint architecture + compression search against baselines.

At the same number of evaluations, compares the Pareto fronts (validation accuracy vs packed
bytes) of the joint search over architecture *and* compression genes against the two
baselines: (a) the published MNIST-1D CNN (3 conv layers of 25 channels + linear, 5,210
parameters) trained with its reference recipe, then uniformly quantized to 8 and 4 bits and
magnitude-pruned; (b) an architecture-only search (float32 weights), then each arch of its front
uniformly int8. Also reported, as a stronger comparison than the target names: an
architecture-only search scored at int8 during the search (compression genes fixed to 8 bits, no
sparsity, full rank). No distillation or fine-tuning: inherited supernet weights only.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import optuna
import torch
import torch.nn.functional as F
from optuna.study import StudyDirection
from torch import nn

from nasopt import api
from nasopt.compression.compress import (
    FLOAT_BITS, Policy, compress, reference_compression, uniform_compression,
)
from nasopt.core.data import FRESH_MNIST1D_SEED, check_extra_validation, extend_validation
from nasopt.search.evaluate import Evaluator
from nasopt.core.objectives import get_objectives, hypervolume
from nasopt.core.pareto import minimized, nondominated_mask, weakly_dominated
from nasopt.compression.packed import layer_size
from nasopt.search.loop import run_search
from nasopt.supernet.train import TrainConfig, correct, train_model
from nasopt_bench.report import machine, table
from nasopt_bench.setup import bench_config, conv1d_supernet

BUDGETS_KB = (2, 4, 8)
REFERENCE_KB = 16  # hypervolume reference point: accuracy 0 at 16 KB
TARGET_ACC_4KB = 0.92
#: a missed baseline point counts as significantly more accurate than the joint front below
#: this one-sided paired p-value (:func:`paired_p`)
ALPHA = 0.05
#: the bench's points are (validation accuracy, packed bytes, label)
DIRECTIONS = (StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE)


class ReferenceCNN(nn.Module):
    """The MNIST-1D repository's ConvBase: 3 conv layers of 25 channels + linear (5,210 params)."""

    def __init__(self, length: int = 40, classes: int = 10, channels: int = 25):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        with torch.no_grad():
            n = self._features(torch.zeros(1, 1, length)).shape[1]
        self.linear = nn.Linear(n, classes)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.relu(conv(x))
        return torch.flatten(x, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self._features(x))


def _objectives(points: list) -> np.ndarray:
    """(accuracy, size) of each (accuracy, size, label) point, both minimized."""
    return minimized([p[:2] for p in points], DIRECTIONS)


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Non-dominated (accuracy up, size down) points, by increasing size; of equal points,
    the first."""
    ordered = sorted(points, key=lambda p: (p[1], -p[0]))
    keep = nondominated_mask(_objectives(ordered), unique=True)
    return [p for p, k in zip(ordered, keep) if k]


def dominated_share(front: list, others: list) -> float:
    """Share of ``others`` weakly dominated by some point of ``front``."""
    if not others:
        return 0.0
    return int(weakly_dominated(_objectives(others), _objectives(front)).sum()) / len(others)


def misses(front: list, others: list) -> list[tuple[tuple, tuple | None]]:
    """The points of ``others`` that no point of ``front`` weakly dominates, each with the most
    accurate point ``front`` has at that size or less (None: nothing that small)."""
    out = []
    for point, covered in zip(others, weakly_dominated(_objectives(others), _objectives(front))):
        if not covered:
            fit = [p for p in front if p[1] <= point[1]]
            out.append((point, max(fit, key=lambda p: p[0]) if fit else None))
    return out


def discordant(baseline_right: torch.Tensor, joint_right: torch.Tensor) -> tuple[int, int]:
    """Of the samples two models classify (bool per sample: right), how many only the
    baseline gets right, and how many only the joint model does."""
    return (int((baseline_right & ~joint_right).sum()),
            int((~baseline_right & joint_right).sum()))


def paired_p(only_baseline: int, only_joint: int) -> float:
    """One-sided exact McNemar test (:func:`discordant`'s counts): the probability, were the
    two models equally accurate, that of the samples exactly one of them gets right the
    baseline would get at least ``only_baseline`` (small: the baseline is really more
    accurate)."""
    n = only_baseline + only_joint
    return sum(math.comb(n, k) for k in range(only_baseline, n + 1)) / 2 ** n


def _share(front: list, others: list) -> str:
    return f"{dominated_share(front, others):.0%} of {len(others)}"


def best_under(points: list, kb: float) -> float | None:
    fit = [a for a, s, _ in points if s <= kb * 1024]
    return max(fit) if fit else None


class Search(NamedTuple):
    """One search of the bench: its space (``joint``, ``float`` or ``int8``) and strategy."""

    space: str
    strategy: str

    @property
    def name(self) -> str:
        return f"{SPACE_NAMES[self.space]}, {self.strategy}"


#: what each space's front is: the joint search's; the architecture-only search's (float
#: weights), then each of its front's archs uniformly int8 (baseline b, what a user
#: of an architecture-only NAS tool deploys); the architecture-only search scored at int8 during
#: the search (int8-aware, a stronger baseline than the target's)
SPACE_NAMES = {"joint": "joint", "float": "arch-only then int8",
               "int8": "int8-aware arch-only"}
#: the space whose evaluator scores a front member of each space's search (the float search's
#: front members are its archs at int8)
EVALUATED_ON = {"joint": "joint", "float": "int8", "int8": "int8"}


def _study(space, evaluator, evaluations: int, seed: int, strategy: str) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=api.STRATEGIES[strategy].make_sampler(space, seed))
    run_search(study, space, evaluator, get_objectives(["accuracy", "size"]), evaluations,
               show_progress=False)
    return study


def _points(study: optuna.Study) -> list[tuple[float, float, str]]:
    return [(t.values[0], t.values[1], f"trial {t.number}") for t in study.trials
            if t.state == optuna.trial.TrialState.COMPLETE]


def then_int8(study: optuna.Study, int8_genes: dict, int8_evaluator
              ) -> list[tuple[float, float, str]]:
    """An architecture-only (float) search's front, each of its archs then uniformly int8:
    accuracy and packed bytes of the int8 model (one more evaluation per front member)."""
    trials = {f"trial {t.number}": t for t in study.trials}
    out = []
    for _, _, label in pareto(_points(study)):
        metrics = int8_evaluator({**trials[label].params, **int8_genes})
        out.append((metrics.accuracy, float(metrics.compressed_bytes), f"{label}, int8"))
    return out


def run(args: argparse.Namespace) -> Path:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    # before the supernet's training (``--set data.dataset=...`` overrides ``--dataset``)
    check_extra_validation(bench_config(args.set, args.dataset).data.dataset, args.extra_val)
    timings = {}
    t0 = time.perf_counter()
    cfg, data, space, supernet, _ = conv1d_supernet(args.run_dir, args.set, log, args.dataset)
    timings["supernet (trained or reused)"] = time.perf_counter() - t0
    split_val = len(data.y_val)
    # scored on more validation samples; the supernet (trained above) never sees them
    data = extend_validation(data, args.extra_val)
    n_val = len(data.y_val)

    genes = space.compression_genes()
    int8_genes = reference_compression(genes)
    spaces = {"joint": space,
              "float": space.restrict({g: [v] for g, v in uniform_compression(
                  genes, FLOAT_BITS).items()}),
              "int8": space.restrict({g: [v] for g, v in int8_genes.items()})}
    evaluators = {k: Evaluator(sp, supernet, data, cfg.eval.calib_samples)
                  for k, sp in spaces.items()}
    joint_strategy = args.joint_strategy
    strategies = [joint_strategy] + [s for s in ("nsga2",) if s != joint_strategy]
    # every space searched by NSGA-II (the baseline) and by the joint strategy itself, so what
    # the strategy gains on any space is not credited to the joint space
    searches = [Search(k, s) for k in spaces for s in strategies]
    runs: dict[Search, dict[int, list]] = {s: {} for s in searches}
    # the arch of each front member, by label, for the paired tests and the JSON
    archs: dict[Search, dict[int, dict[str, dict]]] = {s: {} for s in searches}
    front_evaluations = 0
    seeds = list(range(args.seed, args.seed + args.seeds))
    for seed in seeds:
        for search in searches:
            t0 = time.perf_counter()
            study = _study(spaces[search.space], evaluators[search.space], args.evaluations,
                           seed, search.strategy)
            params = {f"trial {t.number}": t.params for t in study.trials}
            if search.space == "float":
                runs[search][seed] = then_int8(study, int8_genes, evaluators["int8"])
                front_evaluations = max(front_evaluations, len(runs[search][seed]))
                params = {f"{k}, int8": {**v, **int8_genes} for k, v in params.items()}
            else:
                runs[search][seed] = _points(study)
            archs[search][seed] = {label: params[label]
                                   for *_, label in pareto(runs[search][seed])}
            timings[f"{search.name} search, seed {seed}"] = time.perf_counter() - t0
        log(f"seed {seed} done")
    joint = Search("joint", joint_strategy)
    baseline_b, int8_aware = Search("float", "nsga2"), Search("int8", "nsga2")

    t0 = time.perf_counter()
    torch.manual_seed(0)
    reference = ReferenceCNN(data.input_shape[-1], data.num_classes)
    recipe = TrainConfig(epochs=args.reference_epochs, batch_size=100, lr=1e-2, seed=0)
    train_model(reference, data.x_train, data.y_train, recipe)
    timings["reference CNN training"] = time.perf_counter() - t0
    baseline, cnn_right = [], {}
    for bits, sparsity in ((32, 0.0), (8, 0.0), (4, 0.0), (8, 0.5), (8, 0.75), (4, 0.5),
                           (8, 0.9)):
        # the baseline as the literature states it: global magnitude pruning after training
        model, stored = compress(reference, Policy(bits={"all": bits}, sparsity=sparsity,
                                                   pruning="magnitude"), lambda name: "all")
        size = sum(layer_size(layer) for layer in stored)
        label = f"{bits}-bit" + (f", {sparsity:.0%} pruned" if sparsity else "")
        cnn_right[label] = correct(model, data.x_val, data.y_val)
        baseline.append((cnn_right[label].sum().item() / n_val, float(size), label))
        log(f"reference CNN {baseline[-1][2]}: {baseline[-1][0]:.4f} at {size} B")
    reference_front = pareto(baseline)

    ref = REFERENCE_KB * 1024
    fronts = {search: {seed: pareto(points) for seed, points in r.items()}
              for search, r in runs.items()}
    # (joint search, baseline search) pairs compared point by point: each joint strategy against
    # both architecture-only baselines by NSGA-II, and the joint strategy against the same
    # baselines searched by itself
    pairs = [(Search("joint", j), Search(b, "nsga2")) for b in ("float", "int8")
             for j in strategies]
    pairs += [(joint, Search(b, joint_strategy)) for b in ("float", "int8")
              if joint_strategy != "nsga2"]
    shares = {(j, b): {seed: dominated_share(fronts[j][seed], fronts[b][seed]) for seed in seeds}
              for j, b in pairs}
    hv_rows = [[seed, *[f"{hypervolume([(a, s) for a, s, _ in fronts[search][seed]], ref):.4f}"
                        for search in searches]] for seed in seeds]
    share_rows = [[seed, *[f"{shares[p][seed]:.0%} of {len(fronts[p[1]][seed])}" for p in pairs]]
                  for seed in seeds]

    def right(search: Search | None, seed: int, label: str) -> torch.Tensor:
        """Which validation samples a front member (``search`` None: the reference CNN's)
        gets right."""
        if search is None:
            return cnn_right[label]
        return evaluators[EVALUATED_ON[search.space]].correct(archs[search][seed][label])

    # each point of a baseline's front the joint front misses, with the joint front's most
    # accurate point at that size or less and the paired test of the two (p 0: nothing that small)
    missed: dict[Search | None, dict[int, list]] = {}
    for base in (baseline_b, int8_aware, None):
        missed[base] = {}
        for seed in seeds:
            rows = missed[base][seed] = []
            for point, best in misses(fronts[joint][seed],
                                      reference_front if base is None else fronts[base][seed]):
                counts = None if best is None else discordant(right(base, seed, point[2]),
                                                              right(joint, seed, best[2]))
                rows.append((point, best, counts, 0.0 if counts is None else paired_p(*counts)))

    def miss_rows(base: Search | None) -> list[list]:
        return [[seed, f"{a:.4f}", int(size),
                 *(["none", "-", "-", "-"] if best is None else
                   [f"{best[0]:.4f}", f"{round((a - best[0]) * n_val)}",
                    f"{counts[0]} / {counts[1]}", f"{p:.3f}" if p >= 0.001 else "< 0.001"])]
                for seed in seeds for (a, size, _), best, counts, p in missed[base][seed]]

    def dominating(base: Search) -> list[int]:
        """Seeds on which the joint front weakly dominates every point of ``base``'s front and
        of the reference CNN's."""
        return [seed for seed in seeds if fronts[base][seed]
                and not missed[base][seed] and not missed[None][seed]]

    def none_significant(base: Search) -> list[int]:
        """Seeds on which no point of ``base``'s front or the reference CNN's is significantly
        more accurate than the joint front's best at its size or less."""
        return [seed for seed in seeds
                if all(p >= ALPHA for b in (base, None) for *_, p in missed[b][seed])]

    first = seeds[0]
    joint_label = f"joint (arch + compression), {joint_strategy}"
    b_label = "architecture-only search (NSGA-II), then uniform int8"
    cnn_label = "reference CNN, quantized/pruned"
    shown = {joint_label: fronts[joint][first], b_label: fronts[baseline_b][first],
             "int8-aware architecture-only search (NSGA-II)": fronts[int8_aware][first],
             cnn_label: reference_front}
    hv = {n: hypervolume([(a, s) for a, s, _ in f], ref) for n, f in shown.items()}
    rows = [[name, f"{hv[name]:.4f}",
             *[(f"{b:.4f}" if (b := best_under(front, kb)) is not None else "none")
               for kb in BUDGETS_KB]] for name, front in shown.items()]
    joint_front = fronts[joint][first]
    dom_rows = [[name, _share(joint_front, front)]
                for name, front in shown.items() if name != joint_label]
    best4 = best_under(joint_front, 4)
    target = dominating(baseline_b)
    stronger = dominating(int8_aware)
    verdict = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    count = lambda ok: f"on {len(ok)} of {len(seeds)} seeds"  # noqa: E731
    own_rows = ""
    if joint_strategy != "nsga2":
        for b in ("float", "int8"):
            own = [s for s, v in shares[(joint, Search(b, joint_strategy))].items() if v == 1.0]
            own_rows += (f"| (not a target) joint front dominates the {SPACE_NAMES[b]} front "
                         f"that `{joint_strategy}` finds, every seed | {count(own)} | - |\n")

    # calibration: on one space at equal budget, how often one search's front weakly dominates
    # every point of another's, by the same rule as the target
    controls = [] if joint_strategy == "nsga2" else [
        (Search(k, a), Search(k, b)) for k in ("float", "int8")
        for a, b in ((joint_strategy, "nsga2"), ("nsga2", joint_strategy))]
    control_rows = []
    for a, b in controls:
        per = [dominated_share(fronts[a][seed], fronts[b][seed]) for seed in seeds]
        control_rows.append([a.name, b.name, count([v for v in per if v == 1.0]),
                             f"{min(per):.0%}-{max(per):.0%}"])
    top = max(a for a, _, _ in joint_front)
    se_samples = (top * (1 - top) * n_val) ** 0.5  # binomial standard error, in samples

    plot = Path(args.out).with_suffix(".png")
    plot.parent.mkdir(parents=True, exist_ok=True)
    _plot(shown, runs[joint][first], runs[int8_aware][first], plot)
    command = "nasopt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    front_rows = [[f"{a:.4f}", int(s), label] for a, s, label in joint_front]
    miss_b, miss_int8 = miss_rows(baseline_b), miss_rows(int8_aware)
    miss_cnn = miss_rows(None)
    miss_header = ["seed", "baseline val acc", "baseline bytes", "joint best acc at <= bytes",
                   "gap (samples)", "only baseline / only joint right", "p (paired)"]
    noise = none_significant(baseline_b)
    extra = "" if not args.extra_val else (
        f"\nValidation: the split's {split_val} samples plus {args.extra_val} freshly generated by "
        f"MNIST-1D's generator (seed {FRESH_MNIST1D_SEED}; `--extra-val`), so that fronts are "
        f"told apart by more samples; the supernet is the one trained without them.")
    text = f"""# Compression benchmark: joint architecture + compression search on `{data.name}`

Command: `{command}`
Machine: {machine()}
Data: {data.summary()}. All accuracies are **validation** accuracy (the test split is not used).{extra}
Sizes are bytes of the packed file (`nasopt.compression.packed`: weights at their bit-width, per-channel
scales, biases, sparse masks/indices, header). The reference CNN's sizes use the same accounting
without the ~25-byte header. Models are evaluated with inherited supernet weights after BN
recalibration and compression; **no distillation or fine-tuning**.

Setup: supernet {cfg.supernet.describe(len(data.x_train))} (sandwich rule). Each search has {args.evaluations}
evaluations (seed {first} in the sections up to "Every seed", {args.seeds} seeds there):

- **joint** search over architecture and compression genes, by `{joint_strategy}`
  (`nasopt strategies`), and by NSGA-II;
- **baseline (a)**: the reference CNN trained with the reference recipe (Adam lr 1e-2, batch
  100, {args.reference_epochs} epochs, cosine decay), then quantized to 8 and 4 bits and
  magnitude-pruned;
- **baseline (b)**: architecture-only search (float32 weights: compression genes fixed to 32
  bits, dense, full rank; accuracy vs float32 bytes) by NSGA-II, **then uniform int8**: each arch
  of its Pareto front is quantized to int8 and evaluated again (at most {front_evaluations} more
  evaluations per search), the baseline's front is the non-dominated set of those int8 models.
  This is what a user of an architecture-only NAS tool (NNI, once-for-all) deploys;
- a **stronger baseline than the target names**: architecture-only search *scored at int8 during
  the search* (compression genes fixed to 8 bits, dense, full rank), by NSGA-II ("int8-aware").
  Not the target; reported so the joint search's gain is not overstated.

To keep a strategy's own gain from being credited to the joint space, "Every seed" also runs
both architecture-only searches with the joint strategy (`{joint_strategy}`).
Hypervolume reference point: accuracy 0 at {REFERENCE_KB} KB (sizes divided by {REFERENCE_KB}
KB, so 1.0 would be 100 % at 0 bytes).

![fronts]({plot.name})

Every front of every seed (accuracy, bytes, trial): `{plot.with_suffix(".json").name}`.

## Results

{table(["front", "hypervolume", *[f"best acc <= {kb} KB" for kb in BUDGETS_KB]], rows)}

Points of each other front weakly dominated by the joint front:

{table(["front", "dominated"], dom_rows)}

### Every seed

Hypervolume of each search's front, per seed ({args.evaluations} evaluations per search; the
sections above show seed {first}):

{table(["seed", *[s.name for s in searches]], hv_rows)}

The share of each architecture-only front (searched by NSGA-II, the baseline, and by the joint
strategy itself) weakly dominated by each joint front, per seed (column: joint front / other
front):

{table(["seed", *[f"{j.name} / {b.name}" for j, b in pairs]], share_rows)}

Points of baseline (b)'s front (architecture-only NSGA-II search, then int8) that the
`{joint_strategy}` front does not weakly dominate, per seed, with the joint front's best accuracy
at that size or less, the gap in validation samples (of {n_val}), and a paired test of the two
models on those samples: how many samples only one of them gets right, and the one-sided exact
McNemar p-value (the chance of a lead at least this large, were the two equally accurate; below
{ALPHA} the baseline point is significantly more accurate). The test takes both models as given,
though both points were selected, each the best of many evaluations, on these same samples; it
has little power at this size, so "not significant" means only that the sample cannot tell the
two apart.

{table(miss_header, miss_b) if miss_b else "none"}

The same for the reference CNN's points (baseline a):

{table(miss_header, miss_cnn) if miss_cnn else "none"}

The same for the int8-aware architecture-only NSGA-II front (not the target's baseline):

{table(miss_header, miss_int8) if miss_int8 else "none"}

For scale: the binomial standard error of a validation accuracy of {top:.4f} (the joint front's
best, seed {first}) on {n_val} samples is {se_samples:.1f} samples. How often, by the same rule,
one search's front dominates another's on the *same* space at the same budget (no joint space
involved):

{table(["front", "dominates every point of", "seeds", "share dominated"], control_rows)
 if control_rows else "(only with a joint strategy other than NSGA-II)"}

| target | value | verdict |
|---|---|---|
| joint front dominates both baselines (a: reference CNN; b: architecture-only NSGA-II search, then int8), every seed | {count(target)} (seed {first}: HV joint {hv[joint_label]:.4f} vs b {hv[b_label]:.4f} / a {hv[cnn_label]:.4f}) | {verdict(len(target) == len(seeds))} |
| (not the target's rule) no point of either baseline significantly more accurate (paired p < {ALPHA}) than the joint front at its size or less, nor smaller than every joint point, every seed | {count(noise)} | - |
| >= {TARGET_ACC_4KB:.0%} val accuracy at <= 4 KB | {best4 if best4 is None else f"{best4:.4f}"} | {verdict(best4 is not None and best4 >= TARGET_ACC_4KB)} |
| (not a target: stronger than baseline b) joint front dominates the reference CNN and the int8-aware architecture-only NSGA-II front, every seed | {count(stronger)} | - |
{own_rows}
## Joint front

{table(["val acc", "packed bytes", "trial"], front_rows)}

## Reference CNN points

{table(["val acc", "bytes", "policy"], [[f"{a:.4f}", int(s), lbl] for a, s, lbl in baseline])}

## Wall time

{table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()])}

Evaluations are cached per space across seeds (an arch evaluated by an earlier search is not
measured again), so later searches can take less time.
Nondeterminism: everything is seeded; floating-point results can differ across machines and
thread counts (a supernet trained on another machine can differ); wall times depend on the
machine's load.
"""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    # every front of every seed, so the report's comparisons can be redone without searching
    out.with_suffix(".json").write_text(json.dumps({
        "command": command, "evaluations": args.evaluations, "validation_samples": n_val,
        "extra_validation_samples": args.extra_val,
        "fronts": {search.name: {str(seed): [list(p) for p in front]
                                 for seed, front in fronts[search].items()}
                   for search in searches},
        "reference_cnn": [list(p) for p in baseline],
        # the arch (genes) of every front member, by search, seed and label
        "archs": {search.name: {str(seed): a for seed, a in archs[search].items()}
                  for search in searches}}, indent=1) + "\n")
    return out


def _plot(fronts: dict, joint: list, int8_aware: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([s / 1024 for _, s, _ in joint], [a for a, _, _ in joint], s=6, c="tab:blue",
               alpha=0.25, label="joint: all evaluations")
    ax.scatter([s / 1024 for _, s, _ in int8_aware], [a for a, _, _ in int8_aware], s=6,
               c="tab:orange", alpha=0.25, label="int8-aware arch-only: all evaluations")
    for (name, front), color in zip(fronts.items(), ("tab:blue", "tab:red", "tab:orange",
                                                     "tab:green")):
        ax.step([s / 1024 for _, s, _ in front], [a for a, _, _ in front], where="post",
                color=color, marker="o", ms=3, label=f"{name} front")
    for kb in BUDGETS_KB:
        ax.axvline(kb, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log")
    ticks = [0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("packed size (KB, log scale)")
    ax.set_ylabel("validation accuracy")
    lowest = min(a for front in fronts.values() for a, _, _ in front)
    ax.set_ylim(max(0.0, min(0.5, lowest - 0.05)), 1.0)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
