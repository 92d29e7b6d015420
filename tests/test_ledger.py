"""The ledger (nasopt.search.ledger): a trial is written three times, holds every field it held
when each field was its own write, reads of a held trial see its pending writes, and the counts
of the exact-total check equal the trials' states — on SQLite, a journal file and PostgreSQL."""
from __future__ import annotations

import os
import sqlite3
import uuid

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from nasopt.core.objectives import Constraint, get_objectives
from nasopt.search import workers
from nasopt.search.ledger import Ledger
from nasopt.search.loop import run_search, suggest_arch
from nasopt.search.study import open_storage
from nasopt.search.tabular import TabularEvaluator
from nasopt.spaces import SPACES

NB201 = SPACES["nb201"]


@pytest.fixture(scope="module")
def evaluator() -> TabularEvaluator:
    return TabularEvaluator(NB201(*NB201.table_input))


def storages(tmp_path):
    yield "sqlite", open_storage(f"sqlite:///{tmp_path / 'studies.db'}")
    yield "journal", open_storage(f"journal:///{tmp_path / 'studies.log'}")
    url = os.environ.get("NASOPT_TEST_POSTGRES")
    if url:
        yield "postgresql", open_storage(url)


def search(storage, evaluator, trials: int, constraints=()) -> optuna.Study:
    objectives = get_objectives(["accuracy", "size"])
    study = optuna.create_study(study_name=f"ledger-{uuid.uuid4().hex[:8]}", storage=storage,
                                directions=[o.direction for o in objectives],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    run_search(study, evaluator.space, evaluator, objectives, trials, show_progress=False,
               trial_attrs={"strategy": "random"}, constraints=constraints)
    return study


def test_every_field_of_a_trial_is_recorded_on_every_storage(tmp_path, evaluator):
    budget = [Constraint("size", 2_000_000)]
    for kind, storage in storages(tmp_path):
        study = search(storage, evaluator, 5, budget)
        trials = study.get_trials()
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 5, kind
        for t in trials:
            assert set(t.params) == set(evaluator.space.genes), kind
            assert t.user_attrs["arch"] == evaluator.space.validate(t.params).key
            assert t.user_attrs["strategy"] == "random"
            assert t.user_attrs[workers.WORKER_ATTR]["trial"] == t.number
            metrics = t.user_attrs["metrics"]
            assert t.values == [metrics["accuracy"], metrics["compressed_bytes"]], kind
            excess = metrics["compressed_bytes"] - 2_000_000
            assert t.constraints == {"size": excess}, kind
            assert t.user_attrs["constraints"] == {"size": excess}
            assert t.user_attrs["feasible"] == (excess <= 0)


class CountingJournal(JournalFileBackend):
    def __init__(self, path: str):
        super().__init__(path)
        self.appends = 0

    def append_logs(self, logs):  # noqa: ANN001, ANN201
        self.appends += 1
        return super().append_logs(logs)


def test_a_trial_is_three_writes(tmp_path, evaluator):
    backend = CountingJournal(str(tmp_path / "studies.log"))
    storage = optuna.storages.JournalStorage(backend)
    objectives = get_objectives(["accuracy", "size"])
    study = optuna.create_study(storage=storage, directions=[o.direction for o in objectives],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    before = backend.appends
    run_search(study, evaluator.space, evaluator, objectives, 10, show_progress=False,
               trial_attrs={"strategy": "random"},
               constraints=[Constraint("size", 10**6)])
    # created; arch + worker record; metrics, constraints and state. Optuna's own calls would
    # take 1 + 6 genes + 6 attributes + 1 constraint + 1
    assert backend.appends - before == 3 * 10
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 10


def test_reads_of_a_held_trial_see_its_pending_writes(tmp_path):
    ledger = Ledger(open_storage(f"sqlite:///{tmp_path / 'studies.db'}"))
    study = optuna.create_study(storage=ledger)
    trial = study.ask()
    ledger.hold(trial._trial_id, study._study_id)
    trial.suggest_categorical("k", [3, 5])
    trial.set_user_attr("a", 1)
    trial.set_constraint("c", 0.5)
    seen = ledger.get_trial(trial._trial_id)
    assert seen.params == {"k": trial.params["k"]} and seen.user_attrs == {"a": 1}
    assert seen.constraints == {"c": 0.5}
    assert ledger.inner.get_trial(trial._trial_id).params == {}  # not yet written
    ledger.flush(trial._trial_id)
    assert ledger.inner.get_trial(trial._trial_id).user_attrs == {"a": 1}
    trial.set_user_attr("b", 2)
    study.tell(trial, 1.0)
    done = ledger.inner.get_trial(trial._trial_id)
    assert done.state == TrialState.COMPLETE and done.value == 1.0
    assert done.user_attrs == {"a": 1, "b": 2} and done.constraints == {"c": 0.5}


def test_counts_equal_the_trials_states(tmp_path, evaluator):
    for kind, storage in storages(tmp_path):
        study = search(storage, evaluator, 4)
        running = [study.ask() for _ in range(3)]
        ledger = Ledger(storage)
        assert ledger.count_trials(study._study_id) == (4, 3), kind
        assert ledger.count_trials(study._study_id, running[1].number) == (4, 1), kind
        study.tell(running[0], state=TrialState.FAIL)
        assert ledger.count_trials(study._study_id) == (4, 2), kind


def test_a_retried_trial_keeps_its_arch_and_updates_its_worker_record(tmp_path, evaluator):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    study = search(open_storage(url), evaluator, 2)
    trial = study.ask()  # a worker that died after recording its arch and itself
    ledger = Ledger(study._storage)
    ledger.hold(trial._trial_id, study._study_id)
    arch = suggest_arch(trial, evaluator.space)
    trial.set_user_attr(workers.WORKER_ATTR, {"host": "gone", "pid": 1, "trial": trial.number})
    ledger.flush(trial._trial_id)
    study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    workers.retry_callback()(study, study._storage.get_trial(trial._trial_id))
    objectives = get_objectives(["accuracy", "size"])
    run_search(study, evaluator.space, evaluator, objectives, 3, show_progress=False)
    retry = study.get_trials()[-1]
    assert retry.state == TrialState.COMPLETE
    assert retry.params == dict(arch) and retry.system_attrs["failed_trial"] == trial.number
    assert retry.user_attrs[workers.WORKER_ATTR]["trial"] == retry.number  # its own record


def test_sqlite_studies_are_in_write_ahead_log_mode(tmp_path, evaluator):
    search(open_storage(f"sqlite:///{tmp_path / 'studies.db'}"), evaluator, 1)
    with sqlite3.connect(tmp_path / "studies.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
