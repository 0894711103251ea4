"""One Tune run for every method (orchestrator/methods.py): each method keeps its own searcher, phases and
early stopping, and free slots go to whichever method has work left. Unit tests with scripted searchers and
the real ASHA scheduler; the real sweep is tests/orchestrator/test_sweep_e2e.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher

from peftsweep.orchestrator.methods import ForgetSummaries, MethodRun, SweepScheduler, SweepSearch, UntoldEnds
from peftsweep.trainables.trial_config import TRIAL_KEY


@dataclass
class Scripted(Searcher):
    """Suggests ``budget`` configs named after the method and phase, then FINISHED; records what it saw."""

    name: str
    budget: int
    made: int = 0
    completed: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.made >= self.budget:
            return Searcher.FINISHED
        self.made += 1
        return {"who": self.name, "trial_id": trial_id}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.results.append(trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.completed.append(trial_id)


def _run(name: str, search: int, confirm: int, after: str | None = None) -> tuple[MethodRun, dict]:
    made: dict[str, Scripted] = {}

    def start(phase: str, budget: int) -> Scripted | None:
        if not budget:
            return None
        made[phase] = Scripted(f"{name}/{phase}", budget)
        return made[phase]

    run = MethodRun(
        name,
        start_search=lambda: start("search", search),
        start_confirm=lambda: start("confirm", confirm),
        after=after,
    )
    return run, made


def test_free_slots_go_to_the_method_with_fewest_trials_in_flight() -> None:
    (a, _), (b, _) = _run("a", 3, 0), _run("b", 3, 0)
    sweep = SweepSearch([a, b])
    who = [sweep.suggest(f"t{i}")["who"] for i in range(4)]  # type: ignore[index]
    assert who == ["a/search", "b/search", "a/search", "b/search"]  # interleaved, not a then b
    sweep.on_trial_complete("t0")  # a's first trial is done: a has fewer in flight now
    assert sweep.suggest("t4")["who"] == "a/search"  # type: ignore[index]


def test_each_method_goes_search_then_confirm_then_done_and_results_reach_only_its_searcher() -> None:
    done: list[str] = []
    (a, made), (b, _) = _run("a", 1, 2), _run("b", 1, 0)
    sweep = SweepSearch([a, b], on_done=done.append)
    assert sweep.suggest("s-a")["who"] == "a/search"  # type: ignore[index]
    assert sweep.suggest("s-b")["who"] == "b/search"  # type: ignore[index]
    assert sweep.suggest("x") is None  # both searches spent, their trials still running: nothing to start
    sweep.on_trial_result("s-a", {"m": 1})
    sweep.on_trial_complete("s-a")
    assert made["search"].results == ["s-a"] and made["search"].completed == ["s-a"]
    assert done == []  # a phase advances at the next suggest (after Tune's callbacks recorded the trial)
    assert sweep.suggest("c1")["who"] == "a/confirm"  # type: ignore[index]
    assert sweep.suggest("c2")["who"] == "a/confirm"  # type: ignore[index]
    sweep.on_trial_complete("s-b")
    assert sweep.suggest("y") is None and done == ["b"]  # b had nothing to confirm: done
    for trial_id in ("c1", "c2"):
        sweep.on_trial_complete(trial_id)
    assert made["confirm"].completed == ["c1", "c2"]
    assert sweep.suggest("z") == Searcher.FINISHED and done == ["b", "a"]


def test_a_method_whose_prior_needs_another_waits_for_it() -> None:
    (ref, _), (later, made) = _run("lora", 1, 0), _run("pissa", 1, 0, after="lora")
    sweep = SweepSearch([ref, later])
    assert sweep.suggest("r")["who"] == "lora/search"  # type: ignore[index]
    assert sweep.suggest("x") is None and "search" not in made  # not even built: its prior is unknown
    sweep.on_trial_complete("r")
    assert sweep.suggest("p")["who"] == "pissa/search"  # type: ignore[index]


def _trial(trial_id: str, method: str, role: str = "search") -> Any:
    return SimpleNamespace(trial_id=trial_id, config={TRIAL_KEY: SimpleNamespace(method=method, role=role)})


def test_early_stopping_compares_a_trial_only_with_its_own_methods_trials() -> None:
    """Method b's trials all score far below a's: with one shared ASHA they would be stopped at the rung;
    with one ASHA per method each is judged among its own."""
    made: dict[str, ASHAScheduler] = {}

    def make(method: str) -> ASHAScheduler:
        made[method] = ASHAScheduler(time_attr="step", metric="m", mode="max", max_t=4, grace_period=1)
        return made[method]

    scheduler = SweepScheduler(make)
    good = [_trial(f"a{i}", "a") for i in range(3)]
    weak = [_trial(f"b{i}", "b") for i in range(3)]
    for trial in good + weak:
        scheduler.on_trial_add(None, trial)
    for i, trial in enumerate(good):
        scheduler.on_trial_result(None, trial, {"step": 1, "m": 0.9 + 0.01 * i})
    decisions = [
        scheduler.on_trial_result(None, t, {"step": 1, "m": 0.1 - 0.01 * i}) for i, t in enumerate(weak)
    ]
    assert sorted(made) == ["a", "b"]
    assert decisions[0] == TrialScheduler.CONTINUE  # b's first trial is the best b has seen
    assert decisions[-1] == TrialScheduler.STOP  # b's worst is stopped against b's own rung


def test_the_next_trial_to_start_is_the_first_pending_as_fifo_chooses_among_trials_not_ended() -> None:
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import FIFOScheduler

    scheduler = SweepScheduler(lambda _m: FIFOScheduler())
    trials = [_trial(f"t{i}", "a") for i in range(6)]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    statuses = [Trial.TERMINATED, Trial.RUNNING, Trial.ERROR, Trial.PAUSED, Trial.PENDING, Trial.PENDING]
    for trial, status in zip(trials, statuses, strict=True):
        trial.status = status
    tune = SimpleNamespace(get_trials=lambda: trials)
    assert scheduler.choose_trial_to_run(tune) is trials[4] is FIFOScheduler().choose_trial_to_run(tune)
    assert [t.trial_id for t in scheduler.unfinished] == ["t1", "t3", "t4", "t5"]  # the ended are let go
    trials[4].status = trials[5].status = Trial.RUNNING
    assert scheduler.choose_trial_to_run(tune) is trials[3]  # then the first paused one, as FIFO
    trials[3].status = Trial.TERMINATED
    assert scheduler.choose_trial_to_run(tune) is None


def test_confirmation_runs_are_never_stopped_early() -> None:
    scheduler = SweepScheduler(lambda _m: ASHAScheduler(time_attr="step", metric="m", mode="max", max_t=4))
    runs = [_trial(f"c{i}", "a", role="confirm") for i in range(4)]
    for trial in runs:
        scheduler.on_trial_add(None, trial)
    decisions = [scheduler.on_trial_result(None, t, {"step": 1, "m": -i}) for i, t in enumerate(runs)]
    assert decisions == [TrialScheduler.CONTINUE] * 4 and scheduler.schedulers == {}


def test_max_concurrent_trials_bounds_the_trials_in_flight_of_all_methods_together() -> None:
    """Tune bounds only its pending trials when the searcher says it limits itself: the searcher must."""
    runs = [_run(name, 5, 0)[0] for name in "abc"]
    sweep = SweepSearch(runs)
    assert sweep.set_max_concurrency(2)  # this searcher limits itself: Tune adds no ConcurrencyLimiter
    assert [sweep.suggest(f"t{i}") is not None for i in range(3)] == [True, True, False]
    sweep.on_trial_complete("t0")
    assert sweep.suggest("t3")["who"] == "c/search"  # type: ignore[index]
    assert sweep.in_flight() == 2


def test_under_contention_every_method_gets_its_turn_and_none_runs_ahead() -> None:
    """20 methods, 8 slots, trials of very different lengths (the shortest 1/20 of the longest): each freed
    slot goes to a method with the fewest trials in flight and, among those, the fewest launched, so a
    method with short trials does not take the sweep's slots from one with long trials."""
    import random

    rng = random.Random(0)
    budget, slots, names = 10, 8, [f"m{i:02d}" for i in range(20)]
    length = {name: 1 + 19 * i / (len(names) - 1) for i, name in enumerate(names)}  # m00 shortest
    runs = {name: _run(name, budget, 0)[0] for name in names}
    sweep = SweepSearch(list(runs.values()))
    sweep.set_max_concurrency(slots)
    clock, ends, count, peak = 0.0, [], 0, 0  # ends: (when, trial id)
    while True:
        while (config := sweep.suggest(f"t{count}")) not in (None, Searcher.FINISHED):
            assert isinstance(config, dict)
            method = runs[config["who"].split("/")[0]]
            active = [m for m in runs.values() if m.phase == "search" and not m.searcher_finished]
            # the chosen method had the fewest in flight, then the fewest launched, before this launch
            before = (len(method.running) - 1, method.launched - 1)
            assert all(before <= (len(m.running), m.launched) for m in active if m is not method)
            ends.append((clock + length[method.name] * rng.uniform(0.9, 1.1), f"t{count}"))
            count += 1
        peak = max(peak, sweep.in_flight())
        if config == Searcher.FINISHED:
            break
        ends.sort()
        clock, trial_id = ends.pop(0)
        sweep.on_trial_complete(trial_id)
        launched = [m.launched for m in runs.values() if not m.searcher_finished]
        assert not launched or max(launched) - min(launched) <= 1  # round robin, whatever the lengths
    assert peak == slots and count == budget * len(names)
    assert all(m.phase == "done" and m.launched == budget for m in runs.values())


