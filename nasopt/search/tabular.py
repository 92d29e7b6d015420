"""Tabular evaluation: accuracy read from a table of trained results, as NAS benchmarks publish.

A table is a CSV with an ``arch`` column (the space's arch string, e.g. NAS-Bench-201's
``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``) and one column per accuracy, in percent. Searching on such
a table costs microseconds per trial, so strategies can be compared over many seeds. Params and
MACs are not read from the table: they are counted from the space's real network, like every other
nasopt evaluation.

A space works in tabular mode when it provides ``arch_string(arch) -> str``; it may also provide
``count_key(arch) -> str`` (archs with equal keys have equal params and MACs) so that counts are
cached across archs that share them.
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd
import torch

from nasopt.core.arch import Value
from nasopt.core.config import DEFAULT_METRIC, DEFAULT_TABLE
from nasopt.core.errors import NasoptError
from nasopt.core.metrics import FLOAT32_BYTES, Metrics, count_macs, count_params
from nasopt.core.space import SearchSpace

#: tables shipped inside the package (credits in nasopt/tables/README.md): name -> file
TABLE_DIR = Path(__file__).resolve().parents[1] / "tables"  # nasopt/tables/
BUILTIN_TABLES = {"nb201_cifar10": TABLE_DIR / "nb201_cifar10.csv.gz"}
#: beyond this many archs the start-up check that the table covers the space is skipped
COVERAGE_CHECK_LIMIT = 1_000_000


def resolve_table(path: str | Path) -> Path:
    """The table file: ``path`` if it names a file (absolute, or relative to the working
    directory), else the shipped table of that name (:data:`BUILTIN_TABLES`)."""
    given = Path(path).expanduser()
    candidate = given if given.is_absolute() else Path.cwd() / given
    if candidate.is_file():
        return candidate.resolve()
    if str(path) in BUILTIN_TABLES:
        return BUILTIN_TABLES[str(path)]
    shipped = ", ".join(BUILTIN_TABLES)
    raise NasoptError(f"table {str(path)!r} not found (no file {candidate}, and no shipped table "
                      f"of that name: {shipped}); give an existing CSV with --table PATH (an "
                      f"'arch' column and an accuracy column in percent), or --table alone for "
                      f"the shipped {shipped}")


def table_name(path: Path) -> str:
    """A table's name: its file name without ``.csv`` / ``.csv.gz`` (used in study names)."""
    name = path.name
    for suffix in (".gz", ".csv"):
        name = name.removesuffix(suffix)
    return name


