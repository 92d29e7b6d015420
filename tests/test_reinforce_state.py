"""REINFORCE's controller state in the run folder: saved atomically, restored on resume (equal to a
replay of the study), stale or missing files fall back to replay, and a stopped and restarted
search proposes what an uninterrupted one would have. On the NAS-Bench-201 table (fast)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import optuna
import pytest

from nasopt.core.objectives import get_objectives
from nasopt.search.loop import run_search
from nasopt.search.tabular import TabularEvaluator
from nasopt.spaces.nb201 import CIFAR10_SHAPE, Nb201Space
from nasopt.strategies.reinforce import ReinforceSampler, read_state, state_path

RESTRICT = {"e1_0": ["nor_conv_3x3", "skip_connect"], "e2_0": ["nor_conv_1x1", "avg_pool_3x3"],
            "e2_1": ["none", "nor_conv_3x3", "avg_pool_3x3"], "e3_2": ["nor_conv_3x3"]}


@pytest.fixture(scope="module")
def space() -> Nb201Space:
    return Nb201Space(CIFAR10_SHAPE, 10).restrict(RESTRICT)


@pytest.fixture(scope="module")
def evaluator(space) -> TabularEvaluator:
    return TabularEvaluator(space)


def search(space, evaluator, storage, trials: int, seed: int, path, objectives=("accuracy",)):
    objs = get_objectives(list(objectives))
    sampler = ReinforceSampler(seed=seed, state_path=path)
    study = optuna.create_study(storage=storage, study_name="s", sampler=sampler,
                                load_if_exists=True, directions=[o.direction for o in objs])
    run_search(study, space, evaluator, objs, trials, show_progress=False)
    return study, sampler


def search_space(study):
    return {n: d for n, d in study.trials[-1].distributions.items()}


def test_state_is_saved_and_restored_state_equals_replay(space, evaluator, tmp_path):
    path = tmp_path / "controllers" / "s.reinforce.json"
    study, _ = search(space, evaluator, optuna.storages.InMemoryStorage(), 25, 0, path)
    saved = read_state(path)
    # saved after the last proposal: every trial but the last one consumed
    assert saved["consumed"] == list(range(24)) and saved["step"] == 24
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left no temp file
    restored, probs = ReinforceSampler(state_path=path).controller(study, search_space(study))
    replayed, probs_replayed = ReinforceSampler().controller(study, search_space(study),
                                                             resume=False)
    assert restored["consumed"] == replayed["consumed"] == list(range(25))
    for k in ("logits", "m", "v", "baseline", "step"):
        assert restored[k] == replayed[k], k  # bit for bit
    assert all(np.array_equal(probs[g], probs_replayed[g]) for g in probs)
    assert np.ptp(np.array(replayed["logits"])) > 0  # the policy has learned something


def test_resumed_search_proposes_what_an_uninterrupted_one_would(space, evaluator, tmp_path):
    whole, _ = search(space, evaluator, optuna.storages.InMemoryStorage(), 30, 5,
                      tmp_path / "a.json")
    storage = optuna.storages.InMemoryStorage()
    search(space, evaluator, storage, 18, 5, tmp_path / "b.json")
    # a new process: another seed (as api.search gives a continued study), same run folder
    resumed, _ = search(space, evaluator, storage, 30, 1234, tmp_path / "b.json")
    assert [t.params for t in resumed.trials] == [t.params for t in whole.trials]
    # without the saved state the policy is the same (replay) but the draws are fresh
    storage = optuna.storages.InMemoryStorage()
    search(space, evaluator, storage, 18, 5, tmp_path / "c.json")
    (tmp_path / "c.json").unlink()
    fresh, _ = search(space, evaluator, storage, 30, 1234, tmp_path / "c.json")
    assert [t.params for t in fresh.trials][:18] == [t.params for t in whole.trials][:18]
    assert [t.params for t in fresh.trials][18:] != [t.params for t in whole.trials][18:]


@pytest.mark.parametrize("damage", ["missing", "corrupt", "other study", "other settings"])
def test_missing_or_stale_state_falls_back_to_replay(space, evaluator, tmp_path, damage):
    path = tmp_path / "s.json"
    study, _ = search(space, evaluator, optuna.storages.InMemoryStorage(), 20, 0, path)
    state = json.loads(path.read_text())
    if damage == "missing":
        path.unlink()
    elif damage == "corrupt":
        path.write_text('{"key": ')
    elif damage == "other study":
        state["consumed"] = [n + 100 for n in state["consumed"]]
        state["logits"] = (np.array(state["logits"]) + 5).tolist()
        path.write_text(json.dumps(state))
    else:
        state["key"]["settings"][0] = 0.5
        path.write_text(json.dumps(state))
    restored, _ = ReinforceSampler(state_path=path).controller(study, search_space(study))
    replayed, _ = ReinforceSampler().controller(study, search_space(study), resume=False)
    assert restored["logits"] == replayed["logits"] and restored["step"] == replayed["step"]


def test_multi_objective_state_is_stale_when_rewards_move_and_replay_still_agrees(
        space, evaluator, tmp_path):
    path = tmp_path / "s.json"
    study, _ = search(space, evaluator, optuna.storages.InMemoryStorage(), 20, 0, path,
                      ("accuracy", "params"))
    restored, _ = ReinforceSampler(state_path=path).controller(study, search_space(study))
    replayed, _ = ReinforceSampler().controller(study, search_space(study), resume=False)
    assert restored["logits"] == replayed["logits"]


def test_the_cli_saves_the_controller_in_the_run_folder(tmp_path):
    args = [sys.executable, "-m", "nasopt.cli", "search", "--space", "nb201", "--table",
            "--strategy", "reinforce", "--trials", "6", "--study", "rf", "--quiet",
            "--run-dir", str(tmp_path), *sum((["--restrict", f"{g}={','.join(o)}"]
                                              for g, o in RESTRICT.items()), [])]
    subprocess.run(args, check=True, capture_output=True, timeout=300)
    state = read_state(state_path(tmp_path, "rf"))
    assert state is not None and state["consumed"] == list(range(5))
