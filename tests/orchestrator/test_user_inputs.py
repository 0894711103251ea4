"""A user's own model and data (issue 19): relative paths that resolve from where the command runs, a bad
hub id that fails before Ray starts, and methods whose trials all fail that stop early and say why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from peftsweep.cli import app
from peftsweep.orchestrator.tracking import FAILURE_TAG, LEVEL_TAG, METHOD_TAG, OUTCOME_TAG
from peftsweep.spec import load_spec
from peftsweep.trainables.builtin import builtin_model_dir, builtin_task_dir
from peftsweep.trainables.faults import FAULTS_ENV

TRAINING = {"max_steps": 6, "eval_every": 3}


def _trial_runs(spec_path: Path) -> list[Any]:
    spec = load_spec(spec_path)
    client = MlflowClient(spec.tracking.mlflow_tracking_uri())
    exp = client.get_experiment_by_name(spec.name)
    return client.search_runs([exp.experiment_id], f"tags.`{LEVEL_TAG}` = 'trial'", max_results=100)


def test_relative_paths_to_a_local_model_and_data_resolve_from_where_the_command_runs(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`peftsweep run spec.yaml` from the spec's folder with base_model ./my-base and data ./data/...: the
    trials (in Ray's working directories) see absolute paths and every one completes."""
    project = tmp_path / "project"
    shutil.copytree(builtin_model_dir(), project / "my-base")  # "my own model": a local directory
    rows = (builtin_task_dir("arith-sub") / "train.jsonl").read_text().splitlines(True)[:400]
    (project / "data").mkdir()
    (project / "data" / "sub.jsonl").write_text("".join(rows))
    spec = {
        "name": "mine",
        "base_model": "./my-base",
        "data": {"task": "./data/sub.jsonl", "max_eval_examples": 16},
        "methods": [{"name": "lora", "lr_min": 1e-3, "lr_max": 1e-2, "ranks": [4]}],
        "search": {"trials_per_method": 2, "n_startup_trials": 2, "confirm_seeds": 0},
        "training": TRAINING,
        "resources": {"cpus_per_worker": 0.9},
        "tracking": {"root": "runs"},
    }
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(project)
    result = CliRunner().invoke(app, ["run", "spec.yaml"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    runs = _trial_runs(project / "spec.yaml")
    assert len(runs) == 2 and all(r.data.tags[OUTCOME_TAG] in ("completed", "stopped_early") for r in runs)
    assert (project / "runs" / "mlflow.db").is_file()  # tracking.root: relative to where the command ran
    # The adapter names its base the way the spec did, not this machine's absolute path.
    adapter = MlflowClient(load_spec("spec.yaml").tracking.mlflow_tracking_uri()).download_artifacts(
        runs[0].info.run_id, "adapter", str(tmp_path / "dl")
    )
    assert json.loads((Path(adapter) / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "./my-base"
    )


def test_a_bad_hub_id_fails_before_ray_starts_naming_base_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    starts: list[Any] = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: starts.append(a))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here: the lookup fails at once, as offline
    spec = tmp_path / "hub.yaml"
    spec.write_text(
        yaml.safe_dump({"name": "hub", "base_model": "nobody/no-such-model", "methods": ["lora"]})
    )
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 2, result.output
    assert "base_model: 'nobody/no-such-model' could not be loaded from the Hugging Face Hub" in result.output
    assert starts == []


@pytest.fixture
def failing_lora(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every LoRA trial crashes after its first report, and is not restarted: a systematic failure."""
    monkeypatch.setenv(FAULTS_ENV, json.dumps([{"method": "lora", "kind": "crash", "step": 3}]))


def _failing_spec(tmp_path: Path, methods: list[str], trials: int) -> Path:
    spec = tmp_path / "fail.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "fail",
                "data": {"max_eval_examples": 8},
                "methods": [{"name": m, "lr_min": 1e-3, "lr_max": 1e-2, "ranks": [4]} for m in methods],
                "search": {
                    "trials_per_method": trials,
                    "n_startup_trials": trials,
                    "confirm_seeds": 0,
                    "early_stopping": "none",  # ASHA would stop some at the step-3 rung, before the crash
                },
                "training": TRAINING,
                "resources": {"cpus_per_worker": 0.9, "max_worker_restarts": 0},
                "tracking": {"root": str(tmp_path / "runs")},
            }
        )
    )
    return spec


def test_a_method_whose_first_trials_fail_alike_stops_and_the_sweep_goes_on(
    ray_session: None, tmp_path: Path, failing_lora: None
) -> None:
    spec = _failing_spec(tmp_path, ["lora", "dora"], trials=6)
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 0, result.output + repr(result.exception)  # dora ran: a champion
    out = " ".join(result.output.split())
    why = "RuntimeError: injected fault: crash after step 3"
    assert f"lora: stopped after its first 3 trials all failed with: {why}" in out
    assert f"(failed: {why})" in out  # each failed trial's first error line, as it happens
    runs = _trial_runs(spec)
    lora = [r for r in runs if r.data.tags[METHOD_TAG] == "lora"]
    dora = [r for r in runs if r.data.tags[METHOD_TAG] == "dora"]
    # Stopped after 3 (+ at most the one launched beside the third), not the budget of 6; dora used its 6.
    assert 3 <= len(lora) <= 4 and all(r.data.tags[FAILURE_TAG] == why for r in lora)
    assert len(dora) == 6 and all(r.data.tags[OUTCOME_TAG] != "failed" for r in dora)


def test_a_sweep_where_every_trial_failed_says_so_and_exits_4(
    ray_session: None, tmp_path: Path, failing_lora: None
) -> None:
    result = CliRunner().invoke(app, ["run", str(_failing_spec(tmp_path, ["lora"], trials=3))])
    assert result.exit_code == 4, result.output
    assert "every trial failed" in result.output
    assert "RuntimeError: injected fault: crash after step 3" in result.output
