"""Is a search above chance? The supernet check of every supernet search, and its warnings.

After the supernet is trained (or reused) the search measures, on the validation split:

- the float accuracy of the supernet's largest and smallest subnets (architecture genes at their
  largest / smallest options, no compression at all: inherited weights, BN recalibrated),
- the accuracy of the smallest subnet compressed as a trial would score it (the space's
  :meth:`~nasopt.core.space.SearchSpace.smallest` arch: most compressed),
- the majority-class rate: the accuracy of always answering the most frequent class;
- the trivial predictor's value of every metric the search scores (always answering the training
  split's most frequent class, or its mean target for regression; :mod:`nasopt.core.task`): the
  baseline a search on that metric must beat.

For regression the subnets are measured by MAE (lower is better) and the supernet is flagged when
its largest subnet does no better than the trivial predictor.

The record (:func:`measure`) is stored in the study's setup (user attr ``nasopt``, key
``sanity``); :func:`warnings` says, in one line each, when the supernet or the search's best
trial is near chance (see :data:`CHANCE_MARGIN`) and what to try. ``nasopt search``, ``nasopt
studies show``, the HTML report and ``nasopt run`` all show it from here.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only where measured: `studies show` and the report start without it
    import optuna
    import torch

#: An accuracy is "near chance" when it closes less than this fraction of the gap between the
#: majority-class rate and 100 %: below ``majority + CHANCE_MARGIN * (1 - majority)``. With ten
#: balanced classes (majority 10 %) that is below 19 %; with two (50 %) below 55 %; with a 90 %
#: majority class below 91 %.
CHANCE_MARGIN = 0.1

#: the key of the record in the study's setup (user attr ``nasopt``)
KEY = "sanity"


def chance_threshold(majority: float) -> float:
    """The accuracy below which a model is near chance (see :data:`CHANCE_MARGIN`)."""
    return majority + CHANCE_MARGIN * (1.0 - majority)


def near_chance(acc: float, majority: float) -> bool:
    return acc < chance_threshold(majority)


def majority_rate(y: torch.Tensor, num_classes: int) -> float:
    """The accuracy of always answering the most frequent class of ``y``."""
    import torch
    counts = torch.bincount(y.long().flatten().cpu(), minlength=num_classes)
    return counts.max().item() / max(1, len(y))


def measure(evaluator, supernet_epochs: int) -> dict[str, Any]:  # noqa: ANN001
    """The supernet check of ``evaluator`` (a :class:`nasopt.search.evaluate.Evaluator`): a JSON-able
    record of fractions in [0, 1] and what the advice needs (the space's compression genes with
    their options, the supernet's epochs)."""
    from nasopt.core.scores import scores
    from nasopt.supernet.train import quality  # no gradients: float_model and quality need none
    space = evaluator.space
    x_val, y_val = evaluator._x_val, evaluator._y_val
    targets = y_val.cpu().numpy()
    regression = evaluator.task.regression
    metric = evaluator.task.default_quality  # accuracy, or mae for regression

    def score(model) -> float:  # noqa: ANN001
        return quality(model, x_val, y_val, evaluator.task)

    largest, smallest = space.largest(), space.smallest()
    compression = {g: list(space.genes[g]) for g in space.compression_genes() if g in space.genes}
    compressed = None
    if compression:  # the arch a trial would score lowest on size: most compressed (cached)
        found = evaluator(smallest)
        compressed = found.scores[metric] if regression else found.accuracy
    return {
        "task": evaluator.task.kind,
        "metric": metric,
        "majority": None if regression else majority_rate(y_val, space.num_classes),
        "largest": score(evaluator.float_model(largest)),
        "smallest": score(evaluator.float_model(smallest)),
        "smallest_compressed": compressed,
        "val_samples": len(y_val),
        "classes": space.num_classes,
        "supernet_epochs": supernet_epochs,
        "compression_genes": compression,
        # the trivial predictor (nasopt.core.task), by every metric the search scores
        "baseline": scores(evaluator.trivial_outputs, targets, evaluator.metrics),
    }


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def summary(record: Mapping[str, Any]) -> str:
    """The one line a search prints: the check's numbers."""
    compressed = record.get("smallest_compressed")
    if record.get("task") == "regression":
        base = record.get("baseline") or {}
        return (f"supernet check (validation MAE, lower is better): largest subnet "
                f"{record['largest']:.4g}, smallest {record['smallest']:.4g} (float"
                + (f"; compressed {compressed:.4g}" if compressed is not None else "")
                + "); predicting the training mean: "
                + ", ".join(f"{name} {value:.4g}" for name, value in base.items())
                + f" ({record['val_samples']} samples)"
                + ("; NO BETTER THAN THE MEAN" if supernet_near_chance(record) else ""))
    return (f"supernet check (validation accuracy): largest subnet {_pct(record['largest'])}, "
            f"smallest {_pct(record['smallest'])} (float"
            + (f"; compressed {_pct(compressed)}" if compressed is not None else "")
            + f"); majority class {_pct(record['majority'])} ({record['val_samples']} samples"
            + _baseline_text(record) + ")"
            + ("; NEAR CHANCE" if supernet_near_chance(record) else ""))


def _baseline_text(record: Mapping[str, Any]) -> str:
    """The majority-class predictor's other scores, for the summary ('' without any)."""
    others = [f"{name} {value:.3g}" for name, value in (record.get("baseline") or {}).items()
              if name != "accuracy"]
    return f"; that predictor's {', '.join(others)}" if others else ""


def supernet_near_chance(record: Mapping[str, Any]) -> bool:
    if record.get("task") == "regression":  # no better than the training mean
        return record["largest"] >= (record.get("baseline") or {}).get("mae", float("inf"))
    return near_chance(record["largest"], record["majority"])


def restrict_advice(record: Mapping[str, Any]) -> str:
    """``--restrict`` options that take the harshest compression out of the space: for each
    kind of compression gene (sparsity, bit-widths, low rank) that still has options harsher
    than these; empty when none has."""
    genes: Mapping[str, list] = record.get("compression_genes") or {}
    parts = []
    if any(v > 0.5 for v in genes.get("sparsity", [])):
        parts.append("--restrict sparsity=0.0,0.5")
    for suffix, mild, keep in ((".bits", lambda v: v >= 8, "8,32"),
                               (".rank", lambda v: v >= 1.0, "1.0")):
        harsh = [g for g, opts in genes.items()
                 if g.endswith(suffix) and not all(mild(v) for v in opts)]
        if harsh:
            parts.append(f"--restrict {harsh[0]}={keep}"
                         + (f" (likewise {', '.join(harsh[1:])})" if len(harsh) > 1 else ""))
    return " ".join(parts)


def best_trial(study: optuna.Study) -> tuple[int, float] | None:
    """(number, accuracy) of the completed trial with the best accuracy among those that meet
    the budgets (among all when none does, or there are no budgets); None without one."""
    from nasopt.search.study import completed, is_feasible
    done = completed(study)
    feasible = [t for t in done if is_feasible(t)]
    scored = [(t.user_attrs.get("metrics", {}).get("accuracy"), t.number)
              for t in (feasible or done)]
    scored = [(a, n) for a, n in scored if a is not None]
    if not scored:
        return None
    acc, number = max(scored, key=lambda p: (p[0], -p[1]))
    return number, acc


def best_by_quality(study: optuna.Study) -> tuple[str, int, float] | None:
    """(metric, number, value) of the best trial by the study's quality metric
    (:func:`nasopt.search.study.quality_metric`) among those that meet the budgets (among all
    when none does); None without one."""
    from nasopt.search.study import completed, is_feasible, quality_metric
    name, higher = quality_metric(study)
    done = completed(study)
    feasible = [t for t in done if is_feasible(t)]
    scored = [(v if higher else -v, -t.number) for t in (feasible or done)
              if (v := t.user_attrs.get("metrics", {}).get(name)) is not None]
    if not scored:
        return None
    value, number = max(scored)
    return name, -number, value if higher else -value


def metric_warnings(record: Mapping[str, Any] | None, study: optuna.Study) -> list[str]:
    """One line when the study's quality metric is not accuracy (whose rule is
    :func:`warnings`) and its best trial does no better than always answering the majority
    class."""
    found = best_by_quality(study)
    if not record or found is None or found[0] == "accuracy":
        return []
    name, number, value = found
    base = (record.get("baseline") or {}).get(name)
    if base is None:
        return []
    from nasopt.search.study import quality_metric
    higher = quality_metric(study)[1]
    if (value > base) if higher else (value < base):
        return []
    trivial = ("always predicting the training mean" if record.get("task") == "regression"
               else "always answering the majority class")
    return [f"the search's best trial by {name} (trial {number}) scores {value:.4g}, no better "
            f"than {trivial} ({base:.4g}): train the supernet longer, restrict the compression "
            f"genes, or check the data's "
            f"{'targets and their scale' if record.get('task') == 'regression' else 'labels'}"]


def warnings(record: Mapping[str, Any] | None, best: tuple[int, float] | None = None
             ) -> list[str]:
    """One line per problem: the supernet near chance; the best trial (``best``: number and
    accuracy, see :func:`best_trial`) near chance. Empty when all is well or nothing was
    checked (tabular mode, a study from before the check)."""
    if not record:
        return []
    if record.get("task") == "regression":
        return ([f"the supernet does no better than predicting the training mean: its largest "
                 f"subnet's validation MAE is {record['largest']:.4g}, the mean's "
                 f"{record['baseline']['mae']:.4g}; train it longer (--set supernet.epochs=N; it "
                 f"had {record.get('supernet_epochs')}) and check the data's targets and scale"]
                if supernet_near_chance(record) else [])
    out = []
    majority = record["majority"]
    untrained = supernet_near_chance(record)
    if untrained:
        out.append(f"the supernet is near chance: its largest subnet scores "
                   f"{_pct(record['largest'])} on validation, always answering the majority "
                   f"class scores {_pct(majority)}, and every trial will score about that; "
                   f"train it longer (--set supernet.epochs=N; it had "
                   f"{record.get('supernet_epochs')}) and check the data's labels and scale")
    if best is not None and near_chance(best[1], majority):
        if untrained:
            why = "the supernet itself is near chance (see above)"
        else:
            advice = restrict_advice(record)
            why = (f"the supernet's largest subnet scores {_pct(record['largest'])}, so the "
                   f"searched archs are too small or too compressed: "
                   + (f"restrict the compression genes, e.g. {advice}, " if advice else "")
                   + "or restrict architecture genes to their larger options")
        out.append(f"the search's best trial (trial {best[0]}) scores {_pct(best[1])}, near "
                   f"chance (majority class {_pct(majority)}): {why}")
    return out


def of_study(study: optuna.Study) -> dict[str, Any] | None:
    """The check recorded with ``study``; None for tabular studies and older ones."""
    from nasopt.search.study import SETUP_ATTR
    return study.user_attrs.get(SETUP_ATTR, {}).get(KEY)


def study_lines(study: optuna.Study) -> list[str]:
    """What ``studies show`` and the HTML report print: the summary, then any warnings."""
    record = of_study(study)
    if not record:
        return []
    return [summary(record)] + [f"warning: {w}" for w in warnings(record, best_trial(study))
                                + metric_warnings(record, study)]
