"""``nasopt bench supernet``: how good and how fast is the supernet as an evaluator?

Measures supernet training time, subnet evaluation throughput (extract + BN recalibration +
validation pass + counting), and the Kendall tau between inherited-weight validation accuracy and
the validation accuracy of the same archs trained stand-alone from scratch with one fixed recipe.
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import kendalltau, spearmanr

from nasopt import api
from nasopt.core.errors import NasoptError
from nasopt.search.evaluate import Evaluator
from nasopt.supernet.elastic import train_supernet
from nasopt.supernet.train import TrainConfig, accuracy, train_model
from nasopt_bench.report import LoadSampler, machine, table

TAU_TARGET = 0.6
THROUGHPUT_TARGET = 20.0
THROUGHPUT_ARCHS = 200


def spread_archs(space, n: int, seed: int = 0) -> list:
    if n < 4:
        raise NasoptError("--archs must be at least 4 (a rank correlation needs several; the report uses 16)")
    """``n`` distinct archs spread over the space: evenly spaced quantiles of parameter count
    among 2000 random draws, plus the smallest and largest arch."""
    rng = random.Random(seed)
    ends = (space.smallest(), space.largest())
    pool = {a.key: a for a in (space.sample(rng) for _ in range(2000))}
    for arch in ends:
        pool.pop(arch.key, None)
    ranked = sorted(pool.values(), key=lambda a: sum(p.numel() for p in space.build(a).parameters()))
    middle = [ranked[round(i * (len(ranked) - 1) / (n - 3))] for i in range(n - 2)]
    return [ends[0], *middle, ends[1]]


def train_fresh(space, data, recipes: dict, log) -> dict:  # noqa: ANN001
    """Each recipe's supernet trained from scratch (seed 0) in a temporary folder, one after the
    other: name -> (supernet, seconds). Fresh training: the time is the point."""
    trained = {}
    for name, recipe in recipes.items():
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            start = time.perf_counter()
            supernet, _ = train_supernet(space, data, recipe, Path(tmp), log=log)
            trained[name] = (supernet, time.perf_counter() - start)
    return trained


def _ranking(inherited: list[float], standalone: list[float], se: float) -> dict:
    """Kendall tau, Spearman rho, and the share of clearly separated pairs ordered alike."""
    n = len(inherited)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    separated = [(i, j) for i, j in pairs if abs(standalone[i] - standalone[j]) > 2 * se]
    agree = sum((inherited[i] - inherited[j]) * (standalone[i] - standalone[j]) > 0
                for i, j in separated)
    return {"tau": float(kendalltau(inherited, standalone).statistic),
            "rho": float(spearmanr(inherited, standalone).statistic),
            "pairs": len(pairs), "separated": len(separated),
            "agree": agree / max(1, len(separated))}


def run(args: argparse.Namespace) -> Path:
    if args.joint:
        from nasopt_bench import supernet_joint
        return supernet_joint.run(args)
    if args.archs is None:
        args.archs = 16
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = [f"data.dataset={args.dataset}", f"search.space={args.space}", *args.set]
    cfg = api.load_config(None, overrides)
    data = api.load_data(cfg)
    space = api.make_space(args.space, data).architecture_space()  # architecture genes only
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    # the recipe under test, and those it is compared with (same archs, same references)
    recipes = {"this recipe": cfg.supernet}
    for spec in args.compare:
        other = api.load_config(None, [*overrides, *spec.split()]).supernet
        recipes[spec] = other
    n_train = len(data.x_train)
    load = LoadSampler().start()
    trained = train_fresh(space, data, recipes, log)
    supernet, train_seconds = trained["this recipe"]

    rng = random.Random(1)
    archs = list({a.key: a for a in (space.sample(rng) for _ in range(THROUGHPUT_ARCHS))}.values())
    evaluator = Evaluator(space, supernet, data, cfg.eval.calib_samples)
    start = time.perf_counter()
    for arch in archs:
        evaluator(arch)
    throughput = len(archs) / (time.perf_counter() - start)
    evaluators = {name: Evaluator(space, sn, data, cfg.eval.calib_samples)
                  for name, (sn, _) in trained.items()}
    evaluators["this recipe"] = evaluator

    picked = spread_archs(space, args.archs)
    if args.standalone_seeds < 1:
        raise NasoptError("--standalone-seeds must be at least 1")
    seeds = list(range(args.standalone_seeds))
    standalone_recipes = [TrainConfig(epochs=args.standalone_epochs, batch_size=100, lr=1e-2,
                                      seed=seed) for seed in seeds]
    recipe = standalone_recipes[0]
    # stand-alone results do not depend on the supernet: cache them across benchmark runs
    cache_file = Path(args.run_dir) / "bench" / "standalone.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    rows, standalone = [], []
    inherited: dict[str, list[float]] = {name: [] for name in recipes}
    for i, arch in enumerate(picked):
        m = evaluator(arch)
        t0 = time.perf_counter()
        accs = []
        for r in standalone_recipes:
            key = f"{data.fingerprint}/{r}/{arch.key}"
            if key not in cache:
                torch.manual_seed(r.seed)
                model = space.build(arch)
                train_model(model, data.x_train, data.y_train, r)
                cache[key] = accuracy(model, data.x_val, data.y_val)
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                cache_file.write_text(json.dumps(cache, indent=1))
            accs.append(cache[key])
        acc = sum(accs) / len(accs)
        for name in recipes:
            inherited[name].append(evaluators[name](arch).accuracy)
        log(f"[{i + 1}/{len(picked)}] params {m.params}: inherited {m.accuracy:.4f}, "
            f"stand-alone {acc:.4f} ({time.perf_counter() - t0:.1f} s)")
        standalone.append(acc)
        rows.append([i + 1, m.params, m.macs,
                     *(round(inherited[name][-1], 4) for name in recipes), round(acc, 4),
                     ", ".join(f"{k}={v}" for k, v in arch.items())])
    load.stop()
    # How much of the rank disagreement is among archs the reference cannot tell apart: the
    # standard error of a stand-alone accuracy on the validation split is about
    # sqrt(p (1 - p) / n_val / seeds); pairs closer than two of those are a coin toss.
    se = (0.96 * 0.04 / len(data.y_val) / len(seeds)) ** 0.5
    ranks = {name: _ranking(inherited[name], standalone, se) for name in recipes}
    tau, rho = ranks["this recipe"]["tau"], ranks["this recipe"]["rho"]
    separated, pairs = ranks["this recipe"]["separated"], ranks["this recipe"]["pairs"]
    agree = ranks["this recipe"]["agree"]

    verdict = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    command = "nasopt bench supernet " + " ".join(
        shlex.quote(a) for a in sys.argv[3:]) if sys.argv[1:3] == ["bench", "supernet"] else ""

    def length(recipe) -> str:  # noqa: ANN001
        r = recipe.resolve(n_train)
        return (f"{r.epochs} epochs = {r.epochs * recipe.steps_per_epoch(n_train)} steps: "
                f"{r.warmup_epochs} largest-only, then sandwich rule with {r.n_random} random "
                f"subnets + in-place distillation")

    comparison = ""
    if len(recipes) > 1:
        crow = [[f"`{name}`" if name != "this recipe" else "this recipe (`--set` "
                 f"{' '.join(args.set) or 'none: the default'})", length(r),
                 f"{trained[name][1]:.1f} s", f"{ranks[name]['tau']:.3f}",
                 f"{ranks[name]['rho']:.3f}", f"{ranks[name]['agree']:.1%}",
                 f"{sum(inherited[name]) / len(picked):.4f}"]
                for name, r in recipes.items()]
        comparison = f"""
