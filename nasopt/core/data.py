"""Datasets with fixed, seeded train / validation / test splits.

Built in: ``digits`` (scikit-learn), ``mnist1d`` (generated locally by the ``mnist1d`` package and
cached in the user cache directory; never downloaded), ``fashion-mnist`` (the Debian package
``dataset-fashion-mnist``). User data: a ``.npz`` file (arrays ``x``, ``y``, optional ``x_test``,
``y_test``) or a ``.csv`` file (one label column, the other columns are the features of a 1-D
signal).

Search sees train and validation only; the test split is for final reports.

**Preprocessing** (:class:`Preprocess`, one record per dataset, ``Dataset.preprocess``): what the
loader does to the raw samples, element-wise, ``(x - mean) / std``. ``digits`` divides
``sklearn.datasets.load_digits().images`` (0..16) by 16, ``fashion-mnist`` the image bytes
(0..255) by 255; ``mnist1d`` (the samples as the ``mnist1d`` generator makes them) and user
``.npz`` / ``.csv`` files are used as given. Besides, samples shaped (N, L) or (N, H, W) get a
channel axis: the models take (N, 1, L) / (N, 1, H, W). Exports apply the preprocessing inside
the model (:mod:`nasopt.deploy.export`), so they take raw samples (reshaped to the model's input shape).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nasopt.core.errors import NasoptError

BUILTIN = ("digits", "mnist1d", "fashion-mnist")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Preprocess:
    """The loader's element-wise preprocessing of raw samples: ``(x - mean) / std`` (float32;
    ``x / 255`` in float32 equals the loader's float64 ``x / 255`` rounded to float32, which
    ``x * (1 / 255)`` does not always). ``integers``: the raw samples are whole numbers (pixel
    counts, bytes), so :meth:`raw` rounds when it recovers them from model inputs."""

    mean: float = 0.0
    std: float = 1.0
    integers: bool = False

    @property
    def identity(self) -> bool:
        return self.mean == 0 and self.std == 1

    def apply(self, x):  # noqa: ANN001, ANN201 - a Tensor or a NumPy array
        """Raw samples -> model inputs (no op skipped that changes a value)."""
        if self.mean != 0:
            x = x - self.mean
        if self.std != 1:
            x = x / self.std
        return x

    def raw(self, x: Tensor) -> Tensor:
        """Model inputs -> the raw samples they were made from (the inverse of :meth:`apply`)."""
        if self.identity:
            return x
        x = x * self.std + self.mean
        return torch.round(x) if self.integers else x

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "integers": self.integers,
                "formula": "(x - mean) / std"}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Preprocess":
        d = d or {}
        return cls(float(d.get("mean", 0.0)), float(d.get("std", 1.0)),
                   bool(d.get("integers", False)))


#: the built-in datasets that scale their raw samples; every other dataset is used as given
PREPROCESS = {"digits": Preprocess(std=16.0, integers=True),
              "fashion-mnist": Preprocess(std=255.0, integers=True)}


def preprocess_of(dataset: str) -> Preprocess:
    """The preprocessing of the dataset ``dataset``: a spec (built-in name or file path) or a
    ``Dataset.name`` (``digits[1,2]@0.5``, ``mnist1d+600val``); for records written without one."""
    base = re.match(r"[^\[@+]*", Path(str(dataset)).name).group(0)
    return PREPROCESS.get(base, Preprocess())


@dataclass(frozen=True)
class Dataset:
    """Tensors of one dataset, already split. ``x`` is float32 shaped (N, C, L) or (N, C, H, W);
    ``y`` holds int64 labels (classification) or float32 targets shaped (N, T) (regression,
    where ``num_classes`` is T: the number of outputs)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    fingerprint: str = field(default="")
    #: what the loader did to the raw samples (exports undo nothing: they apply it inside)
    preprocess: Preprocess = field(default_factory=Preprocess)
    task: str = "classification"  # or "regression" (nasopt.core.task)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device | str) -> "Dataset":
        moved = {k: getattr(self, k).to(device) for k in
                 ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
        return Dataset(self.name, num_classes=self.num_classes, fingerprint=self.fingerprint,
                       preprocess=self.preprocess, task=self.task, **moved)

    def summary(self) -> str:
        outputs = (f"{self.num_classes} target(s) (regression)" if self.task == "regression"
                   else f"{self.num_classes} classes")
        return (f"{self.name}: inputs {self.input_shape}, {outputs}, "
                f"{len(self.x_train)} train / {len(self.x_val)} val / {len(self.x_test)} test")


def cache_dir() -> Path:
    """Where generated data is cached (``NASOPT_CACHE`` overrides the user cache directory)."""
    if os.environ.get("NASOPT_CACHE"):
        return Path(os.environ["NASOPT_CACHE"])
    import platformdirs
    return Path(platformdirs.user_cache_dir("nasopt"))


def load_dataset(spec: str, *, seed: int = 0, val_fraction: float = 0.15,
                 test_fraction: float = 0.2, label_column: str = "label",
                 classes: Sequence[int] | None = None, fraction: float = 1.0,
                 task: str | None = None, shots: int | None = None,
                 shots_seed: int = 0) -> Dataset:
    """Load ``spec`` (a built-in name or a .npz / .csv path) and split it.

    ``classes`` keeps only those labels (train, val and test), renumbered 0..k-1 in the order
    given (e.g. Fashion-MNIST classes 5-9 for transfer learning); ``fraction`` < 1 keeps a seeded,
    stratified fraction of the train and validation splits (the test split stays whole).
    ``shots`` keeps ``shots`` training samples of every class (after ``classes`` and
    ``fraction``: a few-shot task), drawn by a generator seeded with ``seed`` and
    ``shots_seed`` (another ``shots_seed``, another draw); validation and test are those of the
    same call without ``shots``.

    Official test sets (MNIST-1D's 1000 samples, Fashion-MNIST's 10000) are kept as the test split;
    other data gets a stratified ``test_fraction``. Validation is a stratified ``val_fraction`` of
    the rest. Splits depend only on ``seed``.

    ``task``: ``"regression"`` reads ``y`` as float targets (a .npz file may say so itself with
    an array ``task="regression"``); splits are then random rather than stratified.
    """
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1:
        raise NasoptError("val_fraction and test_fraction must lie strictly between 0 and 1")
    signals = False  # (N, C, L) multi-channel signals rather than (N, H, W) images
    stated = None  # the task a data file states
    if spec == "digits":
        x, y, xt, yt = _digits()
    elif spec == "mnist1d":
        x, y, xt, yt = _mnist1d()
    elif spec == "fashion-mnist":
        x, y, xt, yt = _fashion_mnist()
    elif spec.endswith(".npz"):
        x, y, xt, yt, signals, stated = _npz(Path(spec))
    elif spec.endswith(".csv"):
        x, y, xt, yt = _csv(Path(spec), label_column)
    else:
        raise NasoptError(f"unknown dataset {spec!r}; known: {', '.join(BUILTIN)}, "
                          f"or a path to a .npz or .csv file")
    kind = task or stated or "classification"
    if kind not in ("classification", "regression"):
        raise NasoptError(f"unknown task {kind!r}; choose classification or regression")
    regression = kind == "regression"
    if regression and classes is not None:
        raise NasoptError(f"{spec}: a class subset needs classes; this is a regression dataset")
    if regression and shots is not None:
        raise NasoptError(f"{spec}: shots per class need classes; this is a regression dataset "
                          f"(use fraction for a smaller training split)")
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, (int, np.integer))
                              or shots < 1):
        raise NasoptError(f"shots must be a whole number >= 1 (training samples per class), "
                          f"got {shots!r}")
    x, y = _checked(spec, x, y, signals, regression)
    if not 0 < fraction <= 1:
        raise NasoptError(f"fraction must lie in (0, 1], got {fraction}")
    if classes is not None:
        x, y, xt, yt = _class_subset(spec, classes, x, y, xt, yt)
    rng = np.random.default_rng(seed)
    split = _random_split if regression else _stratified_split
    if xt is None:
        train_idx, test_idx = split(y, test_fraction, rng)
        x, y, xt, yt = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    else:
        xt, yt = _checked(spec + " (test arrays)", xt, yt, signals, regression)
        if xt.shape[1:] != x.shape[1:]:
            raise NasoptError(f"{spec}: x_test samples are shaped {xt.shape[1:]} but x samples "
                              f"{x.shape[1:]}; give both the same shape")
        if yt.shape[1:] != y.shape[1:]:
            raise NasoptError(f"{spec}: y_test holds {yt.shape[1:]} targets per sample but y "
                              f"{y.shape[1:]}; give both the same number")
    train_idx, val_idx = split(y, val_fraction, rng)
    if fraction < 1:
        train_idx = train_idx[split(y[train_idx], fraction, rng)[1]]
        val_idx = val_idx[split(y[val_idx], fraction, rng)[1]]
    if shots is not None:
        train_idx = _shots(spec, y, train_idx, shots, seed, shots_seed, classes)
    if regression:
        outputs = y.shape[1]
    else:
        labels = np.unique(np.concatenate([y, yt]))  # sorted, distinct: 0..K-1 iff these hold
        if labels.min() < 0 or labels.max() != len(labels) - 1:
            raise NasoptError(f"{spec}: labels must be the integers 0..K-1, got {labels[:20]}; "
                              f"map your classes to consecutive integers, or for float targets "
                              f"use --task regression")
        if len(labels) < 2:
            raise NasoptError(f"{spec}: every label is {labels[0]}: classification needs at "
                              f"least two classes; give samples of every class")
        outputs = int(labels.max() + 1)
    h = hashlib.sha1()
    for arr in (x, y, xt, yt):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(f"{seed}/{val_fraction}/{test_fraction}".encode())
    if fraction < 1:
        h.update(f"/fraction={fraction}".encode())
    if regression:
        h.update(b"/regression")
    if shots is not None:
        h.update(f"/shots={shots}/{shots_seed}".encode())
    as_x = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    as_y = lambda a: torch.from_numpy(np.ascontiguousarray(  # noqa: E731
        a, dtype=np.float32 if regression else np.int64))
    name = Path(spec).name if spec not in BUILTIN else spec
    if classes is not None:
        name += "[" + ",".join(str(c) for c in classes) + "]"
    if fraction < 1:
        name += f"@{fraction:g}"
    if shots is not None:
        name += f"+{shots}shot" + (f"#{shots_seed}" if shots_seed else "")
    return Dataset(name, as_x(x[train_idx]), as_y(y[train_idx]), as_x(x[val_idx]),
                   as_y(y[val_idx]), as_x(xt), as_y(yt), outputs, h.hexdigest()[:16],
                   preprocess_of(spec), kind)


