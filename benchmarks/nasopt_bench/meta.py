"""``nasopt bench meta``: few-shot transfer to held-out classes with a meta-learned
initialisation (Reptile, :mod:`nasopt.deploy.meta`) beside plain transfer and training from
scratch. Writes results/meta.md.

Per dataset (MNIST-1D with a small ``conv1d`` arch, Fashion-MNIST with a small ``mobilenet``
arch; one fixed arch each, with its compression policy), classes 0-4 are the source and classes
5-9 the target. Per seed:

1. the **source model**: the arch freshly initialised and trained supervised on the source
   classes with the existing training loop (``nasopt.deploy.distill.train_student`` without a
   teacher: labels, Adam + cosine, early stopping on the source's validation split), then put in
   its deployed structure (``compress``: BatchNorm folded, quantized), as an export holds it;
2. three initialisations of the target model, each the deployed structure re-headed to the 5
   target classes (``reheaded``) and prepared for QAT (``prepare_qat``), as ``nasopt finetune``
   does: (a) **meta**: Reptile (``MetaConfig``) on tasks drawn from the source classes' training
   split, from the source model (``--meta-init source``, the default) or from a fresh
   initialisation (``--meta-init scratch``); (b) **plain transfer**: the source model re-headed;
   (c) **scratch**: the arch freshly initialised;
3. for every shot count K and task draw (the K training samples per target class drawn by
   ``load_dataset(..., shots=K, shots_seed=draw)``), each initialisation adapted by the same
   fine-tuning recipe (``nasopt.deploy.finetune.finetune``: QAT, Adam + cosine, early stopping on
   the target classes' validation split) and scored once on the target classes' **test** split.

The meta initialisation does not depend on K or the draw: one per seed. Training and early
stopping read train and validation splits only; the test split is read once per adapted model.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nasopt import api
from nasopt.compression.compress import Policy, compress
from nasopt.core.data import Dataset, load_dataset
from nasopt.core.errors import NasoptError
from nasopt.deploy.distill import DistillConfig, train_student
from nasopt.deploy.finetune import FinetuneConfig, finetune, prepare_qat, reheaded
from nasopt.deploy.meta import MetaConfig, reptile
from nasopt.supernet.train import accuracy
from nasopt_bench.report import LoadSampler, machine, table

SOURCE, TARGET = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
INITS = ("meta", "transfer", "scratch")
PARTS = ("mnist1d", "fashion-mnist")

#: MNIST-1D: three conv stages of 16 channels (kernels 5, 5, 3), int8, dense
CONV1D_ARCH = {"s1.depth": 1, "s1.k": 5, "s1.width": 16, "s2.depth": 1, "s2.k": 5,
               "s2.width": 16, "s3.depth": 1, "s3.k": 3, "s3.width": 16, "s1.bits": 8,
               "s2.bits": 8, "s3.bits": 8, "head.bits": 8, "sparsity": 0.0, "head.rank": 1.0}
#: Fashion-MNIST: a small mobilenet (the transfer arch of `nasopt bench distill`), int8 with a
#: 4-bit head, dense, full rank (the bits / rank genes not named here are filled in)
MOBILENET_ARCH = {"stem.width": 16, "s1.depth": 1, "s1.k": 3, "s1.expand": 2, "s1.width": 16,
                  "s2.depth": 2, "s2.k": 3, "s2.expand": 3, "s2.width": 32, "s3.depth": 1,
                  "s3.k": 3, "s3.expand": 3, "s3.width": 48, "head.bits": 4, "sparsity": 0.0}


@dataclass(frozen=True)
class Part:
    dataset: str
    title: str
    space: str
    genes: dict
    source_epochs: int


PART = {"mnist1d": Part("mnist1d", "MNIST-1D", "conv1d", CONV1D_ARCH, 30),
        "fashion-mnist": Part("fashion-mnist", "Fashion-MNIST", "mobilenet", MOBILENET_ARCH, 10)}


def add_arguments(q: argparse.ArgumentParser) -> None:
    """The subcommand's options."""
    q.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated among "
                   f"{', '.join(PARTS)} (default both)")
    q.add_argument("--shots", default="1,5,10,50", help="training samples per target class, "
                   "comma-separated (default 1,5,10,50)")
    q.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1: source model, meta "
                   "initialisation, new heads, fine-tuning (default 3)")
    q.add_argument("--draws", type=int, default=3, help="task draws per seed and shot count: "
                   "which K samples per class (default 3)")
    q.add_argument("--meta-init", choices=("source", "scratch"), default="source",
                   help="Reptile starts from the supervised source model (default) or from a "
                   "fresh initialisation")
    q.add_argument("--meta-iterations", type=int, default=MetaConfig.iterations,
                   help=f"Reptile tasks per seed (default {MetaConfig.iterations})")
    q.add_argument("--epochs", type=int, default=50, help="fine-tuning epochs, every "
                   "initialisation (default 50; early stopping)")
    q.add_argument("--patience", type=int, default=10, help="fine-tuning early stopping "
                   "patience (default 10)")
    q.add_argument("--lr", type=float, default=3e-3, help="fine-tuning Adam learning rate, "
                   "cosine (default 0.003)")
    q.add_argument("--fashion-source-fraction", type=float, default=0.2,
                   help="stratified share of Fashion-MNIST's source classes' train and "
                   "validation splits the source model trains on (default 0.2)")
    q.add_argument("--fashion-target-fraction", type=float, default=0.1,
                   help="stratified share of the target classes' train and validation splits "
                   "(the shots are drawn from it; the test split stays whole; default 0.1)")
    q.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0: "
                   "torch's default)")
    q.add_argument("--out", default="results/meta.md", help="report path")


