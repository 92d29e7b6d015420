"""The quality a search optimizes: balanced accuracy and macro-F1 beside accuracy, a user's own
metric function (found again in fresh processes), and the best trial following the study's
metric."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nasopt.cli import main as cli
from nasopt.core import scores
from nasopt.core.errors import NasoptError
from nasopt.core.metrics import Metrics
from nasopt.core.objectives import get_objectives

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_mlp_space.py"
FAST = ["--set", "supernet.epochs=2", "--set", "supernet.warmup_epochs=1", "--quiet"]
USER_METRIC = '''import numpy as np


def worst_recall(outputs, targets):
    """The lowest recall of any class in the labels."""
    predicted = outputs.argmax(1)
    return float(min(np.mean(predicted[targets == c] == c) for c in np.unique(targets)))


worst_recall.higher_is_better = True
'''


def test_builtin_scores_equal_scikit_learns():
    import warnings

    from sklearn.metrics import balanced_accuracy_score, f1_score
    rng = np.random.default_rng(0)
    for _ in range(100):
        n, k = int(rng.integers(1, 40)), int(rng.integers(2, 6))
        out, y = rng.normal(size=(n, k)), rng.integers(0, k, n)
        predicted = out.argmax(1)
        assert scores.accuracy(out, y) == np.mean(predicted == y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn's note on predicted-only classes
            balanced = balanced_accuracy_score(y, predicted)
            f1 = f1_score(y, predicted, average="macro", zero_division=0)
        assert scores.balanced_accuracy(out, y) == pytest.approx(balanced, abs=1e-12)
        assert scores.macro_f1(out, y) == pytest.approx(f1, abs=1e-12)


def test_metrics_keep_their_scores_flat_in_the_record():
    m = Metrics(accuracy=0.5, params=1, macs=2, float_bytes=4, scores={"f1": 0.25, "mine": 3.0})
    record = m.to_dict()
    assert record["f1"] == 0.25 and record["mine"] == 3.0 and "scores" not in record
    assert Metrics.from_dict(record) == m
    f1, size = get_objectives(["f1", "size"])
    assert f1.direction == "maximize" and f1.value(m) == 0.25


def test_a_user_metric_and_its_mistakes(tmp_path):
    (tmp_path / "good.py").write_text(USER_METRIC + "\n\ndef loss(o, t):\n    return 1.0\n\n"
                                      "loss.higher_is_better = False\n\nsize = 3\n")
    metric = scores.load_metric(f"{tmp_path / 'good.py'}:worst_recall")
    assert metric.name == "worst_recall" and metric.direction == "maximize"
    assert metric.spec == f"{tmp_path / 'good.py'}:worst_recall"
    (objective,) = get_objectives(["loss"], user=scores.load_metric(f"{tmp_path}/good.py:loss"))
    assert objective.direction == "minimize"
    (tmp_path / "bad.py").write_text("def f(o, t):\n    return 1.0\n\n"
                                     "def size(o, t):\n    return 1.0\n\nsize.higher_is_better = 1\n"
                                     "def accuracy(o, t):\n    return 1.0\n\n"
                                     "accuracy.higher_is_better = True\n")
    with pytest.raises(NasoptError, match=r"f.higher_is_better = True \(or False\)"):
        scores.load_metric(f"{tmp_path}/bad.py:f")
    with pytest.raises(NasoptError, match="say whether higher is better"):
        scores.load_metric(f"{tmp_path}/bad.py:size")  # 1 is not a bool
    with pytest.raises(NasoptError, match="taken by a built-in objective"):
        scores.load_metric(f"{tmp_path}/bad.py:accuracy")
    with pytest.raises(NasoptError, match="has no 'nope'"):
        scores.load_metric(f"{tmp_path}/bad.py:nope")


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """Digits with class 0 kept at about 5 % of the samples."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    keep = np.flatnonzero(digits.target != 0)
    zeros = np.flatnonzero(digits.target == 0)[:80]
    order = np.sort(np.concatenate([keep, zeros]))
    path = tmp_path_factory.mktemp("imbalanced") / "digits_imbalanced.npz"
    np.savez(path, x=digits.images[order], y=digits.target[order])
    return path


