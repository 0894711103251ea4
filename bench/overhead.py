"""What does the orchestration cost? `peftsweep run` vs a bare script running the same trials (a benchmark).

wall     (a) `peftsweep run SPEC` (a subprocess: Ray, Ray Train, DeepSpeed, MLflow, Optuna, report,
         registry) with 8 LoRA trials of `--steps` steps (no early stopping: every trial runs in full), then
         (b) this file as a bare script (`--bare`, a subprocess) running the same 8 (lr, rank) configs
         through the same per-worker loop `run_trial`, 2 at a time in 2 processes like the sweep's 2
         concurrent trials, with no Ray/MLflow/Optuna. Reports the wall ratio, cold start (command start →
         first trial's first training step), and per trial: setup phases of the loop (model build, adapter
         init, DeepSpeed initialize, base eval; from the loop's heartbeats) and the Ray-side extra (Tune
         trial time to its last report minus the bare trial's: Ray Train controller + worker group start +
         report/checkpoint rounds).
memory   the driver's RSS over 200 trivial trials (the trainable reports once) through the real searcher,
         scheduler and MLflow trial recorder (`_search_method` + `TrialRecorder`).

Cold start of (a) is estimated: the first Tune result's timestamp (1 s resolution) minus the bare run's
training time of the same config up to its first report. Writes bench/results/overhead.json.

    nice -n 19 .venv/bin/python bench/overhead.py [--parts wall memory] [--steps 3600] [--trials 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from grid import QUICKSTART, RESULTS  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from peftsweep.spec import SweepSpec, load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHOD = "lora"
TARGET = 1.10  # issue 8: peftsweep run within 10 % of the bare loop's wall time for trials of ≥ 60 s
SETUP_BEATS = 5  # the loop's heartbeats before the first step: start, model, adapter, DeepSpeed, base eval
PHASES = ["model build", "adapter init", "DeepSpeed initialize + data", "base eval (forgetting)"]
RSS_EVERY = 10  # trials between driver RSS samples


def overhead_spec(steps: int, trials: int, root: Path) -> dict[str, Any]:
    """The quickstart (LoRA only) with long trials, no early stopping and no confirmation runs."""
    raw = load_spec(QUICKSTART).model_dump(mode="json")
    raw["name"] = "overhead"
    raw["methods"] = [m for m in raw["methods"] if m["name"] == METHOD]
    raw["search"] |= {"trials_per_method": trials, "early_stopping": "none", "confirm_seeds": 0}
    raw["training"] |= {"max_steps": steps, "eval_every": steps // 2}  # two evals a trial, as the quickstart
    raw["tracking"]["root"] = str(root)
    return raw


def bare_trial(spec_json: dict[str, Any], data_dir: str, lr: float, rank: int) -> dict[str, Any]:
    """One trial in a fresh process: the loop's heartbeat and report times (time.time())."""
    from peftsweep.trainables.loop import init_standalone, run_trial

    init_standalone()
    spec = SweepSpec.model_validate(spec_json)
    beats: list[float] = []
    reports: list[float] = []
    start = time.time()
    run_trial(
        spec,
        METHOD,
        lr,
        rank,
        spec.training.seed,
        lambda _m, _d: reports.append(time.time()),
        data_dir=Path(data_dir),
        heartbeat=lambda: beats.append(time.time()) if len(beats) <= SETUP_BEATS else None,
    )
    return {"lr": lr, "rank": rank, "start": start, "beats": beats, "reports": reports, "end": time.time()}


def bare_side(spec_path: Path, configs_path: Path, out_path: Path) -> None:
    """(b): the same trials, 2 processes at a time, no Ray/MLflow/Optuna (run as `overhead.py --bare`)."""
    from peftsweep.trainables.prepared import prepare_data

    spec = load_spec(spec_path)
    data_dir = prepare_data(spec)
    configs = json.loads(configs_path.read_text())
    spec_json = spec.model_dump(mode="json")
    concurrent = spec.resources.max_concurrent_trials
    with ProcessPoolExecutor(concurrent, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(bare_trial, spec_json, str(data_dir), c["lr"], c["rank"]) for c in configs]
        out_path.write_text(json.dumps([f.result() for f in futures]))


def tune_results(root: Path) -> list[dict[str, Any]]:
    """Every Tune trial's reports (result.json lines) of the sweep under ``root``."""
    trials = []
    for path in sorted((root / "ray" / "tune").glob("*/*/result.json")):
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        if lines:
            trials.append(
                {"lr": lines[0]["config"]["lr"], "rank": lines[0]["config"]["rank"], "reports": lines}
            )
    return trials


