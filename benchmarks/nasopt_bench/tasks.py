"""``nasopt bench tasks``: a user's own task on real offline data (scikit-learn's bundled data
sets), the tiny MLP space of examples/tiny_mlp_space.py, against scikit-learn's linear models;
writes results/tasks.md.

1. **Regression** (scikit-learn's diabetes data, written to a .npz with ``task="regression"``
   in the run folder; features and target standardized with the training split's mean and sd):
   per seed a supernet trained and searched on ``mae,size``; the best trial's deployed model
   (``nasopt.api.best_trial``, ``Evaluator.compressed``) scored once on the test split (MAE,
   RMSE in the target's units), against always answering the training mean and Ridge
   regression (alpha chosen on the validation split; float32 and int8 weights).
2. **Imbalanced classification** (scikit-learn's digits with class 0 kept at about 5 % of the
   samples): per seed one supernet, searched twice with the same budget, on ``f1,size`` and on
   ``accuracy,size``; each pick's test macro-F1, balanced accuracy and accuracy, the paired
   comparison of the two picks' test macro-F1, against LogisticRegression (C chosen on the
   validation split's macro-F1; plain and ``class_weight="balanced"``).

The searches read the train split (weights) and the validation split (scores); the test split
is read only to score the picks and the baselines at the end. Sizes: nasopt's packed file
(header and CRC included); a baseline's parameters as float32 (int8: 1 byte per weight plus a
float32 scale), no file header.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import torch

from nasopt import api
from nasopt.compression.packed import fixed_size
from nasopt.core.data import load_dataset
from nasopt.core.errors import NasoptError
from nasopt_bench.report import LoadSampler, machine, table

ROOT = Path(__file__).resolve().parents[2]
SPACE = f"{ROOT / 'examples' / 'tiny_mlp_space.py'}:TinyMLPSpace"
PARTS = ("regression", "imbalanced")
RIDGE_ALPHAS = tuple(10.0 ** k for k in range(-3, 4))
LOGISTIC_CS = (0.01, 0.1, 1.0, 10.0, 100.0)
FLOAT32 = 4


def add_arguments(q: argparse.ArgumentParser) -> None:
    """The subcommand's options (cli.py calls this)."""
    q.add_argument("--seeds", type=int, default=20, help="seeds per part: supernet and search "
                   "seed (default 20; the data split is the same for every seed)")
    q.add_argument("--trials", type=int, default=40, help="trials per search (default 40)")
    q.add_argument("--epochs", type=int, default=200, help="supernet epochs (default 200; "
                   "the first fifth trains the largest subnet alone)")
    q.add_argument("--strategy", default="tpe", help="sampling strategy (default tpe)")
    q.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated among "
                   f"{', '.join(PARTS)}")
    q.add_argument("--zero-share", type=float, default=0.05, help="share of class 0 in the "
                   "imbalanced digits (default 0.05)")
    q.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0: "
                   "torch's default)")
    q.add_argument("--out", default="results/tasks.md", help="report path")
    q.add_argument("--run-dir", default="runs/tasks", help="data files, supernets and studies, "
                   "one folder per part (which must not exist yet: a re-run would reuse their "
                   "supernets and trials)")


# ---- data ------------------------------------------------------------------------------------
@dataclass
class Prepared:
    path: Path
    note: str  # what was done to the data, for the report
    y_scale: float = 1.0  # target sd of the training split (regression): back to target units


def diabetes_npz(folder: Path) -> Prepared:
    """scikit-learn's diabetes data as a regression .npz, standardized with the training split's
    statistics (the split is nasopt's seeded random split, which depends on the number of
    samples only, so the standardized file splits the same way)."""
    from sklearn.datasets import load_diabetes
    d = load_diabetes()
    x, y = d.data.astype(np.float64), d.target.astype(np.float64)
    raw = folder / "diabetes_raw.npz"
    np.savez(raw, x=x.astype(np.float32), y=y.astype(np.float32), task="regression")
    split = load_dataset(str(raw))
    xt = split.x_train.double().numpy().reshape(len(split.x_train), -1)
    yt = split.y_train.double().numpy().ravel()
    mx, sx, my, sy = xt.mean(0), xt.std(0), float(yt.mean()), float(yt.std())
    path = folder / "diabetes.npz"
    np.savez(path, x=((x - mx) / sx).astype(np.float32), y=((y - my) / sy).astype(np.float32),
             task="regression")
    data = load_dataset(str(path))
    if not np.allclose(data.y_test.double().numpy().ravel() * sy + my,
                       split.y_test.double().numpy().ravel(), atol=1e-3):
        raise NasoptError("the standardized diabetes file split differently from the raw one")
    raw.unlink()
    return Prepared(path, f"scikit-learn's diabetes data ({len(x)} patients, {x.shape[1]} "
                    f"features, target: disease progression after one year, {y.min():.0f}-"
                    f"{y.max():.0f}); features and target standardized with the training "
                    f"split's mean and sd (target mean {my:.1f}, sd {sy:.1f}); errors are "
                    f"reported in the target's units", sy)