def test_a_search_on_f1_records_every_score_and_picks_by_f1(imbalanced, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert cli.main(["search", "--space", f"{EXAMPLE}:TinyMLPSpace", "--dataset", str(imbalanced),
                     "--objectives", "f1,size", "--trials", "6", "--study", "f1", *FAST,
                     "--run-dir", str(runs)]) == 0
    from nasopt import api
    study = api.open_study("f1", run_dir=runs)
    table = api.trials(study)
    assert {"accuracy", "balanced_accuracy", "f1"} <= set(table.columns)
    assert [t.values[0] for t in study.trials] == [t.user_attrs["metrics"]["f1"]
                                                 for t in study.trials]
    best = api.best_trial(study)
    top = max(t.user_attrs["metrics"]["f1"] for t in study.trials)
    assert study.trials[best].user_attrs["metrics"]["f1"] == top
    # compare, hypervolume and plots follow the study's metric
    frame = api.compare([study])
    assert "best_f1" in frame.columns and frame["best_f1"].iloc[0] == pytest.approx(top)
    assert "hypervolume of f1 x size" in frame.attrs["hypervolume"]
    from nasopt.inspection.tables import hv_setting
    setting = hv_setting([study])
    assert setting.quality == "f1" and setting.floor == 0.0
    assert setting.of(study.trials) > 0  # every trial is feasible: a positive volume
    for kind in ("pareto", "hypervolume", "importance"):
        assert cli.main(["studies", "plot", "f1", "--kind", kind, "--out",
                         str(tmp_path / f"{kind}.png"), "--run-dir", str(runs)]) == 0
    assert "for f1" in capsys.readouterr().out
    with pytest.raises(NasoptError, match="tabular mode reads accuracy"):
        from nasopt.core.config import load_config
        api.search(load_config(None, ["search.space=nb201", "search.table=nb201_cifar10",
                                      "search.objectives=[\"f1\", \"size\"]",
                                      f"run_dir={json.dumps(str(runs))}"]))


def test_a_user_metric_drives_a_search_and_is_found_again_elsewhere(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "worst.py").write_text(USER_METRIC)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}

    def run(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "nasopt", *argv], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)

    runs = str(tmp_path / "runs")
    scored = run(tmp_path / "mine", "search", "--space", f"{EXAMPLE}:TinyMLPSpace", "--dataset",
                 "digits", "--metric", "worst.py:worst_recall", "--trials", "2", *FAST,
                 "--study", "scored-only", "--run-dir", runs)  # scored, searched on accuracy
    assert scored.returncode == 0, scored.stderr
    assert "worst_recall" in scored.stdout
    search = run(tmp_path / "mine", "search", "--space", f"{EXAMPLE}:TinyMLPSpace", "--dataset",
                 "digits", "--metric", "worst.py:worst_recall", "--objectives",
                 "worst_recall,size", "--trials", "3", *FAST, "--run-dir", runs)
    assert search.returncode == 0, search.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    show = run(elsewhere, "studies", "show", "tiny-mlp-digits", "--run-dir", runs)
    assert show.returncode == 0 and "worst_recall" in show.stdout, show.stderr
    export = run(elsewhere, "export", "tiny-mlp-digits", "--trial", "best", "--out", "model",
                 "--run-dir", runs)
    assert export.returncode == 0, export.stderr
    assert "by worst_recall" in json.loads((elsewhere / "model" / "model.json").read_text())[
        "picked"]
    compare = run(elsewhere, "studies", "compare", "tiny-mlp-digits", "--run-dir", runs)
    assert compare.returncode == 0 and "best_worst_recall" in compare.stdout, compare.stderr
    # the function changed its direction since: the study's records no longer hold
    (tmp_path / "mine" / "worst.py").write_text(USER_METRIC.replace("= True", "= False"))
    again = run(elsewhere, "export", "tiny-mlp-digits", "--trial", "0", "--out", "model2",
                "--run-dir", runs)
    assert again.returncode == 2 and "has changed since the study was run" in again.stderr


