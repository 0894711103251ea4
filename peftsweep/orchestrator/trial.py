"""The Tune function trainable: one Tune trial = one Ray Train `TorchTrainer` job (Ray Train V2 pattern).

The trainer's per-worker reports are forwarded to Tune by `TuneReportCallback`, so ASHA and the Optuna
searcher see every eval point; the adapter checkpoint path arrives as `result["checkpoint_path"]`.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from peftsweep.spec import SweepSpec
from peftsweep.vocab import TRAINER_STATE

CONFIRM_KEY = "confirm"  # a confirmation run's fixed config arrives as one grid-searched dict under this key


def train_run_dir(spec: SweepSpec, trial_id: str) -> Path:
    """Where a trial's Ray Train run keeps its checkpoints (adapter + resume state)."""
    return spec.tracking.ray_storage / "train" / f"train-{trial_id}"


def prune_finished(spec: SweepSpec, trial_id: str) -> int:
    """Drop the resume state (optimizer moments, RNG, data position) from a finished trial's checkpoints and
    return the bytes freed: nothing resumes a finished trial, so only its best-k adapters stay on disk."""
    freed = 0
    for state in train_run_dir(spec, trial_id).glob(f"*/{TRAINER_STATE}"):
        freed += sum(f.stat().st_size for f in state.rglob("*") if f.is_file())
        shutil.rmtree(state, ignore_errors=True)
    return freed


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """A Tune trial config with a confirmation run's fixed dict merged in (lr, rank, seed, role)."""
    return {k: v for k, v in config.items() if k != CONFIRM_KEY} | dict(config.get(CONFIRM_KEY, {}))


def tune_trial(
    config: dict[str, Any],
    *,
    spec_json: dict[str, Any],
    method: str,
    data_dir: str,
    faults: list[dict[str, Any]] | None = None,
) -> None:
    """Build and fit the trial's TorchTrainer with the params Optuna suggested (`lr`, `rank`), or a
    confirmation run's fixed `lr`, `rank` and `seed`."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from peftsweep.trainables.faults import fault_for, trial_index
    from peftsweep.trainables.loop import train_loop_per_worker

    spec = SweepSpec.model_validate(spec_json)
    config = flat_config(config)
    res = spec.resources
    per_worker = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker:
        per_worker["GPU"] = res.gpus_per_worker
    context = ray.tune.get_context()
    trial_id = context.get_trial_id()
    fault = None
    if faults and config.get("role", "search") == "search":  # reliability drills (trainables.faults)
        fault = fault_for(faults, method, trial_index(context.get_trial_name(), context.get_trial_dir()))
        if fault is not None:
            fault = replace(fault, marker=str(train_run_dir(spec, trial_id) / "fault-fired"))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": spec_json,
            "method": method,
            "lr": float(config["lr"]),
            "rank": int(config.get("rank", 0)),  # 0: the method has no rank
            "seed": int(config.get("seed", spec.training.seed)),
            "data_dir": data_dir,  # tokenized once by the driver (trainables.prepared)
            "fault": fault.to_config() if fault else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers_per_trial,
            use_gpu=res.gpus_per_worker > 0,
            resources_per_worker=per_worker,
        ),
        run_config=ray.train.RunConfig(
            name=train_run_dir(spec, trial_id).name,
            storage_path=str(train_run_dir(spec, trial_id).parent),
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
