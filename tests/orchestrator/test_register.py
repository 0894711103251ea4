"""`SweepTracker.register` on a real sqlite MLflow store: which version each alias points at after the gate
decides, and which method becomes the champion (the best mean over seeds, not the luckiest single trial).

Trials are recorded through the tracker's own API (start, results, finish with an adapter directory), as the
Tune callback records them; only the training is left out.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from peftsweep.orchestrator.promotion import GateDecision
from peftsweep.orchestrator.tracking import (
    CHALLENGER_ALIAS,
    CHAMPION_ALIAS,
    METHOD_TAG,
    PROMOTION_TAG,
    SweepTracker,
)
from peftsweep.spec import SweepSpec, parse_spec
from peftsweep.trainables.trial_config import TrialConfig

MAX_STEPS = 10


def _spec(root: Path) -> SweepSpec:
    return parse_spec(
        {
            "name": "reg",
            "methods": ["lora", "dora"],
            "search": {"metric": "exact_match"},
            "training": {"max_steps": MAX_STEPS, "eval_every": MAX_STEPS},
            "tracking": {"root": str(root / "runs")},
        },
        base_dir=root,
    )


def _night(spec: SweepSpec, tmp: Path, trials: list[tuple[str, float, int, float]]) -> SweepTracker:
    """A sweep run with these finished trials (method, lr, seed, exact_match), each with an adapter."""
    tracker = SweepTracker(spec)
    for method in {m for m, *_ in trials}:
        tracker.start_method(method)
    for i, (method, lr, seed, value) in enumerate(trials):
        trial_id = f"{tracker.sweep_run_id[:8]}-{i}"
        config = TrialConfig(
            spec, method, lr, 4, seed, tmp, trial_id=trial_id, role="confirm" if seed else "search"
        )
        record = tracker.start_trial(config)
        tracker.log_result(record, {"exact_match": value, "eval_loss": 1.0 - value, "step": MAX_STEPS})
        adapter = tmp / "adapters" / trial_id
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text(f'{{"trial": "{trial_id}"}}')
        tracker.finish_trial(record, str(adapter))
        assert record.status == "completed" and record.has_adapter
    return tracker


def _gate(promoted: bool, calls: list[tuple[str, str]]) -> object:
    def gate(name: str, run_id: str) -> GateDecision:
        calls.append((name, run_id))
        return GateDecision(promoted, "promoted by the test" if promoted else "kept out by the test")

    return gate


def _alias(client: MlflowClient, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias("reg", alias).version)
    except MlflowException:
        return None


FIRST_NIGHT = [("lora", 1e-3, 0, 0.50), ("dora", 1e-3, 0, 0.40)]
SECOND_NIGHT = [("lora", 2e-3, 0, 0.60), ("dora", 2e-3, 0, 0.45)]


@pytest.mark.parametrize("promoted", [False, True], ids=["gate-says-no", "gate-promotes"])
def test_the_champion_alias_moves_only_when_the_gate_promotes(promoted: bool, tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    client = MlflowClient(spec.tracking.mlflow_tracking_uri())
    first = _night(spec, tmp_path, FIRST_NIGHT)
    name, leader, _ = first.register(_gate(True, []))
    assert name == "reg" and leader.method == "lora"
    old_champion = _alias(client, CHAMPION_ALIAS)
    assert old_champion is not None and _alias(client, CHALLENGER_ALIAS) is None

    calls: list[tuple[str, str]] = []
    second = _night(spec, tmp_path, SECOND_NIGHT)
    _, leader, decision = second.register(_gate(promoted, calls))
    new_version = _alias(client, "best-lora")
    assert leader.method == "lora" and new_version not in (None, old_champion)
    assert calls == [("reg", leader.run_id)]  # the gate judged the new leader's run
    assert client.get_model_version("reg", new_version).run_id == leader.run_id
    if promoted:
        assert _alias(client, CHAMPION_ALIAS) == new_version
        assert _alias(client, CHALLENGER_ALIAS) is None
    else:
        assert _alias(client, CHAMPION_ALIAS) == old_champion  # untouched
        assert _alias(client, CHALLENGER_ALIAS) == new_version
    alias = CHAMPION_ALIAS if promoted else CHALLENGER_ALIAS
    assert client.get_model_version("reg", new_version).tags[PROMOTION_TAG] == decision.reason
    assert client.get_run(second.sweep_run_id).data.tags[PROMOTION_TAG] == f"{alias}: {decision.reason}"


def test_the_champion_is_the_best_mean_over_seeds_not_the_luckiest_trial(tmp_path: Path) -> None:
    """LoRA's best single trial (0.95, one seed) beats every DoRA trial, but LoRA's score is its config with
    the most seeds (mean 0.50); DoRA's three seeds average 0.75: DoRA is the champion."""
    spec = _spec(tmp_path)
    client = MlflowClient(spec.tracking.mlflow_tracking_uri())
    trials = [("lora", 1e-3, seed, 0.50) for seed in range(3)] + [("lora", 3e-3, 0, 0.95)]
    trials += [("dora", 1e-3, seed, value) for seed, value in enumerate([0.70, 0.75, 0.80])]
    tracker = _night(spec, tmp_path, trials)
    _, leader, _ = tracker.register(_gate(True, []))
    champion = client.get_model_version_by_alias("reg", CHAMPION_ALIAS)
    assert leader.method == "dora" and champion.tags[METHOD_TAG] == "dora"
    assert float(champion.tags["exact_match_mean"]) == pytest.approx(0.75)
    assert champion.tags["exact_match"] == "0.8" and champion.tags["seeds"] == "3"  # its best seed's adapter
    lora = client.get_model_version_by_alias("reg", "best-lora")
    assert float(lora.tags["exact_match_mean"]) == pytest.approx(0.50) and lora.tags["lr"] == "0.001"
