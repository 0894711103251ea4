"""The driver of one sweep, top-down: check inputs → Ray → MLflow parent run → per method: Optuna study +
Ray Tune (ASHA) → best trial per method → registry (champion) → final table.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from peftsweep import cluster, search_spaces
from peftsweep.orchestrator.priors import search_order
from peftsweep.orchestrator.status import open_storage
from peftsweep.orchestrator.trial import TrialPlan, executor_for
from peftsweep.spec import MethodSpec, SpecError, SweepSpec

if TYPE_CHECKING:
    from collections.abc import Callable

    from peftsweep.orchestrator.methods import MethodRun
    from peftsweep.orchestrator.optuna_store import WriteBehindStorage
    from peftsweep.orchestrator.tracking import GateDecision, SweepTracker, TrialRecord

# How often Tune may snapshot its experiment state during a sweep's run: in effect never (a sweep resumes from
# Optuna and MLflow, not from that state), and once when the run ends. See `_tune_env`.
TUNE_SNAPSHOT_EVERY_S = 10**9


@dataclass
class SweepResult:
    """What `run` hands back: each method's best trial and the champion."""

    experiment_id: str
    sweep_run_id: str
    registry_name: str | None
    champion: str | None  # method of the sweep's overall best (registered as champion or challenger)
    best: dict[str, dict[str, float | int | str]]  # method -> lr, rank, metric, run_id, mean, std, seeds
    seconds: float
    promoted: bool = False  # the best passed the promotion gate and is now `@champion`
    promotion_reason: str = ""
    stopped: dict[str, str] = field(default_factory=dict)  # method -> why it stopped early (its failures)
    all_failed: bool = False  # every trial of the sweep failed: nothing ran (exit 4)


def check_inputs(spec: SweepSpec) -> dict[str, dict[str, int]]:
    """Everything that can be checked before any cluster work: data files, the base model's location.

    Returns the rows per split of each data source (``data``, and ``forgetting`` when set). Every problem is
    a SpecError naming the spec field.
    """
    from peftsweep.trainables.data import DataError
    from peftsweep.trainables.formats import check_task

    sources = {"data": spec.data} | ({"forgetting": spec.forgetting} if spec.forgetting else {})
    counts: dict[str, dict[str, int]] = {}
    for section, source in sources.items():
        split = getattr(source, "split", (1.0, 0.0, 0.0))  # forgetting data is used whole
        try:
            counts[section] = check_task(
                source.task,
                source.format,
                dict(source.fields),
                split,
                getattr(source, "split_seed", 0),
                max_row_bytes=spec.data.max_row_bytes,  # one limit for all of the sweep's data
            )
        except DataError as exc:
            raise SpecError(f"{section}.task: {exc}") from None
    if counts["data"]["validation"] == 0:  # the search is judged on it; prepare_data would refuse it later
        raise SpecError(
            f"data.split: the validation split of {spec.data.task} is empty; give data.split a validation "
            "share or add a validation file"
        )
    _check_methods_fit(spec, _model_config(spec))
    return counts


def _model_config(spec: SweepSpec) -> dict[str, Any]:
    """The base model's config.json: read from its local directory, or fetched from the hub for a hub id,
    so a typo, a missing or gated model or no network fails here, naming base_model, not once per trial."""
    from peftsweep.spec import HUB_MODEL_ID
    from peftsweep.trainables.model import resolve_base_model

    try:
        base = resolve_base_model(spec.base_model)
        looks_local = base.startswith((".", "/", "~")) or Path(base).exists()
        config = Path(base).expanduser() / "config.json"
        has_config = looks_local and config.is_file()
    except FileNotFoundError as exc:
        raise SpecError(f"base_model: {exc}") from None
    except (OSError, ValueError, RuntimeError) as exc:  # ~unknown-user, a NUL byte, a name too long
        raise SpecError(f"base_model: {spec.base_model!r} is not a usable path ({exc})") from None
    if not looks_local:
        if not HUB_MODEL_ID.fullmatch(base):
            raise SpecError(
                f"base_model: {base!r} is neither a local model directory nor a hub id [owner/]name"
            )
        return _hub_config(spec, base)
    if not has_config:
        raise SpecError(f"base_model: {base} is not a model directory (no config.json)")
    try:
        model_config = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise SpecError(f"base_model: {config} is not a readable JSON file ({exc})") from None
    if not isinstance(model_config, dict):
        raise SpecError(f"base_model: {config} holds {type(model_config).__name__}, not a JSON object")
    return model_config


