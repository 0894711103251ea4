"""Progress of a sweep per method, read from its Optuna studies: works while the sweep runs elsewhere.

Why Optuna: the RDB study is the sweep's source of truth (one study per method, ``<sweep>/<method>``); reading
it needs no Ray, and it is what a resumed sweep continues from. The budget is per sweep run (each night adds
``trials_per_method`` trials to the same studies), so what is left counts only the trials started since the
latest sweep run began; that start time is the one thing read from MLflow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from peftsweep.spec import SweepSpec

if TYPE_CHECKING:
    from optuna.storages import RDBStorage

# Opening a database that another process is creating at that moment fails in the schema setup; by the next
# try the schema exists.
_OPEN_ATTEMPTS = 5


def open_storage(url: str) -> RDBStorage:
    """The sweep's Optuna storage, robust to a race on a brand-new database.

    Optuna creates its schema when it first opens a database; two processes doing so at once (a sweep
    starting while `peftsweep status` or a dashboard polls it) make the loser fail with an IntegrityError or
    a locked database. The loser opens the now-created database again instead of dying.
    """
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(1, _OPEN_ATTEMPTS + 1):
        try:
            return optuna.storages.RDBStorage(url)
        except (IntegrityError, OperationalError):
            if attempt == _OPEN_ATTEMPTS:
                raise
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class MethodStatus:
    """One method's study: trials by state against the budget, and the best finished trial."""

    method: str
    budget: int  # per sweep run
    complete: int  # these four: the whole study, every run
    running: int
    failed: int
    pruned: int
    best_value: float | None
    best_params: dict[str, float | int]
    this_run: int = 0  # the latest sweep run's trials that count against its budget (done or running)

    @property
    def remaining(self) -> int:
        return max(0, self.budget - self.this_run)


def latest_run_start(spec: SweepSpec) -> datetime | None:
    """When the sweep's latest run began (its MLflow sweep run), in Optuna's terms: naive local time.

    None when it never ran; then every trial of the study counts. A resumed run keeps its original start.
    """
    uri = spec.tracking.mlflow_tracking_uri()
    if uri.startswith("sqlite:///") and not (spec.tracking.root / "mlflow.db").is_file():
        return None  # do not create an empty store just to look
    from mlflow.tracking import MlflowClient

    from peftsweep.orchestrator.tracking import LEVEL_TAG

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(spec.name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.`{LEVEL_TAG}` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return datetime.fromtimestamp(runs[0].info.start_time / 1000) if runs else None


def sweep_status(spec: SweepSpec) -> list[MethodStatus]:
    """Every method of the spec, in spec order; a method whose study does not exist yet has zero trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(spec.tracking.optuna_storage_url())
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    since = latest_run_start(spec)
    states = optuna.trial.TrialState
    counted = (states.COMPLETE, states.PRUNED, states.RUNNING)
    out = []
    for m in spec.methods:
        name = f"{spec.name}/{m.name}"
        trials = optuna.load_study(study_name=name, storage=storage).trials if name in existing else []
        count = {state: sum(t.state == state for t in trials) for state in optuna.trial.TrialState}
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
        sign = 1 if spec.search.direction == "max" else -1
        best = max(done, key=lambda t: sign * t.value, default=None)
        out.append(
            MethodStatus(
                method=m.name,
                budget=spec.search.trials_per_method,
                complete=count[optuna.trial.TrialState.COMPLETE],
                running=count[optuna.trial.TrialState.RUNNING],
                failed=count[optuna.trial.TrialState.FAIL],
                pruned=count[optuna.trial.TrialState.PRUNED],
                best_value=best.value if best else None,
                best_params=dict(best.params) if best else {},
                this_run=sum(
                    t.state in counted and (since is None or (t.datetime_start or since) >= since)
                    for t in trials
                ),
            )
        )
    return out