def imbalanced_digits_npz(folder: Path, share: float) -> Prepared:
    """scikit-learn's digits (pixels / 16) with class 0 kept at ``share`` of the samples: that
    many zeros drawn at random (seed 0), every sample of classes 1-9."""
    from sklearn.datasets import load_digits
    d = load_digits()
    zeros, other = np.flatnonzero(d.target == 0), np.flatnonzero(d.target != 0)
    n0 = round(len(other) * share / (1 - share))
    if not 2 <= n0 <= len(zeros):
        raise NasoptError(f"--zero-share {share} keeps {n0} of {len(zeros)} zeros; give a share "
                          f"that keeps 2-{len(zeros)}")
    keep = np.sort(np.concatenate([other, np.random.default_rng(0).choice(zeros, n0, False)]))
    path = folder / "digits_imbalanced.npz"
    np.savez(path, x=(d.images[keep] / 16.0).astype(np.float32), y=d.target[keep])
    return Prepared(path, f"scikit-learn's digits (8x8 images, pixels / 16), class 0 cut to "
                    f"{n0} of its {len(zeros)} samples (drawn at random, seed 0), classes 1-9 "
                    f"whole: {len(keep)} samples, class 0 {n0 / len(keep):.2%}")


# ---- searches -----------------------------------------------------------------------------------
@dataclass
class Pick:
    """One search's best trial, scored once on the test split."""
    seed: int
    objectives: str
    trial: int
    arch: dict
    size: int
    overhead: int  # the packed file's header and CRC
    val: dict  # the study's validation scores of the pick
    test: dict
    supernet_s: float
    search_s: float
    check: dict  # the supernet check (nasopt.search.sanity)
    warnings: list[str]
    #: the best trial (by the study's quality metric) within a baseline's size, scored on test
    within: dict = field(default_factory=dict)


def search(prepared: Prepared, folder: Path, objectives: tuple[str, str], seed: int,
           args: argparse.Namespace) -> tuple[optuna.Study, float, float, dict, list[str]]:
    """One search; the study, supernet and search seconds, the supernet check, warnings."""
    warmup = max(args.epochs // 5, 1) if args.epochs > 1 else 0
    cfg = api.load_config(None, [
        f"data.dataset={json.dumps(str(prepared.path))}", f"search.space={json.dumps(SPACE)}",
        f"search.objectives={json.dumps(list(objectives))}", f"search.trials={args.trials}",
        f"search.strategy={json.dumps(args.strategy)}", f"search.seed={seed}",
        f"search.study={json.dumps(f'{objectives[0]}-seed{seed}')}",
        f"supernet.epochs={args.epochs}", f"supernet.warmup_epochs={warmup}",
        f"supernet.seed={seed}", f"run_dir={json.dumps(str(folder))}", 'device="cpu"'])
    start = time.perf_counter()
    outcome = api.search(cfg, show_progress=False)
    total = time.perf_counter() - start
    return (outcome.study, outcome.supernet_s, total - outcome.supernet_s, outcome.sanity,
            list(outcome.warnings))


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(x).double().numpy()


def regression_scores(predicted: np.ndarray, y: np.ndarray, scale: float) -> dict:
    err = (predicted.ravel() - y.ravel()) * scale
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean()))}


def class_scores(predicted: np.ndarray, y: np.ndarray) -> dict:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes never predicted
        return {"f1": float(f1_score(y, predicted, average="macro", zero_division=0)),
                "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
                "accuracy": float(accuracy_score(y, predicted)),
                "recall0": float(np.mean(predicted[y == 0] == 0)) if (y == 0).any() else 0.0}


