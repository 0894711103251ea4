"""Load: a sweep of many very short trials, 2 at a time, through the real CLI (its own driver process).

MLflow must hold exactly one run per trial with its whole metric history, no writer may hit 'database is
locked', and the driver's memory must not grow by more than a bounded amount per trial once warm. CI runs 30
trials (~2 min on 2 cores with inline trials); ``PEFTSWEEP_LOAD_TRIALS=200`` runs the issue's full 200.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from peftsweep.orchestrator.status import open_storage
from peftsweep.orchestrator.tracking import LEVEL_TAG
from peftsweep.spec import SweepSpec, load_spec

CLI = str(Path(sys.executable).with_name("peftsweep"))
TRIALS = int(os.environ.get("PEFTSWEEP_LOAD_TRIALS", "30"))
STEPS = 2  # one eval point per step: every trial has a 2-point history to check
# The driver keeps one small record per trial: the README says about 0.1 MiB a trial once warm
# (bench/README.md measured +17 MiB over 190 trials). Warm = after the first quarter of the trials (at least
# 4): imports, Tune's, Optuna's and MLflow's caches. From there the driver's RSS may grow by NOISE_MIB (RSS
# moves in allocator and sqlite-cache steps of a few MiB, whatever the trial count) plus PER_TRIAL_MIB per
# finished trial, 5× the claim: a leak of more than 0.5 MiB a trial fails (CI's 30 trials: more than 19 MiB
# over the 22 warm trials).
PER_TRIAL_MIB = 0.5
NOISE_MIB = 8.0

pytestmark = pytest.mark.slow


def test_many_short_trials_one_run_each_full_histories_bounded_driver(tmp_path: Path) -> None:
    spec_path = tmp_path / "load.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": "load",
                "methods": [{"name": "lora", "lr_min": 1e-3, "lr_max": 1e-2, "ranks": [4]}],
                "search": {
                    "strategy": "tpe",  # bracketing would stop the method once its optimum is bracketed
                    "trials_per_method": TRIALS,
                    "early_stopping": "none",
                    "n_startup_trials": 4,
                    "confirm_seeds": 0,
                },
                "training": {"max_steps": STEPS, "eval_every": 1},
                "data": {"max_eval_examples": 4},
                "resources": {"cpus_per_worker": 0.9, "max_concurrent_trials": 2},
                "tracking": {"root": str(tmp_path / "runs")},
            }
        )
    )
    spec = load_spec(spec_path)
    log = tmp_path / "driver.log"
    samples: list[tuple[int, float]] = []  # (trials done, driver RSS MiB)
    with log.open("w") as out:
        driver = subprocess.Popen([CLI, "run", str(spec_path)], stdout=out, stderr=subprocess.STDOUT)
        proc = psutil.Process(driver.pid)
        deadline = time.monotonic() + 60 * TRIALS
        while driver.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                rss = proc.memory_info().rss / 2**20
                started = (spec.tracking.root / "optuna.db").is_file()
                done = _finished_trials(spec) if started else 0
            except Exception:  # noqa: BLE001 - the driver just exited, or the store is mid-creation
                time.sleep(1)
                continue
            samples.append((done, rss))
            time.sleep(1)
    output = log.read_text()
    assert driver.returncode == 0, output[-3000:]
    assert "database is locked" not in output

    client = MlflowClient(spec.tracking.mlflow_tracking_uri())
    exp = client.get_experiment_by_name("load").experiment_id
    runs = client.search_runs([exp], f"tags.`{LEVEL_TAG}` = 'trial'", max_results=10 * TRIALS)
    assert len(runs) == TRIALS
    assert len({r.data.tags["peftsweep.trial_id"] for r in runs}) == TRIALS  # one run per trial
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in runs:  # every eval point of every trial, each once
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval_loss"))
        assert steps == list(range(1, STEPS + 1)), run.info.run_id

    # While trials run, once warm; the report written after the last trial (matplotlib) is not the sweep's
    # steady state.
    warm = max(4, TRIALS // 4)
    settled = [(done, rss) for done, rss in samples if warm <= done < TRIALS]
    trials = settled[-1][0] - settled[0][0] if settled else 0
    assert trials >= TRIALS // 2, samples  # the bound below speaks for at least half the trials
    growth = max(rss for _, rss in settled) - settled[0][1]
    limit = NOISE_MIB + PER_TRIAL_MIB * trials
    summary = {
        "trials": TRIALS,
        "warm_after_trials": settled[0][0],
        "warm_trials": trials,
        "driver_rss_mib_when_warm": round(settled[0][1], 1),
        "driver_rss_mib_max_while_searching": round(max(rss for _, rss in settled), 1),
        "driver_rss_mib_max_overall": round(max(rss for _, rss in samples), 1),
        "growth_while_searching_mib": round(growth, 1),
        "growth_per_trial_kib": round(growth * 1024 / trials, 1),
        "slope_kib_per_trial": round(_slope(settled) * 1024, 1),  # least squares: for the reader
        "limit_mib": round(limit, 1),
        "samples": samples,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}))
    (tmp_path / "load.json").write_text(json.dumps(summary))
    assert growth <= limit, summary


def _finished_trials(spec: SweepSpec) -> int:
    """Finished trials, from the Optuna study only: `sweep_status` would also open the MLflow store, and an
    open of a store the driver is creating at that moment races its schema migration (and can crash it)."""
    import optuna

    storage = open_storage(spec.tracking.optuna_storage_url())
    try:
        study = optuna.load_study(study_name=f"{spec.name}/lora", storage=storage)
    except KeyError:  # not created yet
        return 0
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares MiB per trial of (trials done, RSS MiB) points."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0
