"""Kill -9 the driver mid-sweep, `peftsweep resume`, and check the studies and runs are whole and clean."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import yaml
from mlflow.tracking import MlflowClient

from peftsweep.orchestrator.status import sweep_status
from peftsweep.spec import load_spec

CLI = str(Path(sys.executable).with_name("peftsweep"))
BUDGET = 2  # trials per method


def _ray_sessions() -> set[Path]:
    return set(Path("/tmp/ray").glob("session_2*"))


def _kill_session_leftovers(session: Path) -> None:
    """Ray processes of the killed driver's cluster (raylet, GCS, agents) — only that cluster's."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if session.name in " ".join(proc.info["cmdline"] or []):
            proc.kill()


def test_killed_driver_resumes_to_the_budget_without_reruns_or_zombies(tmp_path: Path) -> None:
    spec_path = tmp_path / "resume.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": "resume",
                "methods": [
                    {"name": "lora", "lr_min": 1e-3, "lr_max": 3e-2, "ranks": [4]},
                    {"name": "dora", "lr_min": 1e-3, "lr_max": 3e-2, "ranks": [4]},
                ],
                "data": {"max_eval_examples": 16},
                "search": {
                    "trials_per_method": BUDGET,
                    "early_stopping": "none",
                    "n_startup_trials": 1,
                    "confirm_seeds": 0,
                },
                "training": {"max_steps": 20, "eval_every": 10},
                "resources": {"cpus_per_worker": 0.95, "max_concurrent_trials": 2},
                "tracking": {"root": str(tmp_path / "runs")},
            }
        )
    )
    spec = load_spec(spec_path)
    before = _ray_sessions()
    with (tmp_path / "run.log").open("w") as log:
        driver = subprocess.Popen(
            [CLI, "run", str(spec_path)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 420
    try:
        while True:  # kill as soon as one lora trial is done and the other may still be running
            assert driver.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            if (tmp_path / "runs" / "optuna.db").is_file() and sweep_status(spec)[0].complete >= 1:
                break
            time.sleep(2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        for session in _ray_sessions() - before:
            _kill_session_leftovers(session)
    killed_at = sweep_status(spec)
    assert killed_at[0].complete < BUDGET or killed_at[1].complete < BUDGET  # it really died mid-sweep
    storage = optuna.storages.RDBStorage(spec.tracking.optuna_storage_url())
    done_before = [
        t.params["lr"]
        for t in optuna.load_study(study_name="resume/lora", storage=storage).trials
        if t.state == optuna.trial.TrialState.COMPLETE
    ]

    resumed = subprocess.run(
        [CLI, "resume", str(spec_path)], capture_output=True, text=True, timeout=600, start_new_session=True
    )
    for session in _ray_sessions() - before:
        _kill_session_leftovers(session)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming sweep run" in resumed.stdout

    for method in ("lora", "dora"):
        trials = optuna.load_study(study_name=f"resume/{method}", storage=storage).trials
        complete = [t.params["lr"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        # (a trial killed between Optuna's ask and its suggestions has no params: nothing to re-run)
        others = [t.params["lr"] for t in trials if t.state != optuna.trial.TrialState.COMPLETE and t.params]
        assert len(complete) == BUDGET, method
        assert not any(t.state == optuna.trial.TrialState.RUNNING for t in trials), method
        assert len(set(complete)) == len(complete)  # no configuration ran twice to completion
        assert set(others) <= set(complete)  # a killed trial's configuration is re-run: its work was lost
    lora = optuna.load_study(study_name="resume/lora", storage=storage).trials
    finished = [t.params["lr"] for t in lora if t.state == optuna.trial.TrialState.COMPLETE]
    assert all(
        finished.count(lr) == 1 for lr in done_before
    )  # what finished before the kill is kept, not redone
    client = MlflowClient(tracking_uri=spec.tracking.mlflow_tracking_uri())
    exp = client.get_experiment_by_name("resume").experiment_id
    assert client.search_runs([exp], filter_string="attributes.status = 'RUNNING'") == []
    sweeps = client.search_runs([exp], filter_string="tags.`peftsweep.level` = 'sweep'")
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"  # the same sweep run, continued
    assert client.get_model_version_by_alias("resume", "champion") is not None


def test_reconcile_fails_killed_trials_and_reruns_only_complete_configurations(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from peftsweep.orchestrator.sweep import reconcile_study
    from peftsweep.spec import parse_spec

    spec = parse_spec({"name": "rc", "methods": [{"name": "lora", "ranks": [4]}]}, base_dir=tmp_path)
    spec.tracking.root.mkdir(parents=True)
    study = optuna.create_study(study_name="rc/lora", storage=spec.tracking.optuna_storage_url())
    sampled = study.ask()
    lr = sampled.suggest_float("lr", 1e-4, 1e-1, log=True)
    sampled.suggest_categorical("rank", [4])
    study.ask()  # killed before Optuna's suggestions: no params
    done, rerun = reconcile_study(spec, "lora", SimpleNamespace(trials={}))  # no finished MLflow runs
    assert done == 0 and rerun == [{"lr": lr, "rank": 4}]
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