def score_pick(study: optuna.Study, trial: int, prepared: Prepared, regression: bool
               ) -> tuple[dict, int, int]:
    """The deployed model of ``trial`` (as the search scored it) on the test split: its scores,
    packed size and the packed format's fixed bytes."""
    evaluator, data = api.rebuild(study)
    arch = study.trials[trial].params
    model, _ = evaluator.compressed(arch)
    out = _outputs(model, data.x_test)
    y = data.y_test.numpy()
    test = (regression_scores(out, y, prepared.y_scale) if regression
            else class_scores(out.argmax(1), y))
    size = int(study.trials[trial].user_attrs["metrics"]["compressed_bytes"])
    return test, size, fixed_size(evaluator.space, evaluator.space.validate(arch))


def quality_of(study: optuna.Study) -> tuple[str, bool]:
    """The study's quality metric and whether higher is better."""
    name = study.user_attrs["nasopt"]["objectives"][0]
    return name, name not in ("mae", "rmse")


def best_within(study: optuna.Study, limit: int) -> int | None:
    """The best completed trial (the study's quality metric on validation; ties: smaller) whose
    packed size is at most ``limit`` bytes."""
    metric, higher = quality_of(study)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
            and t.user_attrs["metrics"]["compressed_bytes"] <= limit]
    if not done:
        return None
    sign = -1 if higher else 1
    return min(done, key=lambda t: (sign * t.user_attrs["metrics"][metric],
                                    t.user_attrs["metrics"]["compressed_bytes"])).number


def run_pick(prepared: Prepared, folder: Path, objectives: tuple[str, str], seed: int,
             args: argparse.Namespace, regression: bool, limit: int) -> Pick:
    study, supernet_s, search_s, check, notes = search(prepared, folder, objectives, seed, args)
    best = api.best_trial(study)
    test, size, overhead = score_pick(study, best, prepared, regression)
    metrics = study.trials[best].user_attrs["metrics"]
    names = ("mae", "rmse") if regression else ("f1", "balanced_accuracy", "accuracy")
    val = {k: float(metrics[k]) * (prepared.y_scale if regression else 1) for k in names}
    pick = Pick(seed, ",".join(objectives), best, dict(study.trials[best].params), size,
                overhead, val, test, supernet_s, search_s, check, notes)
    small = best_within(study, limit)
    smallest = min(t.user_attrs["metrics"]["compressed_bytes"] for t in study.trials
                   if t.state == optuna.trial.TrialState.COMPLETE)
    pick.within = {"limit": limit, "smallest": int(smallest)}
    if small is not None:
        test_small, size_small, _ = score_pick(study, small, prepared, regression)
        pick.within.update(trial=small, size=size_small, test=test_small)
    return pick


# ---- baselines ----------------------------------------------------------------------------------
def _flat(x: torch.Tensor) -> np.ndarray:
    return x.double().numpy().reshape(len(x), -1)


def regression_baselines(prepared: Prepared) -> list[dict]:
    """The training mean, Ridge (alpha on validation MAE) at float32 and with int8 weights."""
    from sklearn.linear_model import Ridge
    data = load_dataset(str(prepared.path))
    x, xv, xt = _flat(data.x_train), _flat(data.x_val), _flat(data.x_test)
    y, yv, yt = (a.double().numpy().ravel() for a in (data.y_train, data.y_val, data.y_test))
    s = prepared.y_scale
    rows = [{"model": "always the training mean", "size": FLOAT32,
             "val": regression_scores(np.full_like(yv, y.mean()), yv, s),
             "test": regression_scores(np.full_like(yt, y.mean()), yt, s)}]
    fits = [(regression_scores(Ridge(alpha=a).fit(x, y).predict(xv), yv, s)["mae"], a)
            for a in RIDGE_ALPHAS]
    val_mae, alpha = min(fits)
    ridge = Ridge(alpha=alpha).fit(x, y)
    n = ridge.coef_.size
    rows.append({"model": f"Ridge float32 (alpha {alpha:g})", "size": (n + 1) * FLOAT32,
                 "val": regression_scores(ridge.predict(xv), yv, s),
                 "test": regression_scores(ridge.predict(xt), yt, s)})
    scale = float(np.abs(ridge.coef_).max()) / 127 or 1.0
    coef = np.clip(np.round(ridge.coef_ / scale), -127, 127) * scale
    predict = lambda a: a @ coef + ridge.intercept_  # noqa: E731
    rows.append({"model": f"Ridge int8 weights (alpha {alpha:g}; per-tensor scale)",
                 "size": n + 2 * FLOAT32,  # int8 weights, float32 scale and intercept
                 "val": regression_scores(predict(xv), yv, s),
                 "test": regression_scores(predict(xt), yt, s)})
    return rows


