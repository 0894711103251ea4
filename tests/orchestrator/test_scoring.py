"""The one scoring rule: configuration evidence, a method's score, the best method, the Welch verdict."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from scipy import stats

from peftsweep.orchestrator.scoring import (
    RunRecord,
    best_method,
    config_scores,
    method_score,
    representative,
    seeds_to_settle,
    top_configs,
    verdicts,
    welch,
)


def run(method: str, lr: float, seed: int, value: float | None, status: str = "completed", **kw) -> RunRecord:
    role = "search" if seed == 0 else "confirm"
    return RunRecord(method, lr, kw.pop("rank", 8), seed, value, status, kw.pop("role", role), **kw)


def test_a_lucky_single_trial_does_not_beat_a_better_mean() -> None:
    runs = [
        run("lora", 1.5e-2, 0, 0.79),  # the search's best single trial, never confirmed
        run("lora", 8e-3, 0, 0.61),
        run("lora", 8e-3, 1, 0.67),
        run("lora", 8e-3, 2, 0.69),
    ]
    score = method_score(runs, "max")
    assert score is not None and (score.lr, score.n) == (8e-3, 3)
    assert score.mean == pytest.approx(statistics.fmean([0.61, 0.67, 0.69]))


def test_the_better_mean_wins_across_methods_not_the_luckiest_trial() -> None:
    runs = [run("pissa", 4e-3, s, v) for s, v in enumerate([0.90, 0.10, 0.20])]  # lucky first seed
    runs += [run("lora", 8e-3, s, v) for s, v in enumerate([0.60, 0.62, 0.65])]
    scores = {m: method_score(runs, "max", m) for m in ("pissa", "lora")}
    assert best_method(scores, "max") == "lora"


def test_diverged_configurations_are_never_a_methods_best() -> None:
    runs = [
        run("dora", 1.5e-2, 0, 0.95),
        run("dora", 1.5e-2, 1, 0.0, status="diverged"),  # the same config blew up on another seed
        run("dora", 8e-3, 0, 0.50),
        run("dora", 8e-3, 1, 0.55),
        run("dora", 3e-2, 0, 0.0, status="diverged"),
    ]
    score = method_score(runs, "max")
    assert score is not None and score.lr == 8e-3
    assert {c.lr for c in config_scores(runs)} == {8e-3}
    only_diverged = [run("dora", 3e-2, 0, 0.0, status="diverged")]
    assert method_score(only_diverged, "max") is None


def test_stopped_and_failed_runs_never_score() -> None:
    runs = [
        run("lora", 3e-2, 0, 0.9, status="pruned"),
        run("lora", 2e-2, 0, 0.9, status="stopped_early"),
        run("lora", 1e-2, 0, 0.9, status="failed"),
        run("lora", 5e-3, 0, 0.3),
    ]
    score = method_score(runs, "max")
    assert score is not None and score.lr == 5e-3
    assert [c.lr for c in top_configs(runs, 3, "max")] == [5e-3]


def test_one_seed_is_one_piece_of_evidence_and_lrs_match_through_float_noise() -> None:
    runs = [run("lora", 1e-3, 0, 0.5), run("lora", 0.0010000000000000002, 0, 0.5), run("lora", 1e-3, 1, 0.7)]
    (config,) = config_scores(runs)
    assert config.n == 2 and config.values == (0.5, 0.7)


def test_top_configs_rank_search_runs_only() -> None:
    runs = [run("m", 1e-3, 0, 0.2), run("m", 2e-3, 0, 0.4), run("m", 3e-3, 0, 0.3), run("m", 1e-3, 1, 0.9)]
    assert [c.lr for c in top_configs(runs, 2, "max")] == [2e-3, 3e-3]
    assert [c.lr for c in top_configs(runs, 2, "min")] == [1e-3, 3e-3]


def test_the_representative_is_the_best_seed_with_an_adapter_of_the_best_config() -> None:
    runs = [
        run("m", 8e-3, 0, 0.70, has_adapter=False, run_id="a"),
        run("m", 8e-3, 1, 0.60, has_adapter=True, run_id="b"),
        run("m", 8e-3, 2, 0.50, has_adapter=True, run_id="c"),
        run("m", 2e-2, 0, 0.90, has_adapter=True, run_id="d"),  # fewer seeds: not the method's best
    ]
    rep = representative(runs, "max")
    assert rep is not None and rep.run_id == "b"


def test_welch_matches_scipy() -> None:
    a, b = [0.615, 0.67, 0.695], [0.475, 0.535, 0.65]
    t, df, p = welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    assert df > 2
    assert math.isnan(welch([0.5], [0.1, 0.2])[2])  # one seed measures no spread
    assert welch([0.5, 0.5], [0.1, 0.1])[2] == 0.0 and welch([0.5, 0.5], [0.5, 0.5])[2] == 1.0


def scores_of(values: dict[str, list[float]]) -> dict:
    runs = [run(m, 1e-2, s, v) for m, vs in values.items() for s, v in enumerate(vs)]
    return {m: method_score(runs, "max", m) for m in values}


def test_separated_methods_are_worse_and_a_leader_beating_all_is_best() -> None:
    out = verdicts(scores_of({"lora": [0.80, 0.82, 0.81], "pissa": [0.20, 0.22, 0.19]}), "max")
    assert out["lora"].verdict == "best" and out["pissa"].verdict == "worse"
    assert out["pissa"].p_value is not None and out["pissa"].p_value < 0.05
    assert out["pissa"].gap == pytest.approx(0.81 - statistics.fmean([0.20, 0.22, 0.19]))


def test_seed_noise_gives_a_tie_with_the_seeds_that_would_settle_it() -> None:
    # the grid's own optima (bench/results/grid.jsonl): LoRA vs DoRA
    out = verdicts(scores_of({"lora": [0.615, 0.67, 0.695], "dora": [0.475, 0.535, 0.65]}), "max")
    assert out["lora"].verdict == "tie" and out["dora"].verdict == "tie"
    assert out["dora"].p_value == pytest.approx(0.162, abs=0.01)
    assert out["dora"].seeds_to_settle is not None and 5 <= out["dora"].seeds_to_settle <= 15
    assert out["lora"].seeds_to_settle == out["dora"].seeds_to_settle


def test_one_seed_each_is_a_tie_not_a_verdict() -> None:
    out = verdicts(scores_of({"lora": [0.9], "pissa": [0.1]}), "max")
    assert out["lora"].verdict == "tie" and out["pissa"].verdict == "tie"
    assert "one seed" in out["pissa"].reason and out["pissa"].seeds_to_settle is None


def test_direction_min_and_no_result() -> None:
    runs = [run("a", 1e-2, s, v) for s, v in enumerate([0.20, 0.21, 0.19])]
    runs += [run("b", 1e-2, s, v) for s, v in enumerate([0.90, 0.91, 0.92])]
    scores = {m: method_score(runs, "min", m) for m in ("a", "b")} | {"c": None}
    out = verdicts(scores, "min")
    assert (out["a"].verdict, out["b"].verdict, out["c"].verdict) == ("best", "worse", "no result")
    assert verdicts({"a": None}, "max")["a"].verdict == "no result"


def test_seeds_to_settle_has_the_stated_power() -> None:
    """Simulated: at the returned n, Welch at α 0.05 rejects a true gap about 80 % of the time."""
    gap, sd = 0.2, 0.2
    n = seeds_to_settle(gap, sd, sd)
    assert n is not None and 15 <= n <= 20  # normal approximation: 2 (1.96 + 0.84)² ≈ 15.7, t adds a little
    rng = random.Random(0)
    hits = 0
    for _ in range(2000):
        a = [rng.gauss(gap, sd) for _ in range(n)]
        b = [rng.gauss(0.0, sd) for _ in range(n)]
        hits += welch(a, b)[2] < 0.05
    assert 0.75 <= hits / 2000 <= 0.88
    assert seeds_to_settle(0.0, sd, sd) is None and seeds_to_settle(gap, 0.0, 0.0) is None
    assert seeds_to_settle(0.4, sd, sd) < n  # a bigger gap needs fewer seeds


def test_run_record_reads_tracker_and_report_trials() -> None:
    from peftsweep.orchestrator.report import Trial
    from peftsweep.orchestrator.scoring import run_record
    from peftsweep.orchestrator.tracking import TrialRecord

    tracked = TrialRecord(
        "lora", "t1", "r1", 8e-3, 8, status="stopped_early", seed=0, metrics={"exact_match": 0.2}
    )
    rec = run_record(tracked, "exact_match")
    assert (rec.status, rec.value, rec.role, rec.run_id, rec.has_adapter) == (
        "stopped_early",
        0.2,
        "search",
        "r1",
        False,
    )
    reported = Trial("r2", "lora", "confirm", "completed", 8e-3, 8, 2, 0.6, 10.0)
    rec = run_record(reported, "exact_match")
    assert (rec.status, rec.value, rec.role, rec.seed) == ("completed", 0.6, "confirm", 2)