## Recipes side by side

The same {len(picked)} archs and the same stand-alone references; each supernet trained
fresh in this run (seed 0), one after the other.

{table(["recipe", "length", "training", "Kendall tau", "Spearman rho", "separated pairs alike", "mean inherited val acc"], crow)}
"""
    sc = cfg.supernet
    text = f"""# Supernet benchmark: `{space.name}` on `{data.name}`

Command: `{command or f'nasopt bench supernet --space {args.space} --dataset {args.dataset}'}`
Machine: {machine()}
Load: {load.note()}
Data: {data.summary()} (inherited and stand-alone accuracy both on the validation split; the
test split is not used).

## Results

| measure | value | target |
|---|---|---|
| supernet training ({length(sc)}; {sc.describe(n_train).split('(', 1)[1].split(')')[0]}) | {train_seconds:.1f} s | — |
| evaluation throughput ({len(archs)} distinct random archs; extract + BN recalibration on {cfg.eval.calib_samples} train samples + validation pass + params/MACs count) | {throughput:.1f} archs/s | >= {THROUGHPUT_TARGET:.0f} archs/s: {verdict(throughput >= THROUGHPUT_TARGET)} |
| Kendall tau, inherited vs stand-alone val accuracy ({len(picked)} archs) | {tau:.3f} | >= {TAU_TARGET}: {verdict(tau >= TAU_TARGET)} |
| Spearman rho (same archs) | {rho:.3f} | — |
| pairs ordered alike, among the {separated} of {pairs} pairs whose stand-alone accuracies differ by more than 2 standard errors ({2 * se:.3%}) | {agree:.1%} | — |
{comparison}
Stand-alone recipe (one for all archs): Adam, lr {recipe.lr} with cosine decay, batch
{recipe.batch_size}, {recipe.epochs} epochs; the stand-alone accuracy is the mean over seeds
{seeds} (initialisation and minibatch order), which lowers the noise of the reference ranking. Archs: the smallest, the largest,
and evenly spaced quantiles of parameter count among 2000 random draws.

## Archs

{table(["#", "params", "MACs", *(("inherited val acc" if n == "this recipe" else f"inherited, `{n}`") for n in recipes), "stand-alone val acc", "arch"], rows)}

Nondeterminism: training and sampling are seeded; PyTorch CPU kernels may still differ in the last
bits between machines and thread counts, and the timings depend on the machine's load.
"""
    out = Path(args.out or f"results/supernet_{data.name.replace('.', '_')}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out
