"""How much compute does each search strategy need to find a method's optimum? (a benchmark, not a test)

Replays search strategies against the ground-truth grid (`bench/grid.py` → `bench/results/grid.jsonl`)
through the real orchestrator: `peftsweep.orchestrator.sweep._search_method` builds the same Ray Tune Tuner,
OptunaSearch (TPE, sqlite storage), BudgetedSearch and ASHA scheduler as `peftsweep run`, but its trainable
reads the learning curve from the table instead of training (`replay_trial`). A sampled LR maps to the
nearest grid LR in log space (the grid is log-spaced, so that is the nearest point within half a grid step);
the rank is exact; every trial of one repetition uses that repetition's training seed (a real sweep trains
every search trial with `training.seed`), cycling through the grid's seeds over the repetitions.

Strategies (each repetition has its own sampler seed and a fresh sqlite Optuna storage):
  grid               all 12 LRs × ranks once (one seed), in random order (no search decisions: no Ray needed)
  random             TPE with n_startup_trials = the budget (Optuna's start-up phase is independent sampling)
  tpe                TPE, no early stopping
  tpe_asha           TPE + ASHA at the replay's eval points (the quickstart's default)
  tpe_asha_curvature + the curvature LR prior (priors.py; reference: that repetition's tpe_asha LoRA search)
  tpe_asha_transfer  + the transfer LR prior (earlier methods' bests enqueued)

Per strategy and method: trial-steps until a fully trained trial's config is truly (seed mean) within 1 % /
within seed noise of the grid optimum, the regret of the config the orchestrator would choose (best single
trial), and how often its LR is within one grid step of the optimum's. Resumable: one JSON line per
(repetition, strategy) in bench/results/search_efficiency_runs.jsonl.

    nice -n 19 .venv/bin/python bench/search_efficiency.py [--reps 20] [--trials 12] [--eval-every 75]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ scripts share grid.py's helpers

from grid import CURVE_KEYS, METRIC, RESULTS, grid_spec, load_runs, summarise  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from peftsweep.spec import SweepSpec  # noqa: E402

STRATEGIES = ["grid", "random", "tpe", "tpe_asha", "tpe_asha_curvature", "tpe_asha_transfer"]
PRIORS = {"tpe_asha_curvature": "curvature", "tpe_asha_transfer": "transfer"}
WITHIN = 0.01  # "within 1 %" of the grid optimum (relative)
GRID_SEEDS_BUDGET = 3  # the full grid runs every config with 3 seeds: its compute is the denominator
STEP, DIVERGED = CURVE_KEYS.index("step"), CURVE_KEYS.index("diverged")
VALUE = CURVE_KEYS.index(METRIC)


@dataclass(frozen=True)
class Truth:
    """The grid's answer for one method: seed-mean final metric per (rank, lr) and its optimum."""

    means: dict[tuple[int, float], float]
    best: tuple[int, float]
    noise: float

    @property
    def optimum(self) -> float:
        return self.means[self.best]


def nearest(lr: float, lrs: list[float]) -> float:
    """The grid LR nearest to ``lr`` in log space."""
    return min(lrs, key=lambda g: abs(math.log(g / lr)))


def replay_trial(
    config: dict[str, Any],
    *,
    curves: dict[str, list[list[float]]],
    lrs: list[float],
    method: str,
    seed: int,
    eval_every: int,
    max_steps: int,
) -> None:
    """A Tune trainable that reports a grid run's learning curve instead of training (ASHA may stop it)."""
    from ray import tune

    lr = nearest(float(config["lr"]), lrs)
    for point in curves[f"{method}/{int(config['rank'])}/{lr:g}/{seed}"]:
        step = int(point[STEP])
        if point[DIVERGED] or step % eval_every == 0 or step == max_steps:
            tune.report({"step": step, METRIC: point[VALUE], "diverged": point[DIVERGED], "lr_grid": lr})