def test_the_majority_class_baseline_of_every_metric_and_its_warning():
    import torch

    from nasopt.core.task import CLASSIFICATION, Task
    from nasopt.search import sanity
    labels = np.array([2, 2, 2, 0, 1, 2])
    outputs = CLASSIFICATION.trivial_outputs(torch.tensor(labels), 6, 3)
    assert (outputs.argmax(1) == 2).all()
    targets = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert Task("regression").trivial_outputs(targets, 3, 2).tolist() == [[2.0, 4.0]] * 3
    base = scores.scores(outputs, labels, scores.BUILTIN)
    assert base == {"accuracy": 4 / 6, "balanced_accuracy": 1 / 3,
                    "f1": pytest.approx((2 * 4 / (4 + 6)) / 3)}
    record = {"majority": 4 / 6, "largest": 0.9, "smallest": 0.5, "smallest_compressed": None,
              "val_samples": 6, "classes": 3, "supernet_epochs": 1, "compression_genes": {},
              "baseline": base}
    assert "that predictor's balanced_accuracy 0.333, f1 0.267" in sanity.summary(record)

    class Trial:  # what metric_warnings reads of a trial
        def __init__(self, number, f1):
            self.number, self.user_attrs, self.constraints = number, {"metrics": {"f1": f1}}, []
            self.state = __import__("optuna").trial.TrialState.COMPLETE

    class Study:
        user_attrs = {"nasopt": {"objectives": ["f1", "size"]}}

        def __init__(self, values):
            self.trials = [Trial(i, v) for i, v in enumerate(values)]

        def get_trials(self, deepcopy=False, states=None):
            return self.trials

    assert sanity.metric_warnings(record, Study([0.1, 0.2, 0.25])) == [
        "the search's best trial by f1 (trial 2) scores 0.25, no better than always answering "
        "the majority class (0.2667): train the supernet longer, restrict the compression "
        "genes, or check the data's labels"]
    assert sanity.metric_warnings(record, Study([0.1, 0.5])) == []


def test_budgets_on_scores_are_floors_or_ceilings():
    from nasopt.core.objectives import get_constraints
    m = Metrics(accuracy=0.9, params=1, macs=2, float_bytes=4,
                scores={"f1": 0.7, "mae": 0.4, "mine": 2.0})
    f1, acc, mae = get_constraints({"f1": 0.8, "accuracy": "85%", "mae": "0.5"})
    assert f1.floor and f1.value(m) == pytest.approx(0.1)  # 0.1 short of the floor: infeasible
    assert acc.floor and acc.value(m) == pytest.approx(-0.05)
    assert not mae.floor and mae.value(m) == pytest.approx(-0.1)
    user = scores.Metric("mine", False, lambda o, t: 0.0, "mine")
    (mine,) = get_constraints({"mine": 3}, user)
    assert not mine.floor and mine.value(m) == pytest.approx(-1.0)
    with pytest.raises(NasoptError, match="unknown budget.*f1, mae"):
        get_constraints({"mine": 3})
    with pytest.raises(NasoptError, match="cannot read the f1 budget 'high'"):
        get_constraints({"f1": "high"})


@pytest.mark.parametrize("argv, message", [
    (["--budget", "f1"], "write SCORE=VALUE"),
    (["--budget", "f1=lots"], "cannot read the f1 budget"),
    (["--budget", "mae=0.5"], "the budget(s) on ['mae'] score regression outputs"),
    (["--table", "--space", "nb201", "--budget", "f1=0.5"], "tabular mode reads accuracy"),
])
def test_score_budget_mistakes_are_one_line(tmp_path, capsys, argv, message):
    code = cli.main(["search", "--space", f"{EXAMPLE}:TinyMLPSpace", "--dataset", "digits",
                     "--trials", "2", *FAST, "--run-dir", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("nasopt: error:") == 1 and message in err, err


def test_the_mnasnet_reward_refuses_what_it_cannot_rank():
    from optuna.study import StudyDirection as D

    from nasopt.strategies.nni_bridge import scalar_reward
    from nasopt.strategies.reinforce import mnasnet_rewards
    with pytest.raises(NasoptError, match="with mae or rmse use evolution"):
        mnasnet_rewards([[0.5, 100]], [D.MINIMIZE, D.MINIMIZE])
    with pytest.raises(NasoptError, match="a trial scored -50"):
        mnasnet_rewards([[-50, 100], [-50, 10000]], [D.MAXIMIZE, D.MINIMIZE])
    with pytest.raises(NasoptError, match="a trial scored -1"):
        scalar_reward([-1.0, 100.0], [D.MAXIMIZE, D.MINIMIZE], [None, None], [[-1.0, 100.0]])
    from nasopt.core.objectives import get_constraints
    with pytest.raises(NasoptError, match=r"outside \[0, 1\]; write e.g. 0.9 or 90%"):
        get_constraints({"accuracy": "90"})
