"""Faults injected for real into a sweep's trials (NaN loss, out of memory, a hung worker, a SIGKILLed
worker): each is handled as promised and the sweep finishes with every other trial intact, on both executors
(inline: the loop inside the Tune trial; train: a Ray Train TorchTrainer job).

One real sweep per executor through the CLI (trainables.faults drills via PEFTSWEEP_FAULTS); the tests each
check one of its trials.
"""

from __future__ import annotations

import json
from typing import Any

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from peftsweep.cli import app
from peftsweep.orchestrator.tracking import DRILL_TAG, FAILURE_TAG, LEVEL_TAG, OUTCOME_TAG
from peftsweep.spec import load_spec
from peftsweep.trainables.faults import FAULTS_ENV
from peftsweep.vocab import TRAINER_STATE

STEPS, EVERY = 10, 5
HANG_TIMEOUT_S = 12.0  # the training hang limit (set-up is not counted): far above a step or an eval here
FAULTS = [  # trial index → fault; trial 4 runs clean
    {"method": "lora", "trial": 0, "kind": "nan", "step": 3},
    {"method": "lora", "trial": 1, "kind": "oom", "step": 4},
    {"method": "lora", "trial": 2, "kind": "hang", "step": EVERY},
    {"method": "lora", "trial": 3, "kind": "kill", "step": EVERY},
]
TRIALS = 5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["inline", "train"])
def drill(
    ray_session: None, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> dict[str, Any]:
    executor = request.param
    root = tmp_path_factory.mktemp(f"faults-{executor}")
    spec_path = root / "faults.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": "faults",
                "methods": [{"name": "lora", "lr_min": 1e-3, "lr_max": 1e-2, "ranks": [4]}],
                "search": {
                    "trials_per_method": TRIALS,
                    "early_stopping": "none",
                    "n_startup_trials": TRIALS,
                    "confirm_seeds": 0,
                },
                "training": {"max_steps": STEPS, "eval_every": EVERY},
                "data": {"max_eval_examples": 16},
                "resources": {
                    "executor": executor,
                    "cpus_per_worker": 0.9,
                    "max_concurrent_trials": 2,
                    "hang_timeout_s": HANG_TIMEOUT_S,
                    "max_worker_restarts": 1,
                },
                "tracking": {"root": str(root / "runs")},
            }
        )
    )
    mp = pytest.MonkeyPatch()
    mp.setenv(FAULTS_ENV, json.dumps(FAULTS))
    try:
        result = CliRunner().invoke(app, ["run", str(spec_path)])
    finally:
        mp.undo()
    assert result.exit_code == 0, result.output + repr(result.exception)
    spec = load_spec(spec_path)
    client = MlflowClient(spec.tracking.mlflow_tracking_uri())
    exp = client.get_experiment_by_name(spec.name)
    runs = client.search_runs([exp.experiment_id], f"tags.`{LEVEL_TAG}` = 'trial'", max_results=100)
    # Each drilled trial's run names its drill (kind@step); the one run without a drill ran clean.
    drilled = {f"{f['kind']}@{f['step']}": f["trial"] for f in FAULTS}
    by_index = {drilled.get(r.data.tags.get(DRILL_TAG, ""), TRIALS - 1): r for r in runs}
    return {"spec": spec, "client": client, "runs": runs, "by_index": by_index, "output": result.output}


def _steps(drill: dict[str, Any], index: int, metric: str = "eval_loss") -> list[int]:
    history = drill["client"].get_metric_history(drill["by_index"][index].info.run_id, metric)
    return sorted(m.step for m in history)


def test_one_run_per_trial_and_nothing_left_running(drill: dict[str, Any]) -> None:
    assert len(drill["runs"]) == TRIALS  # counted: no retried trial became a second run
    assert sorted(drill["by_index"]) == list(range(TRIALS))  # one run per drill, and the clean one
    assert all(r.info.status in ("FINISHED", "FAILED") for r in drill["runs"])
    storage = optuna.storages.RDBStorage(drill["spec"].tracking.optuna_storage_url())
    trials = optuna.load_study(study_name="faults/lora", storage=storage).get_trials(deepcopy=False)
    assert len(trials) == TRIALS
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