def replay_spec(args: argparse.Namespace, strategy: str, sampler_seed: int, root: Path) -> SweepSpec:
    """The quickstart spec as the strategy's sweep would run it, writing under ``root``."""
    raw = grid_spec(args.eval_every, root).model_dump(mode="json")
    raw["methods"] = [m for m in raw["methods"] if m["name"] in args.methods]
    search = raw["search"]
    search |= {"trials_per_method": args.trials, "seed": sampler_seed, "confirm_seeds": 0}
    search["early_stopping"] = "asha" if strategy.startswith("tpe_asha") else "none"
    search["lr_prior"] = PRIORS.get(strategy, "none")
    if strategy == "random":
        search["n_startup_trials"] = args.trials
    return SweepSpec.model_validate(raw)


class _Bests:
    """The two tracker methods `sweep._prior` reads: each earlier method's chosen (lr, rank)."""

    def __init__(self, bests: dict[str, dict[str, Any]]) -> None:
        self.bests = bests

    def method_score(self, method: str) -> Any:
        from types import SimpleNamespace

        best = self.bests.get(method)
        return SimpleNamespace(lr=best["lr"], rank=best["rank"]) if best else None

    def note_method(self, *_args: Any) -> None:
        pass


def run_strategy(
    args: argparse.Namespace,
    strategy: str,
    rep: int,
    curves: dict[str, list[list[float]]],
    lrs: list[float],
    curvature: dict[str, float],
    reference: dict[str, dict[str, Any]] | None,
) -> dict[str, list[dict[str, Any]]]:
    """One repetition of one Tune-driven strategy: every method's trials, in completion order."""
    from ray import tune

    from peftsweep.orchestrator.sweep import _prior, _search_method

    class Record(tune.Callback):
        def __init__(self) -> None:
            self.trials: list[dict[str, Any]] = []

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            last = trial.last_result or {}
            self.trials.append(
                {
                    "lr": float(trial.config["lr"]),
                    "rank": int(trial.config["rank"]),
                    "steps": int(last.get("step", 0)),
                    "value": float(last.get(METRIC, math.nan)),
                    "diverged": bool(last.get("diverged", 0.0)),
                }
            )

    seed = args.seeds[rep % len(args.seeds)]
    root = args.work / f"rep{rep}-{strategy}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)  # the sqlite Optuna storage of this repetition lives here
    spec = replay_spec(args, strategy, sampler_seed=rep, root=root)
    out: dict[str, list[dict[str, Any]]] = {}
    bests: dict[str, dict[str, Any]] = {}
    order = [m.name for m in spec.methods]
    for index, method in enumerate(order):
        if strategy in PRIORS and method == "lora" and reference is not None:
            out[method] = reference["lora"]  # the reference search is tpe_asha's own LoRA search
        else:
            lr_range, points = None, None
            if strategy in PRIORS:
                earlier = [spec.method(m) for m in order[:index]]
                lr_range, points = _prior(spec, method, earlier, _Bests(bests), curvature)  # type: ignore[arg-type]
            record = Record()
            trainable = tune.with_resources(
                tune.with_parameters(
                    replay_trial,
                    curves=curves,
                    lrs=lrs,
                    method=method,
                    seed=seed,
                    eval_every=spec.training.eval_every,
                    max_steps=spec.training.max_steps,
                ),
                {"cpu": spec.resources.trial_driver_cpus},
            )
            _search_method(
                spec, method, [record], root, lr_range=lr_range, points=points, trainable=trainable
            )
            out[method] = record.trials
        bests[method] = chosen(out[method]) or {}
    shutil.rmtree(root, ignore_errors=True)
    return out


def grid_order(
    rep: int,
    method: str,
    ranks: list[int],
    lrs: list[float],
    max_steps: int,
    seed: int,
    curves: dict[str, list[list[float]]],
) -> list[dict[str, Any]]:
    """The one-seed grid in a random order (first-reach depends on the order; the final choice does not)."""
    cfgs = [(r, lr) for r in ranks for lr in lrs]
    random.Random(f"{rep}/{method}").shuffle(cfgs)
    trials = []
    for rank, lr in cfgs:
        last = curves[f"{method}/{rank}/{lr:g}/{seed}"][-1]
        trials.append(
            {
                "lr": lr,
                "rank": rank,
                "steps": int(last[STEP]),
                "value": last[VALUE],
                "diverged": bool(last[DIVERGED]),
            }
        )
    return trials


