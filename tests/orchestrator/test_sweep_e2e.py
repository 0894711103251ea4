"""End to end through the real CLI: Ray Tune + Optuna + Ray Train/DeepSpeed + MLflow on a tiny sweep.

One sweep per module (it costs a minute or two on 2 cores); the tests below each check one promise of it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from peftsweep.cli import app
from peftsweep.orchestrator.scoring import run_record, top_configs
from peftsweep.spec import SweepSpec, load_spec

METHODS = ["lora", "pissa", "milora", "dora"]
TRIALS = 2
SEEDS = 1  # confirmation re-runs of each method's best config


@pytest.fixture(scope="module")
def sweep(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("e2e")
    spec_path = root / "tiny.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": "e2e",
                # A band of LRs that learns within 60 steps, so the champion's metric is not trivially 0.
                "methods": [{"name": m, "lr_min": 3e-3, "lr_max": 2e-2} for m in METHODS],
                "search": {"trials_per_method": TRIALS, "n_startup_trials": 1, "confirm_seeds": SEEDS},
                "training": {"max_steps": 60, "eval_every": 30},
                "data": {"max_eval_examples": 48},
                "resources": {"cpus_per_worker": 0.9, "max_concurrent_trials": 2},
                "tracking": {"root": str(root / "runs")},
            }
        )
    )
    result = CliRunner().invoke(app, ["run", str(spec_path)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    spec = load_spec(spec_path)
    return {
        "spec": spec,
        "spec_path": spec_path,
        "output": result.output,
        "client": MlflowClient(spec.tracking.mlflow_tracking_uri()),
    }


def _runs(client: MlflowClient, spec: SweepSpec) -> list:
    exp = client.get_experiment_by_name(spec.name)
    return client.search_runs([exp.experiment_id], max_results=1000)


def test_final_table_lists_every_method(sweep: dict[str, Any]) -> None:
    out = sweep["output"]
    assert "best config per method" in out and "mean±std" in out
    for method in METHODS:
        assert method in out
    assert "champion:" in out


def _record(run: Any) -> Any:
    """An MLflow trial run as `scoring` reads a trial."""
    params, tags = run.data.params, run.data.tags
    trial = SimpleNamespace(
        method=params["method"],
        lr=float(params["lr"]),
        rank=int(params["rank"]),
        seed=int(params["seed"]),
        metrics=dict(run.data.metrics),
        status=tags["peftsweep.outcome"],
        role=tags["peftsweep.role"],
    )
    return run_record(trial, "exact_match")


def test_mlflow_holds_sweep_method_trial_tree(sweep: dict[str, Any]) -> None:
    client, spec = sweep["client"], sweep["spec"]
    runs = _runs(client, spec)
    by_level: dict[str, list] = {}
    for run in runs:
        by_level.setdefault(run.data.tags["peftsweep.level"], []).append(run)
    (sweep_run,) = by_level["sweep"]
    methods = by_level["method"]
    assert sorted(r.data.tags["peftsweep.method"] for r in methods) == sorted(METHODS)
    assert all(r.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id for r in methods)
    method_ids = {r.info.run_id: r.data.tags["peftsweep.method"] for r in methods}
    trials = [t for t in by_level["trial"] if t.data.tags["peftsweep.role"] == "search"]
    storage = spec.tracking.optuna_storage_url()
    for method in METHODS:  # one MLflow run per trial of the method's study, within its budget
        study = optuna.load_study(study_name=f"{spec.name}/{method}", storage=storage)
        mine = [t for t in trials if t.data.params["method"] == method]
        assert len(mine) == len(study.trials) <= TRIALS
    confirms = [t for t in by_level["trial"] if t.data.tags["peftsweep.role"] == "confirm"]
    for method_run in methods:  # the top search configs (full-length ones), each with the next seed
        method = method_run.data.tags["peftsweep.method"]
        records = [_record(t) for t in trials if t.data.params["method"] == method]
        top = {f"{c.lr:.12g}" for c in top_configs(records, spec.search.confirm_top_k, "max")}
        mine = [t for t in confirms if t.data.params["method"] == method]
        assert len(mine) == len(top) * SEEDS
        assert all(f"{float(t.data.params['lr']):.12g}" in top and t.data.params["seed"] == "1" for t in mine)
        assert method_run.data.metrics["seeds"] == 1 + SEEDS  # the score stands on the most seeds
        assert method_run.data.metrics["exact_match_std"] >= 0
    for trial in trials:
        assert method_ids[trial.data.tags["mlflow.parentRunId"]] == trial.data.params["method"]
        assert {"lr", "rank", "alpha", "seed"} <= set(trial.data.params)
        assert trial.data.metrics["trainable_params"] > 0 and trial.data.metrics["adapter_bytes"] > 0
        assert float(trial.data.params["alpha"]) == float(trial.data.params["rank"])  # paper: alpha = r
        history = client.get_metric_history(trial.info.run_id, "exact_match")
        assert [m.step for m in history] == [30, 60] or trial.data.tags["peftsweep.outcome"] != "completed"
        artifacts = [a.path for a in client.list_artifacts(trial.info.run_id, "adapter")]
        assert "adapter/adapter_config.json" in artifacts
    assert not [r for r in runs if r.info.status == "RUNNING"], "no run may be left RUNNING"


def test_registry_has_a_version_per_method_and_a_champion(sweep: dict[str, Any]) -> None:
    client, spec = sweep["client"], sweep["spec"]
    versions = client.search_model_versions(f"name='{spec.name}'")
    assert sorted(v.tags["peftsweep.method"] for v in versions) == sorted(METHODS)
    champion = client.get_model_version_by_alias(spec.name, "champion")
    # The best-scored method (mean over seeds of its best config), not the luckiest single trial.
    means = {v.tags["peftsweep.method"]: float(v.tags["exact_match_mean"]) for v in versions}
    assert champion.tags["peftsweep.method"] == max(METHODS, key=means.__getitem__)  # ties: spec order
    for method in METHODS:
        version = client.get_model_version_by_alias(spec.name, f"best-{method}")
        assert version.tags["peftsweep.method"] == method
        assert int(version.tags["trainable_params"]) > 0 and int(version.tags["adapter_bytes"]) > 0


def test_each_method_has_its_own_optuna_study(sweep: dict[str, Any]) -> None:
    spec = sweep["spec"]
    storage = spec.tracking.optuna_storage_url()
    for method in METHODS:
        study = optuna.load_study(study_name=f"{spec.name}/{method}", storage=storage)
        assert 1 <= len(study.trials) <= TRIALS
        # Trials ASHA stopped are PRUNED (their step-30 value is no result); the others COMPLETE.
        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        assert all(t.state in done for t in study.trials)
        lr_min, lr_max = spec.method(method).lr_min, spec.method(method).lr_max
        assert all(lr_min <= t.params["lr"] <= lr_max for t in study.trials)


def test_champion_loads_with_plain_peft_and_reproduces_its_metric(
    sweep: dict[str, Any], tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftsweep.orchestrator.champion import champion_info, download_champion
    from peftsweep.trainables.data import load_split
    from peftsweep.trainables.metrics import evaluate
    from peftsweep.trainables.model import resolve_base_model

    spec = sweep["spec"]
    info = champion_info(spec)
    adapter = download_champion(spec, str(tmp_path))
    base_dir = resolve_base_model(spec.base_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    eval_ds = load_split(spec.data.task, "eval", limit=spec.data.max_eval_examples)
    got = evaluate(model, tokenizer, eval_ds)
    assert info["exact_match"] > 0, "the tiny sweep should learn something, else this check is vacuous"
    assert got["exact_match"] == pytest.approx(info["exact_match"], abs=1e-9)
    logged_loss = sweep["client"].get_run(info["run_id"]).data.metrics["eval_loss"]
    assert got["eval_loss"] == pytest.approx(logged_loss, rel=1e-4)


def test_champion_loads_through_mlflow_and_generates(sweep: dict[str, Any], tmp_path: Path) -> None:
    """`mlflow.transformers.load_model("models:/e2e@champion")`, one call: the trial's adapter on the built-in
    base (embedded in the model), the same function as the adapter loaded with plain PEFT, and it answers
    the held-out subtractions as the sweep's evaluation scored them."""
    import mlflow.pyfunc
    import mlflow.transformers
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftsweep.orchestrator.champion import champion_info, download_champion
    from peftsweep.orchestrator.logged_model import tracking_uri
    from peftsweep.trainables.data import load_split
    from peftsweep.trainables.model import resolve_base_model

    client, spec = sweep["client"], sweep["spec"]
    for method in METHODS:  # every registered version is a logged model of its trial's run
        version = client.get_model_version_by_alias(spec.name, f"best-{method}")
        assert version.source.startswith("models:/m-") and version.tags["peftsweep.flavor"] == "transformers"
        assert (
            client.get_logged_model(version.source.removeprefix("models:/")).source_run_id == version.run_id
        )
    info = champion_info(spec)
    uri = f"models:/{spec.name}@champion"
    with tracking_uri(spec.tracking.mlflow_tracking_uri()):
        pipe = mlflow.transformers.load_model(uri)
        predictor = mlflow.pyfunc.load_model(uri)

    rows = list(load_split(spec.data.task, "eval", limit=spec.data.max_eval_examples))
    prompts = [r["prompt"] for r in rows]
    base_dir = resolve_base_model(spec.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), download_champion(spec, str(tmp_path))
    ).eval()
    batch = tokenizer(prompts, return_tensors="pt")  # "aa-bb=": one length, no padding
    with torch.no_grad():
        assert torch.allclose(pipe.model(**batch).logits, reference(**batch).logits, atol=1e-6)

    generated = pipe(prompts, max_new_tokens=4, do_sample=False, return_full_text=False)
    answers = [out[0]["generated_text"] for out in generated]
    assert predictor.predict(prompts) == answers  # the pyfunc view generates the same
    exact = sum(a == r["completion"] for a, r in zip(answers, rows, strict=True)) / len(rows)
    assert exact > 0, "the champion should answer some subtractions, else this check is vacuous"
    assert exact == pytest.approx(info["exact_match"], abs=1e-9)


