"""The budget wrapper around the real OptunaSearch: start-up trials held back, time budgets end the search."""

from __future__ import annotations

import time

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from peftsweep.orchestrator.budget import BudgetedSearch


def _search(max_trials: int = 10, **budget: float) -> BudgetedSearch:
    space = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    inner = OptunaSearch(
        space,
        metric="exact_match",
        mode="max",
        sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2, constant_liar=True),
        study_name="budget",
        storage=optuna.storages.InMemoryStorage(),
    )
    build = lambda trial_id, params, index: params | {"trial_id": trial_id, "index": index}  # noqa: E731
    return BudgetedSearch(inner, build=build, max_trials=max_trials, n_startup_trials=2, **budget)


def _study(search: BudgetedSearch) -> list[optuna.trial.FrozenTrial]:
    return search.searcher._ot_study.get_trials(deepcopy=False)


def _states(search: BudgetedSearch) -> list[str]:
    return [t.state.name for t in _study(search)]


def test_start_up_trials_are_not_over_launched_in_parallel() -> None:
    search = _search()
    a, b = search.suggest("a"), search.suggest("b")  # the two random start-up trials
    assert (a["trial_id"], a["index"], b["trial_id"], b["index"]) == ("a", 0, "b", 1)
    assert search.suggest("c") is None  # both in flight: wait instead of a third random draw ...
    assert _states(search) == ["RUNNING", "RUNNING"] and search.created == 2  # ... and draw nothing
    search.on_trial_complete("a", {"exact_match": 0.2, "time_total_s": 1.0})
    assert search.suggest("c") is None  # b still completes the start-up phase
    assert _states(search) == ["COMPLETE", "RUNNING"] and search.created == 2
    search.on_trial_complete("b", {"exact_match": 0.5, "time_total_s": 1.0})
    c = search.suggest("c")  # TPE now has its start-up data
    assert (c["trial_id"], c["index"]) == ("c", 2) and 1e-4 <= c["lr"] <= 1e-1
    assert [t.value for t in _study(search)] == [0.2, 0.5, None]
    assert _study(search)[2].params == {"lr": c["lr"]}  # the study's third trial is the one launched


def test_a_failed_start_up_trial_does_not_block_the_search() -> None:
    search = _search()
    search.suggest("a")
    search.on_trial_complete("a", None, error=True)  # FAIL: not finished, not running
    b = search.suggest("b")  # nothing in flight to wait for
    assert (b["trial_id"], b["index"]) == ("b", 1) and _states(search) == ["FAIL", "RUNNING"]
    assert search.spent_seconds == 0.0 and search.spent_steps == 0  # a failure reports nothing to count


def test_trial_seconds_and_wall_time_budgets_finish_the_search() -> None:
    search = _search(trial_seconds=5.0)
    search.suggest("a")
    search.on_trial_complete("a", {"exact_match": 0.1, "time_total_s": 4.0})
    assert search.suggest("b")["index"] == 1 and search.stopped_by is None  # 4 of 5 s spent
    search.on_trial_complete("b", {"exact_match": 0.1, "time_total_s": 2.5})
    assert search.spent_seconds == 6.5
    assert search.suggest("c") == Searcher.FINISHED and search.stopped_by == "trial-seconds"
    assert len(_study(search)) == 2 and search.created == 2  # no trial drawn once the budget is spent
    late = _search(deadline=time.monotonic() - 1)
    assert late.suggest("a") == Searcher.FINISHED and late.stopped_by == "wall time"


def test_each_suggestion_is_built_into_a_trial_config_and_the_trial_budget_is_kept() -> None:
    search = _search(max_trials=3)
    configs = []
    for trial_id in "abc":
        configs.append(search.suggest(trial_id))
        search.on_trial_complete(trial_id, {"exact_match": 0.1, "time_total_s": 1.0})
    assert [(c["trial_id"], c["index"]) for c in configs] == [("a", 0), ("b", 1), ("c", 2)]
    assert all(1e-4 <= c["lr"] <= 1e-1 for c in configs)
    assert [c["lr"] for c in configs] == [t.params["lr"] for t in _study(search)]  # Optuna's, kept as is
    assert search.suggest("d") == Searcher.FINISHED  # 3 trials: the method's budget
    assert len(_study(search)) == 3


def test_a_trial_steps_budget_counts_trained_steps_of_finished_trials() -> None:
    search = _search(trial_steps=100)
    for tid in "ab":
        search.suggest(tid)
    search.on_trial_complete("a", {"exact_match": 0.0, "step": 25})  # stopped at its first rung
    search.on_trial_complete("b", {"exact_match": 0.4, "step": 50})
    assert search.suggest("c")["index"] == 2 and search.spent_steps == 75  # 75 of 100 spent
    search.on_trial_complete("c", {"exact_match": 0.5, "step": 150})
    assert search.suggest("d") == Searcher.FINISHED and search.stopped_by == "trial-steps"
    assert search.get_state()["spent_steps"] == 225
