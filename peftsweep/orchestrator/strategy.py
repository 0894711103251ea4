"""Search decisions of a method's study: where the next trial goes, when the method's search is done, which
configurations get confirmation seeds, and how Ray Tune's OptunaSearch records a stopped trial.

The landscape these decisions are built for (DESIGN.md, "Search"; ``bench/results/grid_summary.json``): per
method the final metric is unimodal in log LR, rises over about a decade, peaks just below a cliff and
collapses within a factor 2-4 above the peak; rank matters far less than LR; seed noise at the peak is as
large as the gap between neighbouring LRs. So:

- **Start-up points spread evenly in log LR** (a lattice with a seeded random offset, centre first), not
  random draws that can leave a decade unexplored (`spread`).
- **Bracketing**: after the start-up, each new trial halves the wider log-LR gap between the best trial and
  its nearest tried neighbour, until the best has worse tried neighbours on both sides within
  ``resolution`` decades (`find_bracket`, `next_lr`). The method's search then stops (`search_done`), so the
  trial budget is a cap, not a quota.
- **What "best" means while searching** is the study's own value (the task metric at the end of the trial);
  optionally an early signal recorded at a rung, e.g. ``eval_loss`` at step 50 (``signal``), which a
  stopped trial also has (measured no better on the built-in task: bench/README.md, "search_sim").
- **Confirmation seeds go to the top configurations**, raced like successive halving over seeds
  (`confirmation_runs`): every candidate gets the next seed, only the better 1/eta go on to the one after.
- **A trial the scheduler stopped early is PRUNED in Optuna, not COMPLETE** (`StrategyOptunaSearch`): its
  metric at step 25 is not a result, and TPE must not read it as one.

`LogBracketSampler` is an ordinary Optuna ``BaseSampler``: it works with ``study.ask()`` + fixed
distributions (what Ray Tune's ``OptunaSearch`` calls), with RDB storage, and with several trials in flight
(a running trial holds its LR, so the next proposal goes elsewhere). Its decisions depend only on the study's
trials and the seed, so a resumed study continues where it stopped.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.samplers import BaseSampler, QMCSampler, RandomSampler, TPESampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from peftsweep.orchestrator.scoring import Direction, RunRecord, config_key, config_scores, top_configs

LR, RANK = "lr", "rank"  # the search space's parameter names (sweep._search_method)
Side = Literal["lower", "upper"]
Action = Literal["trial", "wait", "done"]


def signal_attr(name: str, step: int) -> str:
    """The Optuna user attribute under which `StrategyOptunaSearch` keeps metric ``name`` at ``step``."""
    return f"{name}@{step}"


# --- start-up points ---


def spread(n: int, lo: float, hi: float, offset: float) -> list[float]:
    """``n`` LRs evenly spaced in log space over [lo, hi], one per 1/n of the log range at the same relative
    place ``offset`` in [0, 1) (0.5: cell centres), in the order to try them: centre outwards (the first
    trials at a rung always pass ASHA, so the likeliest LRs go first; two in flight straddle the centre)."""
    xs = [(k + offset) / n for k in range(n)]
    order = sorted(range(n), key=lambda k: (round(abs(xs[k] - 0.5), 12), -xs[k]))
    return [lo * (hi / lo) ** xs[k] for k in order]


# --- bracketing, on plain points ---


@dataclass(frozen=True)
class Point:
    """A tried configuration: ``score`` is higher-is-better (None: still running, or nothing to compare)."""

    lr: float
    rank: Any
    score: float | None
    running: bool = False

    @property
    def x(self) -> float:
        return math.log10(self.lr)


@dataclass(frozen=True)
class Bracket:
    """The best point and its nearest tried neighbours in log LR (any rank: LR decides, rank far less)."""

    best: Point | None
    lower: Point | None
    upper: Point | None
    needs: tuple[Side, ...]  # sides where a trial is still wanted (gap > resolution, or none tried yet)
    pending: tuple[Side, ...]  # sides whose nearest neighbour is still running

    @property
    def bracketed(self) -> bool:
        """The best has finished, worse neighbours within the resolution on both sides (or the range edge)."""
        return self.best is not None and not self.needs and not self.pending


def find_bracket(points: Sequence[Point], lo: float, hi: float, resolution: float) -> Bracket:
    """Where the best point stands: its neighbours below and above in log LR and which sides still want a
    trial. Points within resolution/4 of the best's LR are the same LR (a rank check, a re-run), not
    neighbours. A side within ``resolution`` decades of the range's edge needs no neighbour."""
    scored = [p for p in points if not p.running and p.score is not None and math.isfinite(p.score)]
    if not scored:
        return Bracket(None, None, None, ("lower", "upper"), ())
    best = max(scored, key=lambda p: p.score)  # first of equals: the earliest trial
    near = resolution / 4
    below = [p for p in points if p.x < best.x - near]
    above = [p for p in points if p.x > best.x + near]
    lower = max(below, key=lambda p: p.x, default=None)
    upper = min(above, key=lambda p: p.x, default=None)
    needs: list[Side] = []
    pending: list[Side] = []
    for side, neighbour, edge in (("lower", lower, math.log10(lo)), ("upper", upper, math.log10(hi))):
        gap = abs(best.x - (neighbour.x if neighbour else edge))
        if neighbour is not None and neighbour.running and gap <= resolution:
            pending.append(side)
        elif gap > resolution:
            (pending if neighbour is not None and neighbour.running else needs).append(side)
    return Bracket(best, lower, upper, tuple(needs), tuple(pending))