def test_nan_loss_is_diverged_at_once(drill: dict[str, Any]) -> None:
    run = drill["by_index"][0]
    assert run.data.tags[OUTCOME_TAG] == "diverged"
    assert run.data.metrics["diverged"] == 1.0
    assert _steps(drill, 0, "diverged") == [3]  # stopped at the first NaN step, not at the next eval


def test_out_of_memory_fails_the_trial_with_its_reason_and_is_not_retried(drill: dict[str, Any]) -> None:
    run = drill["by_index"][1]
    assert run.info.status == "FAILED" and run.data.tags[OUTCOME_TAG] == "failed"
    assert "out of memory in the forward/backward pass at step 4" in run.data.tags[FAILURE_TAG]
    assert _steps(drill, 1, "oom") == [3]  # reported once: no worker restart at the same config
    # Optuna holds it as the worst result, so the sampler steers away from the config instead of re-trying it.
    storage = optuna.storages.RDBStorage(drill["spec"].tracking.optuna_storage_url())
    trials = optuna.load_study(study_name="faults/lora", storage=storage).get_trials(deepcopy=False)
    lr = float(run.data.params["lr"])
    (oom,) = [t for t in trials if abs(t.params["lr"] - lr) <= 1e-12 * lr]
    assert oom.state == optuna.trial.TrialState.COMPLETE and oom.value == 0.0


@pytest.mark.parametrize("index", [2, 3], ids=["hung-worker-killed-by-watchdog", "worker-sigkilled"])
def test_a_lost_worker_resumes_from_its_checkpoint_with_a_continuous_history(
    drill: dict[str, Any], index: int
) -> None:
    run = drill["by_index"][index]
    assert run.data.tags[OUTCOME_TAG] == "completed"
    assert _steps(drill, index) == [EVERY, STEPS]  # each eval point once: resumed at 5, not restarted at 0
    assert _steps(drill, index, "train_loss") == [EVERY, STEPS]
    resumed = drill["client"].get_metric_history(run.info.run_id, "resumed_from_step")
    assert {m.step: m.value for m in resumed} == {EVERY: 0.0, STEPS: float(EVERY)}  # from its checkpoint
    assert drill["client"].list_artifacts(run.info.run_id, "adapter")


def test_the_sweep_goes_on_and_registers_a_champion(drill: dict[str, Any]) -> None:
    assert drill["by_index"][4].data.tags[OUTCOME_TAG] == "completed"
    client, spec = drill["client"], drill["spec"]
    champion = client.get_model_version_by_alias(spec.name, "champion")
    best = client.get_run(champion.run_id)
    assert best.data.tags[OUTCOME_TAG] == "completed"


def test_finished_trials_keep_only_their_best_k_adapters_on_disk(drill: dict[str, Any]) -> None:
    spec = drill["spec"]
    storage = spec.tracking.ray_storage
    assert not list(storage.rglob(TRAINER_STATE))  # resume state is gone once a trial is finished
    checkpoints = {}  # trial id -> its checkpoint directories (Tune's for inline trials, Train's for train)
    for ckpt in storage.rglob("checkpoint_*"):
        if ckpt.is_dir():
            trial_id = next(
                t for t in (r.data.tags["peftsweep.trial_id"] for r in drill["runs"]) if t in str(ckpt)
            )
            checkpoints.setdefault(trial_id, []).append(ckpt)
    for run in drill["runs"]:
        if run.data.tags[OUTCOME_TAG] != "completed":
            continue
        mine = checkpoints[run.data.tags["peftsweep.trial_id"]]
        assert 1 <= len(mine) <= spec.training.keep_checkpoints + 1  # best k + the latest
        assert all((c / "adapter_model.safetensors").is_file() for c in mine)
    assert "disk: " in drill["output"] and "adapters (MLflow)" in drill["output"]
