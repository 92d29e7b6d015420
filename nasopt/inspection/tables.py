"""Reading a study: typed tables (trials, the feasible Pareto set, the comparison of studies and
of the strategies inside them), hypervolume settings and curves, gene importance, and writing
all trials to a CSV or JSON file.

Every table is a flat pandas DataFrame with typed columns: ``trial`` int, ``state``/``strategy``
strings, ``pareto`` bool, ``feasible`` nullable ``boolean`` (empty for trials that did not
complete), ``accuracy`` float, the byte/param/MAC counts nullable ``Int64`` (empty for trials that
failed before measuring), one ``constraint.<budget>`` float per budget (Optuna's constraint value
``value - limit``: feasible when <= 0), then one column per gene, typed by its options (integer
genes nullable ``Int64``, so a failed trial's empty cells do not turn them into floats).
"""
from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from nasopt.search import study as _study
from nasopt.core.checkpoint import atomic_write_bytes
from nasopt.core.errors import NasoptError
from nasopt.core.objectives import (
    METRIC_OF, OBJECTIVES, SCORE_BUDGETS, hypervolume, parse_quantity,
)
from nasopt.core.scores import UNIT_SCORES

COUNT_COLUMNS = ("compressed_bytes", "params", "nonzero_params", "macs", "float_bytes")
#: hypervolume reference for the size objective when no size budget is shared: accuracy 0 at
#: 16 KB, the reference of the compression and strategies benchmarks (results/*.md)
DEFAULT_SIZE_REFERENCE = 16 * 1024
IMPORTANCE_SEED = 0


def budgets_of(study: optuna.Study) -> dict[str, float]:
    """The study's budgets as limits, e.g. ``{"size": 4096.0}`` (empty without budgets)."""
    return {k: float(v) for k, v in _study.setup_of(study).get("budgets", {}).items()}


def budget_floor(study: optuna.Study, name: str) -> bool:
    """Whether the study's budget ``name`` is a floor (a score where higher is better: f1, a
    user's metric...) rather than a ceiling (size, params, mae...)."""
    if name in METRIC_OF:
        return False
    user = _study.setup_of(study).get("metric")
    if user is not None and user.get("name") == name:
        return bool(user.get("higher_is_better"))
    return SCORE_BUDGETS.get(name, False)


def budget_text(study: optuna.Study, name: str, limit: float, spaced: bool = True) -> str:
    """``size <= 4KB``, ``f1 >= 0.8``."""
    sign = ">=" if budget_floor(study, name) else "<="
    return f"{name} {sign} {format_limit(name, limit)}" if spaced else \
        f"{name}{sign}{format_limit(name, limit)}"


def budget_met(study: optuna.Study, trial: optuna.trial.FrozenTrial, name: str,
               limit: float) -> bool:
    """Whether ``trial`` recorded a value of ``name`` within its budget ``limit``."""
    value = metric_value(trial, METRIC_OF.get(name, name))
    if value is None:
        return False
    return value >= limit if budget_floor(study, name) else value <= limit


def format_limit(name: str, limit: float) -> str:
    """``size`` 4096 -> ``4KB``; counts with k/M (the units `--max-*` reads)."""
    if name in ("size", "float_size", "sram"):
        return f"{limit / 1024:g}KB" if limit % 1024 == 0 else f"{limit:g}B"
    if name == "latency":
        return f"{limit:g}ms"
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if limit >= scale and limit % scale == 0:
            return f"{limit / scale:g}{unit}"
    return f"{limit:g}"