def _hub_config(spec: SweepSpec, model_id: str) -> dict[str, Any]:
    """A hub model's config, fetched (or read from the local hub cache) the way the trials will load it."""
    from transformers import AutoConfig

    from peftsweep.orchestrator.tracking import first_error_line
    from peftsweep.trainables.model import hub_options

    try:
        return AutoConfig.from_pretrained(model_id, **hub_options(spec)).to_dict()
    except (OSError, ValueError) as exc:  # not found, gated, offline (OSError); remote code not allowed
        raise SpecError(
            f"base_model: {model_id!r} could not be loaded from the Hugging Face Hub: "
            f"{first_error_line(str(exc))} (check the id, the network or HF_HUB_OFFLINE, and HF_TOKEN for "
            "gated models)"
        ) from None


def _check_methods_fit(spec: SweepSpec, model_config: dict[str, Any]) -> None:
    """Methods that cannot run on this architecture, and ranks that are not low-rank for its width."""
    # Methods that cannot run on this architecture (e.g. OLoRA on GPT-2's Conv1D) fail here, not in a trial.
    problems = [
        f"methods.{i}: {why}"
        for i, m in enumerate(spec.methods)
        if (why := search_spaces.get_method(m.name).rejection(model_config.get("model_type"), cuda=True))
    ]
    # A rank above the hidden size is no longer low-rank: MiLoRA fails inside the trial, PiSSA and OLoRA
    # silently cap it (trials of different ranks train the same adapter).
    width_keys = ("hidden_size", "n_embd", "d_model")  # Llama-like, GPT-2, T5-like configs
    width = next((w for k in width_keys if isinstance(w := model_config.get(k), int)), None)
    if width is not None:
        problems += [
            f"methods.{i}.ranks: rank {max(m.ranks)} exceeds the base model's hidden size {width}; "
            f"use ranks <= {width}"
            for i, m in enumerate(spec.methods)
            if m.ranks and max(m.ranks) > width and search_spaces.get_method(m.name).rank_bounded_by_width
        ]
    if problems:
        raise SpecError("\n".join(problems))


def _check_resources(spec: SweepSpec) -> None:
    from peftsweep.orchestrator.trial import executor_for

    res = spec.resources
    have = cluster.cluster_resources()
    driver = res.trial_driver_cpus if executor_for(spec) == "train" else 0.0  # inline: trial = worker
    need_cpu = driver + res.workers_per_trial * res.cpus_per_worker
    need_gpu = res.workers_per_trial * res.gpus_per_worker
    if need_cpu > have.get("CPU", 0) or need_gpu > have.get("GPU", 0):
        raise SpecError(
            f"resources: one trial needs {need_cpu:g} CPU and {need_gpu:g} GPU but the cluster has "
            f"{have.get('CPU', 0):g} CPU and {have.get('GPU', 0):g} GPU; lower workers_per_trial / "
            "cpus_per_worker / gpus_per_worker"
        )


def _plan(spec: SweepSpec, method: str, data_dir: Path) -> TrialPlan:
    """What every trial of ``method`` shares, built once on the driver (reliability drills included)."""
    from peftsweep.trainables.faults import faults_from_env

    # drills only; () unless PEFTSWEEP_FAULTS is set (tests, fault drills)
    return TrialPlan(spec, method, data_dir, tuple(faults_from_env()))


def _tune_env() -> None:
    """Tune settings for a sweep: its own progress output instead of Tune's, and no per-result JSON/CSV/
    TensorBoard files (MLflow is the record; each logger costs driver time on every result)."""
    import logging

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: Tune prints nothing; we show progress
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Tune snapshots its experiment state whenever a trial wrote keep_checkpoints checkpoints, and warns that
    # it does; a sweep resumes from Optuna and MLflow, never from that state, so the warning is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's periodic snapshot of that state ("auto": up to 5 % of the driver's time) is every trial's config,
    # last result and metric summaries as one JSON file, rewritten whole: ~66 KB a trial, 140 MB at 2,000
    # trials, during which no trial's report is handled and which it keeps in memory per trial
    # (bench/scale.py). Once, when the run ends, is enough for what a sweep reads of it (nothing).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(TUNE_SNAPSHOT_EVERY_S))
    # A failed trial's first error line is printed by our progress and its whole trace kept on its MLflow
    # run (error.txt); Tune would print every trace to the console as well.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    # Tune's result grid looks for the per-result files we turned off above, and warns per trial.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # ...and lists the failed trials at the end, which our final table and its notes already show.
    logging.getLogger("ray.tune.tune").setLevel(logging.CRITICAL)


