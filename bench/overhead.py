"""What does the orchestration cost? peftsweep against the hand-glued peer and a bare loop (a benchmark).

fixed    per-trial fixed cost, one trial at a time, side by side in one run: the peer
         (`../shared/peer/glue_sweep.py`: Tune + Train V2 TorchTrainer per trial + OptunaSearch + MLflow
         callback) and `peftsweep run` (inline executor), each on `--fixed-trials` tiny trials of
         `--fixed-steps` steps. Both compute (Tune fit time − the same trials' bare in-process time) / trials.
         For peftsweep the fit time is `run_methods` (one Tune run for the sweep), timed from outside.
wall     `peftsweep run` (a subprocess: Ray, Tune, MLflow, Optuna, report, registry) with `--trials` LoRA
         trials of `--steps` steps (no early stopping), 2 at a time, against this file as a bare script
         running the same configs through the same loop (`run_trial`) 2 at a time in 2 processes with no
         Ray/MLflow/Optuna. Wall ratio of the two commands, and cold start (command start → first training
         step: the first trial's MLflow run start + its reported setup_s; the bare script likewise). The
         side that goes first alternates by round; each side's trial seconds and tokens/s are kept.
train    two-worker Ray Train `TorchTrainer` + DeepSpeed trials (`--train-trials` of `--fixed-steps` steps,
         one at a time) with Ray Train's defaults (controller poll 2 s, preemption watcher on: what a trial
         cost before issue 17) and with peftsweep's settings (`orchestrator.trial.TRAIN_ENV`): per-trial wall.
memory   the driver's RSS over `--memory-trials` trivial trials through the real searcher, scheduler and
         MLflow recorder (`run_methods` + `TrialRecorder`), and the recorder's time per trial.

Run on a quiet machine (nothing else running). Writes bench/results/overhead.json.

    nice -n 19 .venv/bin/python bench/overhead.py [--parts fixed wall train memory] [--rounds 2]
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

from peftsweep.spec import SweepSpec, load_spec, parse_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT.parent / "shared" / "peer" / "glue_sweep.py"
METHOD = "lora"
TARGETS = {"fixed_vs_peer": 0.10, "wall_ratio": 1.10, "cold_start_s": 15.0}  # issue 17's acceptance
RSS_EVERY = 10  # trials between driver RSS samples


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    """A side of the benchmark in its own process; its output's tail when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}… failed:\n{(proc.stdout + proc.stderr)[-4000:]}")


