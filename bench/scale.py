"""Sweeps at cluster scale (issue 21): the real orchestrator driving a simulated GPU cluster (a benchmark).

scale       `ray.cluster_utils.Cluster`: a head and `--nodes` nodes of `--gpus-per-node` *declared* GPUs
            (nothing uses them: no CUDA is touched) and 1 CPU each, all on this machine. The sweep's spec
            holds `--methods` methods × `--trials` search trials, each trial `--gpus-per-trial` workers
            of 1 GPU (`resources.workers_per_trial`, `gpus_per_worker`; `max_concurrent_trials` = GPUs /
            GPUs a trial).
            Everything of `peftsweep run` between the spec and the trial runs for real: `sweep.studies` +
            `sweep._method_runs` +
            `sweep.run_methods` (one Tune run: `SweepSearch`, each method's Optuna study + sampler +
            `BudgetedSearch`, its ASHA, its raced `ConfirmationSearch`), the real `SweepTracker` +
            `TrialRecorder` (MLflow) and the live `SweepProgress` (rendered to a null console). Only the
            trainable is replaced: a sleeping Tune trial that reserves the trial's resources (one placement
            group: the trial driver's CPU bundle and one bundle per worker, as Ray Train's would) and reports
            a learning curve replayed from the ground-truth grid (`bench/results/grid.jsonl`): the grid's
            four methods cycled over the sweep's methods, the nearest grid LR, rank 8 for rank-less methods,
            `--pace` seconds per step.
            Measured: driver CPU and RSS (MiB per 1,000 trials), trials started per second, slot utilisation
            (slot-seconds the trials spent working / slot-seconds available, from the first trial's start to
            the last one's: "while trials remain"), the driver's decision latencies (searcher, scheduler,
            Optuna, MLflow, display: median at the start and end of the sweep, so growth shows), wall time
            against the ideal schedule (the trials' working seconds / slots: no gaps, no overhead), and that
            no trial is lost or duplicated in MLflow or Optuna (counted against the trials' own log).
stores      the driver's per-trial MLflow and Optuna writes (what `TrialRecorder` and `StrategyOptunaSearch`
            do for one trial; Optuna side by side on the store and written behind it, as `sweep.studies`
            does: the time on the caller's thread) against sqlite and against the cluster path —
            `peftsweep tracking serve` (MLflow server on Postgres) and Optuna on Postgres — latency per
            trial as the stores fill to
            `--store-trials` trials, and the reads that scale with them (`search_runs`, a study's trials).
quickstart  methods in parallel (one Tune run, free slots to any method) against methods in sequence (each
            method's MethodRun `after` the previous one: the same Tune run, the old one-method-at-a-time
            order) on the quickstart's 2 slots, replaying the grid at the grid's own per-trial seconds,
            `--reps` pairs side by side (alternating which goes first).

The 20th+ method: the registry has 19 methods (qlora included: the simulated cluster has GPUs); further
methods are copies of LoRA registered in this process only (`lora_2`, ...), so every method is a real spec
entry, study and MLflow run.

Defaults are the acceptance run (20 methods × 100 trials, 8 nodes × 8 GPUs, 8 GPUs a trial, Postgres when
`initdb` exists); on a quiet machine:

    nice -n 5 .venv/bin/python bench/scale.py                      # all parts, ~40 min
    nice -n 5 .venv/bin/python bench/scale.py --parts scale --trials 10 --pace 0.02   # a small run

Writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import io
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/ scripts share grid.py's helpers
sys.path.insert(1, str(HERE.parent))  # tests.cluster.servers: the Postgres + MLflow server the tests start

from grid import CURVE_KEYS, RESULTS, grid_spec, load_runs  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from peftsweep.spec import SweepSpec, parse_spec  # noqa: E402

GRID_METHODS = ("lora", "pissa", "milora", "dora")  # what bench/results/grid.jsonl holds
GRID_RANKS = (4, 8)
GRID_SEEDS = 3
TARGETS = {"utilisation": 0.95, "wall_over_ideal": 1.10}  # issue 21's acceptance
SAMPLE_EVERY = 50  # completed trials between driver RSS / CPU samples


# --- the sweep's methods and spec ---


def method_names(n: int) -> list[str]:
    """``n`` method names: the registered methods, then copies of LoRA registered in this process."""
    from peftsweep import search_spaces

    names = search_spaces.method_names()[:n]
    lora = search_spaces.get_method("lora")
    for k in range(2, n - len(names) + 2):
        name = f"lora_{k}"
        with contextlib.suppress(ValueError):  # registered by an earlier part of this run
            search_spaces.register(dataclasses.replace(lora, name=name))
        names.append(name)
    return names


def grid_method(methods: list[str]) -> dict[str, str]:
    """Which grid method's curves each sweep method replays: the grid's own four as themselves, the rest
    cycled over them in spec order."""
    return {m: m if m in GRID_METHODS else GRID_METHODS[i % len(GRID_METHODS)] for i, m in enumerate(methods)}


def scale_spec(args: argparse.Namespace, root: Path, stores: dict[str, str]) -> SweepSpec:
    """The quickstart's search and training settings on the simulated cluster: every method on the grid's LR
    range, `--trials` TPE trials each (TPE: bracketing would stop a method after ~7), workers of 1 GPU."""
    from peftsweep import search_spaces

    methods = []
    for name in method_names(args.methods):
        entry: dict[str, Any] = {"name": name, "lr_min": 1e-4, "lr_max": 1e-1}
        if search_spaces.get_method(name).uses_rank:
            entry["ranks"] = list(GRID_RANKS)
        methods.append(entry)
    slots = args.nodes * args.gpus_per_node // args.gpus_per_trial
    raw = grid_spec(root=root).model_dump(mode="json")
    raw["name"] = "scale"
    raw["methods"] = methods
    raw["search"] |= {"trials_per_method": args.trials, "strategy": "tpe", "lr_grid": None, "seed": args.seed}
    raw["resources"] |= {
        "workers_per_trial": args.gpus_per_trial,
        "gpus_per_worker": 1.0,
        "cpus_per_worker": 0.01,  # declared only: the trial sleeps
        "max_concurrent_trials": slots,
        "executor": "train",
        "zero_stage": 0,  # every method's cap (AdaLoRA: 0); no DeepSpeed runs here
    }
    raw["tracking"] |= stores
    return parse_spec(raw)


def trial_resources(spec: SweepSpec) -> Any:
    """One trial's reservation as `peftsweep run` makes it: an inline trial is its worker; a Ray Train trial
    is the trial driver's CPU plus one bundle per worker, packed (Ray Train's default placement)."""
    from ray import tune

    from peftsweep.orchestrator.trial import executor_for

    res = spec.resources
    worker = {"CPU": res.cpus_per_worker} | ({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})
    if executor_for(spec) == "inline":
        return tune.PlacementGroupFactory([worker])
    bundles = [{"CPU": res.trial_driver_cpus}] + [worker] * res.workers_per_trial
    return tune.PlacementGroupFactory(bundles, strategy="PACK")


# --- the trial: a replayed learning curve ---


def curves_of(runs: list[dict[str, Any]]) -> tuple[dict[str, list], list[float], dict[str, float]]:
    """Grid curves by ``method/rank/lr/seed``, the grid's LRs, and each run's measured seconds."""
    curves = {f"{r['method']}/{r['rank']}/{r['lr']:g}/{r['seed']}": r["curve"] for r in runs}
    seconds = {f"{r['method']}/{r['rank']}/{r['lr']:g}/{r['seed']}": float(r["seconds"]) for r in runs}
    return curves, sorted({r["lr"] for r in runs}), seconds


def replay_trial(
    config: dict[str, Any],
    *,
    curves: dict[str, list],
    seconds: dict[str, float],
    lrs: list[float],
    replays: dict[str, str],
    pace: float | None,
    adapters: str,
    log: str,
) -> None:
    """Sleep through the grid curve of the trial's (grid method, rank, nearest grid LR, seed), reporting at
    the spec's eval points; ``pace`` seconds per step, or None: the grid run's own seconds. Each report
    names the trial's checkpoint (a 4 KiB stand-in adapter under ``adapters``) as a Ray Train trial's
    does, so the driver logs it to MLflow. Appends its working intervals (the sleeps) to ``log`` when it
    ends, stopped early or not."""
    from ray import tune

    from peftsweep.trainables.trial_config import TRIAL_KEY
    from peftsweep.vocab import CHECKPOINT_PATH_KEY

    trial = config[TRIAL_KEY]
    every, steps = trial.spec.training.eval_every, trial.spec.training.max_steps
    lr = min(lrs, key=lambda g: abs(math.log(g / trial.lr)))
    rank = trial.rank if trial.rank in GRID_RANKS else max(GRID_RANKS)
    key = f"{replays[trial.method]}/{rank}/{lr:g}/{trial.seed % GRID_SEEDS}"
    per_step = pace if pace is not None else seconds[key] / steps
    checkpoint = Path(adapters) / trial.trial_id
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    started, work, last = time.time(), [], 0
    try:
        for point in curves[key]:
            step = int(point[0])
            if step % every and step != steps:
                continue
            t0 = time.time()
            time.sleep(per_step * (step - last))
            work.append((t0, time.time()))
            last = step
            metrics = dict(zip(CURVE_KEYS, point, strict=True)) | {"step": step}
            tune.report(metrics | {CHECKPOINT_PATH_KEY: str(checkpoint)})
    finally:
        line = {"id": trial.trial_id, "method": trial.method, "role": trial.role, "start": started}
        line |= {"end": time.time(), "work": work, "step": last}
        with open(log, "a") as out:  # one write of one line: appends of concurrent trials do not interleave
            out.write(json.dumps(line) + "\n")


def replay_trainable(
    spec: SweepSpec, runs: list[dict[str, Any]], pace: float | None, adapters: Path, log: Path
) -> Any:
    from ray import tune

    curves, lrs, seconds = curves_of(runs)
    replays = grid_method([m.name for m in spec.methods])
    fn = tune.with_parameters(
        replay_trial, curves=curves, seconds=seconds, lrs=lrs, replays=replays, pace=pace,
        adapters=str(adapters), log=str(log),
    )  # fmt: skip
    return tune.with_resources(fn, trial_resources(spec))


def read_log(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# --- driver-side probes: time the orchestrator's own calls, sample RSS and CPU ---


@dataclasses.dataclass
class Timer:
    """Every call's (when, seconds) of one driver hook."""

    calls: list[tuple[float, float]] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, float | int]:
        if not self.calls:
            return {"calls": 0}
        secs = [s for _, s in self.calls]
        k = max(1, len(secs) // 10)
        ordered = sorted(secs)
        return {
            "calls": len(secs),
            "total_s": sum(secs),
            "median_ms": 1000 * statistics.median(secs),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "max_ms": 1000 * ordered[-1],
            "first_10pct_median_ms": 1000 * statistics.median(secs[:k]),  # growth over the sweep
            "last_10pct_median_ms": 1000 * statistics.median(secs[-k:]),
        }


class Probes:
    """Wraps the orchestrator's hooks (class attributes, restored on exit) with timers."""

    def __init__(self) -> None:
        self.timers: dict[str, Timer] = {}
        self._undo: list[Callable[[], None]] = []

    def wrap(self, name: str, owner: Any, attr: str) -> None:
        real = getattr(owner, attr)
        timer = self.timers.setdefault(name, Timer())

        @functools.wraps(real)
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                timer.calls.append((t0, time.perf_counter() - t0))

        setattr(owner, attr, timed)
        self._undo.append(lambda: setattr(owner, attr, real))

    @contextlib.contextmanager
    def installed(self) -> Iterator[Probes]:
        from peftsweep.orchestrator.budget import BudgetedSearch
        from peftsweep.orchestrator.methods import SweepScheduler, SweepSearch
        from peftsweep.orchestrator.progress import SweepProgress
        from peftsweep.orchestrator.strategy import ConfirmationSearch, StrategyOptunaSearch
        from peftsweep.orchestrator.tracking import SweepTracker

        hooks = [
            ("searcher.suggest", SweepSearch, "suggest"),  # every decision of what runs next
            ("searcher.on_trial_complete", SweepSearch, "on_trial_complete"),
            ("scheduler.on_trial_result", SweepScheduler, "on_trial_result"),  # ASHA's continue/stop
            ("scheduler.choose_trial_to_run", SweepScheduler, "choose_trial_to_run"),
            ("optuna.suggest", BudgetedSearch, "suggest"),  # budget counts + ask + the sampler
            ("optuna.on_result", StrategyOptunaSearch, "on_trial_result"),  # intermediate values, signals
            ("optuna.tell", StrategyOptunaSearch, "on_trial_complete"),
            ("confirm.suggest", ConfirmationSearch, "suggest"),
            ("mlflow.start_trial", SweepTracker, "start_trial"),
            ("mlflow.log_result", SweepTracker, "log_result"),
            ("mlflow.finish_trial", SweepTracker, "finish_trial"),
            ("display.update", SweepProgress, "update"),  # on every trial event
            ("display.table", SweepProgress, "table"),  # at Live's refresh, when something changed
        ]
        for name, owner, attr in hooks:
            self.wrap(name, owner, attr)
        self._time_full_collections()
        try:
            yield self
        finally:
            for undo in reversed(self._undo):
                undo()
            self._undo.clear()

    def _time_full_collections(self) -> None:
        """The interpreter's full (generation 2) garbage collections: each stops the driver's one thread."""
        timer, started = self.timers.setdefault("gc.full_collection", Timer()), [0.0]

        def probe(phase: str, info: dict[str, int]) -> None:
            if info["generation"] != 2:
                return
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                timer.calls.append((started[0], time.perf_counter() - started[0]))

        gc.callbacks.append(probe)
        self._undo.append(lambda: gc.callbacks.remove(probe))


def memory_growth(snapshots: list[tuple[int, Any]], top: int = 12) -> dict[str, Any]:
    """Where the driver's Python allocations grew between the first and the last of ``snapshots`` ((trials
    done, tracemalloc snapshot), taken while trials run, before Tune lets go of its trials at the end): the
    traced total, the files that made the growth, and the largest allocating stacks (innermost last)."""
    skip = (tracemalloc.Filter(False, tracemalloc.__file__),)
    (n0, first), (n1, last) = snapshots[0], snapshots[-1]
    before, after = first.filter_traces(skip), last.filter_traces(skip)
    files = after.compare_to(before, "filename")
    stacks = after.compare_to(before, "traceback")
    return {
        "between_trials": [n0, n1],
        "traced_growth_mib": round(sum(st.size_diff for st in files) / 2**20, 1),
        "by_file": [
            {"mib": round(st.size_diff / 2**20, 2), "blocks": st.count_diff, "file": st.traceback[0].filename}
            for st in files[:top]
        ],
        "stacks": [
            {"kib": round(st.size_diff / 1024, 1), "blocks": st.count_diff, "stack": st.traceback.format()}
            for st in stacks[:top]
        ],
    }


def sampler_callback(every: int, trace_at: tuple[int, int] = (0, 0)) -> Any:
    """A Tune callback sampling the driver's RSS (MiB) and CPU seconds every ``every`` completed trials,
    and, when tracemalloc traces, a snapshot at each of ``trace_at`` completed trials (`memory_growth`)."""
    import psutil
    from ray import tune

    class Sampler(tune.Callback):
        def __init__(self) -> None:
            self.process = psutil.Process()
            self.done = 0
            self.samples: list[tuple[int, float, float, float]] = [self.sample()]
            self.snapshots: list[tuple[int, Any]] = []  # (trials done, tracemalloc snapshot)

        def sample(self) -> tuple[int, float, float, float]:
            cpu = self.process.cpu_times()
            return (self.done, time.time(), self.process.memory_info().rss / 2**20, cpu.user + cpu.system)

        def __reduce__(self) -> tuple:
            return (tune.Callback, ())  # Tune pickles its callbacks into the experiment state

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            if self.done % every == 0:
                self.samples.append(self.sample())
            if self.done in trace_at and tracemalloc.is_tracing():
                self.snapshots.append((self.done, tracemalloc.take_snapshot()))

        on_trial_error = on_trial_complete

    return Sampler()


# --- the stores: sqlite, or Postgres + the MLflow server ---


@contextlib.contextmanager
def stores(kind: str, base: Path) -> Iterator[dict[str, str]]:
    """`tracking` spec fields for ``kind``: sqlite (the default: nothing to set) or postgres (an MLflow server
    on Postgres, `peftsweep tracking serve`, and Optuna on Postgres: the cluster path)."""
    if kind == "sqlite":
        yield {}
        return
    from tests.cluster.servers import mlflow_server, postgres

    with postgres(base / "pg", ["mlflow", "optuna"]) as pg, mlflow_server(base, pg.url("mlflow")) as uri:
        yield {"mlflow_uri": uri, "optuna_storage": pg.url("optuna")}


def default_store() -> str:
    from tests.cluster.servers import postgres_bin

    return "postgres" if postgres_bin() is not None else "sqlite"


# --- scale: the simulated cluster ---


@contextlib.contextmanager
def simulated_cluster(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """A head (no GPU) and ``args.nodes`` nodes of declared GPUs on this machine; the driver connected."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False},
    )
    try:
        for i in range(args.nodes):
            cluster.add_node(num_cpus=1, num_gpus=args.gpus_per_node, resources={f"node_{i}": 1})
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        cluster.wait_for_nodes()
        yield {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    finally:
        ray.shutdown()
        cluster.shutdown()


def scale(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from rich.live import Live

    from peftsweep.orchestrator import sweep
    from peftsweep.orchestrator.progress import REFRESH_PER_SECOND, SweepProgress
    from peftsweep.orchestrator.tracking import SweepTracker, TrialRecorder

    work = args.work / "scale"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    runs = load_runs(args.grid)
    log = work / "trials.jsonl"
    with stores(args.store, work) as tracking, simulated_cluster(args) as resources:
        spec = scale_spec(args, work / "sweep", tracking)
        spec.tracking.root.mkdir(parents=True)
        slots = spec.resources.max_concurrent_trials
        console.print(
            f"scale: {len(spec.methods)} methods × {args.trials} trials, {slots} slots of "
            f"{args.gpus_per_trial} GPUs on {args.nodes} nodes ({resources}), store {args.store}"
        )
        search_trials = len(spec.methods) * args.trials  # confirmation runs come after most of them
        trace_at = (SAMPLE_EVERY, search_trials - SAMPLE_EVERY)
        probes, sampler = Probes(), sampler_callback(SAMPLE_EVERY, trace_at)
        if args.tracemalloc:
            tracemalloc.start(args.tracemalloc)
        with probes.installed():
            tracker = SweepTracker(spec)
            progress = SweepProgress(spec, tracker)
            null = Console(file=io.StringIO(), force_terminal=True, width=160)  # rendered, not shown
            # as `_run_locked` does
            with Live(progress, console=null, refresh_per_second=REFRESH_PER_SECOND) as live:
                progress.live = live
                trainable = replay_trainable(spec, runs, args.pace, work / "adapters", log)

                def done(method: str) -> None:
                    tracker.finish_method(method)
                    progress.method_done(method)

                t0 = time.time()
                with sweep.studies(spec) as storage:  # the wall includes Optuna's writes still queued
                    now = time.monotonic()
                    method_runs = sweep._method_runs(spec, work, tracker, False, {}, now, storage=storage)
                    sweep.run_methods(
                        spec, method_runs, [TrialRecorder(tracker, progress.update), sampler], on_done=done,
                        trainable=trainable,
                    )  # fmt: skip
                    t_run = time.time()
                tracker.flush()  # and MLflow's, queued on the tracker's writer thread
                t1 = time.time()
            tracker.finish_sweep("FINISHED")
        sampler.samples.append(sampler.sample())
        out = {
            "methods": len(spec.methods),
            "trials_per_method": args.trials,
            "nodes": args.nodes,
            "gpus": args.nodes * args.gpus_per_node,
            "gpus_per_trial": args.gpus_per_trial,
            "slots": slots,
            "pace_s_per_step": args.pace,
            "store": args.store,
        }
        out |= schedule_stats(read_log(log), slots, t0, t1)
        out["stores_catch_up_s"] = t1 - t_run  # Optuna's and MLflow's queued writes at the run's end
        out |= driver_stats(sampler.samples, t0, t1)
        out["timers"] = {name: timer.summary() for name, timer in probes.timers.items()}
        out["decisions_per_s"] = decision_rate(probes)
        out["integrity"] = integrity(spec, tracker, read_log(log))
        out["display"] = display_stats(null.file.getvalue())
        if len(sampler.snapshots) == 2:
            out["memory_growth"] = memory_growth(sampler.snapshots)
        tracemalloc.stop()
    return out


def schedule_stats(trials: list[dict[str, Any]], slots: int, t0: float, t1: float) -> dict[str, Any]:
    """Utilisation while trials remain, trials started per second, the gap a freed slot waits, and the wall
    time against the ideal schedule (every slot working all the time: the trials' working seconds / slots)."""
    if not trials:
        return {"trials_run": 0}
    starts = sorted(t["start"] for t in trials)
    ends = sorted(t["end"] for t in trials)
    lo, hi = starts[0], starts[-1]  # "while trials remain": until the last trial has started

    def inside(a: float, b: float) -> float:
        return max(0.0, min(b, hi) - max(a, lo))

    worked = sum(inside(a, b) for t in trials for a, b in t["work"])
    held = sum(inside(t["start"], t["end"]) for t in trials)
    total_work = sum(b - a for t in trials for a, b in t["work"])
    # The k-th start after the first `slots` fills the slot that the k-th end freed (starts and ends sorted).
    gaps = [s - e for s, e in zip(starts[slots:], ends, strict=False) if s >= e]
    ideal = total_work / slots
    return {
        "trials_run": len(trials),
        "wall_s": t1 - t0,
        "first_start_s": lo - t0,  # Tune's set-up before the first trial works
        "ideal_s": ideal,
        "wall_over_ideal": (t1 - t0) / ideal,
        "utilisation": worked / (slots * (hi - lo)),  # slots working while trials remain
        "held": held / (slots * (hi - lo)),  # slots holding a trial (working or waiting on the driver)
        "trials_started_per_s": (len(starts) - 1) / (hi - lo) if hi > lo else None,
        "slot_gap_median_s": statistics.median(gaps) if gaps else None,  # slot freed → next trial running
        "slot_gap_p95_s": sorted(gaps)[int(0.95 * (len(gaps) - 1))] if gaps else None,
        "trial_work_mean_s": total_work / len(trials),
        "tail_s": t1 - ends[-1],
    } | waits(trials)


def waits(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a held slot does not work: a trial blocked in a report until the driver has handled it (Tune's
    function trainables wait for that), and the time from a trial's last work to its end (a trial the
    scheduler stopped ends only when its actor is reset for the next trial, i.e. after that suggestion)."""
    steps = max(t["step"] for t in trials)
    reports = [b[0] - a[1] for t in trials for a, b in itertools.pairwise(t["work"])]
    last = [(t["end"] - t["work"][-1][1], t["step"] == steps) for t in trials if t["work"]]
    out: dict[str, Any] = {}
    for name, values in (
        ("report", reports),
        ("last_work_to_end_full", [wait for wait, full in last if full]),
        ("last_work_to_end_stopped", [wait for wait, full in last if not full]),
    ):
        ordered = sorted(values) or [0.0]
        out[f"wait_{name}_median_ms"] = 1000 * statistics.median(ordered)
        out[f"wait_{name}_p95_ms"] = 1000 * ordered[int(0.95 * (len(ordered) - 1))]
        out[f"wait_{name}_total_s"] = sum(values)
    return out


def driver_stats(samples: list[tuple[int, float, float, float]], t0: float, t1: float) -> dict[str, Any]:
    """RSS growth per 1,000 trials (after the first sample past warm-up) and CPU per trial over the sweep.
    The last sample is taken after the Tune run has ended (Tune writes its experiment state once then, every
    trial's as JSON): the growth while trials ran is reported apart from that last step."""
    first = next((s for s in samples if s[0] >= SAMPLE_EVERY), samples[0])
    last = samples[-1]
    running = samples[-2] if len(samples) > 2 else last  # the last sample while trials ran
    trials = max(1, last[0] - first[0])
    quarter = max(1, len(samples) // 4)

    def cpu_per_trial(part: list[tuple[int, float, float, float]]) -> float | None:
        if len(part) < 2 or part[-1][0] == part[0][0]:
            return None
        return (part[-1][3] - part[0][3]) / (part[-1][0] - part[0][0])

    return {
        "rss_mib": [(n, round(rss, 1)) for n, _, rss, _ in samples],
        "rss_start_mib": samples[0][2],
        "rss_end_mib": last[2],
        "rss_mib_per_1000_trials": 1000 * (last[2] - first[2]) / trials,
        "rss_mib_per_1000_trials_running": 1000 * (running[2] - first[2]) / max(1, running[0] - first[0]),
        "rss_end_of_run_mib": last[2] - running[2],
        "driver_cpu_s": last[3] - samples[0][3],
        "driver_cpu_share": (last[3] - samples[0][3]) / max(1e-9, t1 - t0),  # of one core
        "driver_cpu_ms_per_trial_first_quarter": _ms(cpu_per_trial(samples[: quarter + 1])),
        "driver_cpu_ms_per_trial_last_quarter": _ms(cpu_per_trial(samples[-quarter - 1 :])),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def display_stats(text: str) -> dict[str, Any]:
    """What the live view printed besides its table: lines a log (CI, `nohup`) would hold."""
    import re

    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    said = [line for line in plain.splitlines() if line.startswith("  ") and line.strip()]
    return {"lines": len(said), "first": said[:3], "last": said[-3:]}


def decision_rate(probes: Probes) -> dict[str, float | None]:
    """Scheduling decisions the driver can make per second of its own time (searcher + scheduler)."""
    out: dict[str, float | None] = {}
    for name in ("searcher.suggest", "scheduler.on_trial_result"):
        s = probes.timers[name].summary()
        out[name] = s["calls"] / s["total_s"] if s.get("total_s") else None
    return out


def integrity(spec: SweepSpec, tracker: Any, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Every trial that ran is exactly one finished MLflow run, and every search trial one finished Optuna
    trial: counted in the stores themselves, against the trials' own log."""
    import optuna

    from peftsweep.orchestrator.status import open_storage
    from peftsweep.orchestrator.tracking import LEVEL_TAG

    client = tracker.client
    ran = [t["id"] for t in trials]
    mlflow_runs = client.search_runs(
        [tracker.experiment_id], f"tags.`{LEVEL_TAG}` = 'trial'", max_results=50_000
    )
    by_id: dict[str, int] = {}
    for run in mlflow_runs:
        trial_id = run.data.tags.get("peftsweep.trial_id", "")
        by_id[trial_id] = by_id.get(trial_id, 0) + 1
    storage = open_storage(spec.tracking.optuna_storage_url())
    states: dict[str, int] = {}
    for m in spec.methods:
        study = optuna.load_study(study_name=f"{spec.name}/{m.name}", storage=storage)
        for t in study.get_trials(deepcopy=False):
            states[t.state.name] = states.get(t.state.name, 0) + 1
    search = sum(t["role"] == "search" for t in trials)
    return {
        "trials_logged": len(ran),
        "trials_unique": len(set(ran)),
        "search_trials": search,
        "confirm_trials": len(ran) - search,
        "mlflow_trial_runs": len(mlflow_runs),
        "mlflow_duplicated": sum(n - 1 for n in by_id.values() if n > 1),
        "mlflow_missing": sum(trial_id not in by_id for trial_id in set(ran)),
        "mlflow_unfinished": sum(r.info.status != "FINISHED" for r in mlflow_runs),
        "optuna_trials": sum(states.values()),
        "optuna_states": states,
        "optuna_lost": search - states.get("COMPLETE", 0) - states.get("PRUNED", 0),
        "ok": len(ran) == len(set(ran)) == len(mlflow_runs)
        and all(n == 1 for n in by_id.values())
        and sum(states.values()) == search == states.get("COMPLETE", 0) + states.get("PRUNED", 0),
    }


# --- stores: MLflow and Optuna latency as the stores fill ---

REPORTS = (
    25,
    50,
    75,
    100,
    125,
    150,
)  # the quickstart's eval points: one MLflow batch + one Optuna report each


def store_latency(kind: str, args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """What the driver writes for one trial — `SweepTracker.start_trial`, a `log_result` per report,
    `finish_trial` (MLflow); ask, a report per eval point, tell (Optuna) — `--store-trials` times, timed per
    trial; then the reads that grow with the stores."""
    import optuna

    from peftsweep.orchestrator import sweep
    from peftsweep.orchestrator.optuna_store import WriteBehindStorage
    from peftsweep.orchestrator.status import open_storage, sweep_status
    from peftsweep.orchestrator.tracking import SweepTracker
    from peftsweep.orchestrator.trial import TrialPlan
    from peftsweep.trainables.trial_config import TRIAL_KEY

    reads: dict[str, Any] = {}
    work = args.work / f"stores-{kind}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with stores(kind, work) as tracking:
        raw = grid_spec(root=work / "sweep").model_dump(mode="json") | {"name": "stores"}
        raw["methods"] = [m for m in raw["methods"] if m["name"] == "lora"]
        raw["tracking"] |= tracking
        raw["search"] |= {"strategy": "tpe", "lr_grid": None}  # as the scale part: TPE after the start-up
        spec = parse_spec(raw)
        spec.tracking.root.mkdir(parents=True)
        tracker = SweepTracker(spec)
        tracker.start_method("lora")
        plan = TrialPlan(spec, "lora", work)
        url = spec.tracking.optuna_storage_url()
        behind = WriteBehindStorage(open_storage(url))
        study, study_behind = (  # side by side: the store itself, and written behind (`sweep.studies`)
            optuna.create_study(
                study_name=f"stores/{name}",
                storage=storage,
                sampler=sweep.method_sampler(spec),
                direction="maximize",
            )
            for name, storage in (("lora", open_storage(url)), ("lora-behind", behind))
        )
        space = {
            "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
            "rank": optuna.distributions.CategoricalDistribution([4, 8]),
        }
        mlflow_s, optuna_s, behind_s = [], [], []
        for i in range(args.store_trials):
            behind_s.append(optuna_trial(study_behind, space, i))  # on the caller's thread
            behind.flush()  # its store writes done before the direct trial is timed, as a sweep overlaps them
            t0 = time.perf_counter()
            trial = study.ask(space)
            t1 = time.perf_counter()
            record = tracker.start_trial(
                plan.config(f"t{i:05d}", trial.params["lr"], trial.params["rank"])[TRIAL_KEY]
            )
            t2 = time.perf_counter()
            ml, ot = t2 - t1, t1 - t0
            for step in REPORTS:
                value = step / 150 * (i % 10) / 10
                t0 = time.perf_counter()
                tracker.log_result(record, {"step": step, "exact_match": value, "eval_loss": 1 - value})
                t1 = time.perf_counter()
                trial.report(value, step)
                t2 = time.perf_counter()
                ml, ot = ml + t1 - t0, ot + t2 - t1
            t0 = time.perf_counter()
            tracker.finish_trial(record, None)
            tracker.flush()  # the trial's writes done: they run on the tracker's writer thread
            t1 = time.perf_counter()
            study.tell(trial, value)
            t2 = time.perf_counter()
            mlflow_s.append(ml + t1 - t0)
            optuna_s.append(ot + t2 - t1)
            if (i + 1) % 500 == 0:
                console.print(
                    f"  {kind}: {i + 1} trials, the last 100: MLflow "
                    f"{1000 * statistics.median(mlflow_s[-100:]):.0f} ms, Optuna "
                    f"{1000 * statistics.median(optuna_s[-100:]):.0f} ms a trial, written behind "
                    f"{1000 * statistics.median(behind_s[-100:]):.1f} ms"
                )
        t0 = time.perf_counter()
        behind.close()
        reads["optuna_behind_close_s"] = time.perf_counter() - t0
        stored = optuna.load_study(study_name="stores/lora-behind", storage=url).trials
        reads["optuna_behind_stored"] = len(stored)  # every trial in the store once closed
        t0 = time.perf_counter()
        runs = tracker._children(tracker.method_runs["lora"], "trial")  # what resume and the report read
        reads["mlflow_search_runs_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        trials = study.get_trials(deepcopy=False)
        reads["optuna_get_trials_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sweep_status(spec)
        reads["peftsweep_status_s"] = time.perf_counter() - t0
        tracker.finish_method("lora")
        tracker.finish_sweep("FINISHED")
    batch = 100
    return {
        "trials": args.store_trials,
        "mlflow_runs_read": len(runs),
        "optuna_trials_read": len(trials),
        "mlflow_ms_per_trial": _batches(mlflow_s, batch),
        "optuna_ms_per_trial": _batches(optuna_s, batch),
        "mlflow_ms_median": 1000 * statistics.median(mlflow_s),
        "optuna_ms_median": 1000 * statistics.median(optuna_s),
        "optuna_behind_ms_per_trial": _batches(behind_s, batch),
        "optuna_behind_ms_median": 1000 * statistics.median(behind_s),
        "mlflow_calls_per_trial": 2 + len(REPORTS) + 2,  # create_run, params; a batch per report; tag, end
        **reads,
    }


def optuna_trial(study: Any, space: dict[str, Any], i: int) -> float:
    """Seconds one trial's Optuna calls take on the caller's thread: ask, a report per eval point, tell."""
    t0 = time.perf_counter()
    trial = study.ask(space)
    value = 0.0
    for step in REPORTS:
        value = step / 150 * (i % 10) / 10
        trial.report(value, step)
    study.tell(trial, value)
    return time.perf_counter() - t0


def _batches(seconds: list[float], size: int) -> list[tuple[int, float]]:
    """(trials in the store, median ms a trial) per ``size`` trials: growth with the store's size."""
    return [
        (i + size, round(1000 * statistics.median(seconds[i : i + size]), 2))
        for i in range(0, len(seconds), size)
    ]


# --- quickstart: methods in parallel against methods in sequence, 2 slots ---


def quickstart(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    """The quickstart's sweep replayed at the grid's own trial durations, 2 slots: every method's search in
    one Tune run sharing the slots (parallel, `peftsweep run`'s order) against each method starting only once
    the previous one is done (sequence: `MethodRun.after`, the same Tune run otherwise, so no per-method
    Tune start-up is charged to it)."""
    import ray

    pairs = []
    runs = load_runs(args.grid)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        for rep in range(args.reps):
            orders = ("parallel", "sequence") if rep % 2 == 0 else ("sequence", "parallel")
            pair = {order: quickstart_sweep(args, order, rep, runs) for order in orders}
            pair["speedup"] = pair["sequence"]["wall_s"] / pair["parallel"]["wall_s"]
            console.print(
                f"  quickstart rep {rep}: parallel {pair['parallel']['wall_s']:.0f} s "
                f"({pair['parallel']['trials_run']} trials), sequence {pair['sequence']['wall_s']:.0f} s "
                f"({pair['sequence']['trials_run']} trials): × {pair['speedup']:.2f}"
            )
            pairs.append(pair)
    finally:
        ray.shutdown()
    return {
        "reps": pairs,
        "speedup_median": statistics.median(p["speedup"] for p in pairs),
        "parallel_wall_median_s": statistics.median(p["parallel"]["wall_s"] for p in pairs),
        "sequence_wall_median_s": statistics.median(p["sequence"]["wall_s"] for p in pairs),
    }


def quickstart_sweep(
    args: argparse.Namespace, order: str, rep: int, runs: list[dict[str, Any]]
) -> dict[str, Any]:
    from peftsweep.orchestrator import sweep
    from peftsweep.orchestrator.tracking import SweepTracker, TrialRecorder

    root = args.work / f"quickstart-{order}-{rep}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    raw = grid_spec(root=root / "sweep").model_dump(mode="json")
    raw["search"]["seed"] = rep
    spec = parse_spec(raw)
    spec.tracking.root.mkdir(parents=True)
    tracker = SweepTracker(spec)
    log = root / "trials.jsonl"
    trainable = replay_trainable(spec, runs, None, root / "adapters", log)
    t0 = time.time()
    with sweep.studies(spec) as storage:
        method_runs = sweep._method_runs(spec, root, tracker, False, {}, time.monotonic(), storage=storage)
        if order == "sequence":
            for before, run in zip(method_runs, method_runs[1:], strict=False):
                run.after = before.name
        sweep.run_methods(
            spec, method_runs, [TrialRecorder(tracker)], on_done=tracker.finish_method, trainable=trainable
        )
    t1 = time.time()
    tracker.finish_sweep("FINISHED")
    stats = schedule_stats(read_log(log), spec.resources.max_concurrent_trials, t0, t1)
    keep = ("trials_run", "wall_s", "ideal_s", "utilisation", "trial_work_mean_s")
    return {k: stats[k] for k in keep} | {"methods": [m.name for m in spec.methods]}


# --- main ---


def _wait(s: dict[str, Any], key: str) -> str:
    median, p95, total = (s[f"wait_{key}_{part}"] for part in ("median_ms", "p95_ms", "total_s"))
    return f"{median:.0f} / {p95:.0f} ms ({total:.0f} s)"


def print_scale(result: dict[str, Any], console: Console) -> None:
    s = result
    table = Table(
        title=f"scale: {s['methods']} methods × {s['trials_per_method']} trials on {s['gpus']} GPUs"
    )
    for col in ("measure", "value", "target"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    rows = [
        ("trials run (search + confirm)", f"{s['trials_run']}", ""),
        ("wall / ideal schedule", f"{s['wall_over_ideal']:.3f} ({s['wall_s']:.0f} s / {s['ideal_s']:.0f} s)",
         f"≤ {TARGETS['wall_over_ideal']}"),
        ("slot utilisation while trials remain", f"{s['utilisation']:.1%} (held {s['held']:.1%})",
         f"≥ {TARGETS['utilisation']:.0%}"),
        ("trials started per second", f"{s['trials_started_per_s']:.2f}", ""),
        ("freed slot → next trial, median / p95",
         f"{s['slot_gap_median_s']:.2f} / {s['slot_gap_p95_s']:.2f} s", ""),
        *((f"held, not working: {what}, median / p95 (total)", _wait(s, key), "")
          for what, key in (("a report", "report"), ("last work → end, full", "last_work_to_end_full"),
                            ("last work → end, stopped", "last_work_to_end_stopped"))),
        ("driver RSS start → end", f"{s['rss_start_mib']:.0f} → {s['rss_end_mib']:.0f} MiB", ""),
        ("driver RSS per 1,000 trials", f"{s['rss_mib_per_1000_trials']:+.0f} MiB", "bounded"),
        ("  while trials run; once at the run's end",
         f"{s['rss_mib_per_1000_trials_running']:+.0f} MiB; {s['rss_end_of_run_mib']:+.0f} MiB", ""),
        ("driver CPU (share of a core)", f"{s['driver_cpu_s']:.0f} s ({s['driver_cpu_share']:.0%})", ""),
        ("driver CPU per trial, first / last quarter",
         f"{s['driver_cpu_ms_per_trial_first_quarter'] or 0:.0f} / "
         f"{s['driver_cpu_ms_per_trial_last_quarter'] or 0:.0f} ms", "flat"),
        ("lost or duplicated trials (MLflow, Optuna)",
         "none" if s["integrity"]["ok"] else json.dumps(s["integrity"]), "none"),
    ]  # fmt: skip
    for row in rows:
        table.add_row(*row)
    console.print(table)
    timers = Table(title="driver hooks (ms): median, p99, median of the first → last 10 % of calls")
    for col in ("hook", "calls", "median", "p99", "first → last 10 %", "total s"):
        timers.add_column(col, justify="left" if col == "hook" else "right")
    for name, t in s["timers"].items():
        if t["calls"]:
            timers.add_row(
                name, str(t["calls"]), f"{t['median_ms']:.2f}", f"{t['p99_ms']:.1f}",
                f"{t['first_10pct_median_ms']:.2f} → {t['last_10pct_median_ms']:.2f}", f"{t['total_s']:.1f}",
            )  # fmt: skip
    console.print(timers)


def print_stores(result: dict[str, Any], console: Console) -> None:
    table = Table(title="driver writes per trial (ms, median of 100 trials) as the stores fill")
    table.add_column("store")
    table.add_column("what")
    sizes = [n for n, _ in next(iter(result.values()))["mlflow_ms_per_trial"]]
    for n in sizes:
        table.add_column(f"{n}", justify="right")
    table.add_column("reads at the end (s)", justify="right")
    for kind, r in result.items():
        for what in ("mlflow", "optuna", "optuna_behind"):
            reads = {
                "mlflow": f"search_runs {r['mlflow_search_runs_s']:.1f}",
                "optuna": f"get_trials {r['optuna_get_trials_s']:.2f}, status {r['peftsweep_status_s']:.1f}",
                "optuna_behind": f"close {r['optuna_behind_close_s']:.2f} s, {r['optuna_behind_stored']} in",
            }[what]
            label = "optuna, written behind" if what == "optuna_behind" else what
            table.add_row(kind, label, *(f"{ms:.1f}" for _, ms in r[f"{what}_ms_per_trial"]), reads)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["scale", "stores", "quickstart"],
                        choices=["scale", "stores", "quickstart"])  # fmt: skip
    parser.add_argument("--methods", type=int, default=20)
    parser.add_argument("--trials", type=int, default=100, help="search trials per method")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpus-per-trial", type=int, default=8)
    parser.add_argument("--pace", type=float, default=0.05, help="seconds a replayed training step takes")
    parser.add_argument(
        "--store", choices=["sqlite", "postgres"], default=None, help="default: postgres if found"
    )
    parser.add_argument("--store-trials", type=int, default=2000, help="stores: trials written per store")
    parser.add_argument("--reps", type=int, default=3, help="quickstart: parallel/sequence pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tracemalloc", type=int, default=0, metavar="FRAMES",
        help="scale: trace the driver's allocations (slow) and list where they grew after the first "
        f"{SAMPLE_EVERY} trials, with stacks of FRAMES frames (0: off)",
    )  # fmt: skip
    parser.add_argument("--grid", type=Path, default=RESULTS / "grid.jsonl")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "peftsweep-bench-scale")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args()
    args.store = args.store or default_store()
    console = Console(width=160)
    result: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["targets"] = TARGETS
    if "scale" in args.parts:
        result["scale"] = scale(args, console)
        print_scale(result["scale"], console)
        args.out.write_text(json.dumps(result, indent=1))
    if "stores" in args.parts:
        kinds = ["sqlite"] + (["postgres"] if default_store() == "postgres" else [])
        result["stores"] = {kind: store_latency(kind, args, console) for kind in kinds}
        print_stores(result["stores"], console)
        args.out.write_text(json.dumps(result, indent=1))
    if "quickstart" in args.parts:
        result["quickstart"] = quickstart(args, console)
        q = result["quickstart"]
        console.print(
            f"quickstart, 2 slots: parallel {q['parallel_wall_median_s']:.0f} s, sequence "
            f"{q['sequence_wall_median_s']:.0f} s (median of {args.reps}): parallel is "
            f"{q['speedup_median']:.2f}× faster"
        )
    args.out.write_text(json.dumps(result, indent=1))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
