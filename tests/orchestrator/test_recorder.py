"""The driver's MLflow recorder (tracking.TrialRecorder) with Tune's callbacks called directly: a real sqlite
MLflow store, a stand-in Tune trial."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from peftsweep.orchestrator.tracking import FAILURE_TAG, OUTCOME_TAG, SweepTracker, TrialRecorder
from peftsweep.orchestrator.trial import TrialPlan
from peftsweep.spec import parse_spec

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
    run = tracker.client.get_run(record.run_id)
    assert run.info.status == "FAILED" and run.data.tags[OUTCOME_TAG] == "failed"
    assert run.data.tags[FAILURE_TAG] == record.failure and run.data.params["lr"] == "0.001"
