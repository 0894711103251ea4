"""Which search strategy finds each method's optimum, and gives the grid's verdict, at 1/10 of its compute?

A fast replay of whole sweeps (search + confirmation seeds + verdict) against the ground-truth grid
(`bench/grid.py` → `results/grid.jsonl`: 4 methods × ranks 4, 8 × 12 LRs × seeds 0-2, learning curves every
25 steps). No Ray runtime and no training: the objects the orchestrator builds run in this process on a
simulated clock — the driver's `methods.SweepSearch` / `methods.SweepScheduler` (all methods share the
slots, as `sweep.run_methods` runs them), per method Ray Tune's `AsyncHyperBandScheduler` (ASHA) and Ray's
`OptunaSearch` (or this project's `strategy.StrategyOptunaSearch`) inside `budget.BudgetedSearch`, real
Optuna samplers on an in-memory study (ask/tell; PRUNED for stopped trials where the strategy says so), and
`strategy.ConfirmationSearch` (today: `budget.FixedSearch`) + `scoring` for the confirmation seeds, the
chosen configuration and the verdict. So what is measured here is the shipped code; only the trainable is
replaced by the table.

How a replay maps onto the table:

- **A trial** with (lr, rank, seed) reads the curve of the grid LR nearest to lr in log space (within half a
  grid step, a factor of 1.37), the same rank, and the grid seed the sweep's training seed maps to. It
  reports at every ``eval_every`` steps (and at the last step); ASHA may stop it at a report, and it then
  costs the steps it trained (trial-steps are the compute).
- **Seeds**: a sweep trains every search trial with ``training.seed`` and confirmation run i with seed + i.
  Replay r maps the sweep's seeds 0, 1, 2 onto the grid's seeds by permutation r mod 6 (each permutation
  equally often), so search trials and confirmation runs always see different grid seeds, and every grid
  seed is the search seed in a third of the replays. The grid has 3 seeds: at most 2 confirmation seeds.
- **Slots**: 2 trials in flight for the whole sweep, as in the quickstart (``pool="sweep"``; ``"method"``: one
  method after another, each with the slots). A slot that frees asks the sweep's searcher for the next
  trial (running trials are visible to the samplers); ``None`` (a method's searcher holding back start-up
  trials, waiting for a running neighbour, or a confirmation round in flight) leaves the slot idle until the
  next event. Reports at the same simulated step are processed in trial order; a report that makes ASHA
  stop a trial reaches the searcher only through ``on_trial_complete`` (Tune's controller does the same).
- **Truth**: a configuration's true score is its mean over the grid's 3 seeds; a method's optimum is the best
  of its 24. "Within 0.10" compares the chosen configuration's true score with the optimum. The grid's
  verdict is `scoring.verdicts` on each method's optimum with its 3 seeds.

Per strategy and method: P(chosen within 0.10 of the optimum), P(verdict = the grid's), regret median/mean,
trial-steps (search + confirmation) and their fraction of the grid's 10,800 per method.

    nice -n 19 .venv/bin/python bench/search_sim.py [--replays 200] [--strategies ...] [--markdown]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ scripts share grid.py's helpers

from grid import CURVE_KEYS, RESULTS, load_runs  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from peftsweep.orchestrator import scoring  # noqa: E402
from peftsweep.orchestrator.scoring import RunRecord  # noqa: E402

METRIC, RUNG_LOSS = "exact_match", "eval_loss"
STEP, EM, LOSS, DIVERGED = (CURVE_KEYS.index(k) for k in ("step", METRIC, RUNG_LOSS, "diverged"))
METHODS = ("lora", "pissa", "milora", "dora")
RANKS = (4, 8)
LR_RANGE = (1e-4, 1e-1)
MAX_STEPS = 150
WITHIN = 0.10  # the "within 0.10 exact match of the grid optimum"
GRID_COMPUTE = 24 * 3 * MAX_STEPS  # 24 configs × 3 seeds × 150 steps per method
PERMS = list(itertools.permutations(range(3)))


# --- the table ---


@dataclass
class Grid:
    curves: dict[tuple[str, int, float, int], list[list[float]]]
    lrs: list[float]
    truth: dict[str, dict[tuple[int, float], float]]  # method -> (rank, lr) -> 3-seed mean final metric
    optimum: dict[str, float]

    def nearest(self, lr: float) -> float:
        return min(self.lrs, key=lambda g: abs(math.log(g / lr)))

    def curve(self, method: str, rank: int, lr: float, seed: int) -> list[list[float]]:
        return self.curves[(method, int(rank), self.nearest(lr), seed)]


def load_grid(path: Path) -> Grid:
    runs = load_runs(path)
    curves = {(r["method"], int(r["rank"]), float(r["lr"]), int(r["seed"])): r["curve"] for r in runs}
    lrs = sorted({float(r["lr"]) for r in runs})
    truth: dict[str, dict[tuple[int, float], float]] = {}
    for m in METHODS:
        truth[m] = {
            (k, lr): statistics.fmean(curves[(m, k, lr, s)][-1][EM] for s in range(3))
            for k in RANKS
            for lr in lrs
        }
    return Grid(curves, lrs, truth, {m: max(t.values()) for m, t in truth.items()})


def grid_verdicts(grid: Grid, rule: str) -> dict[str, str]:
    """The grid's own verdict: each method's optimum with its 3 seeds, under ``rule`` (new | legacy)."""
    scores = {}
    for m in METHODS:
        rank, lr = max(grid.truth[m], key=lambda c: grid.truth[m][c])
        runs = tuple(RunRecord(m, lr, rank, s, grid.curves[(m, rank, lr, s)][-1][EM]) for s in range(3))
        scores[m] = scoring.ConfigScore(m, lr, rank, runs)
    if rule == "legacy":
        return legacy_verdicts({m: s.values for m, s in scores.items()})
    return {m: v.verdict for m, v in scoring.verdicts(scores, "max").items()}


# --- strategies ---


@dataclass(frozen=True)
class Strategy:
    name: str
    help: str
    sampler: str  # tpe | random | bracket | lattice_tpe | qmc_tpe
    trials: int = 8  # trials_per_method: a cap for the bracketing sampler (it stops when bracketed)
    n_startup: int = 3
    eval_every: int = 75
    rung_metric: str | None = METRIC  # None: no early stopping
    grace: int = 75
    reduction_factor: float = 2.0
    pruned: bool = False  # stopped trials told PRUNED (StrategyOptunaSearch) instead of COMPLETE
    top_k: int = 1
    extra_seeds: int = 1
    eta: float = 1.0
    scoring: str = "new"  # new (scoring.py) | legacy (today's tracker.method_score + report.is_tie)
    resolution: float = 0.3
    grid: int | None = None  # LogBracketSampler(grid=...): snap every LR to a log grid of this many points
    rank_policy: str = "largest"
    check_ranks: bool = True
    signal: tuple[str, int, str] | None = None  # (metric, step, direction): the bracket's early signal
    search_steps: int | None = None  # BudgetedSearch(trial_steps=...): no new search trial after this many
    concurrency: int = 2  # slots: the sweep's (pool "sweep") or the method's alone (pool "method")
    pool: str = (
        "sweep"  # sweep: all methods share the slots (methods.SweepSearch) | method: one after another
    )

    def with_(self, name: str, help: str, **changes: Any) -> Strategy:
        return Strategy(**(asdict(self) | {"name": name, "help": help} | changes))


TODAY = Strategy(
    "today",
    "quickstart: 3 random + 5 TPE, ASHA rung at 75 on exact match, stopped = COMPLETE, +1 seed on top-1, "
    "tracker/report rules",
    "tpe",
    scoring="legacy",
)
# eval_loss rungs from step 25 (reported every 25 steps), stopped trials PRUNED, scoring.py
EL = {"eval_every": 25, "rung_metric": RUNG_LOSS, "grace": 25, "pruned": True, "scoring": "new"}
C2X2 = {"top_k": 2, "extra_seeds": 2, "eta": 1.0}  # the default's confirmation: top-2 × 2 more seeds
DEFAULT = Strategy(
    "default",
    "3 spread start-up points on the 12-point LR grid, bracket the best grid LR (cap 8), largest rank; "
    "eval_loss rungs at 25/50/75/100 keeping the top 2/3 (ASHA rf 1.5), PRUNED; top-2 configs × 2 more seeds",
    "bracket",
    n_startup=3,
    grid=12,
    reduction_factor=1.5,
    check_ranks=False,
    **EL,
    **C2X2,
)
BASES = [
    TODAY,
    TODAY.with_("today+scoring", "today's search and seeds, scored by scoring.py", scoring="new"),
    TODAY.with_(
        "random",
        "8 random trials, no early stopping, +1 seed on top-1",
        sampler="random",
        rung_metric=None,
        scoring="new",
    ),
    TODAY.with_(
        "tpe", "3 random + 5 TPE, no early stopping, +1 seed on top-1", rung_metric=None, scoring="new"
    ),
    TODAY.with_("tpe+el", "3 random + 5 TPE, eval_loss rungs 25/50/100 (rf 2), PRUNED, +1 seed", **EL),
    TODAY.with_(
        "qmc+tpe", "3 Sobol (QMC) + 5 TPE, eval_loss rungs (rf 2), PRUNED, +1 seed", sampler="qmc_tpe", **EL
    ),
    TODAY.with_(
        "lattice+tpe",
        "3 spread + 5 TPE, eval_loss rungs (rf 2), PRUNED, +1 seed",
        sampler="lattice_tpe",
        **EL,
    ),
    DEFAULT,
]
# Variants: a base name followed by tags, e.g. "default rf2 c2x2h" (--strategies takes any combination).
TAGS: dict[str, tuple[dict[str, Any], str]] = {
    "em75": (
        {"eval_every": 75, "rung_metric": METRIC, "grace": 75, "reduction_factor": 2.0},
        "one rung at 75 on exact match (today's)",
    ),
    "em25": ({"rung_metric": METRIC}, "rungs on exact match"),
    "norung": ({"rung_metric": None}, "no early stopping"),
    "rf2": ({"reduction_factor": 2.0}, "rungs 25/50/100, top half goes on"),
    "rf1.5": ({"reduction_factor": 1.5}, "rungs 25/50/75/100, top 2/3 go on"),
    "rf3": ({"reduction_factor": 3.0}, "rungs 25/75, top third goes on"),
    "g50": ({"grace": 50}, "first rung at 50"),
    "complete": ({"pruned": False}, "stopped trials told COMPLETE"),
    "el50": ({"signal": (RUNG_LOSS, 50, "min")}, "bracket eval_loss at step 50"),
    "check": ({"check_ranks": True}, "then try the other rank at the best LR"),
    "cycle": ({"rank_policy": "cycle"}, "start-up ranks alternate"),
    "res0.2": ({"resolution": 0.2}, "resolution 0.2 decades"),
    "nogrid": ({"grid": None}, "continuous LRs (mapped to the nearest grid LR), no snapping"),
    "res0.4": ({"resolution": 0.4}, "resolution 0.4 decades"),
    "s4": ({"n_startup": 4}, "4 start-up points"),
    "s5": ({"n_startup": 5}, "5 start-up points"),
    "alone": ({"pool": "method"}, "methods one after another, each with the 2 slots"),
    "alone1": ({"pool": "method", "concurrency": 1}, "methods one after another, one trial in flight"),
    "conc4": ({"concurrency": 4}, "4 slots"),
    "cap6": ({"trials": 6}, "cap 6 trials"),
    "cap7": ({"trials": 7}, "cap 7 trials"),
    "cap12": ({"trials": 12}, "cap 12 trials"),
    "b400": ({"search_steps": 400}, "no new search trial after 400 trial-steps"),
    "b450": ({"search_steps": 450}, "no new search trial after 450 trial-steps"),
    "b500": ({"search_steps": 500}, "no new search trial after 500 trial-steps"),
    "b550": ({"search_steps": 550}, "no new search trial after 550 trial-steps"),
    "c0": ({"top_k": 1, "extra_seeds": 0}, "no confirmation"),
    "c1x1": ({"top_k": 1, "extra_seeds": 1, "eta": 1.0}, "confirm top-1 × 1 seed"),
    "c1x2": ({"top_k": 1, "extra_seeds": 2, "eta": 1.0}, "confirm top-1 × 2 seeds"),
    "c2x1": ({"top_k": 2, "extra_seeds": 1, "eta": 1.0}, "confirm top-2 × 1 seed"),
    "c2x2h": ({"top_k": 2, "extra_seeds": 2, "eta": 2.0}, "confirm top-2 × 1 seed, the better × 1 more"),
    "c2x2": (C2X2, "confirm top-2 × 2 seeds"),
    "c3x2h": ({"top_k": 3, "extra_seeds": 2, "eta": 3.0}, "confirm top-3 × 1 seed, the best × 1 more"),
    "c3x2": ({"top_k": 3, "extra_seeds": 2, "eta": 1.0}, "confirm top-3 × 2 seeds"),
}


def resolve(name: str) -> Strategy:
    """A base strategy, or a base followed by TAGS."""
    base, *tags = name.split()
    s = next((b for b in BASES if b.name == base), None)
    if s is None or any(t not in TAGS for t in tags):
        raise SystemExit(f"unknown strategy {name!r}: bases {[b.name for b in BASES]}, tags {list(TAGS)}")
    for t in tags:
        change, what = TAGS[t]
        s = s.with_(s.name, f"{s.help}; {what}", **change)
    return s.with_(name, s.help)


DEFAULT_SET = [
    "today",
    "today+scoring",
    "random",
    "tpe",
    "random c2x2",
    "tpe c2x2",
    "tpe+el",
    "tpe+el c2x2",
    "tpe+el complete c2x2",
    "qmc+tpe c2x2",
    "lattice+tpe c2x2",
    "default",
    *(
        f"default {t}"
        for t in (
            "norung",
            "em75",
            "em25",
            "rf2",
            "rf3",
            "g50",
            "complete",
            "el50",
            "check",
            "cycle",
            "s4",
            "res0.2",
            "res0.4",
            "cap7",
            "cap12",
        )
    ),
    *(f"default {c}" for c in ("c0", "c1x1", "c1x2", "c2x1", "c2x2h", "c3x2h", "c3x2")),
    "default alone",
    "default alone1",
    "default conc4",
    "today alone",
    "default b450",
    "default b550",
    "default g50 check",
    "default cap12 res0.2",
]


def make_sampler(s: Strategy, seed: int) -> Any:
    import optuna

    from peftsweep.orchestrator.strategy import LogBracketSampler, Signal

    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.n_startup, constant_liar=True)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup, then = {
        "bracket": ("lattice", "bracket"),
        "lattice_tpe": ("lattice", "tpe"),
        "qmc_tpe": ("qmc", "tpe"),
    }[s.sampler]
    return LogBracketSampler(
        n_startup=s.n_startup,
        resolution=s.resolution,
        startup=startup,  # type: ignore[arg-type]
        then=then,  # type: ignore[arg-type]
        rank_policy=s.rank_policy,  # type: ignore[arg-type]
        check_ranks=s.check_ranks,
        signal=Signal(*s.signal) if s.signal else None,  # type: ignore[arg-type]
        seed=seed,
        grid=s.grid,
    )


# --- one method's search on a simulated clock ---


@dataclass
class SimTrial:
    trial_id: str
    config: dict[str, Any]
    curve: list[list[float]]
    start: int
    next: int = 0  # index into reports
    reports: list[list[float]] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)


def make_searcher(s: Strategy, method: str, sampler_seed: int, build: Any) -> Any:
    """The method's search as the sweep builds it (`sweep.method_searcher`): BudgetedSearch around Ray's
    OptunaSearch (today) or `strategy.StrategyOptunaSearch`, one in-memory study per method."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from peftsweep.orchestrator.budget import BudgetedSearch
    from peftsweep.orchestrator.strategy import StrategyOptunaSearch

    space = {
        "lr": optuna.distributions.FloatDistribution(*LR_RANGE, log=True),
        "rank": optuna.distributions.CategoricalDistribution(list(RANKS)),
    }
    common = dict(
        metric=METRIC,
        mode="max",
        sampler=make_sampler(s, sampler_seed),
        study_name=method,
        storage=optuna.storages.InMemoryStorage(),
    )
    if s.sampler == "bracket" or s.pruned:
        record = (s.signal[0],) if s.signal else ()
        inner: Any = StrategyOptunaSearch(space, max_t=MAX_STEPS, record=record, **common)
        if not s.pruned:  # bracket without PRUNED: tell COMPLETE like OptunaSearch
            inner.max_t = -1
    else:
        inner = OptunaSearch(space, **common)
    return BudgetedSearch(
        inner,
        build=build,
        max_trials=s.trials,
        n_startup_trials=min(s.n_startup, s.trials),
        trial_steps=s.search_steps,
    )


