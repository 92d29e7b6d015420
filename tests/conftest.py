"""Shared fixtures: real datasets, small trained supernets (trained once per test session)."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from nasopt import api
from nasopt.core.config import SupernetConfig
from nasopt.core.data import Dataset, load_dataset
from nasopt.supernet.elastic import train_supernet

#: a short recipe: enough to make weights and BN statistics non-trivial
QUICK = SupernetConfig(epochs=2, warmup_epochs=1, batch_size=128, lr=3e-3, n_random=1)

#: for each space with a weight-sharing supernet, a real dataset whose samples it takes
#: (nb201 has none: it is searched from a table, see tests/test_nb201.py)
DATASET_FOR = {"conv1d": "mnist1d", "mobilenet": "digits"}


@pytest.fixture(scope="session")
def datasets() -> dict[str, Dataset]:
    return {name: load_dataset(name) for name in ("digits", "mnist1d")}


@pytest.fixture(scope="session", params=sorted(DATASET_FOR))
def trained(request, datasets, tmp_path_factory):
    """(space, supernet, data) for every space with a supernet, after a short sandwich training."""
    torch.manual_seed(0)
    full = datasets[DATASET_FOR[request.param]]
    # a few hundred samples keep the suite fast; the contract does not depend on accuracy
    data = dataclasses.replace(full, x_train=full.x_train[:384], y_train=full.y_train[:384])
    space = api.make_space(request.param, data)
    supernet, _ = train_supernet(space, data, QUICK, tmp_path_factory.mktemp("sn"),
                                 show_progress=False)
    return space, supernet, data


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (tiny models train fastest on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng() -> random.Random:
    return random.Random(0)