def classification_baselines(prepared: Prepared) -> list[dict]:
    """LogisticRegression, plain and class-balanced, C chosen on validation macro-F1."""
    from sklearn.linear_model import LogisticRegression
    data = load_dataset(str(prepared.path))
    x, xv, xt = _flat(data.x_train), _flat(data.x_val), _flat(data.x_test)
    y, yv, yt = data.y_train.numpy(), data.y_val.numpy(), data.y_test.numpy()
    rows = []
    for weight in (None, "balanced"):
        def fit(c: float) -> object:
            return LogisticRegression(C=c, class_weight=weight, max_iter=5000).fit(x, y)
        fits = [(-class_scores(fit(c).predict(xv), yv)["f1"], c) for c in LOGISTIC_CS]
        _, c = min(fits)
        model = fit(c)
        name = "LogisticRegression" + (' class_weight="balanced"' if weight else "")
        rows.append({"model": f"{name} (C {c:g})",
                     "size": (model.coef_.size + model.intercept_.size) * FLOAT32,
                     "val": class_scores(model.predict(xv), yv),
                     "test": class_scores(model.predict(xt), yt)})
    return rows


# ---- the two parts ------------------------------------------------------------------------------
@dataclass
class Part:
    prepared: Prepared
    summary: str  # the data's splits
    baselines: list[dict]
    picks: dict[str, list[Pick]]  # objectives -> one pick per seed
    seconds: float
    split_counts: str = ""
    #: class-0 samples in train, validation, test (classification)
    counts: tuple[int, int, int] = (0, 0, 0)


def run_regression(args: argparse.Namespace, folder: Path, log) -> Part:  # noqa: ANN001
    start = time.perf_counter()
    folder.mkdir(parents=True)
    prepared = diabetes_npz(folder)
    data = load_dataset(str(prepared.path))
    ridge_size = (math.prod(data.input_shape) + 1) * FLOAT32  # coefficients and intercept
    picks = []
    for seed in range(args.seeds):
        pick = run_pick(prepared, folder, ("mae", "size"), seed, args, True, ridge_size)
        log(f"regression seed {seed}: test MAE {pick.test['mae']:.2f} at {pick.size} B "
            f"({pick.supernet_s:.0f} + {pick.search_s:.0f} s)")
        picks.append(pick)
    baselines = regression_baselines(prepared)  # after the searches, like every test score
    assert baselines[1]["size"] == ridge_size
    return Part(prepared, data.summary(), baselines, {"mae,size": picks},
                time.perf_counter() - start)


def run_imbalanced(args: argparse.Namespace, folder: Path, log) -> Part:  # noqa: ANN001
    start = time.perf_counter()
    folder.mkdir(parents=True)
    prepared = imbalanced_digits_npz(folder, args.zero_share)
    data = load_dataset(str(prepared.path))
    counts = ", ".join(f"{name} {int((y == 0).sum())} of {len(y)}" for name, y in
                       (("train", data.y_train), ("validation", data.y_val),
                        ("test", data.y_test)))
    k = data.num_classes  # a weight per feature and class, and a bias per class
    limit = (math.prod(data.input_shape) * k + k) * FLOAT32
    picks: dict[str, list[Pick]] = {"f1,size": [], "accuracy,size": []}
    for seed in range(args.seeds):
        for objectives in picks:
            first, second = objectives.split(",")
            pick = run_pick(prepared, folder, (first, second), seed, args, False, limit)
            log(f"imbalanced seed {seed} {objectives}: test macro-F1 {pick.test['f1']:.4f} at "
                f"{pick.size} B ({pick.supernet_s:.0f} + {pick.search_s:.0f} s)")
            picks[objectives].append(pick)
    baselines = classification_baselines(prepared)  # after the searches
    assert baselines[0]["size"] == limit
    return Part(prepared, data.summary(), baselines, picks, time.perf_counter() - start,
                f"class 0 samples per split: {counts}",
                tuple(int((y == 0).sum()) for y in (data.y_train, data.y_val, data.y_test)))


# ---- report -------------------------------------------------------------------------------------
def para(*sentences: str) -> str:
    """Sentences as one paragraph wrapped at 100 characters."""
    return textwrap.fill(" ".join(sentences), 100, break_on_hyphens=False,
                         break_long_words=False)