def bench_spec(root: Path, trials: int, steps: int, concurrent: int, **resources: Any) -> dict[str, Any]:
    """The quickstart, LoRA only, every trial in full (no early stopping, no confirmation runs)."""
    raw = load_spec(QUICKSTART).model_dump(mode="json")
    raw["name"] = "overhead"
    raw["methods"] = [m for m in raw["methods"] if m["name"] == METHOD]
    raw.pop("forgetting")
    raw["search"] |= {"trials_per_method": trials, "early_stopping": "none", "confirm_seeds": 0}
    raw["search"]["n_startup_trials"] = trials  # the same random configs on both sides, no TPE model time
    raw["training"] |= {"max_steps": steps, "eval_every": max(1, steps // 2)}  # two evals, as the quickstart
    raw["resources"] |= {"max_concurrent_trials": concurrent, **resources}
    raw["tracking"]["root"] = str(root)
    return raw


def configs(n: int) -> list[dict[str, float]]:
    """The (lr, rank) points both sides train: spread over the quickstart's range, ranks alternating."""
    return [{"lr": 10 ** (-3 + 1.5 * i / max(1, n - 1)), "rank": (4, 8)[i % 2]} for i in range(n)]


def bare_trial(spec: SweepSpec, data_dir: str, lr: float, rank: int) -> dict[str, float]:
    """One trial through the loop, no Ray: its wall time and its setup_s."""
    from peftsweep.trainables.loop import run_trial
    from peftsweep.trainables.trial_config import standalone_trial

    t0 = time.perf_counter()
    reports: list[dict[str, Any]] = []
    run_trial(standalone_trial(spec, METHOD, lr, rank, 0, Path(data_dir)), lambda m, _d: reports.append(m))
    last = reports[-1]
    return {
        "seconds": time.perf_counter() - t0,
        "setup_s": float(reports[0]["setup_s"]),
        "tokens_per_s": float(last.get("tokens_per_s", "nan")),
    }


# --- fixed: per-trial fixed cost against the peer ---


def fixed_side(work: Path, trials: int, steps: int) -> dict[str, Any]:
    """In this process: the bare trials (after one warm-up), then `run_sweep` with `run_methods` timed."""
    from peftsweep.orchestrator import sweep
    from peftsweep.trainables.prepared import prepare_data

    shutil.rmtree(work, ignore_errors=True)
    spec = parse_spec(bench_spec(work, trials, steps, concurrent=1))
    data_dir = str(prepare_data(spec))
    bare_trial(spec, data_dir, 1e-3, 4)  # warm-up: imports and first-call costs are not the trials' own
    bare = [bare_trial(spec, data_dir, c["lr"], c["rank"])["seconds"] for c in configs(trials)]
    timed: dict[str, float] = {}
    real = sweep.run_methods

    def timed_run_methods(*args: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        real(*args, **kwargs)
        timed["fit_s"] = time.perf_counter() - t0

    sweep.run_methods = timed_run_methods  # the bench's stopwatch around the one Tune run of the sweep
    try:
        sweep.run_sweep(spec)
    finally:
        sweep.run_methods = real
    fit = timed["fit_s"]
    return {"bare_s": bare, "fit_s": fit, "per_trial_fixed_s": (fit - sum(bare)) / trials}


def fixed(args: argparse.Namespace, console: Console, rnd: int) -> dict[str, Any]:
    """One round: the peer, then peftsweep, each a fresh process."""
    out = args.work / f"fixed-{rnd}"
    out.mkdir(parents=True, exist_ok=True)
    peer_json = out / "peer.json"
    peer_cmd = [
        sys.executable,
        str(PEER),
        "--trials",
        str(args.fixed_trials),
        "--steps",
        str(args.fixed_steps),
    ]
    peer_cmd += ["--report-every", str(max(1, args.fixed_steps // 2)), "--out", str(peer_json)]
    console.print(f"[fixed {rnd}] peer: {' '.join(peer_cmd[1:])}")
    _run(peer_cmd, out)
    ours_json = out / "peftsweep.json"
    cmd = [sys.executable, __file__, "--side", "fixed", str(out / "runs"), str(ours_json)]
    cmd += ["--fixed-trials", str(args.fixed_trials), "--fixed-steps", str(args.fixed_steps)]
    console.print(
        f"[fixed {rnd}] peftsweep run, {args.fixed_trials} × {args.fixed_steps} steps, one at a time"
    )
    _run(cmd, out)
    peer, ours = json.loads(peer_json.read_text()), json.loads(ours_json.read_text())
    return {
        "peer_per_trial_fixed_s": peer["per_trial_fixed_s"],
        "peer": peer,
        "peftsweep_per_trial_fixed_s": ours["per_trial_fixed_s"],
        "peftsweep": ours,
        "ratio": ours["per_trial_fixed_s"] / peer["per_trial_fixed_s"],
    }


# --- wall: the whole command against a bare script ---


def bare_side(spec_path: Path, out_path: Path, trials: int) -> None:
    """This file as the bare script: the same configs through `run_trial`, 2 processes at a time."""
    from peftsweep.trainables.prepared import prepare_data

    t0 = time.perf_counter()
    spec = load_spec(spec_path)
    data_dir = str(prepare_data(spec))
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        runs = list(pool.map(_bare_in_pool, [(str(spec_path), data_dir, c) for c in configs(trials)]))
    out_path.write_text(json.dumps({"wall_s": time.perf_counter() - t0, "trials": runs}))


def _bare_in_pool(job: tuple[str, str, dict[str, float]]) -> dict[str, float]:
    spec_path, data_dir, config = job
    started_wall = time.time()
    result = bare_trial(load_spec(spec_path), data_dir, config["lr"], int(config["rank"]))
    return result | {"started_wall": started_wall}


def wall(args: argparse.Namespace, console: Console, rnd: int) -> dict[str, Any]:
    """One round: `peftsweep run` and the bare script on the same configs, the side that goes first
    alternating by round (a machine whose speed drifts favours neither side)."""
    out = args.work / f"wall-{rnd}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec_path = out / "overhead.yaml"
    spec_path.write_text(json.dumps(bench_spec(out / "runs", args.trials, args.steps, concurrent=2)))
    sides = [("peftsweep", _wall_peftsweep), ("bare", _wall_bare)]
    measured: dict[str, dict[str, Any]] = {}
    for name, side in sides if rnd % 2 == 0 else sides[::-1]:
        console.print(f"[wall {rnd}] {name}: {args.trials} trials × {args.steps} steps, 2 at a time")
        measured[name] = side(args, spec_path, out)
    ours, bare = measured["peftsweep"], measured["bare"]
    return {
        "first": "peftsweep" if rnd % 2 == 0 else "bare",
        "wall_peftsweep_s": ours["wall_s"],
        "wall_bare_s": bare["wall_s"],
        "ratio": ours["wall_s"] / bare["wall_s"],
        "cold_start_peftsweep_s": ours["cold_start_s"],
        "cold_start_bare_s": bare["cold_start_s"],
        "trial_s_median": statistics.median(bare["trial_s"]),
        # where a trial's time goes on each side: its own seconds and the training steps' tokens/s
        "trial_s_peftsweep": ours["trial_s"],
        "trial_s_bare": bare["trial_s"],
        "tokens_per_s_peftsweep": ours["tokens_per_s"],
        "tokens_per_s_bare": bare["tokens_per_s"],
    }


def _wall_peftsweep(args: argparse.Namespace, spec_path: Path, out: Path) -> dict[str, Any]:
    """`peftsweep run` as a user runs it; its trials as MLflow recorded them (run start → end)."""
    from mlflow.tracking import MlflowClient

    cli = str(Path(sys.executable).with_name("peftsweep"))
    t0 = time.time()
    _run([cli, "run", str(spec_path)], out)
    wall_s = time.time() - t0
    spec = load_spec(spec_path)
    client = MlflowClient(spec.tracking.mlflow_tracking_uri())
    exp = client.get_experiment_by_name(spec.name)
    runs = client.search_runs([exp.experiment_id], "tags.`peftsweep.level` = 'trial'", max_results=100)
    first = min(runs, key=lambda r: r.info.start_time)
    return {
        "wall_s": wall_s,
        "cold_start_s": first.info.start_time / 1000 + first.data.metrics["setup_s"] - t0,
        "trial_s": [(r.info.end_time - r.info.start_time) / 1000 for r in runs],
        "tokens_per_s": statistics.median(r.data.metrics["tokens_per_s"] for r in runs),
    }


def _wall_bare(args: argparse.Namespace, spec_path: Path, out: Path) -> dict[str, Any]:
    """This file as the bare script (`bare_side`), in its own process."""
    bare_json = out / "bare.json"
    t0 = time.time()
    bare_cmd = [sys.executable, __file__, "--side", "bare", str(spec_path), str(bare_json)]
    _run(bare_cmd + ["--trials", str(args.trials)], out)
    wall_s = time.time() - t0
    trials = json.loads(bare_json.read_text())["trials"]
    first = min(trials, key=lambda r: r["started_wall"])
    return {
        "wall_s": wall_s,
        "cold_start_s": first["started_wall"] + first["setup_s"] - t0,
        "trial_s": [r["seconds"] for r in trials],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in trials),
    }


# --- train: two-worker TorchTrainer trials, Ray Train's defaults vs peftsweep's settings ---


def train_side(work: Path, out_path: Path, trials: int, steps: int) -> None:
    from peftsweep.orchestrator import sweep

    shutil.rmtree(work, ignore_errors=True)
    raw = bench_spec(work, trials, steps, concurrent=1, workers_per_trial=2, cpus_per_worker=0.45)
    timed: dict[str, float] = {}
    real = sweep.run_methods

    def timed_run_methods(*a: Any, **k: Any) -> None:
        t0 = time.perf_counter()
        real(*a, **k)
        timed["fit_s"] = time.perf_counter() - t0

    sweep.run_methods = timed_run_methods
    try:
        sweep.run_sweep(parse_spec(raw))
    finally:
        sweep.run_methods = real
    out_path.write_text(json.dumps({"fit_s": timed["fit_s"], "per_trial_s": timed["fit_s"] / trials}))


def train(args: argparse.Namespace, console: Console, rnd: int) -> dict[str, Any]:
    from peftsweep.orchestrator.trial import TRAIN_ENV

    result = {}
    defaults = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2.0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}
    for arm, env in (("ray_defaults", defaults), ("peftsweep", TRAIN_ENV)):
        out = args.work / f"train-{rnd}-{arm}"
        out.mkdir(parents=True, exist_ok=True)
        console.print(
            f"[train {rnd}] {arm}: {args.train_trials} two-worker trials × {args.fixed_steps} steps"
        )
        cmd = [sys.executable, __file__, "--side", "train", str(out / "runs"), str(out / "r.json")]
        cmd += ["--train-trials", str(args.train_trials), "--fixed-steps", str(args.fixed_steps)]
        _run(cmd, out, env=os.environ | env)
        result[arm] = json.loads((out / "r.json").read_text())
    result["saved_per_trial_s"] = result["ray_defaults"]["per_trial_s"] - result["peftsweep"]["per_trial_s"]
    return result


# --- memory: driver RSS over many trivial trials ---


def memory(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """Driver RSS over ``args.memory_trials`` trivial trials: searcher + scheduler + MLflow recorder."""
    from ray import tune

    from peftsweep import cluster
    from peftsweep.orchestrator.methods import MethodRun
    from peftsweep.orchestrator.sweep import method_searcher, run_methods
    from peftsweep.orchestrator.tracking import SweepTracker, TrialRecorder

    work = args.work / "memory"
    shutil.rmtree(work, ignore_errors=True)
    raw = bench_spec(work, args.memory_trials, 150, concurrent=2)
    raw["search"] |= {"early_stopping": "asha", "n_startup_trials": 3}
    spec = parse_spec(raw)

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
            return (tune.Callback, ())  # Tune pickles its callbacks into the experiment state

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            if self.done % RSS_EVERY == 0:
                self.samples.append((self.done, self.rss()))

    class TimedRecorder(TrialRecorder):
        """The real MLflow recorder, timing its driver-side work per trial (start + results + finish)."""

        def __init__(self, tracker: SweepTracker) -> None:
            super().__init__(tracker)
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
        spec.tracking.root.mkdir(parents=True)
        tracker = SweepTracker(spec)
        tracker.start_method(METHOD)
        rss, recorder = RssSampler(), TimedRecorder(tracker)
        run = MethodRun(
            METHOD,
            start_search=lambda: method_searcher(spec, METHOD, work, args.memory_trials),
            start_confirm=lambda: None,
        )
        trivial = tune.with_resources(_trivial_trial, {"cpu": 0.5})
        run_methods(spec, [run], [recorder, rss], trainable=trivial)
        tracker.finish_method(METHOD)
        tracker.finish_sweep("FINISHED")
    finally:
        if started:
            cluster.disconnect()
    samples = rss.samples
    first = samples[1][1] if len(samples) > 1 else samples[0][1]
    mlflow_s = sorted(recorder.seconds.values())
    return {
        "trials": args.memory_trials,
        "rss_mib": samples,
        "growth_mib": samples[-1][1] - samples[0][1],
        "growth_after_first_10_mib": samples[-1][1] - first,
        "mib_per_1000_trials_after_first_10": 1000
        * (samples[-1][1] - first)
        / max(1, samples[-1][0] - RSS_EVERY),
        "mlflow_per_trial_median_s": statistics.median(mlflow_s) if mlflow_s else None,
        "mlflow_per_trial_max_s": max(mlflow_s) if mlflow_s else None,
    }


def _trivial_trial(config: dict[str, Any]) -> None:
    """A trial that trains nothing: one report at the last step (a score from the LR, so TPE has a signal)."""
    import math

    from ray import tune

    from peftsweep.trainables.trial_config import TRIAL_KEY

    lr = config[TRIAL_KEY].lr
    tune.report({"step": 150, "exact_match": 1.0 / (1.0 + abs(math.log10(lr) + 2.0))})


# --- main ---


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["fixed", "wall", "train", "memory"],
        choices=["fixed", "wall", "train", "memory"],
    )
    parser.add_argument("--rounds", type=int, default=2, help="side-by-side rounds of fixed/wall/train")
    parser.add_argument("--fixed-trials", type=int, default=8)
    parser.add_argument("--fixed-steps", type=int, default=20)
    parser.add_argument("--trials", type=int, default=8, help="wall: trials (2 at a time)")
    parser.add_argument(
        "--steps", type=int, default=2400, help="wall: steps a trial (≈ 30 s on a quiet core)"
    )
    parser.add_argument("--train-trials", type=int, default=4)
    parser.add_argument("--memory-trials", type=int, default=200)
    parser.add_argument("--work", type=Path, default=ROOT / "peftsweep-runs" / "bench-overhead")
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead.json")
    parser.add_argument("--side", nargs=3, metavar=("KIND", "PATH", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        kind, path, out = args.side
        if kind == "fixed":
            Path(out).write_text(json.dumps(fixed_side(Path(path), args.fixed_trials, args.fixed_steps)))
        elif kind == "bare":
            bare_side(Path(path), Path(out), args.trials)
        else:
            train_side(Path(path), Path(out), args.train_trials, args.fixed_steps)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    console = Console(width=160)
    result: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["targets"] = TARGETS
    for part, run in (("fixed", fixed), ("wall", wall), ("train", train)):
        if part in args.parts:
            result[part] = [run(args, console, rnd) for rnd in range(args.rounds)]
            result[f"{part}_settings"] = {
                k: v for k, v in vars(args).items() if k not in ("work", "out", "side")
            }
            args.out.write_text(json.dumps(result, indent=1, default=str))
    if "memory" in args.parts:
        result["memory"] = memory(args, console)
        args.out.write_text(json.dumps(result, indent=1, default=str))
    print_tables(result, console)
    console.print(f"wrote {args.out}")


def print_tables(result: dict[str, Any], console: Console) -> None:
    nan = float("nan")
    if result.get("fixed"):
        table = Table(title="per-trial fixed cost, one trial at a time: (Tune fit − bare trials) / trials")
        for col in ("round", "peer s", "peftsweep s", "peftsweep / peer", "target"):
            table.add_column(col, justify="right")
        for i, f in enumerate(result["fixed"]):
            table.add_row(
                str(i), f"{f['peer_per_trial_fixed_s']:.2f}", f"{f['peftsweep_per_trial_fixed_s']:.2f}",
                f"{f['ratio']:.3f}", f"≤ {TARGETS['fixed_vs_peer']}",
            )  # fmt: skip
        console.print(table)
    if result.get("wall"):
        table = Table(title="peftsweep run vs a bare script, the same trials 2 at a time")
        cols = ("round", "first", "trial s", "peftsweep s", "bare s", "ratio",
                "cold start peftsweep / bare s", "tokens/s peftsweep / bare")  # fmt: skip
        for col in cols:
            table.add_column(col, justify="right")
        for i, w in enumerate(result["wall"]):
            table.add_row(
                str(i), w.get("first", "peftsweep"), f"{w['trial_s_median']:.0f}",
                f"{w['wall_peftsweep_s']:.0f}", f"{w['wall_bare_s']:.0f}", f"{w['ratio']:.3f}",
                f"{w['cold_start_peftsweep_s']:.1f} / {w['cold_start_bare_s']:.1f}",
                f"{w.get('tokens_per_s_peftsweep', nan):.0f} / {w.get('tokens_per_s_bare', nan):.0f}",
            )  # fmt: skip
        console.print(table)
    if result.get("train"):
        table = Table(title="two-worker TorchTrainer + DeepSpeed trials: wall per trial")
        for col in ("round", "Ray Train defaults s", "peftsweep settings s", "saved s"):
            table.add_column(col, justify="right")
        for i, t in enumerate(result["train"]):
            table.add_row(
                str(i), f"{t['ray_defaults']['per_trial_s']:.1f}", f"{t['peftsweep']['per_trial_s']:.1f}",
                f"{t['saved_per_trial_s']:.1f}",
            )  # fmt: skip
        console.print(table)
    if result.get("memory"):
        m = result["memory"]
        console.print(
            f"driver RSS over {m['trials']} trivial trials: +{m['growth_mib']:.0f} MiB "
            f"(+{m['growth_after_first_10_mib']:.0f} MiB after the first {RSS_EVERY}; "
            f"{m['mib_per_1000_trials_after_first_10']:.0f} MiB per 1,000 trials); MLflow on the driver per "
            f"trial: median {1000 * m['mlflow_per_trial_median_s']:.0f} ms"
        )


if __name__ == "__main__":
    main()
