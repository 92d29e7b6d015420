from __future__ import annotations

import dataclasses
import os
import random

import numpy as np
import pytest
import torch

from nasopt.core.data import FASHION_DIR, _fashion_mnist, extend_validation, load_dataset
from nasopt.core.errors import NasoptError


def _disjoint(*splits: torch.Tensor) -> bool:
    rows = [tuple(r.flatten().tolist()) for s in splits for r in s]
    return len(rows) == len(set(rows))


def test_digits_splits_are_fixed_disjoint_and_stratified(datasets):
    d = datasets["digits"]
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10
    assert len(d.x_train) + len(d.x_val) + len(d.x_test) == 1797
    assert len(d.x_test) == round(1797 * 0.2) or abs(len(d.x_test) - 359) <= 5
    assert _disjoint(d.x_train, d.x_val, d.x_test)
    assert float(d.x_train.max()) <= 1.0  # scaled from 0..16
    again = load_dataset("digits")
    assert torch.equal(again.x_val, d.x_val) and again.fingerprint == d.fingerprint
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.x_val, d.x_val) and other.fingerprint != d.fingerprint
    # stratified: every class is in every split
    for y in (d.y_train, d.y_val, d.y_test):
        assert set(y.tolist()) == set(range(10))


def test_mnist1d_keeps_the_standard_test_set(datasets):
    d = datasets["mnist1d"]
    assert d.input_shape == (1, 40)
    assert len(d.x_test) == 1000
    assert len(d.x_train) + len(d.x_val) == 4000


def test_extend_validation_adds_fresh_mnist1d_samples_and_nothing_else(datasets):
    d = datasets["mnist1d"]
    more = extend_validation(d, 250)
    assert len(more.y_val) == len(d.y_val) + 250 and more.x_val.shape[1:] == d.x_val.shape[1:]
    assert torch.equal(more.x_val[:len(d.y_val)], d.x_val)  # the split's samples come first
    for split in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(more, split), getattr(d, split))
    assert more.fingerprint != d.fingerprint and more.name == "mnist1d+250val"
    added = more.x_val[len(d.y_val):]
    assert _disjoint(d.x_train, d.x_val, d.x_test, added)  # fresh: none is a built-in sample
    assert set(more.y_val[len(d.y_val):].tolist()) == set(range(10))
    # generated like the built-in data: normalized to about zero mean and unit spread
    assert abs(float(added.mean())) < 0.1 and 0.8 < float(added.std()) < 1.2
    # the generator reseeds Python's and NumPy's global generators; the call leaves them be
    random.seed(7)
    np.random.seed(7)
    expected = random.random(), np.random.rand()
    random.seed(7)
    np.random.seed(7)
    again = extend_validation(d, 250)
    assert (random.random(), np.random.rand()) == expected
    assert torch.equal(again.x_val, more.x_val) and again.fingerprint == more.fingerprint
    assert torch.equal(extend_validation(d, 100).x_val, more.x_val[:len(d.y_val) + 100])
    assert not torch.equal(extend_validation(d, 250, seed=44).x_val, more.x_val)
    assert extend_validation(d, 0) is d
    with pytest.raises(NasoptError, match="mnist1d \\(all classes\\) only, not 'digits'.*"
                       "--dataset mnist1d"):
        extend_validation(datasets["digits"], 10)
    with pytest.raises(NasoptError, match="not 'mnist1d@x.npz'"):  # a user file so named
        extend_validation(dataclasses.replace(d, name="mnist1d@x.npz"), 10)
    with pytest.raises(NasoptError, match="not 'mnist1d\\[0,1\\]'"):  # renumbered labels
        extend_validation(load_dataset("mnist1d", classes=[0, 1]), 10)
    assert len(extend_validation(load_dataset("mnist1d", fraction=0.5), 10).y_val) > 10
    with pytest.raises(NasoptError, match=">= 0"):
        extend_validation(d, -1)