def test_best_command_prints_the_champion(sweep: dict[str, Any]) -> None:
    result = CliRunner().invoke(app, ["best", str(sweep["spec_path"])])
    assert result.exit_code == 0, result.output
    assert "models:/e2e@champion" in result.output
    assert 'mlflow.transformers.load_model("models:/e2e@champion")' in result.output
    assert any(f"method: {m}" in result.output for m in METHODS)


@pytest.mark.slow
def test_a_second_night_continues_the_studies(sweep: dict[str, Any], tmp_path: Path) -> None:
    """`run --nightly` of the same spec: TRIALS more trials in each method's study (TPE warm from the first
    night's), those kept as they were, a second sweep run tagged with the UTC date on the same data version,
    the champion changed only through the gate, the lock released. It runs the module's sweep again, so it
    must stay the last test here (the ones above count one sweep run and TRIALS trials per study)."""
    from datetime import UTC, datetime

    from peftsweep.orchestrator.lock import read_lock

    client, spec = sweep["client"], sweep["spec"]
    storage = spec.tracking.optuna_storage_url()
    first_champion = client.get_model_version_by_alias(spec.name, "champion")

    def studies() -> dict[str, list[tuple]]:
        return {
            m: [
                (t.number, t.params, t.value, t.state)
                for t in optuna.load_study(study_name=f"{spec.name}/{m}", storage=storage).trials
            ]
            for m in METHODS
        }

    before = studies()
    days = {datetime.now(UTC).date().isoformat()}
    result = CliRunner().invoke(app, ["run", "--nightly", str(sweep["spec_path"])])
    assert result.exit_code == 0, result.output + repr(result.exception)
    days.add(datetime.now(UTC).date().isoformat())  # the night may cross midnight UTC

    for method, trials in studies().items():
        assert len(before[method]) == TRIALS
        assert len(trials) == 2 * TRIALS  # confirm runs have no searcher: Optuna never sees them
        assert trials[:TRIALS] == before[method]  # the first night's trials, unchanged

    sweeps = sorted(
        (r for r in _runs(client, spec) if r.data.tags["peftsweep.level"] == "sweep"),
        key=lambda r: r.info.start_time,
    )
    assert len(sweeps) == 2
    first, night = sweeps
    assert "peftsweep.nightly" not in first.data.tags
    assert night.data.tags["peftsweep.nightly"] in days and night.info.status == "FINISHED"
    inputs = [client.get_run(r.info.run_id).inputs.dataset_inputs for r in sweeps]
    (a,), (b,) = inputs
    assert a.dataset.name == b.dataset.name == spec.data.task
    assert a.dataset.digest == b.dataset.digest  # same files, spec and tokenizer: same data version
    assert read_lock(spec) is None
    _the_champion_changed_only_through_the_gate(spec, client, night, first_champion, tmp_path)