class _Errors:
    """A Tune callback that counts the errors it is told of."""

    def __init__(self) -> None:
        self.told: list[str] = []

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.told.append(trial.trial_id)


def test_a_trial_tune_failed_without_telling_the_searcher_frees_its_slot_and_is_recorded_failed() -> None:
    """Tune fails a trial whose reused actor could not be reset without calling the searcher or the
    callbacks; at the slot limit the sweep would wait for ever. UntoldEnds tells both, once."""
    (a, made), (b, _) = _run("a", 3, 0), _run("b", 3, 0)
    sweep = SweepSearch([a, b])
    sweep.set_max_concurrency(2)
    assert sweep.suggest("t0") is not None and sweep.suggest("t1") is not None
    assert sweep.suggest("t2") is None  # both slots counted in flight
    recorder = _Errors()
    watch = UntoldEnds(sweep, [recorder])
    trials = [
        SimpleNamespace(trial_id="t0", status="ERROR"),
        SimpleNamespace(trial_id="t1", status="RUNNING"),
    ]
    watch.on_step_begin(iteration=1, trials=trials)
    watch.on_step_begin(iteration=2, trials=trials)  # told once only
    assert recorder.told == ["t0"] and made["search"].completed == ["t0"]
    assert not sweep.counts_in_flight("t0") and sweep.counts_in_flight("t1")
    assert sweep.suggest("t2") is not None  # the slot is free again


