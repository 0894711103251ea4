"""One rule for what a sweep found: a method's score, the best method, the verdict, the trial to register.

Everything here works on plain `RunRecord`s (method, lr, rank, seed, role, status, metric value, adapter),
so the tracker (MLflow runs), the report, the registry and the CLI all call the same functions.

The rule, in four lines:

1. **A configuration's evidence** is its runs that trained to the end (status ``completed``), one per seed
   (the first; a re-run with the same seed repeats the same training, it is not more evidence).
   Runs stopped early (ASHA: ``stopped_early`` / ``pruned``) hold a partial-training metric and never score.
   A configuration that diverged on any seed is never a method's best: an adapter that sometimes explodes
   is not the best adapter, whatever its other seeds scored.
2. **A method's score** is the mean over seeds of its best configuration. Only configurations with the most
   seeds compete (the confirmation runs give the top configurations more seeds), so one lucky single trial
   cannot beat a configuration whose better mean stands on three seeds.
3. **The verdict** compares every method with the leader (the best mean) by Welch's two-sided t-test over
   their seeds at ``ALPHA``: ``worse`` where the leader is significantly better, ``tie`` where the seeds
   cannot separate them (then ``seeds_to_settle`` says how many seeds per method would, at ``POWER``, if the
   observed gap and spreads are the truth), ``best`` only for a leader that beats every other method.
   One seed measures no spread: such a comparison is a tie ("one seed").
4. **The trial that represents a method** (registered as ``best-<method>``) is the best seed run, with an
   adapter, of the method's best configuration.

Why Welch's test and not "the gap exceeds the two stds": the std rule ignores how many seeds stand behind a
mean and, with one seed each (std 0), calls any gap decisive. On the built-in task the seed noise at the top
of each method's curve is 0.16-0.25 exact match, so with 3 seeds the grid itself separates no method from
the best (bench/README.md, "search_sim"); the test says so, and how many seeds would settle it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

Direction = Literal["max", "min"]
T = TypeVar("T")  # a record of a trial with a ``trial_id`` (tracking's TrialRecord, the report's Trial)
VerdictKind = Literal["best", "tie", "worse", "no result"]

ALPHA = 0.05  # two-sided significance of the leader-vs-method Welch test (3 tests: the leader vs the others)
POWER = 0.8  # power at which `seeds_to_settle` would separate an observed gap
FULL = "completed"  # the one status whose metric is a trained-to-the-end result
DIVERGED = "diverged"


@dataclass(frozen=True)
class RunRecord:
    """One trial as scoring sees it. ``value`` is the search metric's last reported value (None: none)."""

    method: str
    lr: float
    rank: int  # 0: a rank-less method
    seed: int
    value: float | None
    status: str = FULL  # completed | stopped_early | pruned | diverged | failed | killed | running
    role: str = "search"  # search (Optuna's) | confirm (a top configuration re-run with another seed)
    has_adapter: bool = False
    run_id: str = ""
    trial_id: str = ""  # the tracker's key (a trial's run id is filled in once MLflow has created the run)


def run_record(trial: Any, metric: str) -> RunRecord:
    """A `RunRecord` from what the tracker or the report holds: a tracking ``TrialRecord`` (``status``,
    ``metrics``, ``has_adapter``) or a report ``Trial`` (``outcome``, ``value``), read by attribute."""
    metrics = getattr(trial, "metrics", None)
    value = metrics.get(metric) if isinstance(metrics, dict) else getattr(trial, "value", None)
    status = getattr(trial, "status", None) or getattr(trial, "outcome", None) or "running"
    seed = getattr(trial, "seed", None)
    return RunRecord(
        method=trial.method,
        lr=float(trial.lr),
        rank=int(trial.rank or 0),
        seed=int(seed) if seed is not None else 0,
        value=float(value) if value is not None else None,
        status=str(status),
        role=str(getattr(trial, "role", "search")),
        has_adapter=bool(getattr(trial, "has_adapter", False)),
        run_id=str(getattr(trial, "run_id", "")),
        trial_id=str(getattr(trial, "trial_id", "")),
    )


