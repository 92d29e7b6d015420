"""The ledger: the storage a search writes its trials through, with the fewest writes per trial.

Optuna writes each ``suggest``, ``set_user_attr`` and ``set_constraint`` as its own storage write
(an SQLite or PostgreSQL transaction, a journal append), and a nasopt trial records a dozen such
fields. :class:`Ledger` wraps a storage and, for the trials a search *holds*, keeps those writes
in memory until one of two moments:

* :meth:`Ledger.flush`: the search flushes a trial's params (the arch) and its worker record
  together, right after the arch is drawn and before it is evaluated, so a trial whose worker is
  killed mid-evaluation is found (nasopt.search.workers) and retried with the same arch;
* the trial's end (``set_trial_state_values`` to COMPLETE or FAIL, Optuna's ``tell``): the
  metrics, constraint values and the rest go in the same write as the state and values.

So a trial costs three writes (create, start, end) where it cost two plus one per gene and
attribute, on every storage: SQLite and PostgreSQL write each group in one transaction, a journal
appends it in one locked write. What a kill -9 can lose is what was never durable before either:
the measurement of the trial being evaluated. Reads of a held trial (Optuna reads a trial three
times per ``tell``) are served from the ledger's own copy, pending writes included, since only
its owner writes a RUNNING trial; so is the trial it has just finished. All other calls, and writes for trials that are not held (another worker's trial failed by
:func:`nasopt.search.workers.recover`), go straight to the wrapped storage.
"""
from __future__ import annotations

import copy
import threading
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState


@dataclass
class _View:
    """What the ledger has read of one study's trials, kept between reads: finished trials never
    change, so each read looks only at trials it has not seen finished."""

    scanned: int = 0  # trials (by number) looked at so far
    complete: list[FrozenTrial] = field(default_factory=list)  # by number
    open: dict[int, FrozenTrial] = field(default_factory=dict)  # number -> unfinished trial


@dataclass
class _Pending:
    """Writes of one held trial not yet in the storage."""

    study_id: int
    #: the trial as its owner knows it, written fields and pending ones: reads of a held trial
    #: are served from here (only its owner writes a RUNNING trial)
    trial: FrozenTrial
    params: dict[str, tuple[float, BaseDistribution]] = field(default_factory=dict)
    user_attrs: dict[str, Any] = field(default_factory=dict)
    system_attrs: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:  # anything to write
        return bool(self.params or self.user_attrs or self.system_attrs)


