"""The driver of one sweep, top-down: check inputs → Ray → MLflow parent run → per method: Optuna study +
Ray Tune (ASHA) → best trial per method → registry (champion) → final table.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.table import Table

from peftsweep import cluster, search_spaces
from peftsweep.spec import SpecError, SweepSpec

if TYPE_CHECKING:
    from collections.abc import Callable

    from peftsweep.orchestrator.promotion import GateDecision
    from peftsweep.orchestrator.tracking import SweepTracker


@dataclass
class SweepResult:
    """What `run` hands back: each method's best trial and the champion."""

    experiment_id: str
    sweep_run_id: str
    registry_name: str | None
    champion: str | None  # method of the sweep's overall best (registered as champion or challenger)
    best: dict[str, dict[str, float | int | str]]  # method -> lr, rank, metric, run_id
    seconds: float
    promoted: bool = False  # the best passed the promotion gate and is now `@champion`
    promotion_reason: str = ""


def check_inputs(spec: SweepSpec) -> dict[str, dict[str, int]]:
    """Everything that can be checked before any cluster work: data files, the base model's location.

    Returns the rows per split of each data source (``data``, and ``forgetting`` when set).
    """
    from peftsweep.trainables.data import DataError
    from peftsweep.trainables.formats import check_task
    from peftsweep.trainables.loop import resolve_base_model

    sources = {"data": spec.data} | ({"forgetting": spec.forgetting} if spec.forgetting else {})
    counts: dict[str, dict[str, int]] = {}
    for section, source in sources.items():
        split = getattr(source, "split", (1.0, 0.0, 0.0))  # forgetting data is used whole
        try:
            counts[section] = check_task(
                source.task, source.format, dict(source.fields), split, getattr(source, "split_seed", 0)
            )
        except DataError as exc:
            raise SpecError(f"{section}.task: {exc}") from None
    try:
        base = resolve_base_model(spec.base_model)
    except FileNotFoundError as exc:
        raise SpecError(f"base_model: {exc}") from None
    looks_local = base.startswith((".", "/", "~")) or Path(base).exists()
    config = Path(base).expanduser() / "config.json"
    if looks_local and not config.is_file():
        raise SpecError(f"base_model: {base} is not a model directory (no config.json)")
    # Methods that cannot run on this architecture (e.g. OLoRA on GPT-2's Conv1D) fail here, not in a trial.
    # A hub id's architecture is only known once a worker loads it.
    if looks_local:
        model_type = json.loads(config.read_text()).get("model_type")
        problems = [
            f"methods.{i}: {why}"
            for i, m in enumerate(spec.methods)
            if (why := search_spaces.get_method(m.name).rejection(model_type, cuda=True))
        ]
        if problems:
            raise SpecError("\n".join(problems))
    return counts


def _check_resources(spec: SweepSpec) -> None:
    res = spec.resources
    have = cluster.cluster_resources()
    need_cpu = res.trial_driver_cpus + res.workers_per_trial * res.cpus_per_worker
    need_gpu = res.workers_per_trial * res.gpus_per_worker
    if need_cpu > have.get("CPU", 0) or need_gpu > have.get("GPU", 0):
        raise SpecError(
            f"resources: one trial needs {need_cpu:g} CPU and {need_gpu:g} GPU but the cluster has "
            f"{have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU; lower workers_per_trial / "
            "cpus_per_worker / gpus_per_worker"
        )