def _worker_task(spec: SweepSpec, fn: Callable[..., Any]) -> Any:
    """``fn`` as a Ray task sized like one trial worker (its GPU too), so driver-side model work stays off
    the driver."""
    import ray

    res = spec.resources
    return ray.remote(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker)(fn)


@contextlib.contextmanager
def studies(spec: SweepSpec) -> Iterator[WriteBehindStorage]:
    """The methods' Optuna studies for one Tune run, in memory and written behind to the sweep's store
    (`optuna_store`: a suggestion and a tell took ~106 ms on Tune's one thread against Postgres, ~6 ms so).
    The store has every write when this ends, the run's failure included."""
    from peftsweep.orchestrator.optuna_store import WriteBehindStorage

    storage = WriteBehindStorage(open_storage(spec.tracking.optuna_storage_url()))
    try:
        yield storage
    except BaseException:
        with contextlib.suppress(Exception):  # the run's own error is the one to see
            storage.close()
        raise
    storage.close()


def reconcile_study(spec: SweepSpec, method: str, tracker: SweepTracker) -> tuple[int, list[dict]]:
    """Settle the trials a dead driver left RUNNING in the method's Optuna study; return how many trials of
    the budget are done (COMPLETE or PRUNED) and the killed trials' params, to be run again first.

    A RUNNING trial whose MLflow run finished (the driver died between Tune's and Optuna's bookkeeping) gets
    its recorded value, so it is neither lost nor re-run; any other becomes FAIL and its configuration is
    re-run (its work was lost). The study is the source of truth for what is done.
    """
    import optuna

    storage = open_storage(spec.tracking.optuna_storage_url())
    name = f"{spec.name}/{method}"
    if name not in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        return 0, []
    study = optuna.load_study(study_name=name, storage=storage)
    metric = spec.search.metric
    finished = [
        t
        for t in tracker.trials.values()
        if t.method == method and t.status in ("completed", "stopped_early", "diverged")
    ]
    rerun: list[dict] = []
    wanted = {"lr", "rank"} if spec.method(method).ranks else {"lr"}  # the method's search space
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        lr = trial.params.get("lr")
        match = next((t for t in finished if lr is not None and math.isclose(t.lr, lr, rel_tol=1e-9)), None)
        value = match.metrics.get(metric) if match else None
        if value is not None and math.isfinite(value):
            storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.COMPLETE, [value])
        else:
            storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            # A trial killed between Optuna's ask and its suggestions has no (or partial) params: nothing to
            # re-run, and an incomplete point would be rejected by OptunaSearch.
            if set(trial.params) >= wanted:
                rerun.append(dict(trial.params))
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=done)), rerun


def method_searcher(
    spec: SweepSpec,
    method: str,
    data_dir: Path,
    trials: int,
    deadline: float | None = None,
    lr_range: tuple[float, float] | None = None,  # a prior's range instead of the spec's
    points: list[dict] | None = None,  # configurations to try first (Optuna enqueue_trial)
    nightly: bool = False,
    storage: WriteBehindStorage | None = None,  # the sweep's `studies`; None: the store itself
) -> Any:
    """The method's search: its own Optuna study (RDB storage) behind Ray Tune's OptunaSearch, sampled by
    the spec's strategy (`strategy.LogBracketSampler`), stopped trials stored as PRUNED, with the budget of
    ``trials`` new trials (and the sweep's wall-time and trial-seconds budgets).

    ``nightly``: the study holds earlier nights' trials, already bracketed, so a nightly run continues it
    with TPE (warm-started from every earlier night) instead of finding it done at once.
    """
    import optuna

    from peftsweep.orchestrator.budget import BudgetedSearch
    from peftsweep.orchestrator.strategy import StrategyOptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    mspec, search = spec.method(method), spec.search
    lo, hi = lr_range or (mspec.lr_min, mspec.lr_max)
    space = {"lr": optuna.distributions.FloatDistribution(lo, hi, log=True)}
    if mspec.ranks:  # rank-less methods (IA3, BitFit, full FT, prompt methods) search the LR only
        space["rank"] = optuna.distributions.CategoricalDistribution(mspec.ranks)
    sampler = method_sampler(spec, nightly)
    plan = _plan(spec, method, data_dir)
    return BudgetedSearch(
        # metric/mode go to the searcher itself: with a fixed space it never reads them from TuneConfig.
        StrategyOptunaSearch(
            space,
            metric=search.metric,
            mode=search.direction,
            sampler=sampler,
            study_name=f"{spec.name}/{method}",
            storage=storage or open_storage(spec.tracking.optuna_storage_url()),
            points_to_evaluate=points or None,
            max_t=spec.training.max_steps,
        ),
        build=lambda trial_id, params, index: plan.config(
            trial_id, params["lr"], params.get("rank", 0), index=index
        ),
        max_trials=trials,
        n_startup_trials=sampler.n_startup,
        deadline=deadline,
        trial_seconds=search.max_trial_seconds_per_method,
    )


