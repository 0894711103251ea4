"""`peftsweep status` reads per-method progress from the sweep's Optuna studies (no Ray, no MLflow)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from peftsweep.cli import app
from peftsweep.orchestrator.status import sweep_status
from peftsweep.spec import parse_spec


def test_status_counts_trials_per_method_against_the_budget(tmp_path: Path) -> None:
    data = {"name": "st", "methods": ["lora", "pissa"], "search": {"trials_per_method": 5}}
    spec = parse_spec(data, base_dir=tmp_path)
    spec.tracking.root.mkdir(parents=True)
    storage = optuna.storages.RDBStorage(spec.tracking.optuna_storage_url())
    study = optuna.create_study(study_name="st/lora", storage=storage, direction="maximize")
    for lr, value in ((1e-3, 0.2), (1e-2, 0.6)):
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": lr},
                distributions={"lr": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)},
                value=value,
            )
        )
    study.ask()  # a trial left RUNNING (e.g. by a live sweep)
    lora, pissa = sweep_status(spec)
    assert (lora.complete, lora.running, lora.remaining, lora.best_value) == (2, 1, 2, 0.6)
    assert lora.best_params == {"lr": 1e-2}
    assert (pissa.complete, pissa.remaining, pissa.best_value) == (0, 5, None)  # no study yet

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**data, "tracking": {"root": str(spec.tracking.root)}}))
    result = CliRunner().invoke(app, ["status", str(path)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "lora" in result.output and "0.6000" in result.output and "lr=0.01" in result.output


def test_status_of_a_sweep_that_never_ran_says_so(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump({"name": "st", "methods": ["lora"], "tracking": {"root": str(tmp_path / "r")}})
    )
    result = CliRunner().invoke(app, ["status", str(path)])
    assert result.exit_code == 1 and "no sweep store" in result.output


def test_opening_a_store_that_another_process_is_creating_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loser of the schema-creation race (a sweep starting while `status` polls) opens it again."""
    import optuna
    from sqlalchemy.exc import IntegrityError

    from peftsweep.orchestrator import status

    real, calls = optuna.storages.RDBStorage, []

    def racing(url: str) -> object:
        calls.append(url)
        if len(calls) == 1:
            raise IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE constraint failed"))
        return real(url)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    storage = status.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(calls) == 2 and storage.get_all_studies() == []


def _add_trials(study: optuna.Study, values: list[float]) -> None:
    for value in values:
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": 1e-3},
                distributions={"lr": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)},
                value=value,
            )
        )


def test_left_counts_only_the_latest_sweep_runs_trials(tmp_path: Path) -> None:
    """Each night adds `trials_per_method` trials to the same study: earlier nights do not use its budget."""
    import time

    import mlflow

    from peftsweep.orchestrator.tracking import LEVEL_TAG

    spec = parse_spec(
        {"name": "nt", "methods": ["lora"], "search": {"trials_per_method": 4}}, base_dir=tmp_path
    )
    spec.tracking.root.mkdir(parents=True)
    storage = optuna.storages.RDBStorage(spec.tracking.optuna_storage_url())
    study = optuna.create_study(study_name="nt/lora", storage=storage, direction="maximize")
    _add_trials(study, [0.1, 0.2, 0.3, 0.4])  # last night's run: its whole budget
    time.sleep(0.05)  # MLflow keeps milliseconds
    client = mlflow.MlflowClient(tracking_uri=spec.tracking.mlflow_tracking_uri())
    experiment = client.create_experiment(spec.name)
    client.create_run(experiment, tags={LEVEL_TAG: "sweep"})  # tonight's sweep run
    time.sleep(0.05)
    _add_trials(study, [0.5])
    study.ask()  # one running
    (lora,) = sweep_status(spec)
    assert (lora.complete, lora.running, lora.this_run, lora.remaining) == (5, 1, 2, 2)


def test_status_of_a_twenty_method_sweep_is_one_row_per_method_and_a_total(tmp_path: Path) -> None:
    """A cluster sweep of every registered method (qlora too: it has GPUs): one row each, then the sweep at
    a glance (sums, and the best method's value and params)."""
    from peftsweep import search_spaces

    methods = search_spaces.method_names()
    data = {
        "name": "big",
        "methods": methods,
        "search": {"trials_per_method": 100},
        "resources": {"gpus_per_worker": 1, "zero_stage": 0},
        "tracking": {"root": str(tmp_path / "r")},
    }
    spec = parse_spec(data)
    spec.tracking.root.mkdir(parents=True)
    storage = optuna.storages.RDBStorage(spec.tracking.optuna_storage_url())
    for k, method in enumerate(methods):
        study = optuna.create_study(study_name=f"big/{method}", storage=storage, direction="maximize")
        _add_trials(study, [0.01 * k, 0.005 * k])
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["status", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(sum(line.startswith(f"│ {m} ") for line in lines) == 1 for m in methods)
    total = next(line for line in lines if f"all {len(methods)} methods" in line)
    best = methods[-1]  # the last method has the best values
    cells = [c.strip() for c in total.strip("│ ").split("│")]
    assert cells[1:6] == [str(2 * len(methods)), "0", "0", "0", str(98 * len(methods))]
    assert cells[6] == f"{0.01 * (len(methods) - 1):.4f}" and cells[7] == f"{best}: lr=0.001"