#: the MNIST-1D generator's seed for :func:`extend_validation` (the built-in data uses the
#: generator's default, 42)
FRESH_MNIST1D_SEED = 43


def check_extra_validation(dataset: str, n: int) -> None:
    """The error :func:`extend_validation` would raise for ``n`` samples added to ``dataset``
    (a name), for a command to check before it spends time on a supernet."""
    if n < 0:
        raise NasoptError(f"extra validation samples must be >= 0, got {n}")
    # all ten classes, numbered as generated: the built-in data or a fraction of it
    # ("mnist1d@0.5"), not a class subset ("mnist1d[...]") nor a user file
    if n and not re.fullmatch(r"mnist1d(@[0-9.]+)?", dataset):
        raise NasoptError(f"extra validation samples are generated for mnist1d (all classes) "
                          f"only, not {dataset!r}; drop the option or use --dataset mnist1d")


def extend_validation(data: Dataset, n: int, seed: int = FRESH_MNIST1D_SEED) -> Dataset:
    """``data`` (MNIST-1D) with ``n`` more validation samples, freshly generated by MNIST-1D's
    own generator with another ``seed``: the first ``n`` of one batch of max(5000, n) samples
    (the generator's default batch, normalized by its own mean and std as the built-in data is).
    Train and test splits are unchanged; the fingerprint says what was added. For benchmarks
    whose verdicts 600 validation samples cannot resolve."""
    check_extra_validation(data.name, n)
    if n == 0:
        return data
    if data.input_shape != (1, 40) or data.num_classes != 10:
        raise NasoptError(f"{data.name}: inputs {data.input_shape}, {data.num_classes} classes "
                          f"are not MNIST-1D's (1, 40) and 10; load the built-in mnist1d")
    from mnist1d.data import get_dataset_args, make_dataset  # generates locally, no download
    args = get_dataset_args()
    args.seed = seed
    args.num_samples = max(args.num_samples, -(-n // 10) * 10)  # whole samples per class
    # the generator seeds Python's and NumPy's global generators: leave them as they were
    states = random.getstate(), np.random.get_state()
    try:
        generated = make_dataset(args)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    x = np.concatenate([generated["x"], generated["x_test"]])[:n]
    y = np.concatenate([generated["y"], generated["y_test"]])[:n]
    x_val = torch.cat([data.x_val, torch.from_numpy(x.astype(np.float32))[:, None].to(data.x_val)])
    y_val = torch.cat([data.y_val, torch.from_numpy(y.astype(np.int64)).to(data.y_val)])
    fingerprint = hashlib.sha1(f"{data.fingerprint}+val{n}@{seed}".encode()).hexdigest()[:16]
    return dataclasses.replace(data, name=f"{data.name}+{n}val", x_val=x_val, y_val=y_val,
                               fingerprint=fingerprint)


def _class_subset(spec: str, classes: Sequence[int], x, y, xt, yt):  # noqa: ANN001, ANN202
    """Keep the samples of ``classes`` and renumber them 0..k-1 in the given order."""
    classes = [int(c) for c in classes]
    known = set(np.unique(y).tolist())
    bad = [c for c in classes if c not in known]
    if bad or len(set(classes)) != len(classes) or len(classes) < 2:
        raise NasoptError(f"{spec}: --classes must name at least two distinct labels of the "
                          f"dataset (it has {sorted(known)}); got {classes}")
    lookup = np.full(max(max(known), max(classes)) + 1, -1)
    lookup[classes] = np.arange(len(classes))

    def keep(xs, ys):  # noqa: ANN001, ANN202
        if xs is None:
            return None, None
        sel = np.isin(ys, classes)
        return xs[sel], lookup[ys[sel]]

    return (*keep(x, y), *keep(xt, yt))


def _shots(spec: str, y: np.ndarray, train_idx: np.ndarray, shots: int, seed: int,
           shots_seed: int, classes: Sequence[int] | None) -> np.ndarray:
    """``shots`` indices of every class among ``train_idx`` (sorted), from a generator of its
    own: the splits drawn before are those of the same call without ``shots``."""
    rng = np.random.default_rng([seed, shots_seed, 0x5407])
    keep = []
    for c in np.unique(y[train_idx]):
        idx = train_idx[y[train_idx] == c]
        if len(idx) < shots:
            label = classes[c] if classes is not None else c
            raise NasoptError(f"{spec}: class {label} has {len(idx)} training samples, fewer "
                              f"than shots={shots}; ask for at most {len(idx)} shots (or a "
                              f"larger fraction)")
        keep.append(rng.choice(idx, size=shots, replace=False))
    return np.sort(np.concatenate(keep))


def _stratified_split(y: np.ndarray, fraction: float, rng: np.random.Generator):
    keep, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = int(round(len(idx) * fraction))
        held.append(idx[:n])
        keep.append(idx[n:])
    keep_idx, held_idx = np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))
    if len(held_idx) == 0 or len(keep_idx) == 0:
        raise NasoptError("too few samples to split into train / validation / test; "
                          "provide more data")
    return keep_idx, held_idx