def make_scheduler(s: Strategy) -> Any:
    """The method's early stopping (`sweep.method_scheduler`): ASHA on the strategy's rung metric, or FIFO."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    if not s.rung_metric:
        return FIFOScheduler()
    return AsyncHyperBandScheduler(
        time_attr="step",
        metric=s.rung_metric,
        mode="min" if s.rung_metric == RUNG_LOSS else "max",
        max_t=MAX_STEPS,
        grace_period=s.grace,
        reduction_factor=s.reduction_factor,
    )


class Clock:
    """Trials in flight on a simulated clock: each reports at its eval points, earliest first."""

    def __init__(self, eval_every: int) -> None:
        self.eval_every, self.now, self.running = eval_every, 0, []

    def start(self, trial_id: str, config: dict[str, Any], curve: list[list[float]]) -> SimTrial:
        reports = [p for p in curve if int(p[STEP]) % self.eval_every == 0 or int(p[STEP]) == MAX_STEPS]
        trial = SimTrial(trial_id, config, curve, self.now, reports=reports)
        self.running.append(trial)
        return trial

    def next_report(self) -> tuple[SimTrial, list[float], dict[str, Any], bool]:
        """The next report: (trial, curve point, Tune result, whether it is the trial's last)."""
        trial = min(self.running, key=lambda t: (t.start + int(t.reports[t.next][STEP]), t.trial_id))
        point = trial.reports[trial.next]
        trial.next += 1
        self.now = trial.start + int(point[STEP])
        result = {
            "step": int(point[STEP]),
            METRIC: point[EM],
            RUNG_LOSS: point[LOSS],
            "diverged": point[DIVERGED],
            "training_iteration": trial.next,
            "time_total_s": float(point[STEP]),
        }
        trial.last = result
        return trial, point, result, trial.next == len(trial.reports) or bool(point[DIVERGED])


def search(grid: Grid, s: Strategy, method: str, grid_seed: int, sampler_seed: int) -> tuple[list[dict], int]:
    """One method's search alone with ``s.concurrency`` trials in flight (``--pool method``): its trials in
    completion order (lr, rank, steps, value, status) and the makespan in steps."""
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import Searcher

    searcher = make_searcher(s, method, sampler_seed, lambda _trial_id, params, _index: params)
    scheduler = make_scheduler(s)
    clock = Clock(s.eval_every)
    done: list[dict] = []
    created, finished = 0, False
    while True:
        while not finished and len(clock.running) < s.concurrency:
            tid = f"t{created:03d}"
            config = searcher.suggest(tid)
            if config == Searcher.FINISHED:
                finished = True
                break
            if config is None:
                break
            trial = clock.start(tid, config, grid.curve(method, config["rank"], config["lr"], grid_seed))
            created += 1
            scheduler.on_trial_add(None, trial)
        if not clock.running:
            break
        trial, point, result, end = clock.next_report()
        decision = scheduler.on_trial_result(None, trial, result)
        if (
            decision != TrialScheduler.STOP
        ):  # as Tune's controller: a stopping result goes to on_trial_complete
            searcher.on_trial_result(trial.trial_id, result)
        if decision == TrialScheduler.STOP or end:
            scheduler.on_trial_complete(None, trial, result)
            searcher.on_trial_complete(trial.trial_id, result)
            clock.running.remove(trial)
            done.append(trial_row(trial, point, result))
    return done, clock.now


def trial_row(trial: SimTrial, point: list[float], result: dict[str, Any]) -> dict[str, Any]:
    full = result["step"] >= MAX_STEPS
    status = "diverged" if point[DIVERGED] else ("completed" if full else "stopped_early")
    cfg = trial.config
    return {
        "lr": float(cfg["lr"]),
        "rank": int(cfg["rank"]),
        "seed": int(cfg.get("seed", 0)),
        "steps": result["step"],
        "value": point[EM],
        "status": status,
    }


def is_tie(mean: float, std: float, best_mean: float, best_std: float) -> bool:
    """The tie rule before issue 18 (report.is_tie, removed from the package): within the two stds."""
    gap, limit = abs(mean - best_mean), best_std + std
    return gap <= limit or math.isclose(gap, limit) or math.isclose(mean, best_mean)


# --- today's scoring (tracker.method_score / top_configs, report._rows + is_tie), for the baseline ---


def legacy_top_configs(runs: list[RunRecord], k: int) -> list[tuple[float, int]]:
    search = sorted(
        (r for r in runs if r.role == "search" and r.status != "diverged"), key=lambda r: -r.value
    )
    return list(dict.fromkeys((r.lr, r.rank) for r in search))[:k]


def legacy_choice(runs: list[RunRecord]) -> tuple[float, int]:
    """tracker.method_score: confirmed configs compete on their means (stopped trials count), else best."""
    groups: dict[tuple[float, int], list[RunRecord]] = {}
    for r in runs:
        if r.status != "diverged":
            groups.setdefault((r.lr, r.rank), []).append(r)
    confirmed = {c: g for c, g in groups.items() if any(r.role == "confirm" for r in g)}
    pool = confirmed or groups
    return max(pool, key=lambda c: statistics.fmean(r.value for r in pool[c]))


def legacy_verdicts(seeds: dict[str, tuple[float, ...]]) -> dict[str, str]:
    """report._rows: the best mean is 'best'; others tie if the gap ≤ std sum (report.is_tie)."""
    from peftsweep.orchestrator.report import mean_std

    stats = {m: mean_std(v) for m, v in seeds.items() if v}
    winner = max(stats, key=lambda m: stats[m][0])
    return {
        m: "best" if m == winner else ("tie" if is_tie(*stats[m], *stats[winner]) else "worse") for m in stats
    }


def legacy_seeds(runs: list[RunRecord]) -> tuple[float, ...]:
    """report._seeds: the best search trial (stopped ones too) and its confirm runs."""
    best = max((r for r in runs if r.role == "search"), key=lambda r: r.value)
    confirms = [r.value for r in runs if r.role == "confirm" and (r.lr, r.rank) == (best.lr, best.rank)]
    return (best.value, *confirms)


# --- one replay: every method searched, confirmed and scored ---


def replay(grid: Grid, s: Strategy, rep: int) -> dict[str, Any]:
    """One sweep: every method searched, confirmed and scored (``s.pool``: the sweep's shared slots, or each
    method alone)."""
    perm = PERMS[rep % len(PERMS)]  # sweep seed i → grid seed perm[i]
    if s.pool == "sweep":
        records, rows, makespan = sweep_pool(grid, s, rep, perm)
        makespans = dict.fromkeys(METHODS, makespan)
    else:
        records, rows, makespans = method_by_method(grid, s, rep, perm)
    return conclude(grid, s, rep, perm, records, rows, makespans)


def sweep_pool(
    grid: Grid, s: Strategy, rep: int, perm: tuple[int, ...]
) -> tuple[dict[str, list[RunRecord]], dict[str, list[dict]], int]:
    """All methods in one pool of ``s.concurrency`` slots, as the sweep runs them: the driver's own
    `methods.SweepSearch` (each method's searcher, fewest trials in flight first; a method's confirmation
    starts when its search is over) and `methods.SweepScheduler` (each method's ASHA; confirmation runs never
    stopped). Records reach the confirmation searcher after the searchers hear of a completion, as Tune's
    callbacks do."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import Searcher

    from peftsweep.orchestrator.budget import FixedSearch
    from peftsweep.orchestrator.methods import MethodRun, SweepScheduler, SweepSearch
    from peftsweep.orchestrator.strategy import ConfirmationSearch
    from peftsweep.trainables.trial_config import TRIAL_KEY

    records: dict[str, list[RunRecord]] = {m: [] for m in METHODS}
    rows: dict[str, list[dict]] = {m: [] for m in METHODS}

    def build(method: str, role: str) -> Any:
        def config(trial_id: str, params: dict, index: int) -> dict:
            seed = int(params.get("seed", 0))
            trial = SimpleNamespace(method=method, role=role, seed=seed, trial_id=trial_id)
            return {TRIAL_KEY: trial, "method": method, "role": role, "seed": seed} | params

        return config

    def start_confirm(method: str) -> Any:
        if s.extra_seeds == 0:
            return None
        if s.scoring == "legacy":  # today: the top-k × seeds as one fixed list (sweep.confirm_searcher)
            points = [
                {"lr": lr, "rank": rank, "seed": i}
                for lr, rank in legacy_top_configs(records[method], s.top_k)
                for i in range(1, s.extra_seeds + 1)
            ]
            return FixedSearch(points, build(method, "confirm")) if points else None
        return ConfirmationSearch(
            lambda: records[method],
            build(method, "confirm"),
            top_k=s.top_k,
            extra_seeds=s.extra_seeds,
            base_seed=0,
            direction="max",
            eta=s.eta,
        )

    runs = [
        MethodRun(
            m,
            start_search=lambda m=m: make_searcher(s, m, rep, build(m, "search")),
            start_confirm=lambda m=m: start_confirm(m),
        )
        for m in METHODS
    ]
    search, scheduler, clock = (
        SweepSearch(runs),
        SweepScheduler(lambda _m: make_scheduler(s)),
        Clock(s.eval_every),
    )
    created, finished = 0, False
    while True:
        while not finished and len(clock.running) < s.concurrency:
            tid = f"t{created:04d}"
            config = search.suggest(tid)
            if config == Searcher.FINISHED:
                finished = True
            if not isinstance(config, dict):
                break
            grid_seed = perm[config["seed"]]
            trial = clock.start(
                tid, config, grid.curve(config["method"], config["rank"], config["lr"], grid_seed)
            )
            created += 1
            scheduler.on_trial_add(None, trial)
        if not clock.running:
            if not finished:
                raise RuntimeError(
                    f"replay {rep} {s.name}: nothing runs and the sweep search is not finished"
                )
            break
        trial, point, result, end = clock.next_report()
        decision = scheduler.on_trial_result(None, trial, result)
        if decision != TrialScheduler.STOP:
            search.on_trial_result(trial.trial_id, result)
        if decision == TrialScheduler.STOP or end:
            scheduler.on_trial_complete(None, trial, result)
            search.on_trial_complete(trial.trial_id, result)
            clock.running.remove(trial)
            method, role = trial.config["method"], trial.config["role"]
            row = trial_row(trial, point, result) | {"role": role}
            rows[method].append(row)
            records[method].append(record(grid, s, method, row))
    return records, rows, clock.now


def record(grid: Grid, s: Strategy, method: str, row: dict[str, Any]) -> RunRecord:
    """A finished trial as the tracker records it (stopped trials: ``pruned`` where the study says so)."""
    status = {"stopped_early": "pruned" if s.pruned else "stopped_early"}.get(row["status"], row["status"])
    role = row.get("role", "search")
    return RunRecord(method, grid.nearest(row["lr"]), row["rank"], row["seed"], row["value"], status, role)


def method_by_method(
    grid: Grid, s: Strategy, rep: int, perm: tuple[int, ...]
) -> tuple[dict[str, list[RunRecord]], dict[str, list[dict]], dict[str, int]]:
    """Each method alone with ``s.concurrency`` trials in flight, then its confirmation runs."""
    from peftsweep.orchestrator.strategy import confirmation_runs

    records: dict[str, list[RunRecord]] = {}
    rows: dict[str, list[dict]] = {}
    makespans: dict[str, int] = {}
    for method in METHODS:
        trials, makespan = search(grid, s, method, perm[0], sampler_seed=rep)
        runs = [record(grid, s, method, t) for t in trials]
        rows[method] = [t | {"role": "search"} for t in trials]
        legacy = (
            [
                [
                    (lr, rank, i)
                    for lr, rank in legacy_top_configs(runs, s.top_k)
                    for i in range(1, s.extra_seeds + 1)
                ]
            ]
            if s.scoring == "legacy"
            else None
        )
        while True:
            if legacy is not None:  # today: one batch, top-k × seeds
                batch = legacy.pop() if legacy else []
            else:
                batch = confirmation_runs(
                    runs, top_k=s.top_k, extra_seeds=s.extra_seeds, base_seed=0, direction="max", eta=s.eta
                )
            if not batch:
                break
            for lr, rank, seed in batch:
                point = grid.curve(method, rank, lr, perm[seed])[-1]
                row = {
                    "lr": lr,
                    "rank": rank,
                    "seed": seed,
                    "steps": int(point[STEP]),
                    "value": point[EM],
                    "status": "diverged" if point[DIVERGED] else "completed",
                    "role": "confirm",
                }
                rows[method].append(row)
                runs.append(record(grid, s, method, row))
            makespan += MAX_STEPS * math.ceil(len(batch) / s.concurrency)
        records[method], makespans[method] = runs, makespan
    return records, rows, makespans


def conclude(
    grid: Grid,
    s: Strategy,
    rep: int,
    perm: tuple[int, ...],
    records: dict[str, list[RunRecord]],
    rows: dict[str, list[dict]],
    makespans: dict[str, int],
) -> dict[str, Any]:
    """Each method's chosen configuration, regret and compute, and the verdict across methods."""
    out: dict[str, Any] = {"rep": rep, "perm": perm, "methods": {}}
    scores: dict[str, scoring.ConfigScore | None] = {}
    legacy_seed_values: dict[str, tuple[float, ...]] = {}
    for method in METHODS:
        runs = records[method]
        if s.scoring == "legacy":
            lr, rank = legacy_choice(runs)
            legacy_seed_values[method] = legacy_seeds(runs)
        else:
            score = scoring.method_score(runs, "max")
            scores[method] = score
            lr, rank = (score.lr, score.rank) if score else (grid.lrs[0], RANKS[0])
        true = grid.truth[method][(rank, grid.nearest(lr))]
        search_rows = [r for r in rows[method] if r["role"] == "search"]
        out["methods"][method] = {
            "chosen": [rank, grid.nearest(lr)],
            "regret": grid.optimum[method] - true,
            "search_steps": sum(r["steps"] for r in search_rows),
            "confirm_steps": sum(r["steps"] for r in rows[method] if r["role"] == "confirm"),
            "trials": len(search_rows),
            "full": sum(r["status"] == "completed" for r in search_rows),
            "makespan": makespans[method],
        }
    if s.scoring == "legacy":
        verdict = legacy_verdicts(legacy_seed_values)
    else:
        verdict = {m: v.verdict for m, v in scoring.verdicts(scores, "max").items()}
    for m in METHODS:
        out["methods"][m]["verdict"] = verdict.get(m, "no result")
    return out


# --- aggregate and print ---


def aggregate(grid: Grid, s: Strategy, reps: list[dict[str, Any]]) -> dict[str, Any]:
    truth_verdict = grid_verdicts(grid, s.scoring)
    per: dict[str, Any] = {}
    for m in METHODS:
        rows = [r["methods"][m] for r in reps]
        steps = [x["search_steps"] + x["confirm_steps"] for x in rows]
        regrets = [x["regret"] for x in rows]
        per[m] = {
            "p_within": sum(x <= WITHIN + 1e-9 for x in regrets) / len(rows),
            "p_verdict": sum(x["verdict"] == truth_verdict[m] for x in rows) / len(rows),
            "grid_verdict": truth_verdict[m],
            "verdicts": {
                v: sum(x["verdict"] == v for x in rows) for v in ("best", "tie", "worse", "no result")
            },
            "regret_median": statistics.median(regrets),
            "regret_mean": statistics.fmean(regrets),
            "steps_mean": statistics.fmean(steps),
            "steps_max": max(steps),
            "steps_p90": sorted(steps)[int(0.9 * (len(steps) - 1))],
            "p_within_budget": sum(x <= GRID_COMPUTE / 10 for x in steps) / len(rows),
            "search_steps_mean": statistics.fmean(x["search_steps"] for x in rows),
            "confirm_steps_mean": statistics.fmean(x["confirm_steps"] for x in rows),
            "trials_mean": statistics.fmean(x["trials"] for x in rows),
            "full_trials_mean": statistics.fmean(x["full"] for x in rows),
            "fraction_of_grid": statistics.fmean(steps) / GRID_COMPUTE,
            "p_within_by_search_seed": {
                g: sum(r["methods"][m]["regret"] <= WITHIN + 1e-9 for r in reps if r["perm"][0] == g)
                / max(1, sum(r["perm"][0] == g for r in reps))
                for g in range(3)
            },
            "makespan_mean": statistics.fmean(x["makespan"] for x in rows),
        }
    return {"strategy": asdict(s), "replays": len(reps), "methods": per}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replays", type=int, default=200)
    parser.add_argument("--strategies", nargs="+", default=None, help="names (default: all)")
    parser.add_argument("--grid", type=Path, default=RESULTS / "grid.jsonl")
    parser.add_argument("--out", type=Path, default=RESULTS / "search_sim.json")
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    parser.add_argument(
        "--compact", action="store_true", help="print the README's one-row-per-strategy table"
    )
    parser.add_argument("--summary-only", action="store_true", help="print the table from --out, run nothing")
    args = parser.parse_args()
    console = Console(width=220)

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    grid = load_grid(args.grid)
    previous = json.loads(args.out.read_text())["results"] if args.out.exists() else {}
    results: dict[str, Any] = dict(previous)
    if not args.summary_only:
        for name in args.strategies or DEFAULT_SET:
            strategy = resolve(name)
            t0 = time.perf_counter()
            reps = [replay(grid, strategy, rep) for rep in range(args.replays)]
            results[name] = aggregate(grid, strategy, reps)
            results[name]["seconds"] = round(time.perf_counter() - t0, 1)
            m = results[name]["methods"]
            console.print(
                f"{name:>24}: "
                + "  ".join(
                    f"{k} {m[k]['p_within']:.0%}/{m[k]['p_verdict']:.0%} {m[k]['fraction_of_grid']:.3f}"
                    for k in METHODS
                )
                + f"  ({results[name]['seconds']:.0f} s)"
            )
        args.out.write_text(
            json.dumps(
                {
                    "grid": args.grid.name,
                    "within": WITHIN,
                    "grid_compute_per_method": GRID_COMPUTE,
                    "optimum": grid.optimum,
                    "grid_verdict": {r: grid_verdicts(grid, r) for r in ("new", "legacy")},
                    "results": results,
                },
                indent=1,
            )
        )
    if args.compact:
        print(compact(results, [n for n in (args.strategies or DEFAULT_SET) if n in results]))
    else:
        report(results, console, args.markdown, only=args.strategies)


COLUMNS = (
    "strategy",
    "method",
    "P(within 0.10)",
    "P(verdict)",
    "regret med / mean",
    "trial-steps: mean (search + confirm)",
    "of grid",
    "P(≤ 1/10 grid)",
    "trials (full)",
)


def report(results: dict[str, Any], console: Console, markdown: bool, only: list[str] | None = None) -> None:
    table = Table(
        title=f"search_sim: chosen config within {WITHIN} of the grid optimum, verdict = grid's, compute"
    )
    for col in COLUMNS:
        table.add_column(col)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, res in results.items():
        if only and name not in only:
            continue
        for m, a in res["methods"].items():
            cells = [
                name,
                m,
                f"{a['p_within']:.0%}",
                f"{a['p_verdict']:.0%}",
                f"{a['regret_median']:.3f} / {a['regret_mean']:.3f}",
                f"{a['steps_mean']:.0f} ({a['search_steps_mean']:.0f} + {a['confirm_steps_mean']:.0f})",
                f"{a['fraction_of_grid']:.3f}",
                f"{a['p_within_budget']:.0%}",
                f"{a['trials_mean']:.1f} ({a['full_trials_mean']:.1f})",
            ]
            table.add_row(*cells)
            lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    if markdown:
        print("\n".join(lines))


def pct(x: float) -> str:
    """A share as a percentage, with the half-percent that 200 replays resolve (89.5 % is not 90 %)."""
    return f"{x:.0%}" if round(x * 200) % 2 == 0 else f"{x:.1%}"


def compact(results: dict[str, Any], names: list[str]) -> str:
    """The README's table: one row per strategy, per method P(within) · P(verdict) · mean regret · compute."""
    head = "| strategy | " + " | ".join(METHODS) + " | trial-steps (mean over methods) | ≤ 1/10 in |"
    lines = [head, "|" + "---|" * (len(METHODS) + 3)]
    for name in names:
        per = results[name]["methods"]
        cells = [
            f"{pct(a['p_within'])} · {pct(a['p_verdict'])} · {a['regret_mean']:.3f} · "
            f"{a['fraction_of_grid']:.3f}"
            for a in (per[m] for m in METHODS)
        ]
        steps = statistics.fmean(per[m]["steps_mean"] for m in METHODS)
        budget = statistics.fmean(per[m]["p_within_budget"] for m in METHODS)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {steps:,.0f} | {budget:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