def wall(args: argparse.Namespace, console: Console, rnd: int) -> dict[str, Any]:
    work = args.work / f"round{rnd}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec_a = work / "sweep.yaml"
    import yaml

    spec_a.write_text(yaml.safe_dump(overhead_spec(args.steps, args.trials, work / "sweep")))
    t0_a = time.time()
    with (work / "sweep.log").open("w") as log:
        subprocess.run(
            [str(ROOT / ".venv" / "bin" / "peftsweep"), "run", str(spec_a)], stdout=log, stderr=log
        )
    wall_a = time.time() - t0_a
    ray_trials = tune_results(work / "sweep")
    configs = [{"lr": t["lr"], "rank": t["rank"]} for t in ray_trials]
    console.print(f"round {rnd}: peftsweep run {wall_a:.0f} s, {len(configs)} trials")

    spec_b = work / "bare.yaml"
    spec_b.write_text(yaml.safe_dump(overhead_spec(args.steps, args.trials, work / "bare")))
    (work / "configs.json").write_text(json.dumps(configs))
    t0 = time.time()
    cmd = [
        sys.executable,
        __file__,
        "--bare",
        str(spec_b),
        str(work / "configs.json"),
        str(work / "bare.json"),
    ]
    with (work / "bare.log").open("w") as log:
        subprocess.run(cmd, stdout=log, stderr=log, check=True)
    wall_b = time.time() - t0
    bare = json.loads((work / "bare.json").read_text())
    console.print(f"round {rnd}: bare script {wall_b:.0f} s")

    # Per trial: setup phases (bare), and the Ray-side extra = Tune's time to the last report − bare's.
    phases = {p: [b["beats"][i + 1] - b["beats"][i] for b in bare] for i, p in enumerate(PHASES)}
    by_cfg = {(b["lr"], b["rank"]): b for b in bare}
    extra = [
        t["reports"][-1]["time_total_s"] - (b["reports"][-1] - b["start"])
        for t in ray_trials
        if (b := by_cfg.get((t["lr"], t["rank"])))
    ]
    train_s = [b["reports"][-1] - b["beats"][SETUP_BEATS - 1] for b in bare]
    first_b = min(bare, key=lambda b: b["start"])
    first_a = min(ray_trials, key=lambda t: t["reports"][0]["timestamp"])
    twin = by_cfg[(first_a["lr"], first_a["rank"])]
    return {
        "wall_peftsweep_s": wall_a,
        "wall_bare_s": wall_b,
        "ratio": wall_a / wall_b,
        "trial_train_s_median": statistics.median(train_s),
        "cold_start_bare_s": first_b["beats"][SETUP_BEATS - 1] - t0,
        "cold_start_peftsweep_s": first_a["reports"][0]["timestamp"]
        - (twin["reports"][0] - twin["beats"][SETUP_BEATS - 1])
        - t0_a,
        "phases_median_s": {p: statistics.median(v) for p, v in phases.items()},
        "ray_extra_per_trial_s": extra,
        "configs": configs,
        "bare_trials": bare,
        "ray_trials": [{k: t[k] for k in ("lr", "rank")} | {"reports": t["reports"]} for t in ray_trials],
    }