# ---- tables ---------------------------------------------------------------------------------
def trials_table(study: optuna.Study, pareto_only: bool = False) -> pd.DataFrame:
    """All trials (or the feasible Pareto set, best accuracy first), typed, with constraints.

    Columns: the marks, ``accuracy`` and the counts, any further numeric metric some trial
    recorded (e.g. ``latency_ms``, ``sram_bytes`` with a hardware profile), one
    ``constraint.<budget>`` per budget, a scalarized objective if any (``mnasnet``), the genes."""
    frame = _study.trials_frame(study, pareto_only=pareto_only)
    budgets = budgets_of(study)
    genes = dict(_study.setup_of(study).get("space", {}).get("genes", {}))
    recorded = further_metrics(study)  # a user's metric among them
    scalar = [(i, o) for i, o in enumerate(_study.setup_of(study).get("objectives", []))
              if o not in OBJECTIVES and o not in recorded]
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    numbers = frame["trial"].tolist() if len(frame) else []
    extra: dict[str, list[Any]] = {}
    for key in recorded:
        if key not in frame.columns:
            extra[key] = [by_number[n].user_attrs.get("metrics", {}).get(key) for n in numbers]
    for name in budgets:
        extra[f"constraint.{name}"] = [(by_number[n].constraints or {}).get(name)
                                       for n in numbers]
    for i, name in scalar:  # objectives that no metric column carries (mnasnet)
        extra[name] = [by_number[n].values[i] if by_number[n].values else None for n in numbers]
    metrics = ("accuracy", *COUNT_COLUMNS)
    if _study.setup_of(study).get("data", {}).get("task") == "regression":
        metrics = COUNT_COLUMNS  # no accuracy: its scores (mae, rmse) are further metrics
        frame = frame.drop(columns="accuracy", errors="ignore")
    if frame.empty:
        columns = ["trial", "state", "pareto", "feasible", "strategy", *metrics, *extra, *genes]
        return _typed(pd.DataFrame(columns=columns), genes)
    head = [c for c in frame.columns if c not in genes and c not in metrics]
    frame = frame.assign(**{k: v for k, v in extra.items()})
    order = [*head, *metrics, *extra, *[g for g in genes if g in frame.columns],
             *[c for c in frame.columns if c not in head and c not in genes and c not in extra
               and c not in metrics]]
    return _typed(frame[order], genes)


def further_metrics(study: optuna.Study) -> list[str]:
    """Numeric metric keys beyond accuracy and the counts that some trial of ``study`` has."""
    keys: dict[str, None] = {}
    for t in study.get_trials(deepcopy=False):
        for key, value in t.user_attrs.get("metrics", {}).items():
            if (key not in ("accuracy", *COUNT_COLUMNS) and isinstance(value, (int, float))
                    and not isinstance(value, bool)):
                keys[key] = None
    return list(keys)


def metric_value(trial: optuna.trial.FrozenTrial, key: str) -> float | None:
    """A recorded metric as a float, None when the trial has none (failed, or not measured)."""
    value = trial.user_attrs.get("metrics", {}).get(key)
    return None if value is None else float(value)


def _typed(frame: pd.DataFrame, genes: dict[str, list]) -> pd.DataFrame:
    """``genes``: each gene's options (the study's space), which give its column's type."""
    frame = frame.copy()
    types: dict[str, Any] = {"trial": "int64", "pareto": "bool", "feasible": "boolean",
                             "accuracy": "float64", **{c: "Int64" for c in COUNT_COLUMNS}}
    for column in frame.columns:
        if column in types:
            frame[column] = frame[column].astype(types[column])
        elif column.startswith("constraint.") or column == "mnasnet":
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
        elif column in ("state", "strategy", "error", "arch"):
            frame[column] = frame[column].astype("string")
        elif column in genes or frame[column].dtype == object:
            values = genes.get(column) or frame[column].dropna().tolist()
            if len(values) and all(isinstance(v, str) for v in values):
                frame[column] = frame[column].astype("string")
            elif len(values) and all(isinstance(v, int) and not isinstance(v, bool)
                                     for v in values):
                frame[column] = frame[column].astype("Int64")
            elif len(values):
                frame[column] = pd.to_numeric(frame[column]).astype("float64")
    return frame.reset_index(drop=True)