def method_sampler(spec: SweepSpec, nightly: bool = False) -> Any:
    """A method study's sampler, as the spec's search strategy says (`strategy.LogBracketSampler`)."""
    from peftsweep.orchestrator.strategy import LogBracketSampler

    search = spec.search
    return LogBracketSampler(
        n_startup=min(search.n_startup_trials, search.trials_per_method),
        resolution=search.bracket_resolution,
        then="tpe" if search.strategy == "tpe" or nightly else "bracket",
        check_ranks=search.check_ranks,
        seed=search.seed,
        grid=search.lr_grid,
    )


def method_scheduler(spec: SweepSpec) -> Any:
    """A method's early stopping: ASHA at eval points on ``search.rung_metric`` (eval_loss by default: it
    separates LRs at step 25, when exact match is still ~0), or none."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from peftsweep.vocab import direction

    search = spec.search
    if search.early_stopping != "asha":
        return FIFOScheduler()
    rung = search.rung_metric or search.metric or ""
    return ASHAScheduler(
        time_attr="step",
        metric=rung,
        mode=search.direction if rung == search.metric else direction(rung),
        max_t=spec.training.max_steps,
        grace_period=spec.training.eval_every * search.grace_period_evals,
        reduction_factor=search.reduction_factor,
    )


def run_methods(
    spec: SweepSpec,
    runs: list[MethodRun],
    callbacks: list,
    on_done: Callable[[str], None] = lambda _m: None,
    on_stop: Callable[[str, str], None] = lambda _m, _why: None,
    trainable: Any | None = None,  # a Tune trainable instead of the trial's (bench/ replays a table)
) -> None:
    """Every method's search and confirmation in one Tune run (`methods.py`): warm reused actors for inline
    trials, each method's own searcher and early stopping, ``max_concurrent_trials`` at once.

    ``trainable`` lets benchmarks drive this exact searcher + scheduler with a trainable that reads learning
    curves from a table instead of training; None trains for real.
    """
    from peftsweep.orchestrator.methods import SweepSearch

    _tune_env()
    search = SweepSearch(runs, on_done, on_stop)
    # The interpreter's full collections walk every object and stop the driver meanwhile (no trial's report
    # is handled): 0.2-0.7 s each at 2,000 trials (bench/scale.py). The objects made so far, the loaded
    # libraries' above all, live as long as the run: frozen, a full collection walks only the run's own.
    ours = gc.get_freeze_count() == 0  # unfreeze afterwards only what was frozen here
    gc.freeze()
    try:
        _tuner(spec, search, callbacks, trainable).fit()
    finally:
        if ours:
            gc.unfreeze()


def _tuner(spec: SweepSpec, search: Any, callbacks: list, trainable: Any | None) -> Any:
    """`run_methods`' Tune run: the sweep's searcher (a `methods.SweepSearch`) and per-method schedulers."""
    from ray import tune

    from peftsweep.orchestrator.methods import ForgetSummaries, SweepScheduler, UntoldEnds
    from peftsweep.orchestrator.trial import trainable as trial_trainable
    from peftsweep.orchestrator.trial import tune_run_config_extras

    return tune.Tuner(
        trainable if trainable is not None else trial_trainable(spec),
        tune_config=tune.TuneConfig(
            search_alg=search,
            scheduler=SweepScheduler(lambda _method: method_scheduler(spec)),
            num_samples=-1,  # the searcher's budgets decide; it says FINISHED when every method is done
            max_concurrent_trials=spec.resources.max_concurrent_trials,
            reuse_actors=True,  # inline: the warm worker; train: the light process that drives Ray Train
            trial_dirname_creator=lambda trial: f"{trial.trainable_name}_{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(spec.tracking.ray_storage / "tune"),
            callbacks=[*callbacks, UntoldEnds(search, callbacks), ForgetSummaries()],
            verbose=0,
            **tune_run_config_extras(spec),
        ),
    )


def _gate(spec: SweepSpec, tracker: SweepTracker, data_dir: Path) -> Callable[[str, str], GateDecision]:
    """The promotion gate, evaluating adapters in a Ray task sized like one trial worker (GPU if trials have
    one), so the driver stays light."""
    import ray

    from peftsweep.orchestrator.promotion import run_gate
    from peftsweep.trainables.metrics import evaluate_adapter

    task = _worker_task(spec, evaluate_adapter)

    def evaluate(spec: SweepSpec, data: str, adapter: str) -> dict[str, float]:
        return ray.get(task.remote(spec, data, adapter))

    return lambda name, run_id: run_gate(spec, tracker.client, name, run_id, str(data_dir), evaluate)


def _curvatures(spec: SweepSpec, data_dir: Path, console: Console) -> dict[str, float]:
    """λ_max at init per method, each probed in a Ray task sized like one trial worker."""
    import ray

    from peftsweep.orchestrator.priors import probe_curvature

    task = _worker_task(spec, probe_curvature)
    with console.status("probing each method's curvature at init (top Hessian eigenvalue)…"):
        refs = {m.name: task.remote(spec, str(data_dir), m.name) for m in spec.methods}
        values = {name: float(ray.get(ref)) for name, ref in refs.items()}
    console.print("curvature λ_max: " + ", ".join(f"{m} {v:.3g}" for m, v in values.items()))
    return values


def _prior(
    spec: SweepSpec,
    method: str,
    earlier: list[MethodSpec],
    tracker: SweepTracker,
    curvature: dict[str, float],
) -> tuple[tuple[float, float] | None, list[dict] | None]:
    """(LR range, points to try first) that ``search.lr_prior`` gives this method; (None, None) without."""
    from peftsweep.orchestrator.priors import (
        centred_range,
        reference_method,
        transfer_points,
        usable_curvature,
    )

    ref = reference_method(spec)
    if method == ref or method not in curvature:
        if method in curvature:
            tracker.note_method(method, {"curvature_lambda": curvature[method]}, {})
        return None, None
    if not usable_curvature(curvature[ref]) or not usable_curvature(curvature[method]):
        # The probe's top eigenvalue can be negative (PiSSA/MiLoRA at init sit near a saddle on the built-in
        # task): no stability scale, and a negative ratio would give a negative LR range. The spec's range.
        tracker.note_method(
            method,
            {"curvature_lambda": curvature[method]},
            {"lr_prior": f"none: λ_max {curvature[method]:.3g} (reference {curvature[ref]:.3g}) is not > 0"},
        )
        return None, None
    ratio = curvature[ref] / curvature[method]
    metrics = {"curvature_lambda": curvature[method], "lr_prior_ratio": ratio}
    if spec.search.lr_prior == "curvature":
        ref_score = tracker.method_score(ref)
        if ref_score is None:
            return None, None  # the reference found nothing to centre on: the spec's range
        lr_range = centred_range(spec.method(method), ref_score.lr * ratio)
        tracker.note_method(
            method, metrics, {"lr_prior": f"curvature range {lr_range[0]:.3g}..{lr_range[1]:.3g}"}
        )
        return lr_range, None
    bests = [
        (score.lr * curvature[m.name] / curvature[method], score.rank)
        for m in earlier
        if usable_curvature(curvature.get(m.name)) and (score := tracker.method_score(m.name)) is not None
    ]
    points = transfer_points(spec.method(method), bests, 1.0)
    tracker.note_method(method, metrics, {"lr_prior": f"transfer {points}"})
    return None, points


def _write_report(spec: SweepSpec, sweep_run_id: str, curvature: dict[str, float], console: Console) -> None:
    """The sweep's report (also `peftsweep report`); a report problem never fails a finished sweep."""
    from peftsweep.orchestrator.report import build_report

    try:
        out = spec.tracking.root / "reports" / sweep_run_id
        report = build_report(spec, out, sweep_run_id, curvature or None)
    except Exception as exc:  # noqa: BLE001 - the sweep's results are safe in MLflow; say what went wrong
        console.print(f"[yellow]report not written: {exc}[/]")
        return
    if report.finding:
        console.print(report.finding, highlight=False)
    console.print(f"report: {report.html}", highlight=False)