def _the_champion_changed_only_through_the_gate(
    spec: SweepSpec, client: MlflowClient, night: Any, first_champion: Any, tmp_path: Path
) -> None:
    """The gate's decision, re-made here (both adapters evaluated on the same held-out rows, the margin
    applied), is the one the night recorded, and the aliases follow it: promoted → ``champion`` is the
    night's version; not → ``champion`` stays the first night's and ``challenger`` is the night's."""
    import json

    from peftsweep.orchestrator.promotion import decide
    from peftsweep.trainables.metrics import evaluate_adapter
    from peftsweep.trainables.prepared import prepare_data

    summary_file = client.download_artifacts(night.info.run_id, "summary.json", str(tmp_path))
    summary = json.loads(Path(summary_file).read_text())
    promoted = summary["promotion"]["promoted"]
    alias = "champion" if promoted else "challenger"
    assert night.data.tags["peftsweep.promotion"] == f"{alias}: {summary['promotion']['reason']}"
    new = client.get_model_version(spec.name, summary[alias]["version"])
    method = summary[alias]["method"]
    assert new.tags["peftsweep.method"] == method and new.run_id != first_champion.run_id
    assert client.get_model_version_by_alias(spec.name, f"best-{method}").version == new.version  # tonight's

    data_dir = str(prepare_data(spec))  # the sweep's cached prepared data
    scores = {}
    for role, run_id in (("new", new.run_id), ("champion", first_champion.run_id)):
        adapter = client.download_artifacts(run_id, "adapter", str(tmp_path / role))
        scores[role] = evaluate_adapter(spec, data_dir, adapter)[spec.search.metric]
    expected = decide(scores["new"], scores["champion"], spec.search.direction, spec.search.promotion_margin)
    assert promoted is expected, (scores, summary["promotion"])
    assert f"{scores['new']:.4f}" in summary["promotion"]["reason"]  # the gate scored the same adapter
    assert f"{scores['champion']:.4f}" in summary["promotion"]["reason"]

    champion = client.get_model_version_by_alias(spec.name, "champion")
    if expected:
        assert champion.version == new.version
    else:
        assert champion.version == first_champion.version  # untouched
        assert client.get_model_version_by_alias(spec.name, "challenger").version == new.version