def next_lr(bracket: Bracket, lo: float, hi: float, step: float) -> float | None:
    """The LR that narrows the bracket most: the log midpoint of the wider gap between the best and its
    neighbour (no neighbour yet: ``step`` decades out from the best, within the range). Sides whose
    neighbour is running are left to it. None: nothing to narrow (bracketed, or waiting for running ones)."""
    if bracket.best is None:
        return None
    xb = bracket.best.x
    options: list[tuple[float, float, float]] = []  # (gap, neighbour's score, x to try)
    for side in (s for s in bracket.needs if s not in bracket.pending):
        neighbour = bracket.lower if side == "lower" else bracket.upper
        sign = -1.0 if side == "lower" else 1.0
        if neighbour is None:
            edge = math.log10(lo if side == "lower" else hi)
            x = xb + sign * min(step, abs(edge - xb))
            gap, score = abs(edge - xb), -math.inf
        else:
            x = (xb + neighbour.x) / 2
            gap = abs(neighbour.x - xb)
            score = neighbour.score if neighbour.score is not None else -math.inf
        options.append((gap, score, x))
    if not options:
        return None
    _, _, x = max(options)  # the wider gap; equal gaps: towards the better neighbour
    return float(min(max(10.0**x, lo), hi))


# --- the sampler ---


@dataclass(frozen=True)
class Trials:
    """A study's trials as read once for one decision, with the study's direction.

    Why: each read of an RDB-backed study is SQL round trips (`_CachedStorage` re-reads the unfinished
    trials every time), and a suggestion used to read it ~10 times: 53 ms a suggestion on Tune's event loop
    at 20 methods (bench/scale.py). Inside ``ask`` the sampler reads Optuna's own per-ask cache (what its
    samplers read; ``ask`` and ``tell`` reset it), outside it the caller reads once and passes the read on.
    """

    all: tuple[FrozenTrial, ...]
    maximize: bool

    @classmethod
    def read(cls, study: Study, *, in_ask: bool = False) -> Trials:
        if in_ask:
            trials = study._get_trials(deepcopy=False, use_cache=True)
        else:
            trials = study.get_trials(deepcopy=False)
        return cls(tuple(trials), study.direction == StudyDirection.MAXIMIZE)

    def of(self, *states: TrialState) -> list[FrozenTrial]:
        return [t for t in self.all if t.state in states]

    def asking(self, trial: FrozenTrial) -> Trials:
        """With the trial being asked as it is now (Optuna's cache holds it as it was at ``ask``: without the
        parameters suggested since)."""
        others = tuple(t for t in self.all if t.number != trial.number)
        return Trials((*others, trial), self.maximize)


def _trials(study: Study | Trials) -> Trials:
    return study if isinstance(study, Trials) else Trials.read(study)


@dataclass(frozen=True)
class Signal:
    """What 'best' means while searching: a metric recorded at a step (user attribute ``name@step``)."""

    name: str
    step: int
    direction: Direction


