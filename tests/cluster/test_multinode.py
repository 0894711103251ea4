"""A real multi-node run on one machine: two `ray start` nodes (1 CPU each), Postgres for Optuna and MLflow,
an MLflow server (`peftsweep tracking serve`), and the sweep submitted as a Ray Job (`peftsweep submit`).

Trials must land on both nodes, tracking must be complete (one FINISHED run per trial, every study trial
COMPLETE, adapters behind the server) and the champion registered. The same cluster also shows that sqlite
is refused once trials span nodes, and that `peftsweep stop` ends a running job. All servers are on
127.0.0.1 and stopped by PID.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.cluster.servers import (
    VENV_BIN,
    Postgres,
    RayCluster,
    mlflow_server,
    postgres,
    postgres_bin,
    ray_cluster,
)

CLI = str(VENV_BIN / "peftsweep")
TRIALS = 4  # two waves of two concurrent trials, one per node
JOB_TIMEOUT_S = 900  # a job that has not ended by then is hung

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        postgres_bin() is None,
        reason="no Postgres server binaries (initdb): .ci/run installs Debian's postgresql; "
        "elsewhere `apt-get install postgresql`",
    ),
]


class Stack:
    def __init__(self, base: Path, pg: Postgres, mlflow_uri: str, ray: RayCluster) -> None:
        self.base, self.pg, self.mlflow_uri, self.ray = base, pg, mlflow_uri, ray

    def spec(self, name: str, *, servers: bool = True) -> Path:
        """A tiny sweep whose every trial fits one node: 0.9 CPU worker + 0.05 CPU trial driver."""
        path = self.base / f"{name}.yaml"
        data = {
            "name": name,
            "methods": [{"name": "lora", "lr_min": 1e-3, "lr_max": 3e-2, "ranks": [4]}],
            "search": {
                "trials_per_method": TRIALS,
                "n_startup_trials": 2,
                "early_stopping": "none",
                "confirm_seeds": 0,
                "lr_prior": "none",
            },
            "training": {"max_steps": 10, "eval_every": 5},
            "data": {"max_eval_examples": 16},
            "resources": {"cpus_per_worker": 0.9, "max_concurrent_trials": 2},
            # tracking.root on one machine: every node sees it, like an NFS mount
            "tracking": {"root": str(self.base / "runs")}
            | ({"mlflow_uri": self.mlflow_uri, "optuna_storage": self.pg.url("optuna")} if servers else {}),
        }
        path.write_text(yaml.safe_dump(data))
        return path

    def cli(self, *args: str, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run(
            [CLI, *args], env=self.ray.env, capture_output=True, text=True, timeout=timeout, cwd=self.base
        )


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # Not pytest's tmp_path: Ray's socket paths under it would pass the 108-byte Unix socket limit.
    with tempfile.TemporaryDirectory(prefix="psw-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)  # the postgres user must reach its data directory inside
        with (
            postgres(base, ["mlflow", "optuna"]) as pg,
            mlflow_server(base, pg.url("mlflow")) as mlflow_uri,
            ray_cluster(base, [{"CPU": 1}, {"CPU": 1}]) as ray,
        ):
            yield Stack(base, pg, mlflow_uri, ray)


def _node_ids(stack: Stack) -> set[str]:
    out = subprocess.run(
        [str(VENV_BIN / "ray"), "list", "nodes", "--address", stack.ray.gcs, "--format", "yaml"],
        env=stack.ray.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {n["node_id"] for n in yaml.safe_load(out) if n["state"] == "ALIVE"}


def test_sqlite_is_refused_once_trials_span_nodes(stack: Stack) -> None:
    spec = stack.spec("sqlite", servers=False)  # the embedded defaults: sqlite under tracking.root
    t0 = time.monotonic()
    done = stack.cli("run", str(spec), "--address", stack.ray.gcs, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    said = " ".join((done.stdout + done.stderr).split())
    assert "trials would run on 2 nodes" in said and "is sqlite" in said, said
    assert "tracking.optuna_storage (default sqlite:///" in said
    assert not (stack.base / "runs" / "ray").exists()  # refused before any trial: no trial storage
    assert time.monotonic() - t0 < 120


def test_sweep_submitted_as_ray_job_runs_on_both_nodes_tracks_everything(stack: Stack) -> None:
    import optuna
    from mlflow.tracking import MlflowClient

    from peftsweep.orchestrator.tracking import LEVEL_TAG, NODE_TAG, OUTCOME_TAG

    spec = stack.spec("multinode")
    submitted = stack.cli("submit", str(spec), "--address", stack.ray.dashboard, "--job-id", "psw-multinode")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "submitted psw-multinode" in submitted.stdout

    followed = stack.cli("logs", "psw-multinode", "--address", stack.ray.dashboard, "--follow")
    log = followed.stdout + followed.stderr
    assert followed.returncode == 0, log[-4000:]
    assert "job psw-multinode: SUCCEEDED" in log
    assert "cluster: trials run on 2 nodes" in log
    assert "champion: lora" in log or "challenger: lora" in log, log[-3000:]

    # Optuna on Postgres: the whole budget, every trial COMPLETE.
    study = optuna.load_study(study_name="multinode/lora", storage=stack.pg.url("optuna"))
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * TRIALS

    # MLflow through the server: one FINISHED run per trial, each with its node; both nodes used.
    client = MlflowClient(stack.mlflow_uri)
    exp = client.get_experiment_by_name("multinode").experiment_id
    runs = client.search_runs([exp], f"tags.`{LEVEL_TAG}` = 'trial'")
    assert len(runs) == TRIALS
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags[OUTCOME_TAG] for r in runs} == {"completed"}
    assert all(len(client.get_metric_history(r.info.run_id, "eval_loss")) == 2 for r in runs)
    used = {r.data.tags[NODE_TAG] for r in runs}
    assert used == _node_ids(stack), used  # trials ran on both nodes, and only on the cluster's nodes
    print(f"trials per node: { {n[:12]: sum(r.data.tags[NODE_TAG] == n for r in runs) for n in used} }")

    # The champion is registered, and its adapter comes back through the server's artifact proxy.
    version = client.get_model_version_by_alias("multinode", "champion")
    adapter = Path(client.download_artifacts(version.run_id, "adapter", str(stack.base / "dl")))
    assert (adapter / "adapter_model.safetensors").is_file()


def test_stop_ends_a_running_job(stack: Stack) -> None:
    spec = stack.spec("stopped")
    submitted = stack.cli("submit", str(spec), "--address", stack.ray.dashboard, "--job-id", "psw-stop")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    deadline, running = time.monotonic() + 120, False
    while not running and time.monotonic() < deadline:
        shown = stack.cli("logs", "psw-stop", "--address", stack.ray.dashboard).stdout
        running = "job psw-stop: RUNNING" in shown
        time.sleep(0 if running else 2)
    assert running
    stopped = stack.cli("stop", "psw-stop", "--address", stack.ray.dashboard, timeout=60)
    assert stopped.returncode == 0 and "stopping psw-stop" in stopped.stdout, stopped.stdout + stopped.stderr
    followed = stack.cli("logs", "psw-stop", "--address", stack.ray.dashboard, "--follow", timeout=120)
    assert followed.returncode == 4 and "job psw-stop: STOPPED" in followed.stdout, followed.stdout[-2000:]
