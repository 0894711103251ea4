"""The driver's MLflow recorder (tracking.TrialRecorder) with Tune's callbacks called directly: a real sqlite
MLflow store, a stand-in Tune trial."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from peftsweep.orchestrator.tracking import FAILURE_TAG, OUTCOME_TAG, SweepTracker, TrialRecorder
from peftsweep.orchestrator.trial import TrialPlan
from peftsweep.spec import parse_spec
from peftsweep.trainables.trial_config import TRIAL_KEY

ACTOR_ERROR = (
    "RuntimeError: The actor with name ImplicitFunc failed to import on the worker. This may be because "
    "needed library dependencies are not installed in the worker environment"
)


def test_a_trial_whose_actor_never_started_is_recorded_as_failed_not_a_crash(tmp_path: Path) -> None:
    """Tune reports an error without a start for a trial whose actor could not start (a node lost, a worker
    environment that does not import): the sweep must go on, and the trial must not vanish from MLflow."""
    spec = parse_spec({"name": "rec", "methods": ["lora"], "tracking": {"root": str(tmp_path / "r")}})
    spec.tracking.root.mkdir(parents=True)
    tracker = SweepTracker(spec)
    tracker.start_method("lora")
    config = TrialPlan(spec, "lora", tmp_path).config("t-1", 1e-3, 8)
    trial = SimpleNamespace(
        trial_id="t-1",
        config=config,
        last_result={},
        checkpoint=None,
        error_file=None,
        get_error=lambda: ACTOR_ERROR,
    )
    recorder = TrialRecorder(tracker)
    recorder.on_trial_error(iteration=0, trials=[trial], trial=trial)  # no on_trial_start before it
    record = tracker.trials["t-1"]
    assert record.status == "failed" and record.failure.startswith("RuntimeError: The actor with name")
    tracker.flush()
    run = tracker.client.get_run(record.run_id)
    assert run.info.status == "FAILED" and run.data.tags[OUTCOME_TAG] == "failed"
    assert run.data.tags[FAILURE_TAG] == record.failure and run.data.params["lr"] == "0.001"


def _tracker(tmp_path: Path) -> SweepTracker:
    spec = parse_spec({"name": "rec", "methods": ["lora"], "tracking": {"root": str(tmp_path / "r")}})
    spec.tracking.root.mkdir(parents=True)
    tracker = SweepTracker(spec)
    tracker.start_method("lora")
    return tracker


def test_a_trials_writes_reach_mlflow_in_order_and_the_records_at_once(tmp_path: Path, monkeypatch) -> None:
    """MLflow writes run on the tracker's writer thread, the run's creation included; the driver's records
    do not wait for them."""
    tracker = _tracker(tmp_path)
    creators: list[str] = []
    create_run = tracker.client.create_run

    def spy(*args: object, **kwargs: object) -> object:
        creators.append(threading.current_thread().name)
        return create_run(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "create_run", spy)
    adapter = tmp_path / "checkpoint_000001"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "trainer_state").mkdir()
    (adapter / "trainer_state" / "optim.pt").write_bytes(b"\0" * 64)
    record = tracker.start_trial(TrialPlan(tracker.spec, "lora", tmp_path).config("t-1", 1e-3, 8)[TRIAL_KEY])
    max_steps = tracker.spec.training.max_steps
    for step, value in [(10, 0.1), (20, 0.3), (max_steps, 0.2)]:
        tracker.log_result(record, {"step": step, "exact_match": value, "eval_loss": 1 - value})
    assert record.metrics["exact_match"] == 0.2  # the record, before MLflow has caught up
    pruned: list[bool] = []
    tracker.finish_trial(
        record, str(adapter), then=lambda: pruned.append(tracker_has_adapter(tracker, record))
    )
    assert record.status == "completed" and record.has_adapter
    tracker.flush()
    history = tracker.client.get_metric_history(record.run_id, "exact_match")
    assert [(m.step, m.value) for m in history] == [(10, 0.1), (20, 0.3), (max_steps, 0.2)]
    run = tracker.client.get_run(record.run_id)
    assert run.info.status == "FINISHED" and run.data.tags[OUTCOME_TAG] == "completed"
    assert run.data.params["lr"] == "0.001"
    assert pruned == [True]  # `then` ran once, after the adapter was in MLflow
    assert len(creators) == 1 and creators[0] != threading.current_thread().name
    assert run.data.tags["peftsweep.trial_id"] == record.trial_id


def tracker_has_adapter(tracker: SweepTracker, record: object) -> bool:
    return bool(tracker.client.list_artifacts(record.run_id, "adapter"))  # type: ignore[attr-defined]


def test_a_failed_mlflow_write_is_raised_on_the_driver_not_lost(tmp_path: Path, monkeypatch) -> None:
    from mlflow.exceptions import MlflowException

    tracker = _tracker(tmp_path)
    record = tracker.start_trial(TrialPlan(tracker.spec, "lora", tmp_path).config("t-1", 1e-3, 8)[TRIAL_KEY])
    tracker.flush()

    def down(*_a: object, **_k: object) -> None:
        raise MlflowException("tracking server unreachable")

    monkeypatch.setattr(tracker.client, "log_batch", down)
    tracker.log_result(record, {"step": 10, "exact_match": 0.1, "eval_loss": 0.9})
    with pytest.raises(MlflowException, match="unreachable"):
        tracker.flush()
    tracker.log_result(record, {"step": 20, "exact_match": 0.2, "eval_loss": 0.8})
    with pytest.raises(MlflowException, match="unreachable"):  # at the next write, if not at a flush
        for _ in range(100):
            time.sleep(0.05)
            tracker.log_result(record, {"step": 30, "exact_match": 0.3, "eval_loss": 0.7})
    tracker.finish_sweep("FAILED")  # a failed sweep still closes its runs
    assert tracker.client.get_run(record.run_id).info.status == "KILLED"