@dataclass(frozen=True)
class ConfigScore:
    """One configuration's evidence: its full-length runs (one per seed) and their mean ± sample std."""

    method: str
    lr: float
    rank: int
    runs: tuple[RunRecord, ...]

    @property
    def values(self) -> tuple[float, ...]:
        return tuple(float(r.value) for r in self.runs if r.value is not None)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """Sample std (n - 1: seeds are a sample); 0 with one seed, which means no spread was measured."""
        return statistics.stdev(self.values) if self.n > 1 else 0.0


def _sign(direction: Direction) -> int:
    return 1 if direction == "max" else -1


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def config_key(lr: float, rank: int) -> tuple[float, int]:
    """A configuration's identity: rank, and the LR to 12 significant digits (LRs round-trip through MLflow
    strings and Optuna storage)."""
    return float(f"{lr:.12g}"), int(rank)


def config_scores(runs: Iterable[RunRecord], method: str | None = None) -> list[ConfigScore]:
    """Every configuration with at least one full-length run, in first-seen order; configurations with a
    diverged run are left out (rule 1). ``method`` filters the runs first."""
    groups: dict[tuple[float, int], list[RunRecord]] = {}
    diverged: set[tuple[float, int]] = set()
    for run in runs:
        if method is not None and run.method != method:
            continue
        key = config_key(run.lr, run.rank)
        if run.status == DIVERGED:
            diverged.add(key)
        elif run.status == FULL and _finite(run.value):
            group = groups.setdefault(key, [])
            if all(r.seed != run.seed for r in group):  # a seed is one piece of evidence, however often run
                group.append(run)
    return [ConfigScore(rs[0].method, rs[0].lr, rank, tuple(rs)) for (_, rank), rs in groups.items()
            if config_key(rs[0].lr, rank) not in diverged]  # fmt: skip


def method_score(
    runs: Iterable[RunRecord], direction: Direction, method: str | None = None
) -> ConfigScore | None:
    """The method's score: its best configuration among those with the most seeds (rule 2); None if it has
    no full-length run."""
    configs = config_scores(runs, method)
    if not configs:
        return None
    most = max(c.n for c in configs)
    return max((c for c in configs if c.n == most), key=lambda c: _sign(direction) * c.mean)


def top_configs(
    runs: Iterable[RunRecord], k: int, direction: Direction, method: str | None = None
) -> list[ConfigScore]:
    """The k best configurations by their search runs alone (what confirmation seeds go to), best first."""
    search = [r for r in runs if r.role == "search"]
    ranked = sorted(config_scores(search, method), key=lambda c: -_sign(direction) * c.mean)
    return ranked[:k]


def representative(
    runs: Iterable[RunRecord], direction: Direction, method: str | None = None
) -> RunRecord | None:
    """The trial to register for a method (rule 4): the best seed run, with an adapter, of its best config."""
    score = method_score(runs, direction, method)
    candidates = [r for r in (score.runs if score else ()) if r.has_adapter]
    return max(candidates, key=lambda r: _sign(direction) * float(r.value or 0.0), default=None)


def representative_trial(trials: Sequence[T], metric: str, direction: Direction) -> T | None:
    """Which of ``trials`` (the tracker's records, or a snapshot of them) `representative` picks: the one
    rule, wherever a method's best trial is shown or registered."""
    chosen = representative([run_record(t, metric) for t in trials], direction)
    return next((t for t in trials if t.trial_id == chosen.trial_id), None) if chosen else None