class LogBracketSampler(BaseSampler):
    """Spread start-up points in log LR, then bracket the best LR (or hand over to TPE).

    The defaults are the ones `bench/search_sim.py` measured best on the built-in task's grid (3 start-up
    points, 0.3 decades, largest rank only); see bench/README.md, "search_sim".

    Args:
        n_startup: start-up trials (trial numbers 0..n_startup-1); 3 spread a decade apart over the
            quickstart's 3-decade range.
        resolution: decades of log LR within which both neighbours of the best must lie for the search to
            be done. 0.3 ≈ the grid's step (0.27): two halvings after a 1-decade start-up.
        startup: ``lattice`` (evenly spaced, seeded offset), ``qmc`` (Optuna's scrambled Sobol QMCSampler)
            or ``random``.
        then: after the start-up, ``bracket`` or ``tpe`` (Optuna's TPE, constant liar).
        rank_policy: start-up and bracketing rank: ``largest`` (a rank-r LoRA update contains every
            smaller one; rank matters far less than LR) or ``cycle`` (start-up ranks alternate, largest
            first; bracketing keeps the best's rank).
        check_ranks: once bracketed, try every other rank at the best LR before the search is done (off by
            default: on the built-in task rank 8 is never worse than rank 4 at a method's peak, and the
            check costs ~8 % more trial-steps for no gain; turn it on when a smaller adapter matters).
        signal: rank trials by this recorded early metric instead of the study's value (trials stopped
            before its step rank below every trial that reached it). None: the study's value.
        seed: the start-up offset and every random fallback.
        grid: None, or how many LRs log-spaced over the study's range (both ends included) the search may
            try (the paper protocol's grid: 12 over three decades). Every proposal is snapped to an untried
            grid point, and the resolution is at least one grid step, so "bracketed" means the best grid LR
            has both grid neighbours tried and worse.
        lr_param, rank_param: parameter names; other parameters are sampled at random.
    """

    def __init__(
        self,
        *,
        n_startup: int = 3,
        resolution: float = 0.3,
        startup: Literal["lattice", "qmc", "random"] = "lattice",
        then: Literal["bracket", "tpe"] = "bracket",
        rank_policy: Literal["largest", "cycle"] = "largest",
        check_ranks: bool = False,
        signal: Signal | None = None,
        seed: int | None = None,
        grid: int | None = None,
        lr_param: str = LR,
        rank_param: str = RANK,
    ) -> None:
        if n_startup < 1:
            raise ValueError("n_startup must be ≥ 1")
        if resolution <= 0:
            raise ValueError("resolution must be > 0 decades")
        if grid is not None and grid < 2:
            raise ValueError("grid must have ≥ 2 points (both ends of the range)")
        self.n_startup, self.resolution, self.grid = n_startup, resolution, grid
        self.startup, self.then = startup, then
        self.rank_policy, self.check_ranks, self.signal = rank_policy, check_ranks, signal
        self.lr_param, self.rank_param = lr_param, rank_param
        self._seed = seed
        self._offset = float(np.random.default_rng(seed).uniform())
        self._random = RandomSampler(seed=seed)
        self._qmc: BaseSampler | None = None
        if startup == "qmc":
            with warnings.catch_warnings():  # QMCSampler is "experimental" since Optuna 3.0
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._qmc = QMCSampler(
                    qmc_type="sobol", scramble=True, seed=seed or 0, warn_independent_sampling=False
                )
        self._tpe = TPESampler(n_startup_trials=0, constant_liar=True, seed=seed) if then == "tpe" else None

    def reseed_rng(self) -> None:
        self._random.reseed_rng()
        if self._tpe is not None:
            self._tpe.reseed_rng()

    # Which sampler decides a trial: the start-up design, QMC, random, TPE or the bracket.
    def _delegate(self, trial: FrozenTrial) -> BaseSampler | None:
        if trial.number < self.n_startup:
            return {"qmc": self._qmc, "random": self._random}.get(self.startup)
        return self._tpe

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        delegate = self._delegate(trial)
        if delegate is not None:
            return delegate.infer_relative_search_space(study, trial)
        return optuna.search_space.intersection_search_space(
            Trials.read(study, in_ask=True).of(TrialState.COMPLETE, TrialState.PRUNED), include_pruned=True
        )

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        delegate = self._delegate(trial)
        if delegate is not None:
            return delegate.sample_relative(study, trial, search_space)
        return self._decide(study, trial, search_space)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        delegate = self._delegate(trial)
        if delegate is not None:
            return delegate.sample_independent(study, trial, param_name, param_distribution)
        return self._decide(study, trial, {param_name: param_distribution})[param_name]

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        if self._tpe is not None:
            self._tpe.before_trial(study, trial)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        if self._tpe is not None:
            self._tpe.after_trial(study, trial, state, values)

    # --- the decision itself: a function of the study's other trials, the trial number and the seed ---

    def _decide(self, study: Study, trial: FrozenTrial, space: dict[str, BaseDistribution]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        lr_dist, rank_dist = space.get(self.lr_param), space.get(self.rank_param)
        if isinstance(lr_dist, FloatDistribution) or isinstance(rank_dist, CategoricalDistribution):
            trials = Trials.read(study, in_ask=True).asking(trial)
            lr, rank = self._propose(trials, trial.number, lr_dist, rank_dist)
            if lr_dist is not None:
                out[self.lr_param] = lr
            if rank_dist is not None:
                out[self.rank_param] = rank
        for name, dist in space.items():
            if name not in out:
                out[name] = self._random.sample_independent(study, trial, name, dist)
        return out

    def _known(self, trials: Trials, name: str) -> BaseDistribution | None:
        """Parameter ``name``'s distribution as the study's trials know it (None before the first ask)."""
        return next((t.distributions[name] for t in trials.all if name in t.distributions), None)

    def _lr_range(self, trials: Trials, lr_dist: BaseDistribution | None) -> tuple[float, float]:
        lr_dist = lr_dist or self._known(trials, self.lr_param)  # None: the rank alone is being sampled
        if not isinstance(lr_dist, FloatDistribution) or not lr_dist.log:
            raise ValueError(f"LogBracketSampler needs a log-scale float '{self.lr_param}'")
        return lr_dist.low, lr_dist.high

    def _ranks(self, trials: Trials, rank_dist: BaseDistribution | None) -> list[Any]:
        """The rank choices, largest first ([None] when the space has no rank)."""
        rank_dist = rank_dist or self._known(trials, self.rank_param)
        if not isinstance(rank_dist, CategoricalDistribution):
            return [None]
        return sorted(rank_dist.choices, key=lambda c: (c is None, c), reverse=True)

    def points(self, study: Study | Trials, exclude: int | None = None) -> list[Point]:
        """The study's tried configurations as bracketing points (running ones hold their LR)."""
        trials = _trials(study)
        sign = 1.0 if trials.maximize else -1.0
        out = []
        for t in trials.of(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
            if t.number == exclude or self.lr_param not in t.params:
                continue
            rank = t.params.get(self.rank_param)
            if t.state == TrialState.RUNNING:
                out.append(Point(t.params[self.lr_param], rank, None, running=True))
            else:
                out.append(Point(t.params[self.lr_param], rank, self._score(t, sign)))
        return out

    def _score(self, t: FrozenTrial, sign: float) -> float:
        """Higher is better. Study value: pruned trials rank below every complete one. Signal: trials
        without it (stopped before its step) rank below every trial with it."""
        if self.signal is not None:
            value = t.user_attrs.get(signal_attr(self.signal.name, self.signal.step))
            if value is None or not math.isfinite(value):
                return -1e300
            return value if self.signal.direction == "max" else -value
        if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value):
            return sign * t.value
        return -1e300

    def bracket(self, study: Study | Trials, exclude: int | None = None) -> Bracket:
        """The study's current bracket (see `find_bracket`)."""
        trials = _trials(study)
        lo, hi = self._lr_range(trials, None)
        return find_bracket(self.points(trials, exclude), lo, hi, self._resolution(lo, hi))

    def _resolution(self, lo: float, hi: float) -> float:
        """Decades within which a neighbour closes a side: the resolution, at least one grid step."""
        if self.grid is None:
            return self.resolution
        return max(self.resolution, 1.01 * math.log10(hi / lo) / (self.grid - 1))

    def grid_lrs(self, lo: float, hi: float) -> list[float]:
        """The LRs a gridded search may try, ascending (empty without a grid)."""
        if self.grid is None:
            return []
        return [lo * (hi / lo) ** (k / (self.grid - 1)) for k in range(self.grid)]

    def _snap(self, lr: float, pts: Sequence[Point], lo: float, hi: float, best: Point | None) -> float:
        """``lr`` on the grid: the nearest grid LR not yet tried (on ``lr``'s side of the best, if any)."""
        grid = self.grid_lrs(lo, hi)
        if not grid:
            return lr
        near = self._resolution(lo, hi) / 4
        tried = [p.x for p in pts]
        free = [g for g in grid if all(abs(math.log10(g) - x) > near for x in tried)]
        if best is not None:
            side = math.copysign(1.0, math.log10(lr) - best.x)
            free = [g for g in free if (math.log10(g) - best.x) * side > 0]
        return min(free or grid, key=lambda g: abs(math.log10(g) - math.log10(lr)))

    def _untried_rank(self, pts: Sequence[Point], best: Point, ranks: Sequence[Any]) -> Any | None:
        near = self.resolution / 4
        tried = {p.rank for p in pts if abs(p.x - best.x) <= near}
        return next((r for r in ranks if r not in tried), None)

    def _plan(
        self,
        trials: Trials,
        number: int,
        lr_dist: BaseDistribution | None,
        rank_dist: BaseDistribution | None,
    ) -> tuple[Action, float | None, Any]:
        """What trial ``number`` should be, from the study's other trials: ("trial", lr, rank), or "wait"
        (the next useful point depends on running trials), or "done" (`search_done`)."""
        lo, hi = self._lr_range(trials, lr_dist)
        ranks = self._ranks(trials, rank_dist)
        if number < self.n_startup:
            if self.startup != "lattice":
                return "trial", None, None  # delegated (qmc/random)
            lr = spread(self.n_startup, lo, hi, self._offset)[number]
            lr = self._snap(lr, self.points(trials, exclude=number), lo, hi, None)
            return "trial", lr, ranks[0] if self.rank_policy == "largest" else ranks[number % len(ranks)]
        if self.then == "tpe":
            return "trial", None, None
        pts = self.points(trials, exclude=number)
        b = find_bracket(pts, lo, hi, self._resolution(lo, hi))
        if b.best is None:
            return ("wait" if any(p.running for p in pts) else "trial"), None, ranks[0]
        rank = b.best.rank if b.best.rank is not None else ranks[0]
        lr = next_lr(b, lo, hi, math.log10(hi / lo) / self.n_startup)
        if lr is not None:
            return "trial", self._snap(lr, pts, lo, hi, b.best), rank
        if b.pending:
            return "wait", None, rank
        other = self._untried_rank(pts, b.best, ranks) if self.check_ranks else None
        if other is not None:
            return "trial", b.best.lr, other
        return "done", None, rank

    def next_action(self, study: Study | Trials) -> Action:
        """What the next ask would do: "trial" (a useful new point), "wait" (for running trials: the next
        useful point depends on them) or "done" (bracketed; running trials may still reopen it). Ray
        Tune's adapter (`StrategyOptunaSearch`) asks only on "trial"."""
        trials = _trials(study)
        number = len(trials.all)
        if number < self.n_startup or self.then != "bracket":
            return "trial"
        action, _, _ = self._plan(trials, number, None, None)
        return action

    def _propose(
        self,
        trials: Trials,
        number: int,
        lr_dist: BaseDistribution | None,
        rank_dist: BaseDistribution | None,
    ) -> tuple[float, Any]:
        action, lr, rank = self._plan(trials, number, lr_dist, rank_dist)
        if action == "trial" and lr is not None:
            return lr, rank
        # Asked although there is nothing to narrow (a plain Optuna loop does not wait): a random LR inside
        # the bracket, at the best's rank.
        lo, hi = self._lr_range(trials, lr_dist)
        rng = np.random.default_rng(None if self._seed is None else [self._seed, number])
        pts = self.points(trials, exclude=number)
        b = find_bracket(pts, lo, hi, self._resolution(lo, hi))
        xs = [p.x for p in (b.lower, b.best, b.upper) if p is not None] or [math.log10(lo), math.log10(hi)]
        if rank is None:
            rank = self._ranks(trials, rank_dist)[0]
        return self._snap(float(10 ** rng.uniform(min(xs), max(xs))), pts, lo, hi, None), rank

    def search_done(self, study: Study | Trials) -> bool:
        """The method's search has answered: the best is bracketed within the resolution by finished trials
        and (check_ranks) every rank was tried at the best LR. Running trials are not waited for here: the
        caller waits for them before ending the search (one may become the new best)."""
        trials = _trials(study)
        finished = trials.of(TrialState.COMPLETE, TrialState.PRUNED)
        if self.then != "bracket" or len(finished) < self.n_startup:
            return False
        lo, hi = self._lr_range(trials, None)
        pts = [p for p in self.points(trials) if not p.running]
        b = find_bracket(pts, lo, hi, self._resolution(lo, hi))
        if not b.bracketed:
            return False
        assert b.best is not None
        return not (
            self.check_ranks and self._untried_rank(pts, b.best, self._ranks(trials, None)) is not None
        )


# --- confirmation seeds ---

UNFINISHED = ("running", "killed")  # a confirmation run in these states is (re-)run


def confirmation_runs(
    runs: Iterable[RunRecord],
    *,
    top_k: int,
    extra_seeds: int,
    base_seed: int,
    direction: Direction,
    eta: float = 1.0,
    method: str | None = None,
) -> list[tuple[float, int, int]]:
    """The next (lr, rank, seed) confirmation runs of a method, given every run so far; [] when done.

    The top ``top_k`` configurations of the search (`scoring.top_configs`) race over seeds base_seed + 1,
    + 2, ... + extra_seeds: every configuration still in the race gets the next seed, then only the best
    ceil(n / eta) by mean over their seeds go on. eta 1: every candidate gets every seed (the plain top-k ×
    seeds grid). A run that ended without a result (failed) is not retried, and its configuration leaves
    the race, as does one that diverged; a killed run (a dead driver) is asked for again. Call again after
    each returned batch: the plan is a function of the recorded runs, so a resumed sweep picks it up.
    """
    runs = [r for r in runs if method is None or r.method == method]
    candidates = top_configs(runs, top_k, direction)
    alive = [config_key(c.lr, c.rank) for c in candidates]
    lrs = {config_key(c.lr, c.rank): c.lr for c in candidates}
    sign = 1 if direction == "max" else -1
    for i in range(1, extra_seeds + 1):
        seed = base_seed + i
        done = {config_key(r.lr, r.rank) for r in runs if r.seed == seed and r.status not in UNFINISHED}
        missing = [k for k in alive if k not in done]
        if missing:
            return [(lrs[k], k[1], seed) for k in missing]
        if i == extra_seeds:
            break
        seeds = {base_seed + j for j in range(i + 1)}
        scores = {config_key(c.lr, c.rank): c for c in config_scores(r for r in runs if r.seed in seeds)}
        whole = [k for k in alive if k in scores and scores[k].n == i + 1]  # a result on every seed so far
        ranked = sorted(whole, key=lambda k: -sign * scores[k].mean)
        alive = ranked[: math.ceil(len(alive) / eta)]
    return []


class ConfirmationSearch(Searcher):
    """A method's confirm phase as a Tune searcher: hands out `confirmation_runs`' next batch, round after
    round, as points ``{"lr", "rank", "seed"}`` passed through ``build(trial_id, point, index)`` (the sweep's
    `TrialPlan.config` with ``role="confirm"``), and says FINISHED when the race is over.

    ``records()`` returns the method's runs as recorded so far (the tracker's, through `scoring.run_record`).
    Tune tells a searcher of a completion before its callbacks record it, so a finished run may still look
    missing for a moment: a point is handed out once per searcher, and the search waits (None) until the
    records catch up instead of launching it twice.
    """

    def __init__(
        self,
        records: Callable[[], list[RunRecord]],
        build: Callable[[str, dict, int], dict],
        *,
        top_k: int,
        extra_seeds: int,
        base_seed: int,
        direction: Direction,
        eta: float = 1.0,
    ) -> None:
        super().__init__()
        self.records, self.build = records, build
        self.plan = {
            "top_k": top_k,
            "extra_seeds": extra_seeds,
            "base_seed": base_seed,
            "direction": direction,
        }
        self.plan["eta"] = eta
        self.launched: set[tuple[float, int, int]] = set()
        self.running: set[str] = set()

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict | str | None:
        batch = confirmation_runs(self.records(), **self.plan)  # type: ignore[arg-type]
        todo = [
            (lr, rank, seed) for lr, rank, seed in batch if (*config_key(lr, rank), seed) not in self.launched
        ]
        if todo:
            lr, rank, seed = todo[0]
            self.launched.add((*config_key(lr, rank), seed))
            self.running.add(trial_id)
            return self.build(trial_id, {"lr": lr, "rank": rank, "seed": seed}, len(self.launched) - 1)
        return None if batch or self.running else Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.running.discard(trial_id)


def confirmation_cost(top_k: int, extra_seeds: int, eta: float = 1.0) -> int:
    """How many confirmation runs `confirmation_runs` asks for at most (all candidates finish)."""
    total, alive = 0, top_k
    for _ in range(extra_seeds):
        total += alive
        alive = math.ceil(alive / eta)
    return total


# --- the Ray Tune side ---


class StrategyOptunaSearch(OptunaSearch):
    """Ray Tune's OptunaSearch, with what the orchestrator's searches need on top:

    - a trial the scheduler stopped before ``max_t`` is told to Optuna as **PRUNED** (its last reported
      metric becomes its intermediate value), not COMPLETE: OptunaSearch itself tells COMPLETE with the
      metric of the last report whenever there is one (``on_trial_complete``). A trial that ended itself
      early with a verdict (``diverged``, ``oom``: the worst score) stays COMPLETE;
    - metrics named in ``record`` are kept per report as user attributes ``name@step`` (what a
      `LogBracketSampler` ``signal`` reads), including the report at which the scheduler stopped the trial
      (Tune hands that one to ``on_trial_complete`` only);
    - when the sampler says the method's search is done (``search_done``), ``suggest`` waits for running
      trials and then returns ``FINISHED``, so the trial budget is a cap;
    """

    def __init__(
        self,
        *args: Any,
        max_t: int,
        time_attr: str = "step",
        record: Sequence[str] = (),
        final_flags: Sequence[str] = ("diverged", "oom"),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_t, self.time_attr = max_t, time_attr
        self.record, self.final_flags = tuple(record), tuple(final_flags)
        self.pruned: set[str] = set()
        self._read: tuple[str, Trials] | None = None  # `read_trials`' read, for that trial id's `suggest`

    def read_trials(self, trial_id: str) -> Trials:
        """The study's trials, read once for the suggestion of ``trial_id`` (Tune asks with a new id each
        time): a wrapper deciding whether to ask (`budget.BudgetedSearch`) and this searcher's `suggest`
        share the read."""
        self._read = (trial_id, Trials.read(self._ot_study))
        return self._read[1]

    def suggest(self, trial_id: str) -> dict | str | None:
        read, self._read = self._read, None
        sampler = self._ot_study.sampler if self._ot_study is not None else None
        if trial_id not in self._ot_trials and hasattr(sampler, "next_action"):
            # one read for the whole decision
            trials = read[1] if read and read[0] == trial_id else Trials.read(self._ot_study)
            running = trials.of(TrialState.RUNNING)
            action = sampler.next_action(trials)
            if action == "done" and sampler.search_done(trials) and not running:
                return Searcher.FINISHED
            if action != "trial" and running:
                return None  # Tune asks again when a trial reports or ends
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:  # a report without the search metric is still a signal for `record`
            super().on_trial_result(trial_id, result)
        self._record(trial_id, result)

    def _record(self, trial_id: str, result: dict | None) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if (
            ot_trial is None
            or not result
            or self.time_attr not in result
            or trial_id in self._completed_trials
        ):
            return
        for name in self.record:
            value = result.get(name)
            if isinstance(value, int | float):
                ot_trial.set_user_attr(signal_attr(name, int(result[self.time_attr])), float(value))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # Tune does not pass the result that made the scheduler stop a trial to on_trial_result, only here
        # (as the trial's last result): record its signal before the trial is told.
        self._record(trial_id, result)
        if (
            not error
            and result
            and trial_id not in self._completed_trials
            and trial_id in self._ot_trials
            and float(result.get(self.time_attr, self.max_t)) < self.max_t
            and not any(result.get(flag) for flag in self.final_flags)
        ):
            try:
                self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
            except Exception as exc:  # noqa: BLE001 — as OptunaSearch does: a failed tell is not fatal
                optuna.logging.get_logger(__name__).warning(str(exc))
            self._completed_trials.add(trial_id)
            self.pruned.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)


def study_bracket(
    storage: Any, study_name: str, resolution: float, grid: int | None = None
) -> Bracket | None:
    """Where a method's study stands (its best LR and the tried neighbours around it), for the final table
    and the report; None when the study does not exist yet."""
    if study_name not in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        return None
    study = optuna.load_study(study_name=study_name, storage=storage)
    return LogBracketSampler(resolution=resolution, grid=grid).bracket(study)


def bracket_text(bracket: Bracket | None) -> str:
    """'yes', or which side of the best LR is still open ('no: upper side open')."""
    if bracket is None or bracket.best is None:
        return "-"
    if bracket.bracketed:
        return "yes"
    open_sides = sorted(set(bracket.needs) | set(bracket.pending))
    return f"no: {' and '.join(open_sides)} side open"
