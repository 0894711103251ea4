"""Registered adapters as MLflow models: each loads back through MLflow, on its base, and generates.

The sweep's own champion (a PEFT adapter on the built-in base, embedded) is checked end to end in
test_sweep_e2e.py; here a non-PEFT result through the pyfunc, and a PEFT adapter on a local base directory
that MLflow refers to by path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from mlflow.entities import LoggedModelStatus
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftsweep.orchestrator.logged_model import (
    DEFAULT_MAX_NEW_TOKENS,
    base_reference,
    log_trained,
    tracking_uri,
)
from peftsweep.orchestrator.redact import RedactingClient
from peftsweep.search_spaces import load_trained
from peftsweep.spec import SweepSpec, parse_spec
from peftsweep.trainables.builtin import builtin_model_dir
from peftsweep.trainables.metrics import complete
from peftsweep.vocab import TRAINER_STATE

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

PROMPTS = ["57-23=", "90-08=", "41-40=", "66-66="]  # built-in subtractions


def _spec(tmp: Path, method: str, base: str = "builtin:tiny-arith") -> SweepSpec:
    return parse_spec(
        {
            "name": "logged",
            "base_model": base,
            "methods": [method],
            "data": {"max_eval_examples": 16},
            "training": {"max_steps": 30, "eval_every": 30},
        },
        base_dir=tmp,
    )


def _train(spec: SweepSpec, method: str, lr: float, rank: int, out: Path) -> Path:
    """One short trial of ``method``; its exported result as the driver logs it (no resume state)."""
    from peftsweep.trainables.loop import run_trial
    from peftsweep.trainables.trial_config import standalone_trial

    def keep(metrics: dict, ckpt: Path | None) -> None:
        shutil.copytree(ckpt, out, ignore=shutil.ignore_patterns(TRAINER_STATE), dirs_exist_ok=True)

    run_trial(standalone_trial(spec, method, lr, rank, 0), keep)
    return out


def _register(spec: SweepSpec, export: Path) -> tuple[str, str]:
    """Log ``export`` as the model of a fresh run and alias it champion; returns (models:/ uri, flavour)."""
    client = RedactingClient(tracking_uri=spec.tracking.mlflow_tracking_uri())
    experiment = client.create_experiment(spec.name, artifact_location=spec.tracking.artifact_root.as_uri())
    run_id = client.create_run(experiment).info.run_id
    model, flavour = log_trained(client, spec, run_id, export, experiment)
    assert model.status == LoggedModelStatus.READY
    client.create_registered_model(spec.name)
    with tracking_uri(spec.tracking.mlflow_tracking_uri()):
        version = client.create_model_version(spec.name, model.model_uri, run_id, model_id=model.model_id)
    assert version.source == model.model_uri  # the version is that logged model
    client.set_registered_model_alias(spec.name, "champion", version.version)
    return f"models:/{spec.name}@champion", flavour


def test_base_reference_by_kind(tmp_path: Path) -> None:
    assert base_reference(_spec(tmp_path, "lora")) == ("builtin", str(builtin_model_dir()))
    local = shutil.copytree(builtin_model_dir(), tmp_path / "my-base")
    assert base_reference(_spec(tmp_path, "lora", "./my-base")) == ("path", str(local))
    assert base_reference(_spec(tmp_path, "lora", "org/some-model")) == ("hub", "org/some-model")


def test_a_bitfit_result_loads_through_the_pyfunc_and_generates(tmp_path: Path) -> None:
    import mlflow.pyfunc

    spec = _spec(tmp_path, "bitfit")
    export = _train(spec, "bitfit", 3e-2, 0, tmp_path / "export")
    uri, flavour = _register(spec, export)
    assert flavour == "python_function"
    shutil.rmtree(export)  # the logged model carries everything it needs (the tiny base embedded)

    with tracking_uri(spec.tracking.mlflow_tracking_uri()):
        loaded = mlflow.pyfunc.load_model(uri)
    got = loaded.predict(PROMPTS)

    # The reference: the documented loader on the same base, generating as evaluation does.
    base_dir = builtin_model_dir()
    with tracking_uri(spec.tracking.mlflow_tracking_uri()):
        again = mlflow.artifacts.download_artifacts(f"{uri}", dst_path=str(tmp_path / "dl"))
    model = load_trained(
        AutoModelForCausalLM.from_pretrained(base_dir), Path(again) / "artifacts" / "trained"
    )
    want = complete(model, AutoTokenizer.from_pretrained(base_dir), PROMPTS, DEFAULT_MAX_NEW_TOKENS)
    assert got == want
    assert all(answer.isdigit() for answer in got), got  # it answers in digits: the model generates


def test_a_peft_adapter_on_a_local_base_loads_through_the_transformers_flavour(tmp_path: Path) -> None:
    import mlflow.transformers
    from peft import PeftModel

    local = shutil.copytree(builtin_model_dir(), tmp_path / "my-base")
    spec = _spec(tmp_path, "lora", "./my-base")
    export = _train(spec, "lora", 1e-2, 4, tmp_path / "export")
    uri, flavour = _register(spec, export)
    assert flavour == "transformers"

    tokenizer = AutoTokenizer.from_pretrained(local)
    batch = tokenizer(PROMPTS, return_tensors="pt")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(local), str(export)).eval()
    with torch.no_grad():
        want = reference(**batch).logits
    with tracking_uri(spec.tracking.mlflow_tracking_uri()):
        pipe = mlflow.transformers.load_model(uri)
        with torch.no_grad():
            assert torch.allclose(pipe.model(**batch).logits, want, atol=1e-6)
        answers = mlflow.pyfunc.load_model(uri).predict(PROMPTS)
        assert all(isinstance(a, str) and a for a in answers), answers

        # Only the adapter travelled: the base is referred to by its path, and elsewhere it is named at load.
        moved = local.rename(tmp_path / "moved-base")
        with pytest.raises(Exception):  # noqa: B017 - from_pretrained's error for a missing directory
            mlflow.transformers.load_model(uri)
        pipe = mlflow.transformers.load_model(uri, base_model_path=str(moved))
        with torch.no_grad():
            assert torch.allclose(pipe.model(**batch).logits, want, atol=1e-6)


def test_a_model_that_cannot_be_logged_still_registers_the_adapter(tmp_path: Path) -> None:
    """A hub base with the hub unreachable (HF_HUB_OFFLINE here): no MLflow model, but the version is
    registered all the same, pointing at the run's adapter files, and says why."""
    from peftsweep.orchestrator.champion import champion_info
    from peftsweep.orchestrator.promotion import GateDecision
    from peftsweep.orchestrator.tracking import FLAVOR_TAG, SweepTracker
    from peftsweep.trainables.trial_config import TrialConfig

    spec = _spec(tmp_path, "lora", "org/unreachable-model")
    export = tmp_path / "ckpt"
    export.mkdir()
    (export / "adapter_config.json").write_text("{}")
    tracker = SweepTracker(spec)
    tracker.start_method("lora")
    record = tracker.start_trial(TrialConfig(spec, "lora", 1e-3, 4, 0, tmp_path, trial_id="t0"))
    tracker.log_result(record, {"step": 30, "exact_match": 0.5, "eval_loss": 1.0})
    tracker.finish_trial(record, str(export))
    name, champion, _ = tracker.register(lambda name, run_id: GateDecision(True, "test"))

    version = tracker.client.get_model_version_by_alias(name, "champion")
    assert version.source == f"runs:/{champion.run_id}/adapter"
    why = version.tags[FLAVOR_TAG]
    assert why.startswith("none: OSError: ") and len(why) > 20, why  # the hub lookup's error, in one line
    info = champion_info(spec)
    assert info["load"] == version.tags[FLAVOR_TAG]
