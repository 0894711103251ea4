"""A Tune trial: which executor runs it, the trial configurations the driver builds, and the Tune trainable.

Two executors, one loop (`trainables.loop`):
- ``inline``: the loop runs inside the Tune function trial, on actors Tune reuses across trials
  (``reuse_actors``), so imports and prepared data are paid once per concurrency slot, not once per trial.
- ``train``: the Tune trial builds and fits a Ray Train ``TorchTrainer`` whose workers run the loop with
  DeepSpeed ZeRO across them; `TuneReportCallback` forwards rank 0's reports to Tune.
``resources.executor: auto`` is inline for one worker per trial and train for more.
"""

from __future__ import annotations

import itertools
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from peftsweep.spec import SweepSpec
from peftsweep.trainables.faults import fault_for
from peftsweep.trainables.trial_config import TRIAL_KEY, TrialConfig, train_run_dir
from peftsweep.vocab import TRAINER_STATE, TrialRole

ExecutorName = Literal["inline", "train"]

# Ray Train V2 knobs for the train executor's fixed cost (measured in bench/overhead.py, issue 17): the
# controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), and a report or the
# end of a trial waits for the next poll; the preemption watcher is one more process per trial that a sweep
# on a fixed cluster does not use. Set only where the user has not set them.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def executor_for(spec: SweepSpec) -> ExecutorName:
    """Where a trial of ``spec`` runs its loop (``resources.executor``; ``auto`` as the module says)."""
    res = spec.resources
    if res.executor != "auto":
        return res.executor
    return "inline" if res.workers_per_trial == 1 else "train"


def describe(spec: SweepSpec) -> str:
    """One line for `run`: how each trial of this sweep runs."""
    from peftsweep.trainables.engine import engine_for

    res, engine = spec.resources, engine_for(spec)
    if executor_for(spec) == "inline":
        return f"inline (loop inside the Tune trial, warm reused actors), {engine} engine"
    return f"train (Ray Train TorchTrainer, {res.workers_per_trial} worker(s) a trial), {engine} engine"


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of one method shares, built once on the driver; `config` makes one trial's."""

    spec: SweepSpec
    method: str
    data_dir: Path
    faults: tuple[dict[str, Any], ...] = ()  # reliability drills (trainables.faults); () in real sweeps

    def config(
        self,
        trial_id: str,
        lr: float,
        rank: int,
        *,
        seed: int | None = None,
        role: TrialRole = "search",
        index: int = -1,
    ) -> dict[str, Any]:
        """The Tune config of one trial: its `TrialConfig` under `TRIAL_KEY`, plus its fields for display.

        ``index``: the trial's creation order among the method's search trials (which drill it gets).
        """
        fault = fault_for(list(self.faults), self.method, index) if role == "search" and self.faults else None
        if fault is not None:
            fault = replace(fault, marker=str(train_run_dir(self.spec, trial_id) / "fault-fired"))
        trial = TrialConfig(
            spec=self.spec,
            method=self.method,
            lr=float(lr),
            rank=int(rank),
            seed=self.spec.training.seed if seed is None else int(seed),
            data_dir=self.data_dir,
            trial_id=trial_id,
            role=role,
            fault=fault,
        )
        return {**trial.display(), TRIAL_KEY: trial}


def trainable(spec: SweepSpec) -> Any:
    """The Tune trainable of every trial of this sweep, with the resources its executor needs."""
    from ray import tune

    res = spec.resources
    if executor_for(spec) == "inline":  # the trial is the worker
        resources = {"cpu": res.cpus_per_worker}
        if res.gpus_per_worker:
            resources["gpu"] = res.gpus_per_worker
    else:  # the trial only drives a Ray Train job, whose workers reserve their own resources
        resources = {"cpu": res.trial_driver_cpus}
    return tune.with_resources(tune_trial, resources)


def tune_trial(config: dict[str, Any]) -> None:
    """Run the trial the driver configured, with the executor its spec chose."""
    trial: TrialConfig = config[TRIAL_KEY]
    if executor_for(trial.spec) == "inline":
        from peftsweep.trainables.executors import run_inline

        run_inline(trial)
        return
    fit_train_job(trial)


def fit_train_job(trial: TrialConfig) -> None:
    """Build and fit the trial's TorchTrainer; its reports reach Tune through `TuneReportCallback`."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from peftsweep.trainables.executors import train_loop_per_worker

    spec, res = trial.spec, trial.spec.resources
    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)  # read by the controller this process starts
    per_worker = {"CPU": res.cpus_per_worker} | ({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})
    run_dir = trial.run_dir
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={TRIAL_KEY: trial},  # as the driver built it: no JSON, no re-validation
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers_per_trial,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker=per_worker,
        ),
        run_config=ray.train.RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            callbacks=[TuneReportCallback()],
            # Adapter-only checkpoints (+ resume state), best k by the search metric; Ray always keeps the
            # latest too, which is what a restarted worker group resumes from and what the driver logs.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=spec.training.keep_checkpoints,
                checkpoint_score_attribute=spec.search.metric,
                checkpoint_score_order=spec.search.direction,
            ),
            failure_config=ray.train.FailureConfig(max_failures=res.max_worker_restarts),
        ),
    )
    trainer.fit()


def tune_run_config_extras(spec: SweepSpec) -> dict[str, Any]:
    """`tune.RunConfig` arguments that depend on the executor: inline trials keep their checkpoints in Tune
    (best k by the search metric, plus the latest) and are restarted by Tune from the latest after a crash;
    train trials get both from Ray Train instead."""
    from ray import tune

    if executor_for(spec) != "inline":
        return {}
    return {
        "checkpoint_config": tune.CheckpointConfig(
            num_to_keep=spec.training.keep_checkpoints,
            checkpoint_score_attribute=spec.search.metric,
            checkpoint_score_order=spec.search.direction,
        ),
        "failure_config": tune.FailureConfig(max_failures=spec.resources.max_worker_restarts),
    }


def prune_finished(checkpoint: Path | None) -> int:
    """Drop the resume state (optimizer moments, RNG, data position) from a finished trial's checkpoints —
    ``checkpoint`` and its siblings — and return the bytes freed: nothing resumes a finished trial, so only
    its best-k adapters stay on disk."""
    if checkpoint is None or not checkpoint.parent.is_dir():
        return 0
    freed = 0
    for state in itertools.chain.from_iterable(
        c.glob(TRAINER_STATE) for c in checkpoint.parent.glob("checkpoint_*") if c.is_dir()
    ):
        freed += sum(f.stat().st_size for f in state.rglob("*") if f.is_file())
        shutil.rmtree(state, ignore_errors=True)
    return freed
