"""A method's search budget, enforced where trials are launched: a wrapper around the Optuna searcher that
also turns each suggestion into the trial's typed configuration (`trial.TrialPlan.config`).

Why a searcher wrapper: a budget must stop *launching* trials, not kill running ones (their results are
paid for), so the natural place is ``suggest`` — returning ``FINISHED`` ends the method's search once its
running trials report. The same place fixes parallel TPE's known waste: with several trials in flight,
Optuna keeps drawing random start-up trials until ``n_startup_trials`` have *finished*, so it launches
start-up + concurrency − 1 random trials. The wrapper holds back instead, until the in-flight start-up
trials have reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray.tune.search import Searcher

# build(trial_id, suggested params, creation index) -> the Tune config of that trial
Build = Callable[[str, dict, int], dict]


class BudgetedSearch(Searcher):
    """Wraps a Ray Tune ``OptunaSearch``: wall-time, trial-seconds and trial-steps budgets, start-up trials
    held back."""

    def __init__(
        self,
        searcher: Any,
        *,
        build: Build,
        max_trials: int,
        n_startup_trials: int,
        deadline: float | None = None,  # time.monotonic() after which no trial starts
        trial_seconds: float | None = None,  # summed trial durations after which no trial starts
        trial_steps: int | None = None,  # summed trained steps (last reported `step`) after which none starts
        step_attr: str = "step",
    ) -> None:
        self.searcher = searcher
        self.build = build
        self.max_trials = max_trials
        self.created = 0  # trials suggested so far (a trial's creation index picks its reliability drill)
        self.n_startup_trials = n_startup_trials
        self.deadline = deadline
        self.trial_seconds = trial_seconds
        self.trial_steps, self.step_attr = trial_steps, step_attr
        self.spent_seconds = 0.0
        self.spent_steps = 0
        self.stopped_by: str | None = None  # which budget ended the search, for the report
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def _counts(self, trial_id: str) -> tuple[int, int]:
        """(finished, running) trials of the Optuna study, the source of truth (resumed trials included)."""
        import optuna

        state = optuna.trial.TrialState
        # One read: each read of an RDB study re-reads its unfinished trials from the store (SQL round trips
        # on the Tune event loop, bench/scale.py); a StrategyOptunaSearch reuses it for its suggestion.
        read = getattr(self.searcher, "read_trials", None)
        if read is not None:
            trials = read(trial_id).of(state.COMPLETE, state.PRUNED, state.RUNNING)
        else:  # OptunaSearch's study (created in its constructor)
            trials = self.searcher._ot_study.get_trials(
                deepcopy=False, states=(state.COMPLETE, state.PRUNED, state.RUNNING)
            )
        running = sum(t.state == state.RUNNING for t in trials)
        return len(trials) - running, running

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.created >= self.max_trials:
            return Searcher.FINISHED
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.stopped_by = "wall time"
            return Searcher.FINISHED
        if self.trial_seconds is not None and self.spent_seconds >= self.trial_seconds:
            self.stopped_by = "trial-seconds"
            return Searcher.FINISHED
        if self.trial_steps is not None and self.spent_steps >= self.trial_steps:
            self.stopped_by = "trial-steps"
            return Searcher.FINISHED
        finished, running = self._counts(trial_id)
        if running and finished < self.n_startup_trials <= finished + running:
            return None  # the start-up trials in flight complete the random phase: wait for them
        params = self.searcher.suggest(trial_id)
        if not isinstance(params, dict):
            return params  # None (wait) or FINISHED
        self.created += 1
        return self.build(trial_id, params, self.created - 1)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.spent_seconds += float((result or {}).get("time_total_s", 0.0))
        self.spent_steps += int((result or {}).get(self.step_attr, 0))
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict:
        """This wrapper's own state; Tune saves the wrapped OptunaSearch separately (``save_to_dir``)."""
        return {"spent_seconds": self.spent_seconds, "spent_steps": self.spent_steps}

    def set_state(self, state: dict) -> None:
        self.spent_seconds = state["spent_seconds"]
        self.spent_steps = state.get("spent_steps", 0)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)


class FixedSearch(Searcher):
    """Suggests a fixed list of configurations once each (confirmation runs), each built into its trial's
    config with the trial id Tune assigned: the same path as the search's trials, no grid of dicts."""

    def __init__(self, points: list[dict], build: Build) -> None:
        super().__init__()
        self.points = list(points)
        self.build = build
        self.created = 0

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.created >= len(self.points):
            return Searcher.FINISHED
        self.created += 1
        return self.build(trial_id, self.points[self.created - 1], self.created - 1)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass
