"""The sweep's Optuna studies, decided on in memory and written behind to the sweep's store.

Why: Ray Tune calls the searchers on its one event-loop thread, and against an RDB store Optuna's ``ask``
re-reads the study several times and writes each suggestion in its own transaction: in `bench/scale.py`'s
20 × 100 sweep on Postgres, a suggestion took 80 ms and a tell 26 ms (medians), against 5.7 and 0.27 ms in
memory. At 8 concurrent trials those ~100 ms a finished trial were where the slots waited (a stopped
trial's actor is handed to the next trial only after the tell and the next ask; every report of the other
trials waits behind them). Here the driver reads and writes an in-memory copy of each study it opens, loaded
from the store when first opened; every write is replayed, in order, on the store by one thread
(`writes.Writes`). Only this driver writes the sweep's studies while it holds the sweep's lock, so the copy
is the study.

The store trails the copy by the queue (empty most of the time): `flush` waits for it, `close` flushes at the
end of the sweep, and a store's error is raised on the driver at the next write or flush. A driver killed
outright loses the queued writes only: `sweep.reconcile_study` settles trials the store still has RUNNING on
resume, and a trial the store never saw is one the resumed sweep runs again.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.exceptions import DuplicatedStudyError
from optuna.storages import BaseStorage, InMemoryStorage
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

from peftsweep.orchestrator.writes import Writes


class StoreConflict(RuntimeError):
    """The store's copy of a study no longer matches the driver's: another process wrote to it."""


class WriteBehindStorage(InMemoryStorage):
    """An Optuna storage that answers from memory and writes through to ``store`` on a thread of its own."""

    def __init__(self, store: BaseStorage) -> None:
        super().__init__()
        self.store = store
        self._writes = Writes("peftsweep-optuna")
        self._store_study: dict[int, int] = {}  # our study id -> the store's (set on the caller's thread)
        self._store_trial: dict[int, int] = {}  # our trial id -> the store's (once the store has the trial)

    # --- studies: opened from the store, created in it at once (rare, before any trial) ---

    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        with self._lock:
            if study_name is not None and study_name in self._study_name_to_id:
                raise DuplicatedStudyError(study_name)
            store_id = self.store.create_new_study(directions, study_name)  # raises DuplicatedStudyError
            study_id = super().create_new_study(directions, self.store.get_study_name_from_id(store_id))
            self._store_study[study_id] = store_id
            return study_id

    def get_study_id_from_name(self, study_name: str) -> int:
        with self._lock:
            if study_name not in self._study_name_to_id:
                self._open(study_name)
            return super().get_study_id_from_name(study_name)

    def _open(self, study_name: str) -> None:
        """The store's study (and its trials, in number order) copied into memory."""
        store_id = self.store.get_study_id_from_name(study_name)  # KeyError when there is none
        study_id = super().create_new_study(self.store.get_study_directions(store_id), study_name)
        self._store_study[study_id] = store_id
        for key, value in self.store.get_study_user_attrs(store_id).items():
            super().set_study_user_attr(study_id, key, value)
        for key, value in self.store.get_study_system_attrs(store_id).items():
            super().set_study_system_attr(study_id, key, value)
        for trial in self.store.get_all_trials(store_id, deepcopy=False):
            trial_id = super().create_new_trial(study_id, template_trial=trial)
            if self.get_trial_number_from_id(trial_id) != trial.number:
                raise StoreConflict(f"Optuna study {study_name!r}: its trial numbers have gaps in the store")
            self._store_trial[trial_id] = trial._trial_id

    def delete_study(self, study_id: int) -> None:
        with self._lock:
            self.flush()
            self.store.delete_study(self._store_study.pop(study_id))
            super().delete_study(study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        """Every study of the store (not only those opened here), once the queued writes are in."""
        self.flush()
        return self.store.get_all_studies()

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        stored = copy.deepcopy(value)  # as it is now, whatever the caller does with it next
        with self._lock:
            super().set_study_user_attr(study_id, key, value)
            self._behind(lambda store: store.set_study_user_attr(self._store_study[study_id], key, stored))

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        stored = copy.deepcopy(value)
        with self._lock:
            super().set_study_system_attr(study_id, key, value)
            self._behind(lambda store: store.set_study_system_attr(self._store_study[study_id], key, stored))

    # --- trials: every write in memory now, in the store behind ---

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        with self._lock:
            trial_id = super().create_new_trial(study_id, template_trial)
            created = copy.deepcopy(self._get_trial(trial_id))  # the store gets it whole, in one transaction
            store_study = self._store_study[study_id]
            self._writes.submit(lambda: self._create_in_store(store_study, trial_id, created))
            return trial_id

    def _create_in_store(self, store_study: int, trial_id: int, trial: FrozenTrial) -> None:
        store_id = self.store.create_new_trial(store_study, template_trial=trial)
        self._store_trial[trial_id] = store_id
        if (number := self.store.get_trial_number_from_id(store_id)) != trial.number:
            name = self.store.get_study_name_from_id(store_study)
            raise StoreConflict(
                f"Optuna study {name!r}: the sweep's trial {trial.number} was stored as trial {number}: "
                "another process writes to this study while the sweep runs (two sweeps of one name?)"
            )

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: BaseDistribution
    ) -> None:
        with self._lock:
            super().set_trial_param(trial_id, param_name, param_value_internal, distribution)
            self._behind(
                lambda store: store.set_trial_param(
                    self._store_trial[trial_id], param_name, param_value_internal, distribution
                )
            )

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        stored = list(values) if values is not None else None
        with self._lock:
            if not super().set_trial_state_values(trial_id, state, values):
                return False  # nothing changed (a RUNNING trial claimed again): nothing to store
            number = self.get_trial_number_from_id(trial_id)
            self._behind(lambda store: self._set_state_in_store(trial_id, number, state, stored))
            return True

    def _set_state_in_store(
        self, trial_id: int, number: int, state: TrialState, values: list[float] | None
    ) -> None:
        if not self.store.set_trial_state_values(self._store_trial[trial_id], state, values):
            raise StoreConflict(f"Optuna trial {number}: another process set its state in the store")

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        with self._lock:
            super().set_trial_intermediate_value(trial_id, step, intermediate_value)
            v = intermediate_value
            self._behind(lambda st: st.set_trial_intermediate_value(self._store_trial[trial_id], step, v))

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        stored = copy.deepcopy(value)
        with self._lock:
            super().set_trial_user_attr(trial_id, key, value)
            self._behind(lambda store: store.set_trial_user_attr(self._store_trial[trial_id], key, stored))

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        stored = copy.deepcopy(value)
        with self._lock:
            super().set_trial_system_attr(trial_id, key, value)
            self._behind(lambda store: store.set_trial_system_attr(self._store_trial[trial_id], key, stored))

    # --- the queue ---

    def _behind(self, write: Callable[[BaseStorage], None]) -> None:
        """Queue ``write`` for the store, after every write queued before it. Callers hold the storage's lock
        from their write in memory to here, so the store gets the writes of several threads in the order
        memory did; the writer's thread never takes that lock (a flush under it cannot deadlock)."""
        self._writes.submit(lambda: write(self.store))

    def flush(self) -> None:
        """Wait until the store has every write made so far; raise the first that failed there."""
        self._writes.flush()

    def close(self) -> None:
        """Flush, and stop the writer's thread."""
        try:
            self.flush()
        finally:
            self._writes.close()

    def __getstate__(self) -> dict[Any, Any]:
        """A pickled copy (Tune saves searchers with pickle) holds the studies and an empty queue."""
        state = super().__getstate__()
        state["_writes"] = Writes("peftsweep-optuna")
        return state