def fingerprint(path: Path) -> str:
    """A short hash of the table's CSV text (decompressed for ``.gz``): a study scored on one
    table refuses another, and a table gzipped or not is the same table."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as exc:
            raise NasoptError(f"table {path} is not a readable gzip file ({exc}); give the CSV "
                              f"again (plain or gzipped) with --table PATH") from None
    return hashlib.sha1(data).hexdigest()[:16]


def load_table(path: Path, metric: str) -> dict[str, float]:
    """``arch string -> accuracy as a fraction`` from the CSV ``path`` (column ``metric`` in %)."""
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, EOFError,
            OSError, zlib.error) as exc:
        raise NasoptError(f"table {path} is not a readable CSV ({exc}); give a CSV with an "
                          f"'arch' column and an accuracy column via --table PATH") from None
    columns = ", ".join(map(str, frame.columns))
    if "arch" not in frame.columns:
        raise NasoptError(f"table {path} has no 'arch' column (its columns: {columns}); the "
                          f"table needs one arch string per row in a column named 'arch'")
    if metric not in frame.columns:
        raise NasoptError(f"table {path} has no column {metric!r}; choose one of its columns "
                          f"with --table-metric COLUMN (its columns: {columns})")
    values = pd.to_numeric(frame[metric], errors="coerce")
    text = frame[metric][values.isna() & frame[metric].notna()]
    if len(text):  # an empty cell is a missing value; a word is a mistake
        raise NasoptError(f"column {metric!r} of table {path} holds text ({text.iloc[0]!r} in "
                          f"row {text.index[0] + 2}); give numbers (accuracy in percent), or "
                          f"leave the cell empty for a missing value")
    known = values.dropna()
    if known.empty or (known < 0).any() or (known > 100).any():
        raise NasoptError(f"column {metric!r} of table {path} must hold accuracies in percent "
                          f"(numbers from 0 to 100); choose another with --table-metric COLUMN")
    if known.max() <= 1:  # 0.94 for 94 %: every trial would score under 1 %
        raise NasoptError(f"column {metric!r} of table {path} holds fractions (at most "
                          f"{known.max():g}), not percent; multiply it by 100")
    archs = frame["arch"].astype(str).str.strip()
    repeated = archs[archs.duplicated()]
    if len(repeated):
        raise NasoptError(f"table {path} lists {len(repeated)} arch(s) more than once (e.g. "
                          f"{repeated.iloc[0]}); keep one row per arch")
    # a missing value stays NaN: that trial is then recorded as failed, the search goes on
    # rounded: percent / 100 in binary floating point prints 93.3533 as 0.9335330000000001
    return dict(zip(archs, (values / 100.0).round(10).tolist()))


class TabularEvaluator:
    """Scores archs of ``space`` from a table: accuracy from column ``metric`` of the CSV
    ``table`` (percent, returned as a fraction), params and MACs counted from ``space.build``.

    Refuses at construction a table that misses a column or any arch of the (restricted) space.
    """

    def __init__(self, space: SearchSpace, table: str | Path = DEFAULT_TABLE,
                 metric: str = DEFAULT_METRIC):
        if space.arch_string(space.largest()) is None:
            raise NasoptError(f"space {space.name!r} has no table format; tabular mode (--table) "
                              f"works for spaces whose archs have a string form, e.g. nb201")
        self.space = space
        self.arch_string: Callable[[Mapping[str, Value]], str] = space.arch_string
        self.path = resolve_table(table)
        self.metric = metric
        self.fingerprint = fingerprint(self.path)
        self._accuracy = load_table(self.path, metric)
        self._count_key: Callable[[Mapping[str, Value]], str] = space.count_key
        self._counts: dict[str, tuple[int, int]] = {}
        self._check_coverage()

    def _check_coverage(self) -> None:
        # refuse up front rather than fail trial after trial in the middle of a search
        genes = self.space.genes
        if self.space.size() > COVERAGE_CHECK_LIMIT:
            return
        for values in itertools.product(*genes.values()):
            text = self.arch_string(dict(zip(genes, values)))
            if text not in self._accuracy:
                raise NasoptError(
                    f"arch {text} of space {self.space.name!r} is not in table {self.path}; use "
                    f"a table that lists every arch, or --restrict the space to the archs it has")

    def accuracy(self, arch: Mapping[str, Value]) -> float:
        """The table's accuracy of ``arch`` as a fraction in [0, 1] (NaN where it has none)."""
        text = self.arch_string(arch)
        if text not in self._accuracy:
            raise NasoptError(f"arch {text} is not in table {self.path}; use a table that lists "
                              f"every arch of the searched space")
        return self._accuracy[text]

    def counts(self, arch: Mapping[str, Value]) -> tuple[int, int]:
        """(params, MACs) of ``space.build(arch)`` for one sample, cached by count key."""
        key = self._count_key(arch)
        if key not in self._counts:
            # on the meta device a model has shapes but no storage: nothing is initialised or
            # computed, yet the parameters and the executed ops are the real ones
            with torch.device("meta"):
                model = self.space.build(arch)
            self._counts[key] = (count_params(model), count_macs(model, self.space.input_shape))
        return self._counts[key]

    def __call__(self, arch: Mapping[str, Value]) -> Metrics:
        arch = self.space.validate(arch)
        params, macs = self.counts(arch)
        return Metrics(
            accuracy=self.accuracy(arch), params=params, macs=macs,
            float_bytes=params * FLOAT32_BYTES, compressed_bytes=params * FLOAT32_BYTES,
            nonzero_params=params,
            sources={"accuracy": f"table: {self.path} column {self.metric}",
                     "params": "counted from build(arch)",
                     "macs": "counted from the executed ops of build(arch)",
                     "float_bytes": "params x 4",
                     "compressed_bytes": "params x 4 (no compression genes: float32 weights)",
                     "nonzero_params": "params (no pruning)"})
