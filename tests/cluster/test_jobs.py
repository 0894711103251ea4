"""`peftsweep submit/logs/stop` and `tracking serve` without a cluster: what the job carries, and the
errors a user gets before anything is sent. The real submission runs in test_multinode.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peftsweep.cluster import jobs
from peftsweep.cluster.local import free_port
from peftsweep.spec import SpecError, load_spec, parse_spec
from tests.conftest import EXAMPLES

CLI = str(Path(sys.executable).with_name("peftsweep"))


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_job_spec_makes_local_paths_absolute_and_keeps_the_rest(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"prompt": "1+1=", "completion": "2"}\n')
    monkeypatch.chdir(tmp_path)
    spec = parse_spec(
        {
            "name": "job",
            "methods": [{"name": "lora"}],
            "data": {"task": "data/train.jsonl"},
            "forgetting": {"task": "builtin:arith-add"},
            "tracking": {"root": "runs"},
        }
    )
    data = jobs.job_spec(spec)
    assert data["data"]["task"] == str(tmp_path / "data" / "train.jsonl")  # the job's cwd is elsewhere
    assert data["forgetting"]["task"] == "builtin:arith-add"  # not a path
    assert data["base_model"] == spec.base_model
    assert data["tracking"]["root"] == str(tmp_path / "runs")
    # What the job loads is the same spec.
    assert parse_spec(yaml.safe_load(yaml.safe_dump(data))) == spec.model_copy(
        update={"data": spec.data.model_copy(update={"task": data["data"]["task"]})}
    )


def test_submit_refuses_unset_env_and_resume_with_nightly() -> None:
    spec = load_spec(EXAMPLES / "quickstart.yaml")
    with pytest.raises(ValueError, match="PEFTSWEEP_NOT_SET_ANYWHERE: not set"):
        jobs.submit(spec, "http://127.0.0.1:1", env=["PEFTSWEEP_NOT_SET_ANYWHERE"])
    with pytest.raises(ValueError, match="cannot also be a new --nightly"):
        jobs.submit(spec, "http://127.0.0.1:1", resume=True, nightly=True)


@pytest.mark.parametrize(
    "args",
    [
        ["submit", str(EXAMPLES / "quickstart.yaml")],
        ["logs", "peftsweep-x"],
        ["logs", "peftsweep-x", "--follow"],
        ["stop", "peftsweep-x"],
    ],
)
def test_no_cluster_at_the_address_is_one_clear_line(args: list[str]) -> None:
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = _cli(*args, "--address", address)
    assert done.returncode == 2
    assert f"Failed to connect to Ray at address: {address}" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_tracking_serve_refuses_a_sqlite_backend() -> None:
    done = _cli(
        "tracking", "serve", "--backend-store-uri", "sqlite:///x.db", "--artifacts-destination", "/tmp/a"
    )
    assert done.returncode == 2
    assert "needs a database server" in done.stderr


def test_one_database_for_both_stores_is_refused() -> None:
    url = "postgresql://u@db:5432/sweeps"
    with pytest.raises(SpecError, match="same database"):
        parse_spec(
            {
                "name": "x",
                "methods": [{"name": "lora"}],
                "tracking": {"mlflow_uri": url, "optuna_storage": url},
            }
        )


def test_ui_points_at_a_tracking_server_instead_of_serving_one(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "methods": [{"name": "lora"}],
                "tracking": {"mlflow_uri": "http://mlflow.internal:5000"},
            }
        )
    )
    done = _cli("ui", str(spec))
    assert done.returncode == 0, done.stderr
    assert "its UI is http://mlflow.internal:5000" in done.stdout
