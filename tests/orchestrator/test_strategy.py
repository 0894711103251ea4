"""Search decisions: the bracketing sampler (an Optuna conformance-style test), confirmation races, and the
Ray Tune adapter that stores stopped trials as PRUNED (driven without starting Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from ray.tune.search import Searcher

from peftsweep.orchestrator.budget import BudgetedSearch
from peftsweep.orchestrator.scoring import RunRecord
from peftsweep.orchestrator.strategy import (
    ConfirmationSearch,
    LogBracketSampler,
    Point,
    Signal,
    StrategyOptunaSearch,
    confirmation_cost,
    confirmation_runs,
    find_bracket,
    next_lr,
    signal_attr,
    spread,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
LO, HI = 1e-4, 1e-1
PEAK = -2.3  # log10 of the synthetic optimum (5e-3)
SPACE = {"lr": FloatDistribution(LO, HI, log=True), "rank": CategoricalDistribution([4, 8])}


def landscape(lr: float, rank: int = 8) -> float:
    """Unimodal in log LR: rises over about a decade, peaks just below a cliff (the built-in task's shape)."""
    x = math.log10(lr)
    if x > PEAK + 0.35:  # the cliff: collapsed
        return 0.01
    return (0.8 if rank == 8 else 0.6) * math.exp(-(((x - PEAK) / 0.6) ** 2))


def run_study(sampler: LogBracketSampler, n: int = 12, in_flight: int = 1, storage=None) -> optuna.Study:
    """An ask/tell loop with ``in_flight`` trials pending at once; stops early when the sampler is done."""
    study = optuna.create_study(direction="maximize", sampler=sampler, storage=storage)
    pending: list[optuna.Trial] = []
    asked = 0
    while asked < n or pending:
        while asked < n and len(pending) < in_flight and not sampler.search_done(study):
            if pending and sampler.next_action(study) != "trial":
                break
            pending.append(study.ask(SPACE))
            asked += 1
        if not pending:
            break
        trial = pending.pop(0)
        study.tell(trial, landscape(trial.params["lr"], trial.params["rank"]))
    return study


def best_x(study: optuna.Study) -> float:
    return math.log10(study.best_trial.params["lr"])


def test_spread_is_even_in_log_space_centre_first() -> None:
    lrs = spread(4, LO, HI, 0.5)
    xs = sorted(math.log10(v) for v in lrs)
    assert xs == pytest.approx([-3.625, -2.875, -2.125, -1.375])
    assert [round(math.log10(v), 3) for v in lrs[:2]] == [-2.125, -2.875]  # the two middle cells first
    assert all(LO <= v <= HI for v in spread(5, LO, HI, 0.999))


def test_find_bracket_and_next_lr() -> None:
    pts = [Point(1e-3, 8, 0.2), Point(1e-2, 8, 0.6), Point(3e-2, 8, 0.0)]
    b = find_bracket(pts, LO, HI, resolution=0.3)
    assert b.best is pts[1] and (b.lower, b.upper) == (pts[0], pts[2])
    assert b.needs == ("lower", "upper") and not b.bracketed  # gaps 1.0 and 0.48 decades
    assert math.log10(next_lr(b, LO, HI, step=1.0)) == pytest.approx(-2.5)  # halves the wider gap
    pts.append(Point(10**-2.5, 8, None, running=True))  # that midpoint is in flight
    b = find_bracket(pts, LO, HI, resolution=0.3)
    assert b.pending == ("lower",) and math.log10(next_lr(b, LO, HI, 1.0)) == pytest.approx(-1.761, abs=1e-3)
    done = [Point(10**-2.2, 8, 0.1), Point(1e-2, 8, 0.6), Point(10**-1.8, 8, 0.3)]
    assert find_bracket(done, LO, HI, resolution=0.3).bracketed
    at_edge = [Point(HI, 8, 0.9), Point(10**-1.2, 8, 0.1)]
    assert find_bracket(at_edge, LO, HI, resolution=0.3).bracketed  # the range's edge closes that side


@pytest.mark.parametrize("in_flight", [1, 2])
def test_the_sampler_finds_and_brackets_the_peak(in_flight: int) -> None:
    sampler = LogBracketSampler(n_startup=3, resolution=0.3, seed=1)
    study = run_study(sampler, n=12, in_flight=in_flight)
    assert sampler.search_done(study)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) <= 9  # stops once bracketed: the budget is a cap
    assert abs(best_x(study) - PEAK) <= 0.3
    b = sampler.bracket(study)
    assert b.bracketed and b.lower is not None and b.upper is not None
    assert b.lower.score < b.best.score and b.upper.score < b.best.score
    assert {t.params["rank"] for t in trials} == {8}  # rank_policy largest, no rank check


