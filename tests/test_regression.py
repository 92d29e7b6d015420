"""Regression: float targets (scikit-learn's diabetes data, written to a .npz here), searched
with a user's space (examples/tiny_mlp_space.py) on MAE, exported and loaded back."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nasopt.cli import main as cli
from nasopt.core.data import load_dataset
from nasopt.core.errors import NasoptError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_mlp_space.py"
SEARCH = ["search", "--space", f"{EXAMPLE}:TinyMLPSpace", "--trials", "8", "--quiet",
          "--set", "supernet.epochs=150", "--set", "supernet.warmup_epochs=30",
          "--restrict", "sparsity=0.0", "--restrict", "head.bits=8,32"]


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory):
    from sklearn.datasets import load_diabetes
    d = load_diabetes()
    folder = tmp_path_factory.mktemp("diabetes")
    y = ((d.target - d.target.mean()) / d.target.std()).astype(np.float32)
    np.savez(folder / "diabetes.npz", x=d.data.astype(np.float32), y=y, task="regression")
    np.savez(folder / "plain.npz", x=d.data.astype(np.float32), y=y)  # says nothing of its task
    return folder


def test_the_data_file_states_its_task_or_the_flag_does(diabetes):
    data = load_dataset(str(diabetes / "diabetes.npz"))
    assert data.task == "regression" and data.num_classes == 1
    assert data.y_train.dtype == torch.float32 and data.y_train.shape[1] == 1
    assert "1 target(s) (regression)" in data.summary()
    with pytest.raises(NasoptError, match="for float targets use --task regression"):
        load_dataset(str(diabetes / "plain.npz"))
    flagged = load_dataset(str(diabetes / "plain.npz"), task="regression")
    assert torch.equal(flagged.y_val, data.y_val)  # the same seeded random split


def test_a_regression_search_beats_the_mean_and_exports(diabetes, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert cli.main([*SEARCH, "--dataset", str(diabetes / "diabetes.npz"), "--study", "reg",
                     "--run-dir", str(runs)]) == 0
    from nasopt import api
    study = api.open_study("reg", run_dir=runs)
    setup = study.user_attrs["nasopt"]
    assert setup["objectives"] == ["mae", "size"] and setup["data"]["task"] == "regression"
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    check = setup["sanity"]
    assert check["task"] == "regression" and set(check["baseline"]) == {"mae", "rmse"}
    best = api.best_trial(study)
    mae = study.trials[best].user_attrs["metrics"]["mae"]
    assert mae == min(t.user_attrs["metrics"]["mae"] for t in study.trials)
    assert mae < check["baseline"]["mae"]  # beats always answering the training mean
    assert "accuracy" not in api.pareto(study).columns
    # export, then load in a fresh process: the same outputs as the scored model
    out = tmp_path / "model"
    assert cli.main(["export", "reg", "--trial", "best", "--out", str(out), "--run-dir",
                     str(runs), "--format", "pytorch", "--format", "packed", "--format",
                     "onnx"]) == 0
    assert "(validation mae" in capsys.readouterr().out
    evaluator, data = api.rebuild(study)
    model, _ = evaluator.compressed(study.trials[best].params)
    expected = model(data.x_val).detach().numpy()
    x = data.preprocess.raw(data.x_val).numpy()
    np.save(tmp_path / "x.npy", x)
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, numpy as np, torch, nasopt\n"
         "x = torch.tensor(np.load(sys.argv[1]))\n"
         "np.save(sys.argv[2], nasopt.load(sys.argv[3])(x).detach().numpy())",
         str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), str(out)],
        capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert np.allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-5)
    assert json.loads((out / "model.json").read_text())["quality"] == "mae"
    int8 = api.export(study, best, tmp_path / "int8", ("onnx-int8",))  # verified on MAE
    check = json.loads((int8 / "model.json").read_text())["onnx"]["onnx-int8"]
    assert check["mae_onnx_int8"] <= check["mae_pytorch"] * 1.1
    # quantization-aware fine-tuning on MSE, early stopping on validation MAE
    assert cli.main(["finetune", "--study", "reg", "--trial", "best", "--epochs", "5", "--out",
                     str(tmp_path / "tuned"), "--run-dir", str(runs)]) == 0
    tuned = json.loads((tmp_path / "tuned" / "metrics.json").read_text())
    assert tuned["history"]["metric"] == "mae"
    assert tuned["val_mae"] <= mae + 1e-9  # the inherited weights are the starting point
    assert np.isfinite(tuned["test_mae_packed"])
    assert "val mae" in capsys.readouterr().out
    # distillation from the supernet's largest subnet: MSE to its outputs and to the targets
    assert cli.main(["distill", "reg", "--trial", "best", "--epochs", "3", "--out",
                     str(tmp_path / "student"), "--run-dir", str(runs)]) == 0
    student = json.loads((tmp_path / "student" / "student.json").read_text())
    assert student["history"]["metric"] == "mae"


@pytest.mark.parametrize("objectives, message", [
    ("accuracy,params", "score classes: use mae or rmse"),
    ("f1,size", "score classes: use mae or rmse"),
])
def test_objectives_must_fit_the_task(diabetes, tmp_path, capsys, objectives, message):
    assert cli.main([*SEARCH, "--dataset", str(diabetes / "plain.npz"), "--task", "regression",
                     "--objectives", objectives, "--run-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_regression_objectives_on_class_labels_are_refused(tmp_path, capsys):
    assert cli.main([*SEARCH, "--dataset", "digits", "--objectives", "mae,size",
                     "--run-dir", str(tmp_path)]) == 2
    assert "score regression outputs" in capsys.readouterr().err


def test_nasopt_run_on_regression_data(diabetes, tmp_path):
    """The whole pipeline (search, pick, distill, fine-tune, export, report) on MAE."""
    config = tmp_path / "run.toml"
    config.write_text(f"""run_dir = "{tmp_path / 'runs'}"
[data]
dataset = "{diabetes / 'diabetes.npz'}"
[supernet]
epochs = 60
warmup_epochs = 10
[search]
space = "{EXAMPLE}:TinyMLPSpace"
trials = 4
restrict = {{ sparsity = [0.0] }}
[distill]
epochs = 3
[finetune]
epochs = 3
[export]
out = "{tmp_path / 'model'}"
formats = ["pytorch", "packed", "torchscript", "onnx"]
""")
    assert cli.main(["run", str(config), "--quiet"]) == 0
    card = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert card["metric"] == "mae" and "test_accuracy" not in card
    test = card["test_mae"]
    packed = test["model.packed via nasopt.load"]
    assert np.isfinite(packed) and packed == pytest.approx(test["fine-tuned model (in memory)"],
                                                           rel=1e-4)
    assert "model.onnx via ONNX Runtime" in test
    report = (tmp_path / "model" / "REPORT.md").read_text()
    assert "## Test MAE (lower is better)" in report and "Validation MAE" in report


def test_several_targets_per_sample(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = np.stack([x[:, 0] + x[:, 1], x[:, 2] - x[:, 3]], 1)
    np.savez(tmp_path / "two.npz", x=x, y=y, task="regression")
    data = load_dataset(str(tmp_path / "two.npz"))
    assert data.num_classes == 2 and data.y_val.shape[1] == 2
    from nasopt.core.task import Task
    mean = Task("regression").trivial_outputs(data.y_train, 3, 2)
    assert mean.shape == (3, 2)
    np.savez(tmp_path / "bad.npz", x=x, y=np.where(x[:, :1] > 0, np.nan, 1.0), task="regression")
    with pytest.raises(NasoptError, match="y contains NaN"):
        load_dataset(str(tmp_path / "bad.npz"))