def test_npz_with_and_without_test_arrays(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 16)).astype(np.float32), np.arange(200) % 4
    np.savez(tmp_path / "a.npz", x=x, y=y)
    d = load_dataset(str(tmp_path / "a.npz"))
    assert d.input_shape == (1, 16) and d.num_classes == 4 and len(d.x_test) == 40
    np.savez(tmp_path / "b.npz", x=x, y=y, x_test=x[:30], y_test=y[:30])
    d = load_dataset(str(tmp_path / "b.npz"))
    assert len(d.x_test) == 30 and len(d.x_train) + len(d.x_val) == 200
    assert torch.allclose(d.x_test[:, 0], torch.from_numpy(x[:30]))


def test_csv_with_label_column(tmp_path):
    rows = ["a,b,c,target"] + [f"{i},{i * 2},{-i},{i % 3}" for i in range(60)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    d = load_dataset(str(tmp_path / "d.csv"), label_column="target")
    assert d.input_shape == (1, 3) and d.num_classes == 3
    with pytest.raises(NasoptError, match="no label column 'label'"):
        load_dataset(str(tmp_path / "d.csv"))


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.full((50, 4), np.nan), "y": np.zeros(50)}, "NaN"),
    ({"x": np.zeros((50, 4)), "y": np.zeros(49)}, "one integer label per sample"),
    ({"x": np.zeros((50, 4)), "y": np.arange(50) * 2 % 7 + 3}, "0..K-1"),
    ({"z": np.zeros((50, 4))}, "arrays named 'x' and 'y'"),
    ({"x": np.zeros((50, 4)), "y": np.arange(50) % 2, "x_test": np.zeros((5, 3)),
      "y_test": np.zeros(5)}, "same shape"),
])
def test_bad_user_data_is_a_clear_error(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(NasoptError, match=message):
        load_dataset(str(tmp_path / "bad.npz"))


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(NasoptError, match="known: digits, mnist1d, fashion-mnist"):
        load_dataset("cifar10")


def test_missing_fashion_mnist_names_the_package(tmp_path):
    with pytest.raises(NasoptError, match="apt-get install dataset-fashion-mnist"):
        _fashion_mnist(tmp_path)


@pytest.mark.skipif(not FASHION_DIR.exists() and not os.environ.get("NASOPT_REQUIRE_FASHION_MNIST"),
                    reason="needs the Debian package: apt-get install dataset-fashion-mnist (set "
                    "NASOPT_REQUIRE_FASHION_MNIST=1 to make its absence a failure, as CI does)")
def test_fashion_mnist_from_the_debian_package():
    assert FASHION_DIR.exists(), "install the Debian package dataset-fashion-mnist"
    d = load_dataset("fashion-mnist")
    assert d.input_shape == (1, 28, 28) and len(d.x_test) == 10000
    assert len(d.x_train) + len(d.x_val) == 60000 and d.num_classes == 10


def test_multi_channel_signals_from_a_data_file(tmp_path, capsys):
    """A 3-axis signal file (N, 3, L) saved with layout='signals' is searched with conv1d; the
    same array without it is read as images, and a wrong layout is one line."""
    from nasopt.cli import main as cli
    rng = np.random.default_rng(0)
    y = np.arange(240) % 3
    x = rng.normal(size=(240, 3, 32)).astype("float32")
    x[np.arange(240), y, :] += 2.0  # the class is the axis that moves
    path = tmp_path / "accel.npz"
    np.savez(path, x=x, y=y, layout="signals")
    d = load_dataset(str(path))
    assert d.input_shape == (3, 32)
    np.savez(tmp_path / "as_images.npz", x=x, y=y)
    assert load_dataset(str(tmp_path / "as_images.npz")).input_shape == (1, 3, 32)
    np.savez(tmp_path / "bad.npz", x=x, y=y, layout="sideways")
    with pytest.raises(NasoptError, match="layout='signals'"):
        load_dataset(str(tmp_path / "bad.npz"))
    assert cli.main(["search", "--space", "conv1d", "--dataset", str(path), "--trials", "2",
                     "--quiet", "--set", "supernet.epochs=1", "--set", "supernet.warmup_epochs=1",
                     "--run-dir", str(tmp_path / "runs")]) == 0
    assert "study 'conv1d-accel.npz': 2 completed trials" in capsys.readouterr().out


def test_the_accelerometer_example_writes_a_file_conv1d_takes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "examples" / "accelerometer_signals.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "accel.npz")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    d = load_dataset(str(tmp_path / "accel.npz"))
    assert d.input_shape == (3, 64) and d.num_classes == 4
