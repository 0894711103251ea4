"""The champion promotion gate: a new sweep's best replaces the registered champion only if it is better.

Why: nightly sweeps must not churn (or worsen) what downstream users load as ``@champion``. The new best and
the current champion are evaluated on the same held-out rows (the sweep's test split, else its validation
split) in the same way, and the new one is promoted only if it wins by more than ``search.promotion_margin``.
Otherwise it is registered as ``@challenger`` and the reason is recorded on the version and the sweep run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

from peftsweep.orchestrator.tracking import ADAPTER_ARTIFACT, CHAMPION_ALIAS, GateDecision
from peftsweep.spec import SweepSpec

# evaluate(spec, data_dir, adapter_dir) -> metrics; a Ray task in a sweep, a plain call in tests
Evaluator = Callable[[dict[str, Any], str, str], dict[str, float]]


def decide(new: float, old: float, direction: str, margin: float) -> bool:
    """True when ``new`` beats ``old`` by more than ``margin`` in the metric's direction."""
    return (new - old if direction == "max" else old - new) > margin


def run_gate(
    spec: SweepSpec, client: Any, name: str, new_run_id: str, data_dir: str, evaluate: Evaluator
) -> GateDecision:
    """Compare the new best adapter (in run ``new_run_id``) with the version aliased ``champion``."""
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:
        return GateDecision(True, "no champion yet")
    if current.run_id == new_run_id:
        return GateDecision(True, "the champion itself", champion_version=str(current.version))
    if current.tags.get("base_model") != spec.base_model:
        return GateDecision(
            True,
            f"champion v{current.version} was trained on another base ({current.tags.get('base_model')})",
            champion_version=str(current.version),
        )
    metric, direction = spec.search.metric, spec.search.direction
    scores = {}
    with tempfile.TemporaryDirectory(prefix="peftsweep-gate-") as tmp:
        for role, run_id in (("new", new_run_id), ("champion", current.run_id)):
            adapter = client.download_artifacts(run_id, ADAPTER_ARTIFACT, f"{tmp}/{role}")
            scores[role] = float(evaluate(spec, data_dir, adapter)[metric])
    margin = spec.search.promotion_margin
    promoted = decide(scores["new"], scores["champion"], direction, margin)
    verb = "beats" if promoted else "does not beat"
    better = ">" if direction == "max" else "<"
    reason = (
        f"{metric} {scores['new']:.4f} {verb} champion v{current.version}'s {scores['champion']:.4f} "
        f"by more than {margin:g} (needs new {better} champion {'+' if direction == 'max' else '-'} margin)"
    )
    return GateDecision(promoted, reason, scores["new"], scores["champion"], str(current.version))