def spread(values: list[float], fmt: str = ".4f") -> str:
    """mean ± sd (n - 1) of ``values``."""
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def size_range(sizes: list[int]) -> str:
    if len(sizes) == 1:
        return f"{sizes[0]:,}"
    return f"{statistics.median(sizes):,.0f} (median; {min(sizes):,}-{max(sizes):,})"


def arch_text(arch: dict) -> str:
    depth = int(arch["depth"])
    widths = "-".join(str(arch[f"s{i}.width"]) for i in range(1, depth + 1))
    bits = "/".join(str(arch[f"s{i}.bits"]) for i in range(1, depth + 1))
    return (f"{widths}, bits {bits}, head {arch['head.bits']} bits rank {arch['head.rank']:g}, "
            f"sparsity {arch['sparsity']:g}")


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test of ``wins`` vs ``losses`` (ties left out)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def _times(picks: list[Pick]) -> str:
    return (f"supernet training {spread([p.supernet_s for p in picks], '.1f')} s per seed, a "
            f"search {spread([p.search_s for p in picks], '.1f')} s")


def regression_section(part: Part, args: argparse.Namespace) -> tuple[str, str]:
    picks = part.picks["mae,size"]
    n = len(picks)
    mean, ridge, ridge8 = part.baselines
    scale = part.prepared.y_scale
    beats_mean = sum(p.check["largest"] * scale < mean["val"]["mae"] for p in picks)
    rows = [[p.seed, f"{p.supernet_s:.1f}", f"{p.search_s:.1f}",
             f"{p.check['largest'] * scale:.2f}", p.trial, arch_text(p.arch), f"{p.size:,}",
             f"{p.val['mae']:.2f}", f"{p.test['mae']:.2f}", f"{p.test['rmse']:.2f}"]
            for p in picks]
    maes, sizes = [p.test["mae"] for p in picks], [p.size for p in picks]
    summary = [[b["model"], f"{b['size']:,}", f"{b['val']['mae']:.2f}", f"{b['test']['mae']:.2f}",
                f"{b['test']['rmse']:.2f}"] for b in part.baselines]
    summary.append([f"nasopt pick (mae,size; {n} seeds, mean ± sd)", size_range(sizes),
                    spread([p.val["mae"] for p in picks], ".2f"), spread(maes, ".2f"),
                    spread([p.test["rmse"] for p in picks], ".2f")])
    below_mean = sum(m < mean["test"]["mae"] for m in maes)
    better = statistics.mean(maes) < ridge["test"]["mae"]
    large = [p for p in picks if p.size >= ridge["size"]]
    large_better = sum(p.test["mae"] < ridge["test"]["mae"] for p in large)
    within = [p for p in picks if "trial" in p.within]
    smallest = min(p.within["smallest"] for p in picks)
    if within:
        small = (f"{len(within)} of {n} searches have a trial within Ridge's {ridge['size']} B "
                 f"(test MAE {spread([p.within['test']['mae'] for p in within], '.2f')}).")
    else:
        small = (f"No trial of any search is as small as Ridge: the smallest is {smallest} B, "
                 f"{picks[0].overhead} of them the packed file's header and CRC.")
    verdict = para(
        f"**Verdict (regression).** nasopt's pick beats always answering the training mean on "
        f"{below_mean} of {n} seeds (test MAE {spread(maes, '.2f')} vs "
        f"{mean['test']['mae']:.2f}).",
        f"It {'beats' if better else 'does not beat'} Ridge regression on average: mean test MAE "
        f"{statistics.mean(maes):.2f} vs {ridge['test']['mae']:.2f} (RMSE "
        f"{statistics.mean(p.test['rmse'] for p in picks):.2f} vs {ridge['test']['rmse']:.2f}),"
        f" lower than Ridge's on {sum(m < ridge['test']['mae'] for m in maes)} of {n} seeds.",
        f"At equal or larger size: {len(large)} of {n} picks are at least Ridge's "
        f"{ridge['size']} B (float32; {ridge8['size']} B with int8 weights, test MAE "
        f"{ridge8['test']['mae']:.2f}), {size_range(sizes)} B, and {large_better} of them have "
        f"a lower test MAE than Ridge; "
        + ("nasopt is not the more accurate model at equal or larger size here."
           if not better else "nasopt is more accurate on average, at a larger size."),
        small)
    text = "\n\n".join([
        "## 1. Regression: diabetes",
        para(f"Data: {part.prepared.note}. Splits: {part.summary} (nasopt's seeded random split,"
             f" the same for every seed).",
             f"{n} seeds; per seed a supernet ({args.epochs} epochs, `supernet.seed` = seed) and "
             f"a search on `mae,size` (`search.seed` = seed); the pick is "
             f"`nasopt.api.best_trial` (the lowest validation MAE), its deployed model "
             f"(`Evaluator.compressed`, the one the search scored) run once on the test split.",
             f"Ridge: alpha among {', '.join(f'{a:g}' for a in RIDGE_ALPHAS)} by validation "
             f"MAE, fitted on the training split (the same standardized features); its size "
             f"counts {ridge['size'] // FLOAT32 - 1} float32 coefficients and the intercept; "
             f"int8: one byte per coefficient plus a float32 scale and the intercept."),
        para(f"Time: {_times(picks)}; the part {part.seconds:.0f} s.",
             f"Supernet check: the largest subnet's validation MAE is below the training mean's"
             f" ({mean['val']['mae']:.2f}) on {beats_mean} of {n} seeds (column \"largest val "
             f"MAE\")."),
        table(["seed", "supernet s", "search s", "largest val MAE", "trial",
               "pick (widths, bits)", "size B", "val MAE", "test MAE", "test RMSE"], rows),
        table(["model", "size B", "val MAE", "test MAE", "test RMSE"], summary),
        verdict])
    head = (f"**Regression** (diabetes, {n} seeds): nasopt's pick, test MAE {spread(maes, '.2f')}"
            f" at {size_range(sizes)} B; Ridge {ridge['test']['mae']:.2f} at {ridge['size']} B "
            f"({ridge8['test']['mae']:.2f} at {ridge8['size']} B with int8 weights); the "
            f"training mean {mean['test']['mae']:.2f}. nasopt beats the mean on {below_mean} of "
            f"{n} seeds and Ridge on {sum(m < ridge['test']['mae'] for m in maes)} of {n}, "
            f"always at a larger size.")
    return text, head