class Ledger(BaseStorage, BaseHeartbeat):
    """``storage`` (a URL or an Optuna storage) with batched writes for held trials (see the
    module doc). Studies opened on a Ledger are ordinary Optuna studies; the wrapped storage holds
    exactly what it would hold without it."""

    def __init__(self, storage: str | BaseStorage):
        if isinstance(storage, Ledger):
            storage = storage.inner
        #: the wrapped storage (an RDB storage behind Optuna's read cache, as Optuna uses it)
        self.inner = optuna.storages.get_storage(storage)
        self._held: dict[int, _Pending] = {}
        self._finished: dict[int, FrozenTrial] = {}  # the last trial this process finished
        self._views: dict[int, _View] = {}
        self._dists: dict[tuple[int, str], BaseDistribution] = {}
        self._lock = threading.Lock()
        #: the error of a trial's last write that failed (a full disk, a lost server): Optuna
        #: reports a failed ``tell`` as an AssertionError of its own, the search raises this
        self.write_error: BaseException | None = None

    # -- holding trials --------------------------------------------------------------------------

    def hold(self, trial_id: int, study_id: int) -> None:
        """Keep ``trial_id``'s param and attribute writes until :meth:`flush` or its end."""
        trial = copy.deepcopy(self.inner.get_trial(trial_id))
        with self._lock:
            self._finished.clear()
            self._held.setdefault(trial_id, _Pending(study_id, trial))

    def flush(self, trial_id: int) -> None:
        """Write ``trial_id``'s pending params and attributes now, in one write."""
        with self._lock:
            pending = self._held.get(trial_id)
            if pending:
                self._held[trial_id] = _Pending(pending.study_id, pending.trial)
        if pending:
            self._write(trial_id, pending, None, None, datetime.now())

    # -- batched writes: one transaction or one journal append ------------------------------------

    def _write(self, trial_id: int, pending: _Pending, state: TrialState | None,
               values: Sequence[float] | None, when: datetime) -> bool:
        backend = _rdb(self.inner)
        if backend is not None:
            return self._write_rdb(backend, trial_id, pending, state, values, when)
        journal = self.inner if isinstance(self.inner, optuna.storages.JournalStorage) else None
        if journal is not None:
            return self._write_journal(journal, trial_id, pending, state, values, when)
        # any other storage (in memory, gRPC proxy): Optuna's own calls, one per field
        for name, (value, dist) in pending.params.items():
            self.inner.set_trial_param(trial_id, name, value, dist)
        for key, value in pending.user_attrs.items():
            self.inner.set_trial_user_attr(trial_id, key, value)
        for key, value in pending.system_attrs.items():
            self.inner.set_trial_system_attr(trial_id, key, value)
        return True if state is None else self.inner.set_trial_state_values(trial_id, state,
                                                                            values)

    def _write_rdb(self, rdb: Any, trial_id: int, pending: _Pending, state: TrialState | None,
                   values: Sequence[float] | None, when: datetime) -> bool:
        from optuna.distributions import check_distribution_compatibility
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session
        from sqlalchemy import exc as sqlalchemy_exc

        try:
            with _create_scoped_session(rdb.scoped_session) as session:
                # one look-up of the trial, then plain inserts (Optuna's per-field helpers look
                # the trial up again for each field)
                trial = models.TrialModel.find_or_raise_by_id(trial_id, session,
                                                              for_update=state is not None)
                rdb.check_trial_is_updatable(trial_id, trial.state)
                for name, (value, dist) in pending.params.items():
                    key = (pending.study_id, name)
                    if key in self._dists:
                        check_distribution_compatibility(self._dists[key], dist)
                        session.add(models.TrialParamModel(
                            trial_id=trial_id, param_name=name, param_value=value,
                            distribution_json=distribution_to_json(dist)))
                    else:  # first time: checked against the study's earlier trials
                        rdb._set_trial_param_without_commit(session, trial_id, name, value, dist)
                    self._dists[key] = dist
                for model, attrs in ((models.TrialUserAttributeModel, pending.user_attrs),
                                     (models.TrialSystemAttributeModel, pending.system_attrs)):
                    if attrs:
                        _upsert_attrs(session, rdb.engine.name, model, trial_id, attrs)
                if state is None:
                    return True
                # what RDBStorage.set_trial_state_values does for a finished state
                for objective, v in enumerate(values or ()):
                    rdb._set_trial_value_without_commit(session, trial, objective, v)
                trial.state = state
                trial.datetime_complete = when
        except sqlalchemy_exc.IntegrityError:
            if state is None:
                raise
            return False  # as Optuna's: another process finished the trial first
        return True

    def _write_journal(self, journal: Any, trial_id: int, pending: _Pending,
                       state: TrialState | None, values: Sequence[float] | None,
                       when: datetime) -> bool:
        from optuna.storages.journal._storage import JournalOperation

        logs: list[tuple[int, dict[str, Any]]] = [
            (JournalOperation.SET_TRIAL_PARAM,
             {"trial_id": trial_id, "param_name": name, "param_value_internal": value,
              "distribution": distribution_to_json(dist)})
            for name, (value, dist) in pending.params.items()]
        # one record per attribute (Optuna's replay takes one each), all in one append
        logs += [(JournalOperation.SET_TRIAL_USER_ATTR, {"trial_id": trial_id,
                                                         "user_attr": {key: value}})
                 for key, value in pending.user_attrs.items()]
        logs += [(JournalOperation.SET_TRIAL_SYSTEM_ATTR, {"trial_id": trial_id,
                                                           "system_attr": {key: value}})
                 for key, value in pending.system_attrs.items()]
        if state is not None:
            logs.append((JournalOperation.SET_TRIAL_STATE_VALUES,
                         {"trial_id": trial_id, "state": state, "values": values,
                          "datetime_complete": when.astimezone(timezone.utc).isoformat(
                              timespec="microseconds")}))
        with journal._thread_lock:
            worker = journal._replay_result.worker_id
            journal._backend.append_logs([{"op_code": op, "worker_id": worker, **fields}
                                          for op, fields in logs])
            journal._sync_with_backend()
        return True

    # -- counting ------------------------------------------------------------------------------

    def _trials_by_number(self, study_id: int) -> Any:
        """The storage's own current map of the study's trials (number -> FrozenTrial), brought
        up to date with one incremental read, or None where the storage keeps none (then every
        read is a full one)."""
        inner = self.inner
        if isinstance(inner, optuna.storages.JournalStorage):
            with inner._thread_lock:
                inner._sync_with_backend()
                replay = inner._replay_result
                ids = replay._study_id_to_trial_ids.get(study_id, [])
                return _JournalTrials(replay._trials, ids)
        if _rdb(inner) is not None and hasattr(inner, "_read_trials_from_remote_storage"):
            inner._read_trials_from_remote_storage(study_id)  # Optuna's cache: new + unfinished
            return inner._studies[study_id].trials
        return None

    def completed_trials(self, study_id: int, trials: Any = None) -> list[FrozenTrial]:
        """The study's COMPLETE trials by number, read incrementally (finished trials are read
        once): what samplers and the loop ask for on every trial, at a cost that does not grow
        with the study on journal and SQLite/PostgreSQL storages. ``trials``: the storage's map
        just read by :meth:`_trials_by_number` (read here when not given)."""
        trials = self._trials_by_number(study_id) if trials is None else trials
        if trials is None:
            return self.inner.get_all_trials(study_id, deepcopy=False,
                                             states=(TrialState.COMPLETE,))
        with self._lock:
            view = self._views.setdefault(study_id, _View())
            while view.scanned in trials:
                view.open[view.scanned] = trials[view.scanned]
                view.scanned += 1
            done = []
            for number in list(view.open):
                trial = trials[number]  # the storage's newest copy
                if trial.state.is_finished():
                    del view.open[number]
                    if trial.state == TrialState.COMPLETE:
                        done.append(trial)
                else:
                    view.open[number] = trial
            if done:
                if view.complete and done[0].number < view.complete[-1].number:
                    view.complete = sorted(view.complete + done, key=lambda t: t.number)
                else:
                    view.complete.extend(sorted(done, key=lambda t: t.number))
            return list(view.complete)

    def count_trials(self, study_id: int, running_below: int | None = None) -> tuple[int, int]:
        """(COMPLETE trials, RUNNING trials [numbered below ``running_below``]) of the study,
        as the storage holds them now: one counting query on an RDB storage, the incremental
        view elsewhere."""
        rdb = _rdb(self.inner)
        if rdb is None:
            complete = len(self.completed_trials(study_id))
            if study_id not in self._views:  # a storage without a view: a full read
                return complete, sum(
                    running_below is None or t.number < running_below
                    for t in self.inner.get_all_trials(study_id, deepcopy=False,
                                                       states=(TrialState.RUNNING,)))
            with self._lock:
                running = sum(t.state == TrialState.RUNNING
                              and (running_below is None or t.number < running_below)
                              for t in self._views[study_id].open.values())
            return complete, running
        import sqlalchemy
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        model = models.TrialModel
        running = model.state == TrialState.RUNNING
        if running_below is not None:
            running = sqlalchemy.and_(running, model.number < running_below)
        with _create_scoped_session(rdb.scoped_session) as session:
            rows = (session.query(model.state, sqlalchemy.func.count(model.trial_id))
                    .filter(model.study_id == study_id)
                    .filter(sqlalchemy.or_(model.state == TrialState.COMPLETE, running))
                    .group_by(model.state).all())
        counts = {state: n for state, n in rows}
        return counts.get(TrialState.COMPLETE, 0), counts.get(TrialState.RUNNING, 0)

    # -- the trial's writes ----------------------------------------------------------------------

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        with self._lock:
            pending = self._held.get(trial_id)
            if pending is not None:
                pending.params[param_name] = (param_value_internal, distribution)
                pending.trial.params[param_name] = distribution.to_external_repr(
                    param_value_internal)
                pending.trial.distributions[param_name] = distribution
                return
        self.inner.set_trial_param(trial_id, param_name, param_value_internal, distribution)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        if not self._keep(trial_id, "user_attrs", key, value):
            self.inner.set_trial_user_attr(trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if not self._keep(trial_id, "system_attrs", key, value):
            self.inner.set_trial_system_attr(trial_id, key, value)

    def _keep(self, trial_id: int, kind: str, key: str, value: Any) -> bool:
        """Keep an attribute write of a held trial (``kind``: user_attrs or system_attrs) for
        the next write; False when the trial is not held."""
        with self._lock:
            pending = self._held.get(trial_id)
            if pending is None:
                return False
            getattr(pending, kind)[key] = value
            getattr(pending.trial, kind)[key] = value
            return True

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        with self._lock:
            pending = self._held.pop(trial_id, None) if state.is_finished() else None
        try:
            if pending is None:
                return self.inner.set_trial_state_values(trial_id, state, values)
            when = datetime.now()
            written = self._write(trial_id, pending, state, values, when)
        except Exception as exc:
            self.write_error = exc
            raise
        if written:  # the trial as now stored, for Optuna's reads right after its end
            trial = pending.trial
            trial.state, trial.values, trial.datetime_complete = state, values, when
            with self._lock:
                self._finished[trial_id] = trial
        return written

    def get_trial(self, trial_id: int) -> FrozenTrial:
        with self._lock:
            pending = self._held.get(trial_id)
            known = pending.trial if pending is not None else self._finished.get(trial_id)
            if known is not None:
                return copy.deepcopy(known)
        return self.inner.get_trial(trial_id)

    # -- everything else: the wrapped storage ----------------------------------------------------

    def create_new_study(self, directions: Sequence[StudyDirection],
                         study_name: str | None = None) -> int:
        return self.inner.create_new_study(directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self.inner.delete_study(study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self.inner.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self.inner.set_study_system_attr(study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self.inner.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self.inner.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self.inner.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self.inner.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self.inner.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[optuna.study.FrozenStudy]:
        return self.inner.get_all_studies()

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self.inner.create_new_trial(study_id, template_trial)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self.inner.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def set_trial_intermediate_value(self, trial_id: int, step: int,
                                     intermediate_value: float) -> None:
        self.inner.set_trial_intermediate_value(trial_id, step, intermediate_value)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        """The study's trials; those of unfinished or complete states only (Optuna's ``ask``
        looks for WAITING trials on every trial) from the incremental view, where the storage
        has one."""
        unfinished = (TrialState.WAITING, TrialState.RUNNING)
        current = (self._trials_by_number(study_id)
                   if states is not None and all(s in unfinished for s in states) else None)
        if current is not None:
            self.completed_trials(study_id, current)  # brings the view up to date
            with self._lock:
                trials = [t for t in self._views[study_id].open.values() if t.state in states]
            return copy.deepcopy(trials) if deepcopy else trials
        if states is not None and tuple(states) == (TrialState.COMPLETE,):
            trials = self.completed_trials(study_id)
            return copy.deepcopy(trials) if deepcopy else trials
        return self.inner.get_all_trials(study_id, deepcopy=deepcopy, states=states)

    def get_n_trials(self, study_id: int, state: Any = None) -> int:
        return self.inner.get_n_trials(study_id, state)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self.inner.get_best_trial(study_id)

    def remove_session(self) -> None:
        self.inner.remove_session()

    def check_trial_is_updatable(self, trial_id: int, trial_state: TrialState) -> None:
        self.inner.check_trial_is_updatable(trial_id, trial_state)

    # -- heartbeat (RDB storages only) -----------------------------------------------------------

    def record_heartbeat(self, trial_id: int) -> None:
        self.inner.record_heartbeat(trial_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return self.inner._get_stale_trial_ids(study_id)

    def get_heartbeat_interval(self) -> int | None:
        return (self.inner.get_heartbeat_interval() if isinstance(self.inner, BaseHeartbeat)
                else None)

    def get_heartbeat_stale_trial_callback(self) -> Any:
        return (self.inner.get_heartbeat_stale_trial_callback()
                if isinstance(self.inner, BaseHeartbeat) else None)


class _JournalTrials:
    """A journal replay's trials of one study as a map number -> FrozenTrial (its trial ids
    in creation order are the numbers' order)."""

    def __init__(self, trials: dict[int, FrozenTrial], ids: list[int]):
        self._trials, self._ids = trials, ids

    def __contains__(self, number: int) -> bool:
        return 0 <= number < len(self._ids)

    def __getitem__(self, number: int) -> FrozenTrial:
        return self._trials[self._ids[number]]


def _upsert_attrs(session: Any, dialect: str, model: Any, trial_id: int,
                  attrs: dict[str, Any]) -> None:
    """Set the trial's attributes ``attrs`` in one statement where the database has an upsert
    (SQLite, PostgreSQL); a retried trial starts with its failed original's attributes, so a
    key may already be there."""
    import json
    rows = [{"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
            for key, value in attrs.items()]
    if dialect in ("sqlite", "postgresql"):
        from sqlalchemy.dialects import postgresql, sqlite
        insert = (sqlite if dialect == "sqlite" else postgresql).insert(model).values(rows)
        session.execute(insert.on_conflict_do_update(
            index_elements=[model.trial_id, model.key],
            set_={"value_json": insert.excluded.value_json}))
        return
    existing = {row.key: row for row in session.query(model).filter(
        model.trial_id == trial_id, model.key.in_(list(attrs)))}
    for row in rows:
        if row["key"] in existing:
            existing[row["key"]].value_json = row["value_json"]
        else:
            session.add(model(**row))


def _rdb(storage: BaseStorage) -> Any:
    """The RDB storage behind ``storage`` (Optuna's cache wrapper or itself), or None."""
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, optuna.storages.RDBStorage) else None