def test_trials_tune_ended_as_usual_are_not_told_twice() -> None:
    a, made = _run("a", 2, 0)
    sweep = SweepSearch([a])
    sweep.suggest("t0")
    sweep.on_trial_complete("t0", result={"m": 1})  # what Tune does for a finished or stopped trial
    recorder = _Errors()
    UntoldEnds(sweep, [recorder]).on_step_begin(
        iteration=1, trials=[SimpleNamespace(trial_id="t0", status="TERMINATED")]
    )
    assert recorder.told == [] and made["search"].completed == ["t0"]


def test_an_ended_trials_metric_summaries_are_dropped_and_its_last_result_kept() -> None:
    from ray.tune.experiment import Trial

    trial = Trial("replay", stub=True)
    for step in (1, 2, 3):
        result = {"eval_loss": 3.0 - step, "exact_match": 0.1 * step, "training_iteration": step}
        trial.update_last_result(result)
    assert set(trial.metric_analysis) >= {"eval_loss", "exact_match"} and trial.metric_n_steps
    before = json.loads(trial.get_json_state()[1])  # Tune's state file holds them too
    ForgetSummaries().on_trial_complete(iteration=3, trials=[trial], trial=trial)
    assert trial.metric_analysis == {} and trial.metric_n_steps == {}
    after = json.loads(trial.get_json_state()[1])
    assert before["metric_analysis"] and after["metric_analysis"] == {} and after["metric_n_steps"] == {}
    assert trial.last_result["eval_loss"] == 0.0  # what the tracker and the searcher read stays