@pytest.mark.parametrize("in_flight", [1, 2])
def test_on_a_grid_every_lr_is_a_distinct_grid_point_and_the_bracket_is_its_neighbours(
    in_flight: int,
) -> None:
    """The paper protocol's 12-point log grid: proposals snap to untried grid LRs, and "bracketed" means the
    best grid LR's two grid neighbours were tried and are worse."""
    sampler = LogBracketSampler(n_startup=3, resolution=0.3, seed=1, grid=12)
    grid = sampler.grid_lrs(LO, HI)
    study = run_study(sampler, n=12, in_flight=in_flight)
    lrs = [t.params["lr"] for t in study.trials]
    assert all(any(math.isclose(lr, g, rel_tol=1e-9) for g in grid) for lr in lrs)
    assert len(set(lrs)) == len(lrs)  # no grid LR twice: one rank (the largest), one trial per LR
    assert sampler.search_done(study)
    b = sampler.bracket(study)
    i = min(range(len(grid)), key=lambda k: abs(grid[k] - b.best.lr))
    assert math.isclose(b.lower.lr, grid[i - 1]) and math.isclose(b.upper.lr, grid[i + 1])
    best_grid = max(grid, key=landscape)
    assert math.isclose(b.best.lr, best_grid)  # the synthetic landscape's best grid LR


def test_pending_trials_hold_their_lr() -> None:
    sampler = LogBracketSampler(n_startup=2, resolution=0.3, seed=0)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for _ in range(2):
        t = study.ask(SPACE)
        study.tell(t, landscape(t.params["lr"]))
    a, b = study.ask(SPACE), study.ask(SPACE)  # two in flight: they must not be the same point
    assert abs(math.log10(a.params["lr"]) - math.log10(b.params["lr"])) > 0.05


def test_deterministic_under_a_seed_and_different_across_seeds() -> None:
    def lrs(seed: int) -> list[float]:
        study = run_study(LogBracketSampler(seed=seed), n=8, in_flight=2)
        return [t.params["lr"] for t in study.trials]

    assert lrs(3) == lrs(3)
    assert lrs(3) != lrs(4)