def best_method(scores: Mapping[str, ConfigScore | None], direction: Direction) -> str | None:
    """The leader: the method with the best mean (ties: the first in ``scores``' order)."""
    scored = [(m, s) for m, s in scores.items() if s is not None]
    return max(scored, key=lambda ms: _sign(direction) * ms[1].mean, default=(None, None))[0]


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch's t-test of equal means: (t, degrees of freedom, two-sided p). NaN p with fewer than 2 values
    on either side. Zero spread on both sides: p 0 if the means differ, 1 if they do not."""
    from scipy import stats

    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return math.nan, math.nan, math.nan
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    va, vb = statistics.variance(a) / na, statistics.variance(b) / nb
    if va + vb == 0.0:
        same = math.isclose(ma, mb, rel_tol=1e-12, abs_tol=1e-12)
        return (0.0 if same else math.copysign(math.inf, ma - mb)), math.inf, (1.0 if same else 0.0)
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / ((va**2 / (na - 1) if va else 0.0) + (vb**2 / (nb - 1) if vb else 0.0))
    return t, df, float(2.0 * stats.t.sf(abs(t), df))


def seeds_to_settle(
    gap: float, std_a: float, std_b: float, alpha: float = ALPHA, power: float = POWER
) -> int | None:
    """Seeds per method (equal n) at which Welch's two-sided test at ``alpha`` separates a true ``gap`` with
    probability ``power``, if the spreads are ``std_a``/``std_b``. None: no spread measured, or no gap."""
    from scipy import stats

    var = std_a**2 + std_b**2
    if gap <= 0.0 or var == 0.0:
        return None
    n = 2
    while n < 10_000:
        df = (n - 1) * var**2 / (std_a**4 + std_b**4)
        t_alpha, t_power = stats.t.ppf(1 - alpha / 2, df), stats.t.ppf(power, df)
        if n >= (t_alpha + t_power) ** 2 * var / gap**2:
            return n
        n += 1
    return None


@dataclass(frozen=True)
class MethodVerdict:
    """A method's line of the verdict."""

    method: str
    verdict: VerdictKind
    score: ConfigScore | None
    gap: float | None  # how much worse than the leader's mean (metric units, ≥ 0); 0 for the leader
    p_value: float | None  # Welch two-sided against the leader; None for the leader or when untestable
    seeds_to_settle: int | None  # tie only: seeds per method that would separate it from the leader
    reason: str


def verdicts(
    scores: Mapping[str, ConfigScore | None],
    direction: Direction,
    alpha: float = ALPHA,
    power: float = POWER,
) -> dict[str, MethodVerdict]:
    """Every method's verdict against the leader (rule 3), in ``scores``' order."""
    leader = best_method(scores, direction)
    out: dict[str, MethodVerdict] = {}
    if leader is None:
        return {
            m: MethodVerdict(m, "no result", None, None, None, None, "no full-length run") for m in scores
        }
    top = scores[leader]
    assert top is not None
    for method, score in scores.items():
        if score is None:
            out[method] = MethodVerdict(method, "no result", None, None, None, None, "no full-length run")
            continue
        if method == leader:
            continue
        gap = _sign(direction) * (top.mean - score.mean)
        _, _, p = welch(top.values, score.values)
        if math.isnan(p):
            out[method] = MethodVerdict(
                method,
                "tie",
                score,
                gap,
                None,
                None,
                f"one seed (n {score.n} vs {top.n}): no spread measured",
            )
        elif p < alpha and gap > 0:
            out[method] = MethodVerdict(method, "worse", score, gap, p, None, f"Welch p {p:.3g} < {alpha:g}")
        else:
            need = seeds_to_settle(gap, top.std, score.std, alpha, power)
            why = f"Welch p {p:.3g} ≥ {alpha:g}" + (f"; ≈ {need} seeds each would settle it" if need else "")
            out[method] = MethodVerdict(method, "tie", score, gap, p, need, why)
    others = [v for v in out.values() if v.verdict != "no result"]
    ties = [v for v in others if v.verdict == "tie"]
    if not ties:
        kind: VerdictKind = "best"
        why = "beats every other method" if others else "the only method with a result"
        need = None
    else:
        kind = "tie"
        needs = [v.seeds_to_settle for v in ties]
        need = None if None in needs else max(n for n in needs if n is not None)
        why = "not separated from " + ", ".join(v.method for v in ties)
    out[leader] = MethodVerdict(leader, kind, top, 0.0, None, need, why)
    return {m: out[m] for m in scores}
