"""The write-behind Optuna storage: the driver decides on memory, the sweep's store (sqlite here) gets every
write, in order, off the caller's thread; a store's error or another writer is raised, not lost."""

from __future__ import annotations

import threading
from pathlib import Path

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from peftsweep.orchestrator.optuna_store import StoreConflict, WriteBehindStorage
from peftsweep.orchestrator.strategy import LogBracketSampler, StrategyOptunaSearch

optuna.logging.set_verbosity(optuna.logging.WARNING)
SPACE = {
    "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
    "rank": optuna.distributions.CategoricalDistribution([4, 8]),
}
WRITES = (
    "create_new_trial",
    "set_trial_param",
    "set_trial_state_values",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
)


class SpiedStore(RDBStorage):
    """A sqlite store that notes which thread ran each trial write."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.threads: list[tuple[str, str]] = []
        for name in WRITES:
            write = getattr(self, name)
            setattr(self, name, self._spied(name, write))

    def _spied(self, name, write):  # noqa: ANN001, ANN202 — a test double
        def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.threads.append((name, threading.current_thread().name))
            return write(*args, **kwargs)

        return spy


def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def searcher(storage: optuna.storages.BaseStorage, points: list[dict] | None = None) -> StrategyOptunaSearch:
    """The sweep's searcher over ``storage``: bracketing then TPE, eval_loss recorded per report."""
    return StrategyOptunaSearch(
        SPACE,
        metric="exact_match",
        mode="max",
        sampler=LogBracketSampler(n_startup=3, resolution=0.3, then="tpe", seed=0),
        study_name="sweep/lora",
        storage=storage,
        points_to_evaluate=points,
        max_t=100,
        record=("eval_loss",),
    )


def drive(search: StrategyOptunaSearch, n: int) -> None:
    """``n`` trials as Tune drives them: two in flight, reports at steps 25/50/..., every other one stopped
    at its first rung (PRUNED), one failed."""
    running: list[str] = []
    for i in range(n):
        search.suggest(f"t{i}")
        running.append(f"t{i}")
        if len(running) < 2:
            continue
        tid = running.pop(0)
        k = int(tid[1:])
        if k == 3:
            search.on_trial_complete(tid, None, error=True)
            continue
        last = 25 if k % 2 else 100
        result: dict = {}
        for it, step in enumerate(range(25, last + 1, 25), 1):
            result = {"step": step, "training_iteration": it, "exact_match": 0.1 * k + step / 1000}
            result["eval_loss"] = 3.0 - result["exact_match"]
            search.on_trial_result(tid, result)
        search.on_trial_complete(tid, result)
    for tid in running:
        search.on_trial_complete(tid, None, error=True)


def as_stored(trial: FrozenTrial) -> tuple:
    return (
        trial.number,
        trial.state,
        trial.params,
        trial.distributions,
        trial.values,
        trial.intermediate_values,
        trial.user_attrs,
        trial.system_attrs,
    )


def stored(tmp_path: Path, name: str = "sweep/lora") -> list[FrozenTrial]:
    """The study as a fresh reader of the store sees it."""
    return optuna.load_study(study_name=name, storage=RDBStorage(url(tmp_path))).get_trials(deepcopy=False)


def test_the_store_gets_every_write_the_driver_made_off_its_thread(tmp_path: Path) -> None:
    store = SpiedStore(url(tmp_path))
    storage = WriteBehindStorage(store)
    search = searcher(storage, points=[{"lr": 3e-3, "rank": 8}])  # an enqueued (WAITING) trial first
    drive(search, 12)
    storage.close()
    memory = search._ot_study.get_trials(deepcopy=False)
    assert len(memory) == 12
    assert {t.state for t in memory} == {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}
    assert any(t.user_attrs for t in memory) and any(t.intermediate_values for t in memory)
    assert [as_stored(t) for t in stored(tmp_path)] == [as_stored(t) for t in memory]
    ran = {name for name, _ in store.threads}
    assert ran >= {"create_new_trial", "set_trial_state_values", "set_trial_intermediate_value"}
    on_caller = [name for name, thread in store.threads if thread == threading.current_thread().name]
    assert on_caller == []  # every trial write left the caller's (Tune's) thread