def _random_split(y: np.ndarray, fraction: float, rng: np.random.Generator):
    """A seeded random split (regression: no classes to stratify by)."""
    idx = rng.permutation(len(y))
    n = int(round(len(idx) * fraction))
    if n == 0 or n == len(idx):
        raise NasoptError("too few samples to split into train / validation / test; "
                          "provide more data")
    return np.sort(idx[n:]), np.sort(idx[:n])


def _checked(spec: str, x: np.ndarray, y: np.ndarray, signals: bool = False,
             regression: bool = False) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 2:
        raise NasoptError(f"{spec}: x must hold one sample per row, got shape {x.shape}")
    if regression:
        if len(x) != len(y) or y.ndim not in (1, 2):
            raise NasoptError(f"{spec}: x has {len(x)} samples but y has shape {y.shape}; give "
                              f"one target (or one row of targets) per sample")
        if not np.issubdtype(y.dtype, np.number) or not np.isfinite(y.astype(np.float64)).all():
            raise NasoptError(f"{spec}: y contains NaN, infinite or non-numeric targets; clean "
                              f"or impute them first")
        y = y.reshape(len(y), -1)
    elif len(x) != len(y) or y.ndim != 1:
        raise NasoptError(f"{spec}: x has {len(x)} samples but y has shape {y.shape}; "
                          f"give one integer label per sample")
    if len(x) == 0:
        raise NasoptError(f"{spec}: the file holds no samples; give at least a few per class")
    if np.issubdtype(x.dtype, np.complexfloating):
        raise NasoptError(f"{spec}: x holds complex numbers; give real values (for example the "
                          f"magnitude, or real and imaginary parts as separate features)")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x.astype(np.float64)).all():
        raise NasoptError(f"{spec}: x contains NaN, infinite or non-numeric values; "
                          f"clean or impute them first")
    if np.abs(x).max() > np.finfo(np.float32).max:
        raise NasoptError(f"{spec}: x holds values up to {np.abs(x).max():.3g}, beyond float32 "
                          f"(the models' number type); scale the inputs first, e.g. to [0, 1]")
    if not regression and (not np.issubdtype(y.dtype, np.number)
                           or np.any(np.asarray(y) != np.round(y))):
        raise NasoptError(f"{spec}: labels must be integers 0..K-1; for float targets use "
                          f"--task regression (or save task='regression' in the .npz)")
    if x.ndim == 2:  # (N, L) signals -> one channel
        x = x[:, None, :]
    elif x.ndim == 3 and not signals:  # (N, H, W) images -> one channel
        x = x[:, None, :, :]  # (N, C, L) signals (layout='signals') stay as they are
    return x.astype(np.float32), y.astype(np.float32 if regression else np.int64)