@dataclass
class Outcome:
    """One dataset's results: test accuracies per (init, K), in (seed, draw) order."""

    part: Part
    source: Dataset
    target: str  # a summary of the target data at the largest K
    arch: dict
    params: int
    meta_cfg: MetaConfig
    finetune_cfg: FinetuneConfig
    test: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    val: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    source_val: list[float] = field(default_factory=list)
    source_test: list[float] = field(default_factory=list)
    meta_loss: list[tuple[list[float], list[float]]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _check(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PART]
    if unknown or not parts:
        raise NasoptError(f"--parts: unknown {unknown}; choose among {', '.join(PARTS)}")
    try:
        shots = [int(k) for k in args.shots.split(",") if k]
    except ValueError:
        raise NasoptError(f"--shots {args.shots!r}: give comma-separated whole numbers, e.g. "
                          f"1,5,10,50") from None
    if not shots or min(shots) < 1:
        raise NasoptError(f"--shots must name whole numbers >= 1, got {args.shots!r}")
    for option in ("seeds", "draws", "meta_iterations", "epochs", "patience"):
        if getattr(args, option) < 1:
            raise NasoptError(f"--{option.replace('_', '-')} must be >= 1, got "
                              f"{getattr(args, option)}")
    for option in ("fashion_source_fraction", "fashion_target_fraction"):
        if not 0 < getattr(args, option) <= 1:
            raise NasoptError(f"--{option.replace('_', '-')} must lie in (0, 1], got "
                              f"{getattr(args, option)}")
    return parts, shots


def _arch(space, genes: dict):  # noqa: ANN001, ANN202
    """The arch of ``genes``, its unnamed compression genes at int8 and full rank."""
    full = dict(genes)
    for gene in space.genes:
        if gene.endswith(".bits"):
            full.setdefault(gene, 8)
        elif gene.endswith(".rank"):
            full.setdefault(gene, 1.0)
    return space.validate(full)


def _part(name: str, args: argparse.Namespace, shots: list[int], log) -> Outcome:  # noqa: ANN001
    part = PART[name]
    fashion = name == "fashion-mnist"
    source = load_dataset(name, classes=SOURCE,
                          fraction=args.fashion_source_fraction if fashion else 1.0)
    target_fraction = args.fashion_target_fraction if fashion else 1.0
    targets = {(k, d): load_dataset(name, classes=TARGET, fraction=target_fraction, shots=k,
                                    shots_seed=d) for k in shots for d in range(args.draws)}
    space = api.make_space(part.space, source)
    arch = _arch(space, part.genes)
    policy = Policy.from_arch(arch)
    meta_cfg = MetaConfig(iterations=args.meta_iterations)
    ft_cfg = FinetuneConfig(epochs=args.epochs, patience=args.patience, lr=args.lr)
    outcome = Outcome(part, source, targets[(max(shots), 0)].summary(), dict(arch),
                      sum(p.numel() for p in space.build(arch).parameters()), meta_cfg, ft_cfg)
    for key in ("source model", "Reptile", "adaptation"):
        outcome.seconds[key] = 0.0

    def prepared(deployed, seed):  # noqa: ANN001, ANN202
        model, new_space = reheaded(deployed, space, arch, len(TARGET), seed)
        return prepare_qat(model, policy, new_space.group_of, deployed=True, seed=seed), new_space

    for seed in range(args.seeds):
        t = time.perf_counter()
        torch.manual_seed(seed)
        model = space.build(arch)
        history = train_student(model, source, None, DistillConfig(
            epochs=part.source_epochs, patience=5, seed=seed))
        source_model = compress(model.eval(), policy, space.group_of)[0]
        outcome.source_val.append(history.best_val_accuracy)
        outcome.source_test.append(accuracy(source_model, source.x_test, source.y_test))
        torch.manual_seed(seed)
        fresh = compress(space.build(arch).eval(), policy, space.group_of)[0]
        outcome.seconds["source model"] += time.perf_counter() - t
        t = time.perf_counter()
        start = source_model if args.meta_init == "source" else fresh
        meta_model, _ = prepared(start, seed)
        meta_history = reptile(meta_model, source.x_train, source.y_train,
                               dataclasses.replace(meta_cfg, seed=seed))
        meta_state = {k: v.detach().clone() for k, v in meta_model.state_dict().items()}
        outcome.meta_loss.append((meta_history.loss_before, meta_history.loss_after))
        outcome.seconds["Reptile"] += time.perf_counter() - t
        log(f"{name} seed {seed}: source model val {history.best_val_accuracy:.4f}, Reptile "
            f"{meta_history.seconds:.0f} s, support loss after adaptation "
            f"{meta_history.loss_after[0]:.3f} -> {meta_history.loss_after[-1]:.3f}")
        inits = {"meta": (start, meta_state), "transfer": (source_model, None),
                 "scratch": (fresh, None)}
        t = time.perf_counter()
        for k in shots:
            for draw in range(args.draws):
                target = targets[(k, draw)]
                for init, (deployed, state) in inits.items():
                    model, new_space = prepared(deployed, seed)
                    if state is not None:
                        model.load_state_dict(state)
                    final, _, adapted = finetune(model, policy, new_space.group_of, target,
                                                 dataclasses.replace(ft_cfg, seed=seed))
                    outcome.val.setdefault((init, k), []).append(adapted.best_val_accuracy)
                    outcome.test.setdefault((init, k), []).append(
                        accuracy(final, target.x_test, target.y_test))
            log(f"{name} seed {seed} K={k}: " + ", ".join(
                f"{init} {statistics.mean(outcome.test[(init, k)][-args.draws:]):.4f}"
                for init in INITS))
        outcome.seconds["adaptation"] += time.perf_counter() - t
    return outcome


def _spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return (f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f} "
            f"({100 * min(values):.1f}–{100 * max(values):.1f})")