def _disk_usage(spec: SweepSpec) -> str:
    """What the sweep's root holds, by part: MLflow's adapters, Ray's checkpoints, the data cache."""
    root = spec.tracking.root

    def size(path: Path) -> int:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0

    parts = {
        "adapters (MLflow)": size(spec.tracking.artifact_root),
        "trial checkpoints (Ray)": size(spec.tracking.ray_storage),
        "data cache": size(root / "cache"),
    }
    total = size(root)
    return (
        f"{total / 2**20:.1f} MiB under {root} ("
        + ", ".join(f"{name} {value / 2**20:.1f} MiB" for name, value in parts.items())
        + ")"
    )


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


def _open_stores(spec: SweepSpec) -> None:
    """Create the MLflow and Optuna tables of a new sqlite store (MLflow's migrations take ~1.5 s) without
    creating any run or study; on a store that exists, or a server, one cheap query each."""
    from mlflow.tracking import MlflowClient

    MlflowClient(spec.tracking.mlflow_tracking_uri()).search_experiments(max_results=1)
    open_storage(spec.tracking.optuna_storage_url())


def _prepare_while_ray_starts(spec: SweepSpec, address: str | None, console: Console) -> tuple[Path, bool]:
    """The data tokenised and the stores opened in a thread while Ray starts, since neither needs the other.

    Why: Ray's start (~4 s) mostly waits for its processes, and tokenising (~4 s on a first run) and the
    stores' tables (~1.5 s) mostly compute, so overlapping them takes ~4 s off the cold start
    (bench/overhead.py). The inputs were checked before (`check_inputs`), so a failure here is rare; if
    it happens, Ray is stopped before the error is raised. Returns the data directory and whether this call
    started Ray (see `cluster.connect`).
    """
    from concurrent.futures import ThreadPoolExecutor

    def prepare() -> Path:
        data_dir = _prepare(spec, console)
        _open_stores(spec)
        return data_dir

    # One thread: a second one for the stores made Ray's start slower on 2 cores and gained nothing.
    with ThreadPoolExecutor(1, thread_name_prefix="peftsweep-prepare") as pool:
        prepared = pool.submit(prepare)
        started = cluster.connect(address, dashboard=executor_for(spec) == "train")
        try:
            return prepared.result(), started
        except BaseException:
            if started:
                cluster.disconnect()
            raise