def pareto_table(study: optuna.Study) -> pd.DataFrame:
    """The feasible Pareto set (for one objective: the best feasible trial), best first by the
    study's quality metric: trial, strategy, metrics, constraint values and genes. Empty when no
    trial is feasible."""
    frame = trials_table(study, pareto_only=True).drop(columns=["state", "pareto", "feasible"])
    quality, higher = _study.quality_metric(study)
    if quality in frame.columns and len(frame):
        frame = frame.sort_values(quality, ascending=not higher, kind="stable")
    return frame.reset_index(drop=True)


def closest_table(study: optuna.Study) -> pd.DataFrame:
    """The one completed trial closest to meeting the budgets (empty without completed trials)."""
    frame = trials_table(study)
    if not _study.completed(study):
        return frame.iloc[0:0]
    return frame[frame["trial"] == _study.closest_trial(study).number].reset_index(drop=True)


def export_table(study: optuna.Study) -> pd.DataFrame:
    """Every trial, for a file: the trials table plus the arch key, seed, start/end times and
    duration."""
    frame = trials_table(study)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    trials = [by_number[n] for n in frame["trial"]]
    frame["seed"] = pd.array([t.user_attrs.get("seed") for t in trials], dtype="Int64")
    frame["arch"] = pd.array([json.dumps(t.params, sort_keys=True, separators=(",", ":"))
                              for t in trials], dtype="string")
    frame["datetime_start"] = pd.to_datetime([t.datetime_start for t in trials])
    frame["datetime_complete"] = pd.to_datetime([t.datetime_complete for t in trials])
    frame["duration_s"] = (frame["datetime_complete"] - frame["datetime_start"]).dt.total_seconds()
    return frame


def check_out_file(path: str | Path, suffixes: tuple[str, ...], force: bool = False) -> Path:
    """The rule of every inspection command that writes one file (table, plot, report): the
    name ends in one of ``suffixes``, is not a folder, and an existing file is replaced only
    with ``force`` (``--force``)."""
    path = Path(path)
    names = " or ".join(suffixes)
    if path.suffix.lower() not in suffixes:
        raise NasoptError(f"cannot write {path}: give a file name ending in {names}")
    if path.is_dir():
        raise NasoptError(f"{path} is a folder; give a file name ending in {names}")
    if path.exists() and not force:
        raise NasoptError(f"{path} exists; choose another file name, or add --force to "
                          f"overwrite it")
    return path


def write_table(study: optuna.Study, path: str | Path, force: bool = False) -> Path:
    """Write every trial to ``path`` (.csv or .json: a list of flat records), atomically."""
    path = check_out_file(path, (".csv", ".json"), force)
    frame = export_table(study)
    if path.suffix.lower() == ".csv":
        text = frame.to_csv(index=False)
    else:
        text = frame.to_json(orient="records", indent=1, date_format="iso")
    atomic_write_bytes(path, text.encode())
    return path


# ---- hypervolume ----------------------------------------------------------------------------
@dataclass(frozen=True)
class HvSetting:
    """Hypervolume of (the quality metric, ``cost`` down) over feasible trials, reference point
    ``floor`` of the quality metric at ``reference`` of the cost (costs are divided by it). For
    accuracy, balanced accuracy and macro-F1 the floor is 0, so values lie in [0, 1]; for a
    user's metric it is the worst value among the trials compared (and the volume is in the
    metric's units), and a metric where lower is better counts its distance below the floor."""
    cost: str  # an objective name with a metric: size, params, macs, ...
    reference: float
    why: str
    quality: str = "accuracy"  # the studies' quality metric (nasopt.search.study.quality_metric)
    higher: bool = True  # whether higher is better for it
    floor: float = 0.0  # its value at the reference point

    def describe(self) -> str:
        scale = (f"1 = a perfect {self.quality} at zero {self.cost}"
                 if self.quality in UNIT_SCORES
                 else f"in units of {self.quality}")
        return (f"hypervolume of {self.quality} x {self.cost} over feasible trials, reference "
                f"point {self.quality} {self.floor:g} at {self.cost} "
                f"{format_limit(self.cost, self.reference)} ({self.why}); {scale}")

    def of(self, trials: Sequence[optuna.trial.FrozenTrial]) -> float:
        metric = METRIC_OF[self.cost]
        points = [(metric_value(t, self.quality), metric_value(t, metric)) for t in trials
                  if _study.is_feasible(t)]
        sign = 1.0 if self.higher else -1.0
        return hypervolume([(sign * (q - self.floor), c) for q, c in points
                            if q is not None and c is not None], self.reference)

    def curve(self, trials: Sequence[optuna.trial.FrozenTrial]) -> list[float]:
        """Hypervolume after each of ``trials`` (in the given order)."""
        return [self.of(trials[:i + 1]) for i in range(len(trials))]