def _paired(a: list[float], b: list[float]) -> tuple[float, float, int]:
    """Mean paired difference a - b (points), its 95 % half-width (2 sd / sqrt n), wins of a."""
    d = [100 * (x - y) for x, y in zip(a, b)]
    half = 2 * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("inf")
    return statistics.mean(d), half, sum(x > 0 for x in d)


def _word(mean: float, half: float) -> str:
    if mean - half > 0:
        return "better"
    if mean + half < 0:
        return "worse"
    return "no clear difference"


def _verdict(o: Outcome, shots: list[int]) -> str:
    lines = []
    for k in shots:
        meta = o.test[("meta", k)]
        parts = []
        for other in ("transfer", "scratch"):
            mean, half, wins = _paired(meta, o.test[(other, k)])
            parts.append(f"vs {'plain transfer' if other == 'transfer' else 'scratch'} "
                         f"**{_word(mean, half)}** ({mean:+.1f} ± {half:.1f} points, meta "
                         f"higher in {wins} of {len(meta)} runs)")
        lines.append(f"- K = {k}: meta " + "; ".join(parts) + ".")
    return "\n".join(lines)


def _summary(outcomes: list[Outcome], shots: list[int]) -> str:
    lines = []
    for o in outcomes:
        parts = []
        for other in ("transfer", "scratch"):
            cells = []
            for k in shots:
                mean, half, _ = _paired(o.test[("meta", k)], o.test[(other, k)])
                cells.append(f"K={k} {_word(mean, half)} ({mean:+.1f})")
            parts.append(f"vs {'plain transfer' if other == 'transfer' else 'scratch'}: "
                         + ", ".join(cells))
        lines.append(f"- {o.part.title}, meta " + "; ".join(parts) + ".")
    return "\n".join(lines)


