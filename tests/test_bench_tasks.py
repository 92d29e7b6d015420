"""`nasopt bench tasks`: the data files it writes (diabetes standardized with the training split's
statistics, digits with few zeros), the sign test, and a real run on a tiny setting (1 seed, a
few trials and epochs) whose report has every table, with finite numbers."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from nasopt.cli.main import main
from nasopt.core.data import load_dataset
from nasopt.core.errors import NasoptError
from nasopt_bench.tasks import (
    classification_baselines, diabetes_npz, imbalanced_digits_npz, regression_baselines,
    sign_test,
)


def test_the_data_files(tmp_path):
    diabetes = diabetes_npz(tmp_path)
    data = load_dataset(str(diabetes.path))
    assert data.task == "regression" and len(data.x_train) + len(data.x_val) + len(
        data.x_test) == 442
    train = data.y_train.double().numpy()
    assert abs(train.mean()) < 1e-5 and abs(train.std() - 1) < 1e-5  # the training split's
    assert 50 < diabetes.y_scale < 100  # the target's sd, back to its units
    assert not (tmp_path / "diabetes_raw.npz").exists()
    digits = imbalanced_digits_npz(tmp_path, 0.05)
    data = load_dataset(str(digits.path))
    y = np.concatenate([data.y_train.numpy(), data.y_val.numpy(), data.y_test.numpy()])
    assert (y == 0).sum() == 85 and len(y) == 1704 and (y == 1).sum() == 182
    assert "85 of its 178" in digits.note
    with pytest.raises(NasoptError, match="keeps"):
        imbalanced_digits_npz(tmp_path, 0.5)


def test_the_baselines_and_the_sign_test(tmp_path):
    mean, ridge, ridge8 = regression_baselines(diabetes_npz(tmp_path))
    assert (mean["size"], ridge["size"], ridge8["size"]) == (4, 44, 18)
    assert ridge["test"]["mae"] < mean["test"]["mae"]
    assert ridge8["test"]["mae"] < mean["test"]["mae"]
    plain, balanced = classification_baselines(imbalanced_digits_npz(tmp_path, 0.05))
    assert plain["size"] == balanced["size"] == (64 * 10 + 10) * 4
    assert plain["test"]["f1"] > 0.9 and 'class_weight="balanced"' in balanced["model"]
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(5, 0) == sign_test(0, 5) == 2 / 32
    assert sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)


def test_a_tiny_run_writes_every_table(tmp_path, capsys):
    out = tmp_path / "tasks.md"
    runs = tmp_path / "runs"
    argv = ["bench", "tasks", "--seeds", "1", "--trials", "4", "--epochs", "3", "--out",
            str(out), "--run-dir", str(runs)]
    assert main(argv) == 0
    text = out.read_text()
    assert "Command: `nasopt bench tasks --seeds 1 --trials 4 --epochs 3" in text
    assert "Machine: " in text and "Wall time: " in text
    assert "301 train / 53 val / 88 test" in text  # diabetes
    assert "1159 train / 205 val / 340 test" in text and "class 0 4.99%" in text
    for heading in ("## 1. Regression", "## 2. Imbalanced classification",
                    "**Verdict (regression).**", "**Verdict (imbalanced classification).**"):
        assert heading in text
    tables = re.findall(r"((?:^\|.*\|\n)+)", text, re.M)
    headers = [t.splitlines()[0] for t in tables]
    assert len(tables) == 5, headers
    assert any("test RMSE" in h and "largest val MAE" in h for h in headers)
    assert any("test macro-F1" in h for h in headers)
    for label in ("always the training mean", "Ridge float32", "Ridge int8",
                  "nasopt pick (mae,size", "LogisticRegression (C", "class_weight=\"balanced\"",
                  "nasopt pick (f1,size", "nasopt pick (accuracy,size"):
        assert label in text, label
    rows = [line for t in tables for line in t.splitlines()[2:]]
    assert sum(" f1,size " in r for r in rows) >= 1 and sum(" accuracy,size " in r for r in rows)
    numbers = [float(x) for x in re.findall(r"(?<![\w.])-?\d+\.\d+", text)]
    assert numbers and all(math.isfinite(x) for x in numbers)
    assert "nan" not in text.lower().replace("nasopt", "")
    # the test split stays out of every search: nasopt.api scores on validation
    assert "The test split is read only after the searches" in " ".join(text.split())
    # a second run into the same folders is refused: it would reuse supernets and trials
    assert main(argv) == 2
    assert "exists: a re-run would reuse" in capsys.readouterr().err
