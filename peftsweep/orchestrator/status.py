"""Progress of a sweep per method, read from its Optuna studies: works while the sweep runs elsewhere.

Why Optuna: the RDB study is the sweep's source of truth (one study per method, ``<sweep>/<method>``); reading
it needs no Ray and no MLflow, and it is what a resumed sweep continues from.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftsweep.spec import SweepSpec


@dataclass(frozen=True)
class MethodStatus:
    """One method's study: trials by state against the budget, and the best finished trial."""

    method: str
    budget: int
    complete: int
    running: int
    failed: int
    pruned: int
    best_value: float | None
    best_params: dict[str, float | int]

    @property
    def remaining(self) -> int:
        return max(0, self.budget - self.complete - self.pruned - self.running)


def sweep_status(spec: SweepSpec) -> list[MethodStatus]:
    """Every method of the spec, in spec order; a method whose study does not exist yet has zero trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(spec.tracking.optuna_storage_url())
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
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
            )
        )
    return out