def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return PREPROCESS["digits"].apply(d.images.astype(np.float64)), d.target, None, None


def _mnist1d():
    path = cache_dir() / "mnist1d.npz"
    if not path.exists():
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError:
            raise NasoptError("mnist1d needs the `mnist1d` package: pip install mnist1d") from None
        # make_dataset generates the data locally; get_dataset() would try to download it
        d = make_dataset(get_dataset_args())
        path.parent.mkdir(parents=True, exist_ok=True)
        # a name of this process's own: two processes making the cache at once must not share
        # (and rename away) one temporary file
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, x=d["x"], y=d["y"], x_test=d["x_test"], y_test=d["y_test"])
        os.replace(tmp, path)
    with np.load(path) as f:
        return f["x"], f["y"], f["x_test"], f["y_test"]


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def _fashion_mnist(root: Path = FASHION_DIR):
    files = {k: root / f"{k}.gz" for k in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise NasoptError("Fashion-MNIST is not installed (missing " + ", ".join(missing) +
                          "); install it with: sudo apt-get install dataset-fashion-mnist")
    images = lambda p: PREPROCESS["fashion-mnist"].apply(  # noqa: E731
        _read_idx(p, 16).reshape(-1, 28, 28).astype(np.float64))
    labels = lambda p: _read_idx(p, 8).astype(np.int64)  # noqa: E731
    return (images(files["train-images-idx3-ubyte"]), labels(files["train-labels-idx1-ubyte"]),
            images(files["t10k-images-idx3-ubyte"]), labels(files["t10k-labels-idx1-ubyte"]))


def stated_task(spec: str) -> str | None:
    """The task a .npz data file states (its ``task`` array, read alone), else None."""
    if not str(spec).endswith(".npz") or not Path(spec).is_file():
        return None
    try:
        with np.load(spec, allow_pickle=False) as f:
            return str(f["task"]) if "task" in f.files else None
    except Exception:  # unreadable: load_dataset says why
        return None


def _npz(path: Path):
    if not path.exists():
        raise NasoptError(f"dataset file {path} does not exist; check the path")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:  # zipfile / ValueError: not an npz
        raise NasoptError(f"{path} is not a readable .npz file ({exc}); save it with numpy.savez") from None
    if "x" not in arrays or "y" not in arrays:
        raise NasoptError(f"{path} must contain arrays named 'x' and 'y' (found {sorted(arrays)})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise NasoptError(f"{path}: give both x_test and y_test, or neither")
    layout = str(arrays["layout"]) if "layout" in arrays else None
    if layout not in (None, "signals", "images"):
        raise NasoptError(f"{path}: layout is {layout!r}; save layout='signals' for x shaped "
                          f"(N, channels, length) or layout='images' for (N, height, width)")
    if layout == "signals" and arrays["x"].ndim != 3:
        raise NasoptError(f"{path}: layout='signals' needs x shaped (N, channels, length), got "
                          f"{arrays['x'].shape}")
    task = str(arrays["task"]) if "task" in arrays else None
    if task not in (None, "classification", "regression"):
        raise NasoptError(f"{path}: task is {task!r}; save task='regression' for float targets "
                          f"or task='classification'")
    return (arrays["x"], arrays["y"], arrays.get("x_test"), arrays.get("y_test"),
            layout == "signals", task)


def _csv(path: Path, label_column: str):
    import pandas as pd
    if not path.exists():
        raise NasoptError(f"dataset file {path} does not exist; check the path")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise NasoptError(f"{path} is not a readable CSV ({exc})") from None
    if label_column not in frame.columns:
        raise NasoptError(f"{path} has no label column {label_column!r} (columns: "
                          f"{list(frame.columns)[:10]}...); name it with --set data.label_column=NAME")
    y = frame.pop(label_column).to_numpy()
    try:
        x = frame.to_numpy(dtype=np.float64)
    except ValueError:
        raise NasoptError(f"{path}: every column except {label_column!r} must be numeric") from None
    return x, y, None, None