def _search_method(spec: SweepSpec, method: str, callbacks: list, data_dir: Path) -> None:
    """One Optuna study (RDB storage) per method, searched by Ray Tune with ASHA among this method only."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: Tune prints nothing; we show progress
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from peftsweep.orchestrator.trial import tune_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    mspec, search, res = spec.method(method), spec.search, spec.resources
    space = {"lr": optuna.distributions.FloatDistribution(mspec.lr_min, mspec.lr_max, log=True)}
    if mspec.ranks:  # rank-less methods (IA3, BitFit, full FT, prompt methods) search the LR only
        space["rank"] = optuna.distributions.CategoricalDistribution(mspec.ranks)
    # metric/mode go to the searcher itself: with a fixed space it never reads them from TuneConfig.
    searcher = OptunaSearch(
        space,
        metric=search.metric,
        mode=search.direction,
        sampler=optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=search.n_startup_trials),
        study_name=f"{spec.name}/{method}",
        storage=optuna.storages.RDBStorage(spec.tracking.optuna_storage_url()),
    )
    scheduler = (
        ASHAScheduler(
            time_attr="step",
            metric=search.metric,
            mode=search.direction,
            max_t=spec.training.max_steps,
            grace_period=spec.training.eval_every * search.grace_period_evals,
            reduction_factor=search.reduction_factor,
        )
        if search.early_stopping == "asha"
        else FIFOScheduler()
    )
    trainable = tune.with_parameters(
        tune_trial, spec_json=spec.model_dump(mode="json"), method=method, data_dir=str(data_dir)
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": res.trial_driver_cpus}),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=search.trials_per_method,
            max_concurrent_trials=res.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=f"{spec.name}-{method}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(spec.tracking.ray_storage / "tune"),
            callbacks=callbacks,
            verbose=0,
        ),
    )
    tuner.fit()


def _gate(spec: SweepSpec, tracker: SweepTracker, data_dir: Path) -> Callable[[str, str], GateDecision]:
    """The promotion gate, evaluating adapters in a Ray task sized like one trial worker (GPU if trials have
    one), so the driver stays light."""
    import ray

    from peftsweep.orchestrator.promotion import run_gate
    from peftsweep.trainables.metrics import evaluate_adapter

    res = spec.resources
    task = ray.remote(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker)(evaluate_adapter)

    def evaluate(spec_json: dict, data: str, adapter: str) -> dict[str, float]:
        return ray.get(task.remote(spec_json, data, adapter))

    return lambda name, run_id: run_gate(spec, tracker.client, name, run_id, str(data_dir), evaluate)


def _prepare(spec: SweepSpec, console: Console) -> Path:
    """Tokenize the data once for the whole sweep (cached across runs of the same spec and files)."""
    from peftsweep.trainables.data import DataError
    from peftsweep.trainables.prepared import prepare_data

    t0 = time.monotonic()
    with console.status("preparing data (tokenised once per sweep)…"):
        try:
            data_dir = prepare_data(spec)
        except DataError as exc:
            raise SpecError(f"data.task: {exc}") from None
    counts = json.loads((data_dir / "DONE").read_text())
    console.print(
        "data: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" rows ({time.monotonic() - t0:.1f} s)"
    )
    return data_dir


def run_sweep(spec: SweepSpec, *, address: str | None = None, console: Console | None = None) -> SweepResult:
    """Run the whole sweep; nothing starts when the spec's inputs are bad."""
    from peftsweep.orchestrator.progress import SweepProgress
    from peftsweep.orchestrator.tracking import SweepTracker, TrialRecorder

    console = console or Console()
    t0 = time.monotonic()
    check_inputs(spec)
    spec.tracking.root.mkdir(parents=True, exist_ok=True)
    data_dir = _prepare(spec, console)
    console.print(
        f"[bold]peftsweep[/] {spec.name}: {len(spec.methods)} method(s) × "
        f"{spec.search.trials_per_method} trials → {spec.tracking.root}"
    )
    started = cluster.connect(address)
    tracker = None
    try:
        _check_resources(spec)
        tracker = SweepTracker(spec)
        progress = SweepProgress(spec, tracker)
        with Live(progress.table(), console=console, refresh_per_second=2) as live:
            progress.live = live
            for mspec in spec.methods:
                tracker.start_method(mspec.name)
                progress.running = mspec.name
                live.update(progress.table())
                _search_method(
                    spec, mspec.name, [TrialRecorder(tracker, mspec.name, progress.update)], data_dir
                )
                tracker.finish_method(mspec.name)
            progress.running = None
            live.update(progress.table())
        console.print()
        bests = {m.name: b for m in spec.methods if (b := tracker.best_trial(m.name)) is not None}
        registered = tracker.register(bests, _gate(spec, tracker, data_dir))
        tracker.finish_sweep("FINISHED")
    except BaseException:
        if tracker is not None:
            tracker.finish_sweep("FAILED")
        raise
    finally:
        if started:
            cluster.disconnect()

    metric = spec.search.metric
    result = SweepResult(
        experiment_id=tracker.experiment_id,
        sweep_run_id=tracker.sweep_run_id,
        registry_name=registered[0] if registered else None,
        champion=registered[1].method if registered else None,
        promoted=registered[2].promoted if registered else False,
        promotion_reason=registered[2].reason if registered else "",
        best={
            m: {"lr": b.lr, "rank": b.rank, metric: b.metrics[metric], "run_id": b.run_id}
            for m, b in bests.items()
        },
        seconds=time.monotonic() - t0,
    )
    console.print(final_table(spec, tracker, result))
    if result.champion and result.promoted:
        console.print(
            f"champion: [bold]{result.champion}[/] → models:/{result.registry_name}@champion "
            f"({result.promotion_reason}; {result.seconds:.0f} s)"
        )
    elif result.champion:
        console.print(
            f"challenger: [bold]{result.champion}[/] → models:/{result.registry_name}@challenger, not "
            f"promoted: {result.promotion_reason} ({result.seconds:.0f} s)"
        )
    else:
        console.print("[red]no trial produced an adapter: nothing registered[/]")
    return result


def final_table(spec: SweepSpec, tracker: SweepTracker, result: SweepResult) -> Table:
    metric = spec.search.metric
    table = Table(title=f"sweep {spec.name}: best per method ({metric}, {spec.search.direction})")
    for col in ("method", "best lr", "best rank", metric, "trials", "stopped early", "diverged", "failed"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for mspec in spec.methods:
        trials = [t for t in tracker.trials.values() if t.method == mspec.name]
        best = result.best.get(mspec.name)
        mark = " ★" if mspec.name == result.champion else ""
        table.add_row(
            mspec.name + mark,
            f"{best['lr']:.2e}" if best else "-",
            str(best["rank"]) if best and best["rank"] else "-",  # rank 0: the method has none
            f"{best[metric]:.3f}" if best else "-",
            str(len(trials)),
            str(sum(t.status == "stopped_early" for t in trials)),
            str(sum(t.status == "diverged" for t in trials)),
            str(sum(t.status == "failed" for t in trials)),
        )
    return table