def confirm_searcher(spec: SweepSpec, method: str, tracker: SweepTracker, data_dir: Path) -> Any:
    """The method's top configurations re-run with extra seeds, raced (`strategy.ConfirmationSearch`), or
    None when the spec asks for none.

    The plan is a function of the recorded runs, so a resumed sweep does not repeat the runs it has.
    Confirmation trials are Tune trials like the search's, tagged ``peftsweep.role=confirm``; Optuna's study
    sees only the search.
    """
    from peftsweep.orchestrator.strategy import ConfirmationSearch

    search = spec.search
    if not search.confirm_seeds:
        return None
    plan = _plan(spec, method, data_dir)
    return ConfirmationSearch(
        lambda: tracker.records(method),
        lambda trial_id, p, _index: plan.config(trial_id, p["lr"], p["rank"], seed=p["seed"], role="confirm"),
        top_k=search.confirm_top_k,
        extra_seeds=search.confirm_seeds,
        base_seed=spec.training.seed,
        direction=search.direction,
        eta=search.confirm_eta,
    )


def run_sweep(
    spec: SweepSpec,
    *,
    address: str | None = None,
    console: Console | None = None,
    resume: bool = False,
    nightly: bool = False,
) -> SweepResult:
    """Run the whole sweep; nothing starts when the spec's inputs are bad.

    ``resume``: continue the latest run of this spec after its driver died — finished trials count against
    each method's budget and are not re-run; trials it left RUNNING are settled in Optuna and MLflow.

    ``nightly`` (`peftsweep schedule`'s runs): a new sweep run tagged ``peftsweep.nightly=<UTC date>``. It
    needs nothing else: OptunaSearch opens each method's study with ``load_if_exists=True``
    (`_search_method`), so every night adds ``trials_per_method`` new trials to the same studies and TPE is
    warm-started from all earlier nights' trials; the champion changes only through the promotion gate.

    Every run, resumes included, holds the sweep's lock (`lock.sweep_lock`), taken once the inputs are
    checked and before any Ray work: a second driver on the same studies would corrupt them.
    """
    from peftsweep.orchestrator.lock import sweep_lock
    from peftsweep.orchestrator.tracking import NIGHTLY_TAG

    console = console or Console()
    t0 = time.monotonic()
    check_inputs(spec)
    spec.tracking.root.mkdir(parents=True, exist_ok=True)
    tags = {NIGHTLY_TAG: datetime.now(UTC).date().isoformat()} if nightly else None
    with sweep_lock(spec, warn=lambda line: console.print(f"[yellow]{escape(line)}[/]", highlight=False)):
        return _run_locked(spec, address, console, resume, tags, t0)