def test_an_opened_study_continues_from_the_stores_trials(tmp_path: Path) -> None:
    before = optuna.create_study(study_name="sweep/lora", storage=url(tmp_path), direction="maximize")
    for lr in (1e-3, 1e-2):
        done = optuna.trial.create_trial(params={"lr": lr, "rank": 8}, distributions=SPACE, value=lr)
        before.add_trial(done)
    before.enqueue_trial({"lr": 5e-3, "rank": 4})  # a killed configuration to run first, as on resume
    storage = WriteBehindStorage(RDBStorage(url(tmp_path)))
    search = searcher(storage)
    drive(search, 4)
    storage.close()
    memory = search._ot_study.get_trials(deepcopy=False)
    assert [t.number for t in memory] == [0, 1, 2, 3, 4, 5]
    assert memory[2].params == {"lr": 5e-3, "rank": 4}  # the enqueued trial ran first
    assert [as_stored(t) for t in stored(tmp_path)] == [as_stored(t) for t in memory]


def test_a_failed_store_write_is_raised_on_the_driver_not_lost(tmp_path: Path) -> None:
    store = RDBStorage(url(tmp_path))
    storage = WriteBehindStorage(store)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()

    def refuse(*_args: object) -> None:
        raise OSError("the store's disk is full")

    store.set_trial_user_attr = refuse
    trial.set_user_attr("a", 1.0)  # done in memory: the driver decides on it at once
    assert study.trials[0].user_attrs == {"a": 1.0}
    with pytest.raises(OSError, match="disk is full"):
        storage.flush()


def test_another_writer_of_the_study_is_a_conflict_named_not_a_renumbering(tmp_path: Path) -> None:
    storage = WriteBehindStorage(RDBStorage(url(tmp_path)))
    study = optuna.create_study(study_name="sweep/lora", storage=storage)
    study.tell(study.ask(), 1.0)
    storage.flush()
    optuna.load_study(study_name="sweep/lora", storage=url(tmp_path)).ask()  # a second sweep of the name
    study.ask()
    with pytest.raises(StoreConflict, match=r"'sweep/lora': the sweep's trial 1 was stored as trial 2"):
        storage.flush()


def test_studies_are_created_in_the_store_at_once_and_listed_from_it(tmp_path: Path) -> None:
    storage = WriteBehindStorage(RDBStorage(url(tmp_path)))
    optuna.create_study(study_name="a", storage=storage)
    optuna.create_study(study_name="b", storage=url(tmp_path))  # not through this storage
    assert {s.study_name for s in optuna.get_all_study_summaries(RDBStorage(url(tmp_path)))} == {"a", "b"}
    assert {s.study_name for s in storage.get_all_studies()} == {"a", "b"}
    with pytest.raises(optuna.exceptions.DuplicatedStudyError):
        optuna.create_study(study_name="b", storage=storage)
    assert optuna.load_study(study_name="b", storage=storage).trials == []
    with pytest.raises(KeyError):
        optuna.load_study(study_name="c", storage=storage)


def test_trials_of_several_threads_reach_the_store_as_memory_ordered_them(tmp_path: Path) -> None:
    storage = WriteBehindStorage(RDBStorage(url(tmp_path)))
    study = optuna.create_study(study_name="threads", storage=storage)

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -1.0, 1.0)
        trial.set_user_attr("thread", threading.current_thread().name)
        trial.report(x, 1)
        return x * x

    study.optimize(objective, n_trials=40, n_jobs=4)  # Optuna's own threads, one study
    storage.close()
    memory = study.get_trials(deepcopy=False)
    assert len(memory) == 40 and len({t.user_attrs["thread"] for t in memory}) > 1
    assert [as_stored(t) for t in stored(tmp_path, "threads")] == [as_stored(t) for t in memory]