def memory(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Driver RSS over ``args.memory_trials`` trivial trials: searcher + scheduler + MLflow recorder."""
    from ray import tune

    from peftsweep import cluster
    from peftsweep.orchestrator.sweep import _search_method
    from peftsweep.orchestrator.tracking import SweepTracker, TrialRecorder

    work = args.work / "memory"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    raw = overhead_spec(150, args.memory_trials, work)
    raw["search"]["early_stopping"] = "asha"
    spec = SweepSpec.model_validate(raw)

    class RssSampler(tune.Callback):
        """The driver's RSS (MiB) before the first trial and every RSS_EVERY completed trials."""

        def __init__(self) -> None:
            import psutil

            self.process = psutil.Process()
            self.samples: list[tuple[int, float]] = [(0, self.rss())]
            self.done = 0

        def rss(self) -> float:
            return self.process.memory_info().rss / 2**20

        def __reduce__(self) -> tuple:
            # Tune pickles its callbacks into the experiment state: a no-op copy there
            return (tune.Callback, ())

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            if self.done % RSS_EVERY == 0:
                self.samples.append((self.done, self.rss()))

    class TimedRecorder(TrialRecorder):
        """The real MLflow recorder, timing its driver-side work per trial (start + results + finish)."""

        def __init__(self, tracker: SweepTracker, method: str) -> None:
            super().__init__(tracker, method)
            self.seconds: dict[str, float] = {}

        def _timed(self, hook: Any, trial: Any, *a: Any, **kw: Any) -> None:
            t0 = time.perf_counter()
            hook(*a, trial=trial, **kw)
            self.seconds[trial.trial_id] = self.seconds.get(trial.trial_id, 0.0) + time.perf_counter() - t0

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._timed(super().on_trial_start, trial, iteration, trials, **info)

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            self._timed(super().on_trial_result, trial, iteration, trials, result=result, **info)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._timed(super().on_trial_complete, trial, iteration, trials, **info)

    started = cluster.connect()
    try:
        tracker = SweepTracker(spec)
        tracker.start_method(METHOD)
        rss = RssSampler()
        recorder = TimedRecorder(tracker, METHOD)
        trivial = tune.with_resources(_trivial_trial, {"cpu": spec.resources.trial_driver_cpus})
        _search_method(spec, METHOD, [recorder, rss], work, trainable=trivial)
        tracker.finish_method(METHOD)
        tracker.finish_sweep("FINISHED")
    finally:
        if started:
            cluster.disconnect()
    samples = rss.samples
    first = samples[1][1] if len(samples) > 1 else samples[0][1]
    mlflow_s = sorted(recorder.seconds.values())
    console.print(
        f"driver RSS: {samples[0][1]:.0f} MiB before, {samples[-1][1]:.0f} MiB after {samples[-1][0]}"
    )
    return {
        "trials": args.memory_trials,
        "rss_mib": samples,
        "growth_mib": samples[-1][1] - samples[0][1],
        "growth_after_first_10_mib": samples[-1][1] - first,
        "mlflow_per_trial_s": mlflow_s,
        "mlflow_per_trial_median_s": statistics.median(mlflow_s) if mlflow_s else None,
    }


def _trivial_trial(config: dict[str, Any]) -> None:
    """A trial that trains nothing: one report at the last step (a score from the LR, so TPE has a signal)."""
    import math

    from ray import tune

    tune.report({"step": 150, "exact_match": 1.0 / (1.0 + abs(math.log10(config["lr"]) + 2.0))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["wall", "memory"], choices=["wall", "memory"])
    parser.add_argument("--steps", type=int, default=3600, help="steps per trial (≈ 50 s, quiet core)")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="(a) then (b), this many times")
    parser.add_argument("--memory-trials", type=int, default=200)
    parser.add_argument("--work", type=Path, default=ROOT / "peftsweep-runs" / "bench-overhead")
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead.json")
    parser.add_argument(
        "--bare", nargs=3, type=Path, metavar=("SPEC", "CONFIGS", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.bare:
        bare_side(*args.bare)
        return
    console = Console(width=160)
    result: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    if "wall" in args.parts:
        result["wall"] = [wall(args, console, rnd) for rnd in range(args.rounds)]
        result["steps"] = args.steps
        args.out.write_text(json.dumps(result, indent=1))
    if "memory" in args.parts:
        result["memory"] = memory(args, console)
        args.out.write_text(json.dumps(result, indent=1))
    print_tables(result, console)
    console.print(f"wrote {args.out}")


def print_tables(result: dict[str, Any], console: Console) -> None:
    if result.get("wall"):
        table = Table(title=f"peftsweep run vs bare loop, {result['steps']} steps a trial")
        for col in ("round", "trial train s", "peftsweep s", "bare s", "ratio", "cold start a / b s",
                    "Ray extra per trial s (median)"):  # fmt: skip
            table.add_column(col, justify="right")
        for i, w in enumerate(result["wall"]):
            table.add_row(
                str(i), f"{w['trial_train_s_median']:.0f}", f"{w['wall_peftsweep_s']:.0f}",
                f"{w['wall_bare_s']:.0f}", f"{w['ratio']:.3f}",
                f"{w['cold_start_peftsweep_s']:.0f} / {w['cold_start_bare_s']:.0f}",
                f"{statistics.median(w['ray_extra_per_trial_s']):.1f}",
            )  # fmt: skip
        console.print(table)
        phases = Table(title="per-trial setup in the loop (bare side, median s)")
        for p in PHASES:
            phases.add_column(p, justify="right")
        phases.add_row(*[f"{result['wall'][-1]['phases_median_s'][p]:.2f}" for p in PHASES])
        console.print(phases)
    if result.get("memory"):
        m = result["memory"]
        console.print(
            f"driver RSS over {m['trials']} trivial trials: +{m['growth_mib']:.0f} MiB "
            f"(+{m['growth_after_first_10_mib']:.0f} MiB after the first {RSS_EVERY})"
        )
        if m.get("mlflow_per_trial_median_s") is not None:
            console.print(
                "MLflow logging on the driver per trial (start + results + finish): "
                f"median {1000 * m['mlflow_per_trial_median_s']:.0f} ms, "
                f"max {1000 * max(m['mlflow_per_trial_s']):.0f} ms"
            )


if __name__ == "__main__":
    main()
