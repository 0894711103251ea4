"""Every method's search in one Tune run: a searcher and a scheduler that keep each method's own.

Why one Tune run for the whole sweep: methods searched one after another leave slots idle at every method's
end and, with the inline executor, start fresh trial actors for every method; one run keeps its actors warm
for the whole sweep and lets a slot freed by one method go to whichever method has work left (issues 17, 21).
Fairness is kept where it matters: each method has its own Optuna study (its own searcher), its own budget,
and its own early-stopping scheduler, so a method's trials are only ever compared with that method's.

A method goes through phases: ``waiting`` (its LR prior needs another method's result first), ``search``
(its Optuna study's trials), ``confirm`` (its top configurations re-run with extra seeds) and ``done``. The
driver supplies the per-method parts as callables; this module only routes and schedules.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from peftsweep.trainables.trial_config import TRIAL_KEY

Phase = Literal["waiting", "search", "confirm", "done"]


@dataclass
class MethodRun:
    """One method's part of the sweep."""

    name: str
    # builds the method's search searcher when its search may start (its prior's inputs are known)
    start_search: Callable[[], Searcher | None]
    # builds its confirmation searcher once the search is over (None: nothing to confirm)
    start_confirm: Callable[[], Searcher | None]
    after: str | None = None  # a method whose whole run must be done first (the LR prior's reference)
    # why the method must stop launching trials (e.g. its first trials all failed the same way), or None
    stop: Callable[[], str | None] = lambda: None
    stopped: str | None = None  # the reason it was stopped, once it was
    phase: Phase = "waiting"
    searcher: Searcher | None = None
    running: set[str] = field(default_factory=set)
    launched: int = 0
    searcher_finished: bool = False  # the phase's searcher said FINISHED (its running trials may go on)


class SweepSearch(Searcher):
    """Suggests the next trial of whichever method has work left, fewest trials in flight first."""

    def __init__(
        self,
        methods: list[MethodRun],
        on_done: Callable[[str], None] = lambda _m: None,
        on_stop: Callable[[str, str], None] = lambda _m, _why: None,
    ) -> None:
        super().__init__()
        self.methods = {m.name: m for m in methods}
        self.order = [m.name for m in methods]
        self.on_done, self.on_stop = on_done, on_stop
        self.owner: dict[str, str] = {}  # trial id -> method
        self.rank = {name: i for i, name in enumerate(self.order)}  # spec order, the last tie-breaker
        self.max_concurrent: int | None = None  # trials in flight at once, all methods together

    def __reduce__(self) -> tuple:
        # Tune pickles its config (this searcher included) into tuner.pkl for `Tuner.restore`, which a sweep
        # never uses (it resumes from Optuna and MLflow). The per-method parts close over the driver's
        # MLflow client and live display, so a pickled copy is an empty search.
        return (SweepSearch, ([],))

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # each method's searcher was built with its own metric, mode and space

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Tune's ``max_concurrent_trials``, enforced here over all methods together (`suggest`).

        Returning True tells Tune's ConcurrencyLimiter that this searcher limits itself, so the limit must be
        kept here: Tune itself bounds only its *pending* trials, and starts as many as the cluster's
        resources allow — with Ray Train trials, whose Tune trial reserves 0.05 CPU, far more than the GPUs
        can run (measured: bench/scale.py)."""
        self.max_concurrent = max_concurrent
        return True

    def in_flight(self) -> int:
        """Trials suggested and not yet complete (pending or running), all methods together."""
        return sum(len(m.running) for m in self.methods.values())

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.max_concurrent and self.in_flight() >= self.max_concurrent:
            return None  # every slot is taken: Tune asks again when a trial ends
        self._advance_all()
        for method in sorted(self._active(), key=self._priority):
            config = self._suggest(method, trial_id)
            if config is not None:
                return config
        return Searcher.FINISHED if all(m.phase == "done" for m in self.methods.values()) else None

    def _active(self) -> list[MethodRun]:
        phases = ("search", "confirm")
        return [m for m in self.methods.values() if m.phase in phases and not m.searcher_finished]

    def _priority(self, method: MethodRun) -> tuple[int, int, int]:
        """Fewest trials in flight, then fewest launched, then spec order: every method gets slots."""
        return (len(method.running), method.launched, self.rank[method.name])

    def _suggest(self, method: MethodRun, trial_id: str) -> dict | None:
        assert method.searcher is not None
        config = method.searcher.suggest(trial_id)
        if config == Searcher.FINISHED:
            method.searcher_finished = True
            self._advance(method)
            return None
        if not isinstance(config, dict):
            return None  # the method's searcher waits (e.g. its start-up trials are still running)
        self.owner[trial_id] = method.name
        method.running.add(trial_id)
        method.launched += 1
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        method = self._method_of(trial_id)
        if method is not None and method.searcher is not None:
            method.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        method = self._method_of(trial_id)
        if method is None:
            return
        if method.searcher is not None and trial_id in method.running:
            method.searcher.on_trial_complete(trial_id, result=result, error=error)
        method.running.discard(trial_id)
        # Phases advance at the next `suggest`: Tune tells the searcher of a completion before its callbacks
        # record it, and the next phase (confirmation, a dependent method's prior) reads those records.

    def counts_in_flight(self, trial_id: str) -> bool:
        """Whether this trial was suggested and never reported complete."""
        method = self._method_of(trial_id)
        return method is not None and trial_id in method.running

    def _method_of(self, trial_id: str) -> MethodRun | None:
        name = self.owner.get(trial_id)
        return self.methods.get(name) if name else None

    def _advance_all(self) -> None:
        for method in self.methods.values():
            self._advance(method)

    def _advance(self, method: MethodRun) -> None:
        """Move a method to its next phase when its current one is over (repeatedly: a phase may be empty)."""
        if method.phase == "search" and method.stopped is None and (why := method.stop()) is not None:
            method.stopped, method.searcher_finished = why, True  # its running trials finish; no new ones
            method.start_confirm = lambda: None  # nothing of it is worth confirming
            self.on_stop(method.name, why)
        while True:
            if method.phase == "waiting":
                before = self.methods.get(method.after) if method.after else None
                if before is not None and before.phase != "done":
                    return
                self._enter(method, "search", method.start_search)
            elif method.phase in ("search", "confirm") and method.searcher_finished and not method.running:
                if method.phase == "search":
                    self._enter(method, "confirm", method.start_confirm)
                else:
                    method.phase = "done"
                    self.on_done(method.name)
            else:
                return

    def _enter(self, method: MethodRun, phase: Phase, start: Callable[[], Searcher | None]) -> None:
        method.phase, method.searcher = phase, start()
        method.searcher_finished = method.searcher is None  # nothing to do in this phase

    def save(self, checkpoint_path: str) -> None:
        """Progress only, for a look at a stopped run: the sweep resumes from its Optuna studies and MLflow
        runs (`resume`), not from Tune's experiment state."""
        state = {m.name: {"phase": m.phase, "launched": m.launched} for m in self.methods.values()}
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        pass  # see `save`