CLASS_KEYS = ("f1", "balanced_accuracy", "accuracy", "recall0")


def imbalanced_section(part: Part, args: argparse.Namespace) -> tuple[str, str]:
    f1s, accs = part.picks["f1,size"], part.picks["accuracy,size"]
    n = len(f1s)
    rows = [[p.seed, p.objectives, p.trial, arch_text(p.arch), f"{p.size:,}",
             f"{p.val['f1']:.4f}", f"{p.val['accuracy']:.4f}",
             *(f"{p.test[k]:.4f}" for k in CLASS_KEYS)]
            for a, b in zip(f1s, accs) for p in (a, b)]
    summary = [[b["model"], f"{b['size']:,}", *(f"{b['test'][k]:.4f}" for k in CLASS_KEYS)]
               for b in part.baselines]
    for name, picks in (("f1,size", f1s), ("accuracy,size", accs)):
        summary.append([f"nasopt pick ({name}; {n} seeds, mean ± sd)",
                        size_range([p.size for p in picks]),
                        *(spread([p.test[k] for p in picks]) for k in CLASS_KEYS)])
    lr, lr_bal = part.baselines
    limit = lr["size"]
    within_rows = []
    for name, picks in (("f1,size", f1s), ("accuracy,size", accs)):
        found = [q for q in picks if "trial" in q.within]
        within_rows.append([name, f"{len(found)} of {n}",
                            size_range([q.within["size"] for q in found]) if found else "-",
                            *(spread([q.within["test"][k] for q in found]) if found else "-"
                              for k in CLASS_KEYS)])
    diff = [a.test["f1"] - b.test["f1"] for a, b in zip(f1s, accs)]
    wins, losses = sum(d > 0 for d in diff), sum(d < 0 for d in diff)
    same = sum(a.arch == b.arch for a, b in zip(f1s, accs))
    p = sign_test(wins, losses)
    far = max(range(n), key=lambda i: abs(diff[i]))
    lost, won = (accs[far], f1s[far]) if diff[far] > 0 else (f1s[far], accs[far])
    metric = "accuracy" if lost is accs[far] else "f1"
    label = {"accuracy": "validation accuracy", "f1": "validation macro-F1"}[metric]
    outlier = (f"The largest difference, seed {lost.seed} ({diff[far]:+.4f}), comes from the "
               f"{'accuracy' if metric == 'accuracy' else 'F1'} search, whose {args.trials} "
               f"trials reached a {label} of {lost.val[metric]:.4f} at best, against "
               f"{won.val[metric]:.4f} for the other search's pick on the same supernet."
               if n > 1 and abs(diff[far]) > 0.05 else "")
    if wins <= losses:
        finding = ("Searching on macro-F1 did not give the higher test macro-F1 more often than "
                   "searching on accuracy.")
    elif p >= 0.05:
        finding = ("Searching on macro-F1 gave the higher test macro-F1 more often, not "
                   "significantly.")
    else:
        finding = "Searching on macro-F1 gave a significantly higher test macro-F1."
    mean_f1 = {name: statistics.mean(q.test["f1"] for q in picks)
               for name, picks in (("F1", f1s), ("accuracy", accs))}
    lr_f1 = (lr["test"]["f1"], lr_bal["test"]["f1"])
    below = all(v < min(lr_f1) for v in mean_f1.values())
    large = [q for q in f1s + accs if q.size >= limit]
    beat_plain = sum(q.test["f1"] > lr_f1[0] for q in large)
    beat_bal = sum(q.test["f1"] > lr_f1[1] for q in large)
    found = [q for q in f1s + accs if "trial" in q.within]
    small_f1 = statistics.mean(q.within["test"]["f1"] for q in found) if found else None
    verdict = para(
        f"**Verdict (imbalanced classification).** The F1 search's pick has the higher test "
        f"macro-F1 on {wins} of {n} seeds, the lower on {losses}, the same on {n - wins - losses}"
        f" (the two searches picked the same arch on {same}); mean paired difference "
        f"{spread(diff)}, median {statistics.median(diff):+.4f} (two-sided exact sign test "
        f"over the seeds that differ: p = {p:.2f}).",
        finding, outlier,
        f"Class 0's test recall: {spread([q.test['recall0'] for q in f1s])} (F1 search) vs "
        f"{spread([q.test['recall0'] for q in accs])} (accuracy search), over "
        f"{part.counts[2]} test samples of class 0"
        + ("; nearly every pick finds class 0's test samples, so at this share the minority "
           "class leaves a macro-F1 objective little to gain on this data." if min(
               statistics.mean(q.test["recall0"] for q in f1s),
               statistics.mean(q.test["recall0"] for q in accs)) >= 0.95 else "."),
        f"Against LogisticRegression ({limit:,} B; test macro-F1 {lr_f1[0]:.4f}, "
        f"{lr_f1[1]:.4f} class-balanced): nasopt's picks reach {mean_f1['F1']:.4f} (F1 search) "
        f"and {mean_f1['accuracy']:.4f} (accuracy search) on average, "
        + ("below both." if below else "not below both.")
        + f" At equal or larger size, {len(large)} of {2 * n} picks are at least {limit:,} B and"
        f" {beat_plain} of them have a higher test macro-F1 than the plain model, {beat_bal} "
        f"than the class-balanced one"
        + (f"; the best trial within {limit:,} B reaches {small_f1:.4f} on average."
           if small_f1 is not None else "."),
        "nasopt does not beat logistic regression on this data." if below and
        beat_bal <= len(large) / 2 else "")
    text = "\n\n".join([
        "## 2. Imbalanced classification: digits with few zeros",
        para(f"Data: {part.prepared.note}. Splits: {part.summary} (stratified; the same for "
             f"every seed); {part.split_counts}.",
             f"{n} seeds; per seed one supernet ({args.epochs} epochs, `supernet.seed` = seed) "
             f"and two searches with the same budget and `search.seed` = seed, `--objectives "
             f"f1,size` and `--objectives accuracy,size`; each pick (`nasopt.api.best_trial`: "
             f"the highest validation macro-F1, resp. accuracy) run once on the test split.",
             f"LogisticRegression: C among {', '.join(f'{c:g}' for c in LOGISTIC_CS)} by "
             f"validation macro-F1, fitted on the training split (the same pixels); its size "
             f"counts its {limit // FLOAT32} float32 parameters.",
             "Recall 0: the share of class 0's test samples predicted as 0."),
        para(f"Time: {_times(f1s + accs)}; the part {part.seconds:.0f} s."),
        table(["seed", "objectives", "trial", "pick (widths, bits)", "size B", "val F1",
               "val acc", "test F1", "test bal. acc", "test acc", "test recall 0"], rows),
        table(["model", "size B", "test macro-F1", "test balanced acc", "test acc",
               "test recall 0"], summary),
        para(f"The best trial of each search within LogisticRegression's {limit:,} B (by the "
             f"search's own validation metric), on the test split:"),
        table(["search", "searches with one", "size B", "test macro-F1", "test balanced acc",
               "test acc", "test recall 0"], within_rows),
        verdict])
    head = (f"**Imbalanced digits** ({n} seeds): test macro-F1 of the F1 search's pick "
            f"{spread([a.test['f1'] for a in f1s])}, of the accuracy search's "
            f"{spread([b.test['f1'] for b in accs])}; the F1 pick is higher on {wins} of {n} "
            f"seeds, lower on {losses}, the same on {n - wins - losses} (sign test p = {p:.2f})."
            f" LogisticRegression {lr_f1[0]:.4f}, class-balanced {lr_f1[1]:.4f}, at "
            f"{limit:,} B.")
    return text, head


