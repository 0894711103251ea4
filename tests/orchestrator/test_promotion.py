"""The champion promotion gate, both ways, with real adapters, a real MLflow registry and real evaluation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from peftsweep.orchestrator.promotion import decide, run_gate
from peftsweep.spec import parse_spec
from peftsweep.trainables.metrics import evaluate_adapter


@pytest.mark.parametrize(
    ("new", "old", "direction", "margin", "promoted"),
    [
        (0.80, 0.70, "max", 0.05, True),
        (0.74, 0.70, "max", 0.05, False),  # better, but within the margin
        (0.70, 0.70, "max", 0.0, False),  # a tie keeps the champion
        (1.10, 1.30, "min", 0.1, True),
        (1.25, 1.30, "min", 0.1, False),
    ],
)
def test_decide_needs_a_win_by_more_than_the_margin(
    new: float, old: float, direction: str, margin: float, promoted: bool
) -> None:
    assert decide(new, old, direction, margin) is promoted


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two exported adapters of the built-in task — LoRA at init (the base's behaviour) and LoRA trained for
    40 steps — logged as runs of a sqlite-backed MLflow."""
    from mlflow.tracking import MlflowClient

    from peftsweep.trainables.loop import run_trial
    from peftsweep.trainables.prepared import prepare_data
    from peftsweep.trainables.trial_config import standalone_trial

    tmp = tmp_path_factory.mktemp("gate")
    spec = parse_spec(
        {
            "name": "gate",
            "methods": ["lora"],
            "data": {"max_eval_examples": 48},
            "search": {"metric": "eval_loss"},  # smooth: the trained adapter is reliably better
            "training": {"max_steps": 40, "eval_every": 40},
        },
        base_dir=tmp,
    )
    data_dir = prepare_data(spec)
    adapters = {}
    for name, lr in (("untrained", 1e-12), ("trained", 1e-2)):

        def keep(metrics: dict, ckpt: Path | None, name: str = name) -> None:
            adapters[name] = shutil.copytree(ckpt, tmp / name, ignore=shutil.ignore_patterns("trainer_state"))

        run_trial(standalone_trial(spec, "lora", lr, 4, 0, data_dir=data_dir), keep)
    client = MlflowClient(tracking_uri=spec.tracking.mlflow_tracking_uri())
    exp = client.create_experiment("gate", artifact_location=str(spec.tracking.artifact_root))
    runs = {}
    for name, path in adapters.items():
        run = client.create_run(exp, run_name=name)
        client.log_artifacts(run.info.run_id, str(path), "adapter")
        runs[name] = run.info.run_id
    return {"spec": spec, "client": client, "runs": runs, "data_dir": str(data_dir)}


def _crown(client: object, name: str, run_id: str, base: str) -> None:
    """Register ``run_id``'s adapter as the current champion of registered model ``name``."""
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run_id}/adapter", run_id, tags={"base_model": base})
    client.set_registered_model_alias(name, "champion", version.version)


def test_a_better_adapter_is_promoted(registry: dict) -> None:
    spec, client, runs = registry["spec"], registry["client"], registry["runs"]
    _crown(client, "promote", runs["untrained"], spec.base_model)
    decision = run_gate(spec, client, "promote", runs["trained"], registry["data_dir"], evaluate_adapter)
    assert decision.promoted and decision.champion_version == "1"
    assert decision.new_score < decision.champion_score  # eval_loss: lower is better
    assert "beats champion v1" in decision.reason


def test_a_worse_adapter_stays_challenger(registry: dict) -> None:
    spec, client, runs = registry["spec"], registry["client"], registry["runs"]
    _crown(client, "keep", runs["trained"], spec.base_model)
    decision = run_gate(spec, client, "keep", runs["untrained"], registry["data_dir"], evaluate_adapter)
    assert not decision.promoted and decision.new_score > decision.champion_score
    assert "does not beat champion v1" in decision.reason


def test_no_champion_or_another_base_promotes_with_a_reason(registry: dict) -> None:
    spec, client, runs = registry["spec"], registry["client"], registry["runs"]
    first = run_gate(spec, client, "fresh", runs["trained"], registry["data_dir"], evaluate_adapter)
    assert first.promoted and first.reason == "no champion yet"
    _crown(client, "rebased", runs["trained"], "some/other-base")
    moved = run_gate(spec, client, "rebased", runs["untrained"], registry["data_dir"], evaluate_adapter)
    assert moved.promoted and "another base" in moved.reason