def _method_runs(
    spec: SweepSpec,
    data_dir: Path,
    tracker: SweepTracker,
    resume: bool,
    curvature: dict[str, float],
    t0: float,
    nightly: bool = False,
    storage: WriteBehindStorage | None = None,  # the run's `studies`
) -> list[MethodRun]:
    """Each method's part of the one Tune run: its search (budget left, LR prior, killed configurations
    first on resume) and its confirmation, started when their inputs are known."""
    from peftsweep.orchestrator.methods import MethodRun
    from peftsweep.orchestrator.priors import reference_method

    total = spec.search.max_wall_time_s
    deadline = t0 + total if total is not None else None
    reference = reference_method(spec) if spec.search.lr_prior != "none" else None

    def start_search(method: str) -> Any:
        done, rerun = reconcile_study(spec, method, tracker) if resume else (0, [])
        left = spec.search.trials_per_method - done
        if left <= 0:
            return None
        finished = [m for m in search_order(spec) if tracker.method_score(m.name) is not None]
        lr_range, points = _prior(spec, method, finished, tracker, curvature)
        points = (rerun + (points or []))[:left] or None  # killed configurations first
        return method_searcher(spec, method, data_dir, left, deadline, lr_range, points, nightly, storage)

    def start_confirm(method: str) -> Any:
        return confirm_searcher(spec, method, tracker, data_dir)

    def stop(method: str) -> str | None:
        k = spec.search.stop_after_failures
        return tracker.failure_streak(method, k) if k is not None else None

    for mspec in spec.methods:
        tracker.start_method(mspec.name)
    return [
        MethodRun(
            m.name,
            start_search=lambda name=m.name: start_search(name),
            start_confirm=lambda name=m.name: start_confirm(name),
            stop=lambda name=m.name: stop(name),
            after=reference if reference not in (None, m.name) else None,
        )
        for m in search_order(spec)
    ]


def _run_locked(
    spec: SweepSpec,
    address: str | None,
    console: Console,
    resume: bool,
    tags: dict[str, str] | None,
    t0: float,
) -> SweepResult:
    """`run_sweep` under the sweep's lock."""
    from peftsweep.orchestrator.progress import REFRESH_PER_SECOND, SweepProgress
    from peftsweep.orchestrator.tracking import SweepTracker, TrialRecorder
    from peftsweep.orchestrator.trial import describe

    console.print(
        f"[bold]peftsweep[/] {spec.name}: {len(spec.methods)} method(s) × "
        f"{spec.search.trials_per_method} trials → {spec.tracking.root}"
    )
    names = ", ".join(m.name for m in spec.methods)
    console.print(f"trials of {names}: {describe(spec)}", highlight=False)
    data_dir, started = _prepare_while_ray_starts(spec, address, console)
    tracker = None
    curvature: dict[str, float] = {}
    try:
        _check_resources(spec)
        if (nodes := cluster.check_multinode(spec)) > 1:
            console.print(f"cluster: trials run on {nodes} nodes; tracking.root is shared by all of them")
        tracker = SweepTracker(spec, resume=resume, tags=tags)
        tracker.log_data(data_dir)
        if resume:
            console.print(
                f"resuming sweep run {tracker.sweep_run_id}: {len(tracker.trials)} finished trial(s) kept, "
                f"{len(tracker.killed)} left running by the dead driver marked KILLED"
            )
        progress = SweepProgress(spec, tracker)
        # The progress renders itself at Live's refresh rate (never per Tune event: progress.py).
        with Live(progress, console=console, refresh_per_second=REFRESH_PER_SECOND) as live:
            progress.live = live
            curvature = _curvatures(spec, data_dir, console) if spec.search.lr_prior != "none" else {}
            recorder = TrialRecorder(tracker, progress.update)

            def stopped(method: str, why: str) -> None:
                k = spec.search.stop_after_failures
                live.console.print(
                    f"[yellow]{method}: stopped after its first {k} trials all failed with: "
                    f"{escape(why)}[/]; the sweep goes on with the other methods",
                    highlight=False,
                )

            def done(method: str) -> None:
                tracker.finish_method(method)
                progress.method_done(method)

            with studies(spec) as storage:
                runs = _method_runs(spec, data_dir, tracker, resume, curvature, t0, tags is not None, storage)
                run_methods(spec, runs, [recorder], on_done=done, on_stop=stopped)
            live.update(progress.table())
            stops = {run.name: run.stopped for run in runs if run.stopped}
        console.print()
        registered = tracker.register(_gate(spec, tracker, data_dir))
        tracker.finish_sweep("FINISHED")
    except BaseException:
        if tracker is not None:
            tracker.finish_sweep("FAILED")
        if started:
            cluster.disconnect()
        raise
    # Ray is not needed past the registry: it stops while the results are printed and the report written.
    stopping = cluster.Disconnecting() if started else None
    try:
        return _conclude(spec, tracker, registered, stops, curvature, t0, console)
    finally:
        if stopping is not None:
            stopping.join()


