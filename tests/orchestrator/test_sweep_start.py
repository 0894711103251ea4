"""A sweep's start: the data and the stores are prepared while Ray starts, and nothing is left running when
that preparation fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rich.console import Console

from peftsweep import cluster
from peftsweep.orchestrator import sweep
from peftsweep.spec import SweepSpec, parse_spec


def _spec(root: Path, workers: int = 1) -> SweepSpec:
    return parse_spec(
        {
            "name": "start",
            "methods": ["lora"],
            "resources": {"workers_per_trial": workers, "cpus_per_worker": 0.5},
            "tracking": {"root": str(root)},
        }
    )


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Record connect/disconnect instead of starting Ray."""
    calls: dict[str, list] = {"connect": [], "disconnect": []}

    def connect(address: str | None = None, **kwargs: object) -> bool:
        calls["connect"].append({"address": address, **kwargs})
        return True

    monkeypatch.setattr(cluster, "connect", connect)
    monkeypatch.setattr(cluster, "disconnect", lambda: calls["disconnect"].append(True))
    return calls


def test_data_and_stores_are_ready_when_ray_is(tmp_path: Path, fake_ray: dict[str, list]) -> None:
    spec = _spec(tmp_path)
    data_dir, started = sweep._prepare_while_ray_starts(spec, None, Console(quiet=True))
    assert started is True
    assert (data_dir / "DONE").is_file()  # tokenised
    assert (tmp_path / "mlflow.db").stat().st_size > 0 and (tmp_path / "optuna.db").stat().st_size > 0
    assert fake_ray["disconnect"] == []


@pytest.mark.parametrize(("workers", "dashboard"), [(1, False), (2, True)])
def test_rays_dashboard_starts_only_for_train_trials(
    tmp_path: Path, fake_ray: dict[str, list], workers: int, dashboard: bool
) -> None:
    """Ray Train V2 releases placement groups through the dashboard's state API; inline trials need none."""
    sweep._prepare_while_ray_starts(_spec(tmp_path, workers), None, Console(quiet=True))
    (call,) = fake_ray["connect"]
    assert call["dashboard"] is dashboard


def test_a_preparation_that_fails_stops_the_ray_it_started(
    tmp_path: Path, fake_ray: dict[str, list], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_spec: SweepSpec, _console: Console) -> Path:
        raise OSError("disk full while tokenising")

    monkeypatch.setattr(sweep, "_prepare", broken)
    with pytest.raises(OSError, match="disk full"):
        sweep._prepare_while_ray_starts(_spec(tmp_path), None, Console(quiet=True))
    assert len(fake_ray["connect"]) == 1 and fake_ray["disconnect"] == [True]


@pytest.mark.parametrize("user", [None, "30"])
def test_tune_does_not_snapshot_its_experiment_state_during_a_sweep_unless_the_user_asks(
    monkeypatch: pytest.MonkeyPatch, user: str | None
) -> None:
    """Tune reads TUNE_GLOBAL_CHECKPOINT_S when its run starts; "auto" rewrote every trial's state as one
    file (140 MB at 2,000 trials) for up to 5 % of the driver's time. A user's own setting is kept."""
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", user or "")  # restored after the test
    if user is None:
        monkeypatch.delenv("TUNE_GLOBAL_CHECKPOINT_S")
    sweep._tune_env()
    period = float(os.environ["TUNE_GLOBAL_CHECKPOINT_S"])
    assert period == (float(user) if user else sweep.TUNE_SNAPSHOT_EVERY_S) and period >= 30


def test_the_driver_objects_made_before_the_tune_run_are_frozen_for_it_and_only_for_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A full garbage collection stops the driver (0.2-0.7 s at 2,000 trials): during the run it walks only
    the objects the run made; afterwards the process collects as before."""
    import gc

    seen: list[int] = []
    before = gc.get_freeze_count()

    class Run:
        def fit(self) -> None:
            seen.append(gc.get_freeze_count())

    monkeypatch.setattr(sweep, "_tuner", lambda *_a: Run())
    sweep.run_methods(_spec(tmp_path), [], [])
    assert seen and seen[0] > before
    assert gc.get_freeze_count() == before