def _section(o: Outcome, shots: list[int], args: argparse.Namespace) -> str:
    p = o.part
    runs = args.seeds * args.draws
    rows = [[k, *[_spread(o.test[(init, k)]) for init in INITS]] for k in shots]
    val_rows = [[k, *[f"{100 * statistics.mean(o.val[(init, k)]):.1f}" for init in INITS]]
                for k in shots]
    losses = "; ".join(f"seed {s}: {before[0]:.3f} -> {before[-1]:.3f} before, "
                       f"{after[0]:.3f} -> {after[-1]:.3f} after"
                       for s, (before, after) in enumerate(o.meta_loss))
    reduced = (f" The source model trains on a stratified {args.fashion_source_fraction:g} of "
               f"the source classes' train and validation splits, and the target data is a "
               f"stratified {args.fashion_target_fraction:g} of the target classes' train "
               f"and validation splits (the shots are drawn from it, early stopping reads its "
               f"validation part; the test split is whole), to keep the bench short."
               if p.dataset == "fashion-mnist" else "")
    meta, ft = o.meta_cfg, o.finetune_cfg
    start = ("supervised source model" if args.meta_init == "source" else
             "fresh initialisation (not the source model)")
    return f"""## {p.title}: classes 0-4 → 5-9

Source: {o.source.summary()}. Target at K = {max(shots)}: {o.target}.{reduced}
Arch ({p.space}, {o.params} float parameters; its compression policy applies throughout):
`{o.arch}`.

- Source model: trained from scratch on the source classes, <= {p.source_epochs} epochs
  (patience 5), then deployed (BatchNorm folded, quantized): validation accuracy
  {_spread(o.source_val)} %, test accuracy {_spread(o.source_test)} % on the source classes.
- Meta: Reptile from the {start}, {meta.iterations} tasks of 5 classes x {meta.shots} shots,
  {meta.inner_steps} Adam steps (beta1 = 0) at {meta.inner_lr:g} per task, outer step
  {meta.meta_lr:g} decaying linearly to 0. Mean support loss at the first inner step and after
  the last, first tenth -> last tenth of the tasks: {losses}.
- Fine-tuning (every initialisation): QAT, <= {ft.epochs} epochs, Adam lr {ft.lr:g} with a
  cosine schedule, batch {ft.batch_size}, early stopping on the target classes' validation
  split (patience {ft.patience}).
- Time: source models {o.seconds['source model']:.0f} s, Reptile {o.seconds['Reptile']:.0f} s,
  adaptation {o.seconds['adaptation']:.0f} s.

**Test accuracy (%)** of the adapted, deployed model on the target classes' test split: mean ±
sd (min–max) over {runs} runs ({args.seeds} seeds x {args.draws} task draws).

{table(["K (shots per class)", "meta (Reptile)", "plain transfer", "scratch"], rows)}

Validation accuracy (%, the early-stopping split, mean):

{table(["K", "meta", "plain transfer", "scratch"], val_rows)}

Verdict per K (paired by seed and draw; "better" / "worse" when the mean paired difference ± 2
sd / √n excludes 0):

{_verdict(o, shots)}
"""


def run(args: argparse.Namespace) -> Path:
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    parts, shots = _check(args)  # before any training
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with LoadSampler() as load:
        outcomes = [_part(name, args, shots, log) for name in parts]
    sections = "\n".join(_section(o, shots, args) for o in outcomes)
    command = "nasopt " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"""# Few-shot transfer: meta-learned initialisation vs plain transfer vs scratch

Command: `{command}`
Machine: {machine()}; {load.note()}
Bench wall time: {time.perf_counter() - start:.0f} s.

Classes 0-4 of each dataset are the source, classes 5-9 the held-out target. Three
initialisations of one fixed arch per dataset are adapted to K training samples per target class
by the same fine-tuning recipe: **meta** (Reptile, `nasopt.deploy.meta`, on tasks drawn from
the source classes' training split), **plain transfer** (the supervised source model
re-headed) and **scratch** (the arch freshly initialised). Every target model is the deployed
structure re-headed to 5 classes and trained quantization-aware, as `nasopt finetune` (and
`nasopt finetune --meta`) does. Accuracies are on the TEST split of the target classes,
measured once per adapted model; training, meta-training and early stopping read train and
validation splits only. Early stopping reads the whole validation split of the target classes
(hundreds of samples), for every initialisation alike: a few-shot user with K samples per
class would have fewer. Remaining nondeterminism: thread scheduling in PyTorch's CPU kernels
(the same machine and thread count reproduce the numbers).

Meta starts from the {"supervised source model" if args.meta_init == "source" else
"fresh initialisation"} (`--meta-init {args.meta_init}`). Reptile's settings are
`MetaConfig`'s defaults, chosen in exploratory runs (not part of this command) on MNIST-1D at 5
shots by the target classes' validation accuracy: from the source model, larger steps (outer
step 1.0, inner learning rate 0.001-0.01) moved its features away and lost 10-20 points to plain
transfer; Reptile from a fresh initialisation (300-1000 tasks, inner learning rate 0.005, outer
step 1.0) beat scratch by about 5-14 points but stayed well below plain transfer, so meta starts
from the source model (`--meta-init scratch` runs the other). Fashion-MNIST uses the same
settings, untuned. **Scratch** is weaker than it needs to be: like every initialisation here
it is the deployed structure, BatchNorm folded (here at its initial statistics), so it trains
without BatchNorm; on the mobilenet several scratch runs never leave chance (20 %), as the
minimum column shows. A scratch model trained in float with BatchNorm first (as `nasopt bench
distill` does) would score higher; the comparison that matters for the meta initialisation is
the one with plain transfer.

Summary (paired differences of test accuracy in points; rule below each table):

{_summary(outcomes, shots)}

{sections}""")
    return out
