"""The sweep's lock (one driver per sweep) and the data version on the sweep run; no Ray starts here."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from peftsweep.cli import app
from peftsweep.orchestrator import lock
from peftsweep.orchestrator.status import sweep_status
from peftsweep.spec import SweepSpec, load_spec


def _spec_file(tmp_path: Path, **tracking: object) -> Path:
    path = tmp_path / "s.yaml"
    data = {"name": "lk", "methods": ["lora"], "tracking": {"root": str(tmp_path / "runs"), **tracking}}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def spec_path(tmp_path: Path) -> Path:
    return _spec_file(tmp_path)


@pytest.fixture
def spec(spec_path: Path) -> SweepSpec:
    spec = load_spec(spec_path)
    spec.tracking.root.mkdir(parents=True)
    return spec


def _plant(spec: SweepSpec, host: str, pid: int, started: datetime) -> None:
    """A lock as another run would have left it."""
    storage = optuna.storages.RDBStorage(spec.tracking.optuna_storage_url())
    study_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], lock.lock_name(spec))
    holder = {"host": host, "pid": pid, "started": started.isoformat(timespec="seconds"), "token": "t0"}
    storage.set_study_user_attr(study_id, lock.HOLDER_ATTR, holder)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


def test_a_second_acquisition_fails_naming_the_holder_and_release_frees_it(spec: SweepSpec) -> None:
    warnings: list[str] = []
    with lock.sweep_lock(spec, warn=warnings.append) as holder:
        assert (holder.host, holder.pid) == (socket.gethostname(), os.getpid())
        with pytest.raises(lock.SweepLocked) as info:
            lock.acquire(spec)
        message = str(info.value)
        assert f"pid {holder.pid} on {holder.host}" in message and "peftsweep unlock SPEC" in message
        assert lock.read_lock(spec) == lock.Holder(holder.host, holder.pid, holder.started, holder.token)
    assert lock.read_lock(spec) is None and not warnings
    with lock.sweep_lock(spec):  # free again
        pass


def test_a_lock_whose_process_on_this_host_is_dead_is_broken_with_a_warning(spec: SweepSpec) -> None:
    pid = _dead_pid()
    _plant(spec, socket.gethostname(), pid, datetime.now(UTC))
    warnings: list[str] = []
    holder = lock.acquire(spec, warn=warnings.append)
    assert holder.pid == os.getpid() and lock.read_lock(spec) == holder
    (line,) = warnings
    assert f"its process {pid} on this host is gone" in line and "stale" in line
    assert lock.delete_lock(spec, holder.token)


def test_a_lock_on_another_host_holds_until_its_heartbeat_is_too_old(tmp_path: Path) -> None:
    spec = load_spec(_spec_file(tmp_path, lock_max_age_s=600))
    spec.tracking.root.mkdir(parents=True)
    _plant(spec, "elsewhere", 1, datetime.now(UTC) - timedelta(seconds=60))
    with pytest.raises(lock.SweepLocked, match="pid 1 on elsewhere"):
        lock.acquire(spec)  # another host's pid cannot be checked: a recent lock holds

    lock.delete_lock(spec)
    _plant(spec, "elsewhere", 1, datetime.now(UTC) - timedelta(seconds=700))
    warnings: list[str] = []
    lock.acquire(spec, warn=warnings.append)
    (line,) = warnings
    assert "no heartbeat for 70" in line and "lock_max_age_s: 600" in line


def test_the_holder_heartbeat_keeps_a_long_run_locked(tmp_path: Path) -> None:
    spec = load_spec(_spec_file(tmp_path, lock_max_age_s=2))  # beats every 0.2 s
    spec.tracking.root.mkdir(parents=True)
    with lock.sweep_lock(spec) as holder:
        time.sleep(3)  # older than lock_max_age_s, but beating
        seen = lock.read_lock(spec)
        assert seen is not None and seen.token == holder.token and seen.heartbeat > holder.started
        assert lock.stale_reason(seen, 2) is None
        with pytest.raises(lock.SweepLocked):
            lock.acquire(spec)


def test_unlock_force_deletes_the_lock(spec: SweepSpec, spec_path: Path) -> None:
    _plant(spec, "elsewhere", 42, datetime.now(UTC))
    runner = CliRunner()
    asked = runner.invoke(app, ["unlock", str(spec_path)], input="n\n")
    assert asked.exit_code == 1 and "pid 42 on elsewhere" in asked.output
    assert lock.read_lock(spec) is not None  # declined: kept
    result = runner.invoke(app, ["unlock", str(spec_path), "--force"])
    assert result.exit_code == 0, result.output
    assert "deleted the lock of sweep 'lk'" in result.output and lock.read_lock(spec) is None
    again = runner.invoke(app, ["unlock", str(spec_path), "--force"])
    assert again.exit_code == 0 and "is not locked" in again.output


def test_run_refuses_while_the_sweep_is_locked_before_any_ray_work(
    spec: SweepSpec, spec_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from peftsweep import cluster

    # Spies, not ray.is_initialized(): other modules' tests share one Ray session, so Ray may be up already.
    joined: list[object] = []
    monkeypatch.setattr(cluster, "connect", lambda *a, **k: joined.append(a))
    monkeypatch.setattr(ray, "init", lambda *a, **k: joined.append(a))
    _plant(spec, "elsewhere", 42, datetime.now(UTC))
    result = CliRunner().invoke(app, ["run", str(spec_path), "--nightly"])
    assert result.exit_code == 3, result.output + repr(result.exception)
    assert "locked by another run: pid 42 on elsewhere" in result.output
    assert "peftsweep unlock" in result.output
    assert joined == []
    assert lock.read_lock(spec) is not None  # the refused run leaves the holder's lock alone


def test_status_ignores_the_lock_study(spec: SweepSpec) -> None:
    with lock.sweep_lock(spec):
        (lora,) = sweep_status(spec)
    assert (lora.method, lora.complete, lora.running) == ("lora", 0, 0)
    assert lora.remaining == spec.search.trials_per_method


def test_the_data_version_is_a_dataset_input_of_the_sweep_run(spec: SweepSpec) -> None:
    from peftsweep.orchestrator.tracking import NIGHTLY_TAG, SweepTracker

    data_dir = spec.tracking.root / "cache" / "data-0123456789abcdef"
    data_dir.mkdir(parents=True)
    (data_dir / "DONE").write_text('{"train": 80, "validation": 10}')
    tracker = SweepTracker(spec, tags={NIGHTLY_TAG: "2030-01-02"})
    tracker.log_data(data_dir)
    tracker.log_data(data_dir)  # a resume logs it again: still one input
    run = MlflowClient(spec.tracking.mlflow_tracking_uri()).get_run(tracker.sweep_run_id)
    (given,) = run.inputs.dataset_inputs
    assert given.dataset.name == spec.data.task == "builtin:arith-sub"
    assert given.dataset.digest == "0123456789abcdef"
    assert (given.dataset.source_type, given.dataset.source) == ("builtin", "builtin:arith-sub")
    assert given.dataset.profile == '{"train": 80, "validation": 10}'
    assert {t.key: t.value for t in given.tags} == {"mlflow.data.context": "training"}
    assert run.data.tags[NIGHTLY_TAG] == "2030-01-02" and run.data.tags["peftsweep.level"] == "sweep"
