"""PNG plots of a study: the Pareto front (feasible and infeasible trials, budget lines), the
hypervolume over trials (per strategy), and gene importance.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, so no global figure state or
backend choice); each ``render_*`` returns the PNG's bytes, :func:`save` writes one atomically.
"""
from __future__ import annotations

import io
from pathlib import Path

import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nasopt.inspection import tables as inspection
from nasopt.search import study as _study
from nasopt.core.checkpoint import atomic_write_bytes
from nasopt.core.errors import NasoptError
from nasopt.core.objectives import METRIC_OF

KINDS = ("pareto", "hypervolume", "importance")
LABELS = {"size": "packed size (bytes)", "float_size": "float32 size (bytes)",
          "params": "parameters", "macs": "MACs per sample", "nonzero_params": "non-zero params",
          "latency": "latency (ms, batch 1)", "sram": "peak activation memory (bytes)"}


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _done(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in _study.completed(study) if "metrics" in t.user_attrs]


def render_pareto(study: optuna.Study, setting: inspection.HvSetting | None = None) -> bytes:
    """The study's quality metric (accuracy unless an objective names another) against the cost
    axis: feasible trials as dots, infeasible as crosses, the feasible Pareto set highlighted (a
    staircase when the objectives are exactly that metric and that cost), and a dashed line at
    the budget on that axis."""
    setting = setting or inspection.hv_setting([study])
    metric = METRIC_OF[setting.cost]
    quality = setting.quality
    done = [t for t in _done(study) if inspection.metric_value(t, metric) is not None
            and inspection.metric_value(t, quality) is not None]
    if not done:
        raise NasoptError(f"study {study.study_name!r} has no completed trial with "
                          f"{setting.cost} to plot")
    front = _study.pareto_numbers(study)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()

    def xy(trials):  # noqa: ANN001, ANN202
        return ([t.user_attrs["metrics"][metric] for t in trials],
                [t.user_attrs["metrics"][quality] for t in trials])

    feasible = [t for t in done if _study.is_feasible(t)]
    infeasible = [t for t in done if not _study.is_feasible(t)]
    if feasible:
        ax.scatter(*xy(feasible), s=16, color="tab:blue", alpha=0.6,
                   label=f"feasible ({len(feasible)})")
    if infeasible:
        ax.scatter(*xy(infeasible), s=22, marker="x", color="tab:gray", alpha=0.7,
                   label=f"infeasible ({len(infeasible)})")
    best = sorted((t for t in done if t.number in front),
                  key=lambda t: t.user_attrs["metrics"][metric])
    if best:
        xs, ys = xy(best)
        objectives = _study.setup_of(study).get("objectives", [])
        if objectives == [quality, setting.cost]:
            ax.step(xs, ys, where="post", color="tab:red", lw=1.2)
        ax.scatter(xs, ys, s=40, marker="o", facecolors="none", edgecolors="tab:red", lw=1.5,
                   label=f"Pareto set ({len(best)})")
    budgets = inspection.budgets_of(study)
    for name, limit in budgets.items():
        label = f"budget {inspection.budget_text(study, name, limit)}"
        if name == setting.cost:
            ax.axvline(limit, color="tab:green", ls="--", lw=1.2, label=label)
        else:  # a budget on another metric: the crosses show whom it excludes
            ax.plot([], [], ls="--", color="tab:green", alpha=0.4,
                    label=label + " (not on this axis)")
    values = [t.user_attrs["metrics"][metric] for t in done] + [
        limit for name, limit in budgets.items() if name == setting.cost]
    if min(values) > 0 and max(values) / min(values) > 50:
        ax.set_xscale("log")
    ax.set_xlabel(LABELS.get(setting.cost, setting.cost))
    ax.set_ylabel(quality + ("" if setting.higher else " (lower is better)"))
    ax.set_title(f"{study.study_name}: {len(done)} completed trials", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def render_hypervolume(study: optuna.Study,
                       setting: inspection.HvSetting | None = None) -> bytes:
    """Hypervolume of the feasible trials so far against completed trials, one curve per
    strategy (each over its own trials) and one for the whole study when there are several."""
    setting = setting or inspection.hv_setting([study])
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    drawn = 0
    for name, trials in inspection.strategy_groups(study):
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE
                and "metrics" in t.user_attrs]
        if not done:
            continue
        curve = setting.curve(done)
        whole = name == "(all)"  # dashed, so the first strategy's own curve stays visible
        ax.plot(range(1, len(curve) + 1), curve, lw=1.6 if whole else 1.3,
                ls="--" if whole else "-", color="black" if whole else None,
                zorder=1 if whole else 2,
                label=f"{name} ({len(done)} trials): {curve[-1]:.4f}")
        drawn += 1
    if not drawn:
        raise NasoptError(f"study {study.study_name!r} has no completed trial to plot")
    ax.set_xlabel("completed trials (of the strategy)")
    ax.set_ylabel("hypervolume")
    ax.set_title(f"{study.study_name}: {setting.quality} x {setting.cost}, reference "
                 f"{setting.floor:g} at {inspection.format_limit(setting.cost, setting.reference)}"
                 f" ({setting.why})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def render_importance(study: optuna.Study, seed: int = inspection.IMPORTANCE_SEED) -> bytes:
    """Horizontal bars: fANOVA importance of each gene for the study's quality metric."""
    values = inspection.importance(study, seed).sort_values()
    quality = _study.quality_metric(study)[0]
    fig = Figure(figsize=(7, max(2.5, 0.3 * len(values) + 1)))
    ax = fig.add_subplot()
    ax.barh(values.index.tolist(), values.to_numpy(), color="tab:blue")
    ax.set_xlabel(f"importance for {quality} (fANOVA, normalized to sum 1)")
    ax.set_title(f"{study.study_name}: gene importance for {quality} "
                 f"({len(_done(study))} trials, seed {seed})", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def render(study: optuna.Study, kind: str, setting: inspection.HvSetting | None = None) -> bytes:
    if kind == "pareto":
        return render_pareto(study, setting)
    if kind == "hypervolume":
        return render_hypervolume(study, setting)
    if kind == "importance":
        return render_importance(study)
    raise NasoptError(f"unknown plot kind {kind!r}; choose one of {', '.join(KINDS)}")


def save(study: optuna.Study, kind: str, out: str | Path,
         setting: inspection.HvSetting | None = None, force: bool = False) -> Path:
    """Write the plot ``kind`` of ``study`` to the PNG file ``out`` (atomically; an existing
    file only with ``force``)."""
    out = inspection.check_out_file(out, (".png",), force)
    atomic_write_bytes(out, render(study, kind, setting))
    return out
