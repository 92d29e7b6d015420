"""The supernet most benches measure on: the conv1d space on a dataset (MNIST-1D unless a bench
says otherwise), its config with the bench's ``--set`` overrides, and the supernet trained once
and cached under ``RUN_DIR/supernets`` (a later bench with the same recipe reuses it)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from nasopt import api
from nasopt.core.config import Config
from nasopt.core.data import Dataset
from nasopt.core.space import SearchSpace
from nasopt.supernet.elastic import Supernet, train_supernet


class BenchSupernet(NamedTuple):
    cfg: Config
    data: Dataset
    space: SearchSpace
    supernet: Supernet
    checkpoint: Path


def supernet_epochs(cfg: Config, data: Dataset, space: SearchSpace) -> int:
    """The epochs the supernet of ``cfg`` trains on ``data`` for ``space`` (the default recipe's
    length is sized by the data: its ``epochs`` field is unset until resolved)."""
    return cfg.supernet.resolve(len(data.x_train), space).epochs


def bench_config(overrides: Sequence[str] = (), dataset: str = "mnist1d") -> Config:
    """The config of :func:`conv1d_supernet` (cheap: to check arguments before training)."""
    return api.load_config(None, [f"data.dataset={dataset}", "search.space=conv1d", *overrides])


def conv1d_supernet(run_dir: str | Path, overrides: Sequence[str] = (),
                    log: Callable[[str], None] = print, dataset: str = "mnist1d"
                    ) -> BenchSupernet:
    """Config (``data.dataset``, ``search.space=conv1d``, then ``overrides``), data, space and
    the trained (or cached) supernet."""
    cfg = bench_config(overrides, dataset)
    data = api.load_data(cfg)
    space = api.make_space("conv1d", data)
    supernet, checkpoint = train_supernet(space, data, cfg.supernet, Path(run_dir) / "supernets",
                                          log=log)
    return BenchSupernet(cfg, data, space, supernet, checkpoint)