def test_works_with_rdb_storage(tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    sampler = LogBracketSampler(n_startup=3, seed=2)
    study = run_study(sampler, n=10, in_flight=2, storage=storage)
    assert abs(best_x(study) - PEAK) <= 0.3
    resumed = optuna.load_study(
        study_name=study.study_name, storage=storage, sampler=LogBracketSampler(seed=2)
    )
    assert resumed.sampler.search_done(resumed)  # the decision is the study's, so a resumed sweep agrees


def test_rank_check_tries_the_other_rank_at_the_best_lr() -> None:
    sampler = LogBracketSampler(n_startup=3, seed=0, check_ranks=True)
    study = run_study(sampler, n=12)
    best_lr = study.best_trial.params["lr"]
    ranks_at_best = {t.params["rank"] for t in study.trials if math.isclose(t.params["lr"], best_lr)}
    assert ranks_at_best == {4, 8} and study.best_trial.params["rank"] == 8
    cycled = run_study(LogBracketSampler(n_startup=4, seed=0, rank_policy="cycle"), n=4)
    assert [t.params["rank"] for t in cycled.trials] == [8, 4, 8, 4]


def test_tpe_and_qmc_hand_overs_run() -> None:
    for sampler in (
        LogBracketSampler(then="tpe", seed=0),
        LogBracketSampler(startup="qmc", then="tpe", seed=0),
    ):
        study = run_study(sampler, n=8, in_flight=2)
        assert len(study.trials) == 8 and all(LO <= t.params["lr"] <= HI for t in study.trials)
        assert not sampler.search_done(study)  # TPE has no notion of done: the trial budget ends it
    qmc_bracket = run_study(LogBracketSampler(startup="qmc", seed=0), n=12, in_flight=2)
    assert abs(best_x(qmc_bracket) - PEAK) <= 0.3


def test_a_signal_brackets_a_recorded_early_metric() -> None:
    """Bracketing on eval_loss at step 50 (lower is better), a stopped trial without it ranks last."""
    sampler = LogBracketSampler(n_startup=3, seed=0, signal=Signal("eval_loss", 50, "min"))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for _ in range(8):
        t = study.ask(SPACE)
        x = math.log10(t.params["lr"])
        if x < -3.5:  # stopped at step 25: no eval_loss@50, and pruned
            study.tell(t, state=TrialState.PRUNED)
            continue
        t.set_user_attr(signal_attr("eval_loss", 50), (x + 2.0) ** 2)  # minimum at 1e-2
        study.tell(t, 0.0)  # the final metric says nothing here
    assert abs(math.log10(sampler.bracket(study).best.lr) + 2.0) <= 0.3


def runs_of(values: dict[tuple[float, int], list[float | None]]) -> list[RunRecord]:
    out = []
    for (lr, seed0), vs in values.items():
        for i, v in enumerate(vs):
            status = "failed" if v is None else ("diverged" if v < 0 else "completed")
            role = "search" if seed0 + i == 0 else "confirm"
            out.append(RunRecord("m", lr, 8, seed0 + i, v, status, role))
    return out


def test_confirmation_races_the_top_configs_over_seeds() -> None:
    search = runs_of({(1e-2, 0): [0.8], (5e-3, 0): [0.6], (2e-3, 0): [0.3]})
    kw = {"top_k": 2, "extra_seeds": 2, "base_seed": 0, "direction": "max"}
    assert confirmation_runs(search, eta=2, **kw) == [(1e-2, 8, 1), (5e-3, 8, 1)]
    round1 = search + runs_of({(1e-2, 1): [0.1], (5e-3, 1): [0.6]})
    assert confirmation_runs(round1, eta=2, **kw) == [(5e-3, 8, 2)]  # the better 2-seed mean goes on
    assert sorted(confirmation_runs(round1, eta=1, **kw)) == [(5e-3, 8, 2), (1e-2, 8, 2)]
    done = round1 + runs_of({(5e-3, 2): [0.55]})
    assert confirmation_runs(done, eta=2, **kw) == []
    failed = search + runs_of({(1e-2, 1): [None], (5e-3, 1): [0.6]})  # a failure is not retried forever
    assert confirmation_runs(failed, eta=2, **kw) == [(5e-3, 8, 2)]
    diverged = search + runs_of({(1e-2, 1): [-1.0], (5e-3, 1): [0.2]})
    assert confirmation_runs(diverged, eta=2, **kw) == [(5e-3, 8, 2)]
    assert (
        confirmation_cost(2, 2) == 4
        and confirmation_cost(2, 2, eta=2) == 3
        and confirmation_cost(3, 2, 3) == 4
    )


# --- the Ray Tune adapter, driven without Ray ---


def adapter(sampler: optuna.samplers.BaseSampler | None = None, **kw) -> StrategyOptunaSearch:
    return StrategyOptunaSearch(
        SPACE,
        metric="exact_match",
        mode="max",
        sampler=sampler or optuna.samplers.RandomSampler(seed=0),
        storage=optuna.storages.InMemoryStorage(),
        max_t=150,
        record=("eval_loss",),
        **kw,
    )


def report(search: Searcher, tid: str, step: int, iteration: int, **metrics: float) -> dict:
    result = {"step": step, "training_iteration": iteration, "exact_match": 0.0, "eval_loss": 2.0} | metrics
    search.on_trial_result(tid, result)
    return result


def test_stopped_trials_are_pruned_finished_ones_complete() -> None:
    search = adapter()
    for tid in "abcd":
        assert isinstance(search.suggest(tid), dict)
    stopped = report(search, "a", 25, 1, exact_match=0.02, eval_loss=3.1)  # ASHA stops it at its rung
    search.on_trial_complete("a", stopped)
    for i, step in enumerate((25, 50, 75, 100, 125, 150), 1):
        full = report(search, "b", step, i, exact_match=0.5)
    search.on_trial_complete("b", full)
    diverged = report(search, "c", 50, 2, exact_match=0.0, eval_loss=math.inf, diverged=1.0)
    search.on_trial_complete("c", diverged)
    search.on_trial_complete("d", None, error=True)
    states = {t.number: t.state for t in search._ot_study.trials}
    assert states == {
        0: TrialState.PRUNED,
        1: TrialState.COMPLETE,
        2: TrialState.COMPLETE,
        3: TrialState.FAIL,
    }
    trials = search._ot_study.trials
    assert trials[0].value == 0.02 and trials[0].intermediate_values == {
        1: 0.02
    }  # as Optuna's PRUNED keeps it
    assert trials[1].value == 0.5
    assert trials[0].user_attrs == {signal_attr("eval_loss", 25): 3.1}
    assert search.pruned == {"a"}


def test_a_trials_reports_are_in_the_study_when_it_is_told() -> None:
    search = adapter()
    search.suggest("a")
    report(search, "a", 25, 1, exact_match=0.3, eval_loss=2.4)
    report(search, "a", 50, 2, exact_match=0.4, eval_loss=2.2)
    search.on_trial_complete("a", report(search, "a", 150, 3, exact_match=0.5))
    (told,) = search._ot_study.trials
    assert told.state == TrialState.COMPLETE and told.value == 0.5
    assert told.intermediate_values == {1: 0.3, 2: 0.4, 3: 0.5}
    assert told.user_attrs == {signal_attr("eval_loss", s): v for s, v in ((25, 2.4), (50, 2.2), (150, 2.0))}


def test_plain_optuna_search_would_have_told_complete() -> None:
    """Why the adapter exists: Ray's OptunaSearch tells a stopped trial COMPLETE with its rung value."""
    from ray.tune.search.optuna import OptunaSearch

    search = OptunaSearch(SPACE, metric="exact_match", mode="max", storage=optuna.storages.InMemoryStorage())
    search.suggest("a")
    search.on_trial_complete("a", report(search, "a", 25, 1, exact_match=0.02))
    assert search._ot_study.trials[0].state == TrialState.COMPLETE


def test_the_search_waits_then_finishes_once_bracketed() -> None:
    sampler = LogBracketSampler(n_startup=3, resolution=0.3, seed=1)
    build = lambda _trial_id, params, _index: params  # noqa: E731 — the sweep builds a TrialConfig here
    search = BudgetedSearch(adapter(sampler), build=build, max_trials=20, n_startup_trials=3)
    running: dict[str, dict] = {}
    n, finished = 0, False
    while not finished and n < 20:
        while len(running) < 2:
            config = search.suggest(f"t{n}")
            if config == Searcher.FINISHED:
                finished = True
            if not isinstance(config, dict):
                break
            running[f"t{n}"] = config
            n += 1
        if finished or not running:
            break
        tid, config = next(iter(running.items()))
        del running[tid]
        result = report(search, tid, 150, 1, exact_match=landscape(config["lr"], config["rank"]))
        search.on_trial_complete(tid, result)
    assert finished and not running and n <= 9
    study = search.searcher._ot_study
    assert abs(math.log10(study.best_trial.params["lr"]) - PEAK) <= 0.3


def test_a_budgeted_suggestion_reads_the_study_once_outside_optunas_ask(monkeypatch) -> None:
    """Each read of an RDB study is SQL round trips on Tune's thread: the budget's counts and the
    sampler's decision share one (Optuna's own per-ask cache serves the sampler inside ``ask``)."""
    build = lambda _trial_id, params, _index: params  # noqa: E731
    search = BudgetedSearch(
        adapter(LogBracketSampler(n_startup=3, seed=1)), build=build, max_trials=20, n_startup_trials=3
    )
    for i in range(3):
        config = search.suggest(f"s{i}")
        result = report(search, f"s{i}", 150, 1, exact_match=landscape(config["lr"]))
        search.on_trial_complete(f"s{i}", result)
    study = search.searcher._ot_study
    reads: list[bool] = []  # per read of the store: inside Optuna's ask?
    in_ask = [False]
    ask, get_all_trials = study.ask, study._storage.get_all_trials

    def asking(*args: object, **kwargs: object) -> object:
        in_ask[0] = True
        try:
            return ask(*args, **kwargs)
        finally:
            in_ask[0] = False

    def read(*args: object, **kwargs: object) -> object:
        reads.append(in_ask[0])
        return get_all_trials(*args, **kwargs)

    monkeypatch.setattr(study, "ask", asking)
    monkeypatch.setattr(study._storage, "get_all_trials", read)
    assert isinstance(search.suggest("t"), dict)
    assert reads.count(False) == 1 and reads.count(True) >= 1


def test_the_stopping_report_reaches_only_on_trial_complete_as_in_tune() -> None:
    """Tune's controller does not pass the result that made the scheduler stop a trial to on_trial_result;
    it hands it to on_trial_complete as the trial's last result. Its signal must still be recorded."""
    search = adapter()
    search.suggest("a")
    report(search, "a", 25, 1, eval_loss=2.5)
    stopping = {"step": 50, "training_iteration": 2, "exact_match": 0.01, "eval_loss": 1.7}
    search.on_trial_complete("a", stopping)
    (trial,) = search._ot_study.trials
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs == {signal_attr("eval_loss", 25): 2.5, signal_attr("eval_loss", 50): 1.7}
    assert trial.value == 0.0  # Optuna keeps the last intermediate value Tune reported (step 25's)


def test_the_confirmation_searcher_races_round_after_round_and_waits_for_the_records() -> None:
    """The confirm phase through Tune's searcher interface: round 1 (top-2 × seed 1), then the better one
    × seed 2; a completed run not yet recorded (Tune's callbacks lag) is never launched twice."""
    records = runs_of({(1e-2, 0): [0.8], (5e-3, 0): [0.6], (2e-3, 0): [0.3]})
    search = ConfirmationSearch(
        lambda: list(records),
        lambda trial_id, point, index: point | {"trial_id": trial_id, "index": index},
        top_k=2,
        extra_seeds=2,
        base_seed=0,
        direction="max",
        eta=2,
    )
    a, b = search.suggest("a"), search.suggest("b")
    assert {(a["lr"], a["seed"]), (b["lr"], b["seed"])} == {(1e-2, 1), (5e-3, 1)} and b["index"] == 1
    assert search.suggest("c") is None  # the round is in flight
    search.on_trial_complete("a")
    search.on_trial_complete("b")
    assert search.suggest("c") is None  # done, but not recorded yet: wait, do not re-launch
    records.extend(runs_of({(1e-2, 1): [0.1], (5e-3, 1): [0.6]}))
    c = search.suggest("c")
    assert (c["lr"], c["rank"], c["seed"]) == (5e-3, 8, 2)
    search.on_trial_complete("c")
    records.extend(runs_of({(5e-3, 2): [0.55]}))
    assert search.suggest("d") == Searcher.FINISHED