def hv_setting(studies: Sequence[optuna.Study], cost: str | None = None,
               reference: str | float | None = None) -> HvSetting:
    """The hypervolume's cost axis and reference for ``studies`` (one shared setting, so their
    numbers compare). Cost: ``cost``, else the first study's first cost objective, else size.
    Reference: ``reference``, else the budget on the cost that every study shares, else 16 KB
    for size, else the largest cost among the studies' completed trials."""
    if cost is None:
        objectives = _study.setup_of(studies[0]).get("objectives", [])
        cost = next((o for o in objectives if o in METRIC_OF), "size")
    if cost not in METRIC_OF:
        raise NasoptError(f"cannot compute a hypervolume over {cost!r}; choose one of "
                          f"{', '.join(METRIC_OF)}")
    qualities = {_study.quality_metric(s) for s in studies}
    if len(qualities) > 1:
        raise NasoptError(f"the studies optimize different metrics "
                          f"({', '.join(sorted(q for q, _ in qualities))}); compare studies of "
                          f"one metric")
    quality, higher = qualities.pop()
    floor = 0.0
    if quality not in UNIT_SCORES:  # the worst value among the trials (mae, a user's metric)
        found = [v for s in studies for t in _study.completed(s)
                 if (v := metric_value(t, quality)) is not None]
        floor = (min(found) if higher else max(found)) if found else 0.0
    axis = {"quality": quality, "higher": higher, "floor": floor}
    if reference is not None:
        return HvSetting(cost, parse_quantity(reference, cost), "given", **axis)
    limits = {budgets_of(s).get(cost) for s in studies}
    if len(limits) == 1 and None not in limits:
        return HvSetting(cost, limits.pop(), "the studies' budget", **axis)
    if cost == "size":
        return HvSetting(cost, DEFAULT_SIZE_REFERENCE, "the benchmarks' reference", **axis)
    values = [v for s in studies for t in _study.completed(s)
              if (v := metric_value(t, METRIC_OF[cost])) is not None]
    if not values:
        raise NasoptError("no completed trial to take a hypervolume reference from; give one "
                          "with --hv-reference")
    return HvSetting(cost, max(values), "the largest among the trials", **axis)