def chosen(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The orchestrator's pick without confirmation runs: the best non-diverged trial's last report."""
    ok = [t for t in trials if not t["diverged"] and math.isfinite(t["value"])]
    return max(ok, key=lambda t: t["value"]) if ok else None


def score(trials: list[dict[str, Any]], truth: Truth, lrs: list[float], max_steps: int) -> dict[str, Any]:
    """First-reach compute (trial-steps, None if never), regret and LR-step error of one search."""

    def first_reach(threshold: float) -> int | None:
        spent = 0
        for t in trials:
            spent += t["steps"]
            full = t["steps"] >= max_steps and not t["diverged"]
            if full and truth.means[(t["rank"], nearest(t["lr"], lrs))] >= threshold:
                return spent
        return None

    pick = chosen(trials)
    cfg = (pick["rank"], nearest(pick["lr"], lrs)) if pick else None
    regret = truth.optimum - truth.means[cfg] if cfg else truth.optimum
    lr_steps = abs(lrs.index(cfg[1]) - lrs.index(truth.best[1])) if cfg else None
    return {
        "trials": len(trials),
        "steps": sum(t["steps"] for t in trials),
        "reach_1pct": first_reach(truth.optimum * (1 - WITHIN)),
        "reach_noise": first_reach(truth.optimum - truth.noise),
        "regret": regret,
        "lr_steps_off": lr_steps,
        "chosen": {"rank": cfg[0], "lr": cfg[1]} if cfg else None,
    }


def _median(values: list[float | None]) -> float:
    """Median with never-reached (None) counted as infinite compute."""
    return statistics.median([math.inf if v is None else v for v in values]) if values else math.nan


def report(
    records: list[dict[str, Any]],
    args: argparse.Namespace,
    truths: dict[str, Truth],
    console: Console,
    lrs: list[float],
) -> dict[str, Any]:
    grid_steps = GRID_SEEDS_BUDGET * len(args.ranks) * len(lrs) * args.max_steps
    table = Table(
        title=f"search efficiency on the built-in task: median over repetitions; compute in trial-steps "
        f"(3-seed grid = {grid_steps})"
    )
    for col in (
        "strategy",
        "method",
        "reps",
        "steps used",
        "to 1 %",
        "reached",
        "to noise",
        "regret (med)",
        "regret (mean)",
        "≤ noise",
        "LR ±1 step",
        "vs grid",
        "vs tpe",
    ):
        table.add_column(col, justify="right")
    agg: dict[str, Any] = {}
    for strategy in STRATEGIES:
        for method in args.methods:
            rows = [
                r["scores"][method] for r in records if r["strategy"] == strategy and method in r["scores"]
            ]
            if not rows:
                continue
            to1 = _median([r["reach_1pct"] for r in rows])
            agg[f"{strategy}/{method}"] = a = {
                "reps": len(rows),
                "steps_median": _median([r["steps"] for r in rows]),
                "reach_1pct_median": to1,
                "reach_1pct_rate": sum(r["reach_1pct"] is not None for r in rows) / len(rows),
                "reach_noise_median": _median([r["reach_noise"] for r in rows]),
                "regret_median": _median([r["regret"] for r in rows]),
                "regret_mean": statistics.mean(r["regret"] for r in rows),
                "regret_within_noise_rate": sum(r["regret"] <= truths[method].noise for r in rows)
                / len(rows),
                "lr_within_one_step_rate": sum(
                    r["lr_steps_off"] is not None and r["lr_steps_off"] <= 1 for r in rows
                )
                / len(rows),
                "reach_1pct_vs_grid": to1 / grid_steps,
            }
    for key, a in agg.items():
        strategy, method = key.split("/")
        tpe = agg.get(f"tpe/{method}", {}).get("reach_1pct_median")
        a["reach_1pct_vs_tpe"] = a["reach_1pct_median"] / tpe if tpe and math.isfinite(tpe) else None
        table.add_row(
            strategy,
            method,
            str(a["reps"]),
            f"{a['steps_median']:.0f}",
            f"{a['reach_1pct_median']:.0f}",
            f"{a['reach_1pct_rate']:.0%}",
            f"{a['reach_noise_median']:.0f}",
            f"{a['regret_median']:.3f}",
            f"{a['regret_mean']:.3f}",
            f"{a['regret_within_noise_rate']:.0%}",
            f"{a['lr_within_one_step_rate']:.0%}",
            f"{a['reach_1pct_vs_grid']:.3f}",
            "-" if a["reach_1pct_vs_tpe"] is None else f"{a['reach_1pct_vs_tpe']:.2f}",
        )
    console.print(table)
    if args.markdown:  # the README's table
        print("| strategy | method | reps | steps used | to 1 % (reached) | to noise | regret med / mean | "
              "regret ≤ noise | LR ±1 step | to 1 % / grid | to 1 % / tpe |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for key, a in agg.items():
            vs_tpe = "-" if a["reach_1pct_vs_tpe"] is None else f"{a['reach_1pct_vs_tpe']:.2f}"
            print(
                f"| {key.replace('/', ' | ')} | {a['reps']} | {a['steps_median']:.0f} | "
                f"{a['reach_1pct_median']:.0f} ({a['reach_1pct_rate']:.0%}) | "
                f"{a['reach_noise_median']:.0f} | "
                f"{a['regret_median']:.3f} / {a['regret_mean']:.3f} | {a['regret_within_noise_rate']:.0%} | "
                f"{a['lr_within_one_step_rate']:.0%} | {a['reach_1pct_vs_grid']:.3f} | {vs_tpe} |"
            )
    return agg


def probe_curvatures(args: argparse.Namespace, console: Console) -> dict[str, float]:
    """λ_max at init per method through the orchestrator's probe (priors.probe_curvature), cached."""
    cache = RESULTS / "search_efficiency_curvature.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    missing = [m for m in args.methods if m not in known]
    if missing:
        from peftsweep.orchestrator.priors import probe_curvature
        from peftsweep.trainables.prepared import prepare_data

        spec = grid_spec(root=args.work / "data")
        data_dir = prepare_data(spec)
        for method in missing:
            known[method] = probe_curvature(spec, str(data_dir), method)
            console.print(f"curvature λ_max {method}: {known[method]:.3g}")
        cache.write_text(json.dumps(known, indent=1))
    return {m: known[m] for m in args.methods}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["lora", "pissa", "milora", "dora"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="the grid's training seeds")
    parser.add_argument("--reps", type=int, default=20, help="repetitions (sampler seeds 0..reps-1)")
    parser.add_argument("--trials", type=int, default=12, help="trials per method (half the one-seed grid)")
    parser.add_argument("--eval-every", type=int, default=75, help="the quickstart's: ASHA's rung at step 75")
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    parser.add_argument("--grid", type=Path, default=RESULTS / "grid.jsonl")
    parser.add_argument("--out", type=Path, default=RESULTS / "search_efficiency_runs.jsonl")
    parser.add_argument(
        "--work", type=Path, default=Path(__file__).resolve().parents[1] / "peftsweep-runs" / "bench-search"
    )
    parser.add_argument(
        "--shard", default="0/1", help="i/n: run repetitions i, i+n, ... (n processes share the waiting)"
    )
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    parser.add_argument("--summary-only", action="store_true", help="print the table from --out, run nothing")
    args = parser.parse_args()
    console = Console(width=200)

    runs = load_runs(args.grid)
    lrs = sorted({float(r["lr"]) for r in runs})
    args.max_steps = max(int(r["curve"][-1][STEP]) for r in runs)
    curves = {f"{r['method']}/{r['rank']}/{float(r['lr']):g}/{r['seed']}": r["curve"] for r in runs}
    summary = summarise([r for r in runs if r["method"] in args.methods])
    truths = {
        m: Truth(
            means={(int(k.split("/")[0]), float(k.split("/")[1])): v for k, v in s["means"].items()},
            best=(s["best_rank"], s["best_lr"]),
            noise=s["seed_noise"] or 0.0,  # None: a one-seed (partial) grid
        )
        for m, s in summary.items()
    }
    records = [r for r in load_runs(args.out) if r["strategy"] in args.strategies]
    for r in records:  # scored against the current table (a partial grid may have grown since)
        r["scores"] = {m: score(r["trials"][m], truths[m], lrs, args.max_steps) for m in args.methods}
    done = {(r["rep"], r["strategy"]) for r in records}

    if not args.summary_only:
        import ray

        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        # Per-trial CSV/JSON/TensorBoard result files cost ~0.5 s a trial here and nobody reads them.
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        curvature = probe_curvatures(args, console) if any(s in PRIORS for s in args.strategies) else {}
        # The probe's power iteration returns the dominant eigenvalue, which is negative for PiSSA and MiLoRA
        # at rank 4 here; `_prior` would then build a negative LR range and the search would fail. The
        # benchmark uses |λ| (the curvature magnitude the prior is meant to read); see bench/README.md.
        curvature = {m: abs(v) for m, v in curvature.items()}
        # One local Ray for every repetition; no dashboard (the replay trainable starts no Ray Train job).
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR"
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shard, shards = (int(x) for x in args.shard.split("/"))
        for rep in range(shard, args.reps, shards):
            reference = next((r for r in records if r["rep"] == rep and r["strategy"] == "tpe_asha"), None)
            for strategy in args.strategies:
                if (rep, strategy) in done:
                    continue
                t0 = time.perf_counter()
                if strategy == "grid":
                    seed = args.seeds[rep % len(args.seeds)]
                    trials = {
                        m: grid_order(rep, m, args.ranks, lrs, args.max_steps, seed, curves)
                        for m in args.methods
                    }
                else:
                    if strategy in PRIORS and reference is None:
                        raise SystemExit(
                            "prior strategies need tpe_asha first (its LoRA search is the reference)"
                        )
                    trials = run_strategy(
                        args, strategy, rep, curves, lrs, curvature, reference and reference["trials"]
                    )
                record = {
                    "rep": rep,
                    "strategy": strategy,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "trials": trials,
                    "scores": {m: score(trials[m], truths[m], lrs, args.max_steps) for m in args.methods},
                }
                records.append(record)
                if strategy == "tpe_asha":
                    reference = record
                with args.out.open("a") as fh:
                    fcntl.flock(fh, fcntl.LOCK_EX)  # shards append to one file
                    fh.write(json.dumps(record) + "\n")
                console.print(
                    f"rep {rep} {strategy:>19}: "
                    + ", ".join(f"{m} regret {s['regret']:.3f}" for m, s in record["scores"].items())
                    + f" ({record['seconds']:.0f} s)"
                )
        ray.shutdown()

    agg = report(records, args, truths, console, lrs)
    (RESULTS / "search_efficiency.json").write_text(
        json.dumps(
            {
                "grid": str(args.grid.name),
                "lrs": lrs,
                "trials_per_method": args.trials,
                "eval_every": args.eval_every,
                "within": WITHIN,
                "grid_compute_3_seeds": GRID_SEEDS_BUDGET * len(args.ranks) * len(lrs) * args.max_steps,
                "truth": {
                    m: {"best": t.best, "optimum": t.optimum, "seed_noise": t.noise}
                    for m, t in truths.items()
                },
                "results": agg,
            },
            indent=1,
        )
    )
    console.print(f"wrote {RESULTS / 'search_efficiency.json'}")


if __name__ == "__main__":
    main()