class SweepScheduler(TrialScheduler):
    """Routes each trial to its method's own early-stopping scheduler; confirmation runs are never stopped.

    Trials start in the order they were created (FIFO), so a method's searcher decides what runs next.
    """

    def __init__(self, make: Callable[[str], TrialScheduler]) -> None:
        super().__init__()
        self.make = make
        self.schedulers: dict[str, TrialScheduler] = {}
        self.fifo = FIFOScheduler()
        self.unfinished: list[Any] = []  # trials added and not yet ended, in the order they were added

    def __reduce__(self) -> tuple:
        return (SweepScheduler, (FIFOScheduler,))  # see SweepSearch.__reduce__

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # each method's scheduler was built with its own metric and mode

    def _for(self, trial: Any) -> TrialScheduler:
        config = trial.config[TRIAL_KEY]
        if config.role != "search":
            return self.fifo
        if config.method not in self.schedulers:
            self.schedulers[config.method] = self.make(config.method)
        return self.schedulers[config.method]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self.unfinished.append(trial)
        self._for(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self._for(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self._for(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._for(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._for(trial).on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        """FIFOScheduler's choice (the first PENDING trial, else the first PAUSED), made over the trials not
        yet ended instead of every trial of the sweep: Tune asks at each of its steps, and the scan over all
        trials cost 1.3 ms a call at 2,000 trials (bench/scale.py)."""
        from ray.tune.experiment import Trial

        self.unfinished = [t for t in self.unfinished if t.status not in (Trial.TERMINATED, Trial.ERROR)]
        for status in (Trial.PENDING, Trial.PAUSED):
            trial = next((t for t in self.unfinished if t.status == status), None)
            if trial is not None:
                return trial
        return None

    def debug_string(self) -> str:
        return f"per-method schedulers: {', '.join(self.schedulers) or 'none yet'}"

    def save(self, checkpoint_path: str) -> None:
        pass  # nothing to resume from: see SweepSearch.save

    def restore(self, checkpoint_path: str) -> None:
        pass


class UntoldEnds(Callback):
    """Tells the searcher and the other callbacks of trials that Tune ended without telling them.

    Why: Ray Tune (2.60) fails a trial whose reused actor could not be reset for it (the previous trial's
    thread still running after Tune's reuse wait: ``TuneController._on_trial_reset``) by setting it ERROR,
    and calls neither the searcher's ``on_trial_complete`` nor the callbacks' ``on_trial_error``. SweepSearch
    would count that trial in flight for ever, and with ``max_concurrent_trials`` trials counted so, suggest
    nothing again while Tune waits for a suggestion: the sweep would hang. At each controller step, a trial
    Tune has ended that the searcher still counts is reported to both as failed.
    """

    def __init__(self, search: SweepSearch, callbacks: list[Callback]) -> None:
        self.search, self.callbacks = search, callbacks

    def __reduce__(self) -> tuple:
        return (Callback, ())  # pickled with the RunConfig into Tune's state: a detached no-op there

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        for trial in trials:
            if trial.status in ("ERROR", "TERMINATED") and self.search.counts_in_flight(trial.trial_id):
                self.search.on_trial_complete(trial.trial_id, error=True)
                for callback in self.callbacks:
                    callback.on_trial_error(iteration=iteration, trials=trials, trial=trial)


class ForgetSummaries(Callback):
    """Drops the per-metric summaries Tune keeps of a trial once the trial has ended.

    Why: for every trial, until the Tune run ends, Tune keeps a max/min/avg/last dict and two last-n deques
    per numeric metric of its results (``Trial.metric_analysis``, ``metric_n_steps``): the largest part of
    what the driver's memory grows by with each trial (``bench/scale.py --tracemalloc``: 2.3 of 6.7 MiB per
    100 trials), and in Tune's state file at the end. Only Tune's ResultGrid reads them (a best result "over
    all steps"); a sweep reads its results from MLflow and Optuna, never from the ResultGrid. The trial's
    last result stays.
    """

    def __reduce__(self) -> tuple:
        return (Callback, ())  # pickled with the RunConfig into Tune's state: a detached no-op there

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        metadata = getattr(trial, "run_metadata", None)  # Tune's own; left alone if Tune changes it
        if metadata is None or not hasattr(metadata, "metric_n_steps"):
            return
        metadata.metric_analysis = {}
        metadata.metric_n_steps = {}
        metadata.invalidate_cache()

    on_trial_error = on_trial_complete