def command(args: argparse.Namespace) -> str:
    return (f"nasopt bench tasks --seeds {args.seeds} --trials {args.trials} --epochs "
            f"{args.epochs} --strategy {args.strategy} --parts {args.parts} --zero-share "
            f"{args.zero_share:g} --threads {args.threads} --out {args.out} "
            f"--run-dir {args.run_dir}")


def run(args: argparse.Namespace) -> Path:
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise NasoptError(f"unknown part(s) {', '.join(unknown) or '(none)'}; choose among "
                          f"{', '.join(PARTS)}")
    if args.seeds < 1 or args.trials < 1 or args.epochs < 1:
        raise NasoptError("--seeds, --trials and --epochs must be at least 1")
    root = Path(args.run_dir)
    for name in parts:
        if (root / name).exists():
            raise NasoptError(f"{root / name} exists: a re-run would reuse its supernets and "
                              f"trials; remove it or give another --run-dir")
    threads, verbosity = torch.get_num_threads(), optuna.logging.get_verbosity()
    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    header = f"Machine: {machine()}"
    start = time.perf_counter()
    try:
        with LoadSampler() as load:
            found = {}
            if "regression" in parts:
                found["regression"] = run_regression(args, root / "regression", log)
            if "imbalanced" in parts:
                found["imbalanced"] = run_imbalanced(args, root / "imbalanced", log)
    finally:
        torch.set_num_threads(threads)
        optuna.logging.set_verbosity(verbosity)
    wall = time.perf_counter() - start
    sections, heads = [], []
    for name, part in found.items():
        render = regression_section if name == "regression" else imbalanced_section
        text, head = render(part, args)
        sections.append(text)
        heads.append(textwrap.fill(head, 100, initial_indent="- ", subsequent_indent="  ",
                                   break_on_hyphens=False, break_long_words=False))
    notes = sorted({w for part in found.values() for picks in part.picks.values()
                    for p in picks for w in p.warnings})
    blocks = [
        "# A user's own task: regression and imbalanced classification",
        f"Command: `{command(args)}`  \n{header}  \n"
        f"Wall time: {wall:.0f} s ("
        + ", ".join(f"{k} {v.seconds:.0f} s" for k, v in found.items())
        + f").  \n{load.note()}",
        para("What was measured: nasopt on two tasks other than balanced classification, with a "
             "user's space (`examples/tiny_mlp_space.py:TinyMLPSpace`: 1-3 hidden layers of 16, "
             "32 or 64 units, 2/4/6/8/32 bits per layer, global sparsity 0-0.9, head rank "
             "0.25-1), on data bundled with scikit-learn (nothing downloaded).",
             f"Every search: {args.trials} trials of `{args.strategy}` scored on the validation "
             f"split, on a supernet of {args.epochs} epochs (the first "
             f"{max(args.epochs // 5, 1)} on the largest subnet alone); a pick is the deployed "
             f"model the search scored (inherited supernet weights, compressed, no "
             f"fine-tuning).",
             "The test split is read only after the searches, to score the picks and the "
             "baselines.",
             "Sizes: nasopt's packed file in bytes (format 2, header and CRC included); a "
             "baseline's parameters at 4 B each as float32, no file header.",
             "Mean ± sd over seeds (sd with n - 1)."),
        "\n".join(heads)]
    if notes:
        blocks.append("Warnings the searches printed:\n\n" + "\n".join(
            textwrap.fill(w, 100, initial_indent="- ", subsequent_indent="  ") for w in notes))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(blocks + sections) + "\n")
    log(f"bench tasks: {wall:.0f} s")
    return out