def _conclude(
    spec: SweepSpec,
    tracker: SweepTracker,
    registered: tuple[str, TrialRecord, GateDecision] | None,
    stops: dict[str, str],
    curvature: dict[str, float],
    t0: float,
    console: Console,
) -> SweepResult:
    """The sweep's result, its final table and verdicts, the report, and the champion line."""
    bests = {m.name: b for m in spec.methods if (b := tracker.best_trial(m.name)) is not None}
    metric = spec.search.metric
    result = SweepResult(
        experiment_id=tracker.experiment_id,
        sweep_run_id=tracker.sweep_run_id,
        registry_name=registered[0] if registered else None,
        champion=registered[1].method if registered else None,
        promoted=registered[2].promoted if registered else False,
        promotion_reason=registered[2].reason if registered else "",
        best={
            m: {
                "lr": b.lr,
                "rank": b.rank,
                metric: b.metrics[metric],
                "run_id": b.run_id,
                "mean": score.mean,
                "std": score.std,
                "seeds": score.n,
            }
            for m, b in bests.items()
            if (score := tracker.method_score(m)) is not None
        },
        seconds=time.monotonic() - t0,
        stopped=stops,
        all_failed=bool(tracker.trials) and all(t.status == "failed" for t in tracker.trials.values()),
    )
    console.print(final_table(spec, tracker, result))
    for line in verdict_notes(tracker):
        console.print(f"  {line}", highlight=False)
    for method, why in result.stopped.items():
        console.print(f"[yellow]{method}: stopped early, its first trials all failed with: {escape(why)}[/]")
    _write_report(spec, tracker.sweep_run_id, curvature, console)
    console.print(f"disk: {_disk_usage(spec)}", highlight=False)
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
    elif result.all_failed:
        reasons = sorted({t.failure for t in tracker.trials.values()})
        console.print(f"[red]every trial failed ({len(tracker.trials)}); nothing registered. Errors:[/]")
        for reason in reasons:
            console.print(f"  {escape(reason)}", highlight=False)
    else:
        console.print("[red]no trial produced an adapter: nothing registered[/]")
    return result


def final_table(spec: SweepSpec, tracker: SweepTracker, result: SweepResult) -> Table:
    """Each method's best configuration, its score over seeds, whether its optimum is bracketed, and the
    verdict against the best method, all from `scoring` (the rule the registry and the report use); the
    verdicts' numbers are in `verdict_notes`."""
    from peftsweep.orchestrator.strategy import bracket_text, study_bracket

    metric, search = spec.search.metric, spec.search
    verdicts = tracker.verdicts()
    storage = open_storage(spec.tracking.optuna_storage_url())
    table = Table(title=f"sweep {spec.name}: best config per method ({metric}, {search.direction})")
    columns = ("method", "best lr", "rank", f"{metric} mean±std (seeds)", "bracketed", "verdict")
    for col in (*columns, "trials + confirm", "stopped / diverged / failed"):
        table.add_column(col, justify="left" if col in ("method", "verdict", "bracketed") else "right")
    for mspec in spec.methods:
        trials = [t for t in tracker.trials.values() if t.method == mspec.name]
        best, verdict = result.best.get(mspec.name), verdicts[mspec.name]
        bracket = study_bracket(
            storage, f"{spec.name}/{mspec.name}", search.bracket_resolution, search.lr_grid
        )
        counts = [sum(t.status == s for t in trials) for s in ("stopped_early", "diverged", "failed")]
        table.add_row(
            mspec.name + (" ★" if mspec.name == result.champion else ""),
            f"{best['lr']:.2e}" if best else "-",
            str(best["rank"]) if best and best["rank"] else "-",  # rank 0: the method has none
            f"{best['mean']:.3f}±{best['std']:.3f} ({best['seeds']})" if best else "-",
            bracket_text(bracket),
            _verdict_text(verdict),
            f"{sum(t.role == 'search' for t in trials)} + {sum(t.role == 'confirm' for t in trials)}",
            " / ".join(map(str, counts)),
        )
    return table


def _verdict_text(verdict: Any) -> str:
    """The verdict in a table cell: 'best', 'tie', 'tie (best mean)', 'worse (-0.210)' or 'no result'."""
    if verdict.verdict == "worse":
        return f"worse ({-verdict.gap:+.3f})"
    if verdict.verdict == "tie" and verdict.gap == 0.0:
        return "tie (best mean)"
    return verdict.verdict


def verdict_notes(tracker: SweepTracker) -> list[str]:
    """One line per method under the final table: the test behind its verdict (scoring.verdicts)."""
    return [f"{m}: {v.verdict}: {v.reason}" for m, v in tracker.verdicts().items()]
