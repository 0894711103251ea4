"""Kill -9 the driver mid-sweep, `peftsweep resume`, and check the studies and runs are whole and clean."""

from __future__ import annotations

import os
import random
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


def _ray_sessions(started_by: int) -> set[Path]:
    """The Ray sessions the process ``started_by`` started: Ray names a session directory after the pid of
    the process that started it. Only those: other tests (another xdist worker's sweeps) run Ray beside."""
    return set(Path("/tmp/ray").glob(f"session_2*_{started_by}"))


def _kill_session_leftovers(session: Path) -> None:
    """Ray processes of the killed driver's cluster (raylet, GCS, agents) — only that cluster's."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if session.name in " ".join(proc.info["cmdline"] or []):
            proc.kill()


# Kill points: wait for the event, then a seeded random delay (the driver is anywhere in its work by then).
KILLS = [
    ("the sweep run exists (trials starting)", 0, (0.0, 8.0)),
    ("one trial finished", 1, (0.0, 6.0)),
    ("three trials finished (the second method under way)", 3, (0.0, 4.0)),
]


def _finished_trial_runs(client: MlflowClient, exp: str) -> dict[str, dict[str, float]]:
    runs = client.search_runs(
        [exp], "tags.`peftsweep.level` = 'trial' and attributes.status = 'FINISHED'", max_results=500
    )
    return {r.info.run_id: dict(r.data.metrics) for r in runs}


def _run_until_killed(cmd: list[str], log: Path, spec, min_done: int, delay: float) -> bool:
    """Start the driver, SIGKILL it (and its Ray) ``delay`` s after ``min_done`` trials are done; False when
    it finished first."""
    with log.open("a") as out:
        driver = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 420
    try:
        while driver.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            started = (spec.tracking.root / "optuna.db").is_file()
            if started and sum(m.complete + m.pruned for m in sweep_status(spec)) >= min_done:
                time.sleep(delay)
                break
            time.sleep(1)
        finished = driver.poll() is not None
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        for session in _ray_sessions(started_by=driver.pid):
            _kill_session_leftovers(session)
    assert not finished or driver.returncode == 0, log.read_text()[-3000:]
    return not finished


def test_driver_killed_again_and_again_resumes_to_the_budget_without_loss_or_zombies(tmp_path: Path) -> None:
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
    client = MlflowClient(tracking_uri=spec.tracking.mlflow_tracking_uri())
    rng = random.Random(20261124)
    log = tmp_path / "driver.log"
    kept: dict[str, dict[str, float]] = {}  # finished trial runs seen after each kill
    kills = 0
    for i, (_, min_done, (lo, hi)) in enumerate(KILLS):
        command = [CLI, "run" if i == 0 else "resume", str(spec_path)]
        if not _run_until_killed(command, log, spec, min_done, rng.uniform(lo, hi)):
            break  # it finished before this kill point
        kills += 1
        exp = client.get_experiment_by_name("resume")
        if exp is not None:
            kept |= _finished_trial_runs(client, exp.experiment_id)
    assert kills >= 2, log.read_text()[-3000:]  # it really died mid-sweep, more than once

    resumed = subprocess.run(
        [CLI, "resume", str(spec_path)], capture_output=True, text=True, timeout=600, start_new_session=True
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming sweep run" in resumed.stdout

    storage = optuna.storages.RDBStorage(spec.tracking.optuna_storage_url())
    for method in ("lora", "dora"):
        trials = optuna.load_study(study_name=f"resume/{method}", storage=storage).trials
        complete = [t.params["lr"] for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        # (a trial killed between Optuna's ask and its suggestions has no params: nothing to re-run)
        others = [t.params["lr"] for t in trials if t.state != optuna.trial.TrialState.COMPLETE and t.params]
        assert len(complete) == BUDGET, method  # the budget is met, not exceeded
        assert not any(t.state == optuna.trial.TrialState.RUNNING for t in trials), method
        assert len(set(complete)) == len(complete)  # no configuration ran twice to completion
        assert set(others) <= set(complete)  # a killed trial's configuration is re-run: its work was lost
    exp = client.get_experiment_by_name("resume").experiment_id
    final = _finished_trial_runs(client, exp)
    # Every trial that had finished at any kill is still there, with the same results: nothing redone.
    assert {run: final.get(run) for run in kept} == kept
    assert client.search_runs([exp], filter_string="attributes.status = 'RUNNING'") == []
    sweeps = client.search_runs([exp], filter_string="tags.`peftsweep.level` = 'sweep'")
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"  # the same sweep run, continued
    # The champion is the best finished trial of the whole sweep, whichever driver ran it.
    champion = client.get_model_version_by_alias("resume", "champion")
    metric = spec.search.metric
    best = max(v[metric] for v in final.values() if metric in v)
    assert final[champion.run_id][metric] == best


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