def strategy_groups(study: optuna.Study, with_all: bool = True
                    ) -> list[tuple[str, list[optuna.trial.FrozenTrial]]]:
    """(strategy, its trials in order), one per strategy that ran in the study, plus
    ``("(all)", every trial)`` when there are several and ``with_all``."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    names = list(dict.fromkeys(str(t.user_attrs.get("strategy", "?")) for t in trials))
    groups = [(n, [t for t in trials if str(t.user_attrs.get("strategy", "?")) == n])
              for n in names]
    if with_all and len(groups) > 1:
        groups.append(("(all)", trials))
    return groups


def compare(studies: Sequence[optuna.Study], cost: str | None = None,
            reference: str | float | None = None) -> tuple[pd.DataFrame, HvSetting]:
    """One row per study and strategy (plus a ``(all)`` row for a study run by several):
    completed, failed and feasible trials, best accuracy of any completed trial and under each
    budget any of the studies has, and the hypervolume (one setting for all rows)."""
    if not studies:
        raise NasoptError("name at least one study to compare")
    setting = hv_setting(studies, cost, reference)
    budgets: dict[tuple[str, float], None] = {}
    for s in studies:
        for name, limit in budgets_of(s).items():
            budgets[(name, limit)] = None
    quality = setting.quality
    best = max if setting.higher else min  # the best value of the studies' quality metric
    rows = []
    for s in studies:
        for strategy, trials in strategy_groups(s):
            done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE
                    and "metrics" in t.user_attrs]
            row: dict[str, Any] = {
                "study": s.study_name, "strategy": strategy, "trials": len(done),
                "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
                "feasible": sum(_study.is_feasible(t) for t in done),
                f"best_{quality}": best((v for t in done
                                         if (v := metric_value(t, quality)) is not None),
                                        default=None)}
            for name, limit in budgets:
                row[f"best_{quality}[{budget_text(s, name, limit, spaced=False)}]"] = best(
                    (q for t in done if budget_met(s, t, name, limit)
                     and (q := metric_value(t, quality)) is not None),
                    default=None)
            row["hypervolume"] = setting.of(done)
            rows.append(row)
    frame = pd.DataFrame(rows)
    for column in frame.columns:
        if column.startswith(f"best_{quality}") or column == "hypervolume":
            frame[column] = pd.to_numeric(frame[column]).astype("float64")
        elif column in ("trials", "failed", "feasible"):
            frame[column] = frame[column].astype("int64")
        else:
            frame[column] = frame[column].astype("string")
    return frame, setting


# ---- importance -----------------------------------------------------------------------------
def importance(study: optuna.Study, seed: int = IMPORTANCE_SEED) -> pd.Series:
    """fANOVA importance of each gene for the study's quality metric (Optuna's
    ``get_param_importances`` with a seeded ``FanovaImportanceEvaluator``), summing to 1.

    For several objectives Optuna needs one target: the quality metric
    (:func:`nasopt.search.study.quality_metric`: accuracy unless an objective names another).
    Genes with one option (restricted) have no importance and are left out."""
    done = [t for t in _study.completed(study) if "metrics" in t.user_attrs]
    if len(done) < 2:
        raise NasoptError(f"study {study.study_name!r} has {len(done)} completed trial(s); gene "
                          f"importance needs at least 2 (run more trials)")
    quality = _study.quality_metric(study)[0]
    try:
        values = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed),
            target=lambda t: t.user_attrs["metrics"][quality])
    except (ValueError, RuntimeError) as exc:
        raise NasoptError(f"cannot compute gene importance for study {study.study_name!r} "
                          f"({exc})") from None
    series = pd.Series({k: float(v) for k, v in values.items()}, name="importance",
                       dtype="float64")
    series.index.name = "gene"
    return series


def _number(v: float) -> str:
    """Accuracies with 4 decimals; large whole numbers (constraint values) without."""
    return f"{v:.0f}" if abs(v) >= 100 and v == int(v) else f"{v:.4f}"


def to_text(frame: pd.DataFrame, fmt: str) -> str:
    """A table as the CLI prints it: ``table`` (aligned), ``csv``, or ``json`` (records)."""
    if fmt == "csv":
        return frame.to_csv(index=False)
    if fmt == "json":
        return frame.to_json(orient="records", indent=1, date_format="iso") + "\n"
    if frame.empty:
        return "(no rows)\n"
    shown = frame.copy()
    for column in frame.columns:  # na_rep does not reach nullable columns: they print <NA>
        if isinstance(frame[column].dtype, pd.api.extensions.ExtensionDtype):
            shown[column] = frame[column].astype(object).where(frame[column].notna(), "-")
    buf = io.StringIO()
    buf.write(shown.to_string(index=False, float_format=_number, na_rep="-"))
    return buf.getvalue() + "\n"
