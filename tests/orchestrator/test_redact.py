"""Secrets never reach MLflow: secret names, env values and URL passwords masked, read back from sqlite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.entities import Metric, Param, RunTag

from peftsweep.orchestrator.redact import MASK, RedactingClient, Redactor, is_secret_name
from peftsweep.spec import parse_spec

HF = "hf_TopSecretTokenValue42"  # an env secret
PASSWORD = "tracking-pw-Zq81"  # another, with a character a URL would keep as is
DB_PASSWORD = "hunter2-secret"  # only ever inside a URL's userinfo
KEYED = "sk-only-under-a-secret-key"  # a value whose only tell is its key's name
SECRETS = (HF, PASSWORD, DB_PASSWORD, KEYED)


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("HF_TOKEN", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("MLFLOW_TRACKING_PASSWORD", True),
        ("WANDB_API_KEY", True),
        ("apiKey", True),
        ("APIKey", True),
        ("apikey", True),
        ("db_password", True),
        ("DB_PASSWD", True),
        ("GOOGLE_APPLICATION_CREDENTIALS", True),
        ("option.api_key", True),
        ("PGPASSWORD", True),  # libpq's; the README tells cluster users to set it
        ("HFTOKEN", True),
        ("APITOKEN", True),
        ("SECRETKEY", True),
        ("DB_PASS", True),
        ("PASSPHRASE", True),
        ("pass_at_k", False),  # a metric, not a password
        ("max_new_tokens", False),
        ("keep_checkpoints", False),
        ("pass_k", False),
        ("max_length", False),
        ("tokenizer", False),
        ("TOKENIZERS_PARALLELISM", False),
        ("sort_keys", False),
        ("lr", False),
    ],
)
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_env_values_with_secret_names_are_masked() -> None:
    r = Redactor(
        {
            "HF_TOKEN": HF,
            "MLFLOW_TRACKING_PASSWORD": "p@ss/word-1",
            "SHORT_KEY": "abc",  # too short to mask: it would garble ordinary words
            "PWD": "/work/main",  # the working directory, not a password
            "HOME": "/home/someone",
        }
    )
    text = f"token {HF}, url https://u:p%40ss%2Fword-1@h, raw p@ss/word-1, abc, /work/main, /home/someone"
    assert r.text(text) == "token ***, url https://u:***@h, raw ***, abc, /work/main, /home/someone"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://user:pw@host/db", "postgresql://user:***@host/db"),
        ("https://user:pw@host", "https://user:***@host"),
        ("mysql+pymysql://u:a%2Fb@db:3306/x?ssl=1", "mysql+pymysql://u:***@db:3306/x?ssl=1"),
        ("optuna at 'postgresql://u:hunter2@db/o' failed", "optuna at 'postgresql://u:***@db/o' failed"),
        ("https://user@host/path", "https://user@host/path"),  # no password
        ("https://host:8080/path", "https://host:8080/path"),  # a port is not a password
        ("https://host:8080/a@b", "https://host:8080/a@b"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ],
)
def test_url_passwords_are_masked(url: str, masked: str) -> None:
    assert Redactor({}).text(url) == masked


def test_data_masks_secret_keys_and_keeps_shape() -> None:
    r = Redactor({"HF_TOKEN": HF})
    data = {
        "api_key": KEYED,
        "password": None,  # nothing to hide
        "nested": [{"token": 123}, (f"x {HF}", 2, 0.5, True, None)],
        "max_new_tokens": 16,
    }
    assert r.data(data) == {
        "api_key": MASK,
        "password": None,
        "nested": [{"token": MASK}, ("x ***", 2, 0.5, True, None)],
        "max_new_tokens": 16,
    }


def _everything(client: RedactingClient, run_id: str, dst: Path) -> str:
    """All a reader of the store can see of a run: name, params, tags and every artifact's text."""
    run = client.get_run(run_id)
    root = Path(client.download_artifacts(run_id, "", str(dst)))
    files = {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}
    return json.dumps([run.info.run_name, run.data.params, run.data.tags, files])


def test_run_and_registry_writes_are_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", HF)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    client = RedactingClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")  # reads the env now
    db_url = f"postgresql://u:{DB_PASSWORD}@db/optuna"
    exp = client.create_experiment("s", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(
        exp, run_name=f"run-{HF}", tags={"ordinary": "keep me", "api_key": KEYED, "note": f"t={HF}"}
    ).info.run_id
    client.update_run(run_id, name=f"renamed-{HF}")
    client.log_param(run_id, "lr", 0.001)
    client.log_param(run_id, "storage", db_url)
    client.log_param(run_id, "option.api_key", KEYED)
    client.log_batch(
        run_id,
        metrics=[Metric("eval_loss", 0.25, 0, 1)],
        params=[Param("rank", "8"), Param("secret", KEYED), Param("auth", f"Bearer {HF}")],
        tags=[RunTag("peftsweep.failure", f"401 for {PASSWORD}"), RunTag("AWS_SECRET_ACCESS_KEY", KEYED)],
    )
    client.set_tag(run_id, "peftsweep.outcome", "completed")
    client.set_tag(run_id, "db_password", KEYED)
    client.log_text(run_id, f"Traceback...\nHTTPError: token {HF} rejected by {db_url}\n", "error.txt")
    nested = {"tracking": {"optuna_storage": db_url}, "env": {"HF_TOKEN": KEYED}, "lr": 0.001}
    client.log_dict(run_id, {**nested, "note": f"pw {PASSWORD}"}, "spec.json")
    client.log_dict(run_id, nested, "spec.yaml")

    name = "reg"
    client.create_registered_model(name, tags={"token": KEYED}, description=f"best of {db_url}")
    client.set_registered_model_tag(name, "owner_credentials", KEYED)
    version = client.create_model_version(
        name,
        source=f"runs:/{run_id}/adapter",
        run_id=run_id,
        tags={"lr": "0.001", "base_model": "tiny", "apiKey": KEYED, "note": HF},
        description=f"from {HF}",
    ).version
    client.set_model_version_tag(name, version, "peftsweep.promotion", f"beats champion; {PASSWORD}")
    client.set_model_version_tag(name=name, version=version, key="hf_token", value=KEYED)

    seen = _everything(client, run_id, tmp_path / "dl")
    model, mv = client.get_registered_model(name), client.get_model_version(name, version)
    seen += json.dumps([model.description, model.tags, mv.description, mv.tags])
    for secret in SECRETS:
        assert secret not in seen, secret

    run = client.get_run(run_id)
    assert run.info.run_name == "renamed-***"
    assert run.data.params == {
        "lr": "0.001",
        "storage": "postgresql://u:***@db/optuna",
        "option.api_key": MASK,
        "rank": "8",
        "secret": MASK,
        "auth": "Bearer ***",
    }
    assert run.data.metrics == {"eval_loss": 0.25}
    tags = run.data.tags
    assert (tags["ordinary"], tags["api_key"], tags["note"], tags["peftsweep.outcome"]) == (
        "keep me",
        MASK,
        "t=***",
        "completed",
    )
    assert (tags["peftsweep.failure"], tags["AWS_SECRET_ACCESS_KEY"], tags["db_password"]) == (
        "401 for ***",
        MASK,
        MASK,
    )
    root = Path(client.download_artifacts(run_id, "", str(tmp_path / "dl2")))
    assert (root / "error.txt").read_text().startswith("Traceback...\nHTTPError: token *** rejected by")
    expected = {"tracking": {"optuna_storage": "postgresql://u:***@db/optuna"}, "env": {"HF_TOKEN": MASK}}
    assert json.loads((root / "spec.json").read_text()) == {**expected, "lr": 0.001, "note": "pw ***"}
    assert yaml.safe_load((root / "spec.yaml").read_text()) == {**expected, "lr": 0.001}
    promotion = {"peftsweep.promotion": "beats champion; ***", "hf_token": MASK}
    assert mv.tags == {"lr": "0.001", "base_model": "tiny", "apiKey": MASK, "note": MASK, **promotion}
    assert (mv.description, model.description) == ("from ***", "best of postgresql://u:***@db/optuna")
    assert (model.tags, mv.run_id) == ({"token": MASK, "owner_credentials": MASK}, run_id)


def test_logged_spec_has_no_storage_password(tmp_path: Path) -> None:
    spec = parse_spec(
        {
            "name": "x",
            "methods": [{"name": "lora"}],
            "tracking": {"optuna_storage": f"postgresql://u:{DB_PASSWORD}@db/optuna"},
        },
        base_dir=tmp_path,
    )
    client = RedactingClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("x", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    client.log_dict(run_id, spec.model_dump(mode="json"), "spec.json")
    logged = Path(client.download_artifacts(run_id, "spec.json", str(tmp_path / "dl"))).read_text()
    assert DB_PASSWORD not in logged
    tracking = json.loads(logged)["tracking"]
    assert tracking["optuna_storage"] == "postgresql://u:***@db/optuna"
    assert tracking["root"] == str(spec.tracking.root)  # ordinary values intact


def test_report_files_are_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """report.md/html are logged as files (not rewritten by the client): the report redacts them itself."""
    from peftsweep.orchestrator.report import build_report

    monkeypatch.setenv("DEMO_TOKEN", "sweepsecret42")  # contrived: the sweep's name is the secret
    spec = parse_spec({"name": "sweepsecret42", "methods": ["lora"]}, base_dir=tmp_path)
    client = RedactingClient(tracking_uri=spec.tracking.mlflow_tracking_uri())
    spec.tracking.root.mkdir(parents=True, exist_ok=True)
    exp = client.create_experiment(spec.name, artifact_location=spec.tracking.artifact_root.as_uri())
    sweep = client.create_run(exp, tags={"peftsweep.level": "sweep"}).info.run_id
    tags = {"mlflow.parentRunId": sweep, "peftsweep.level": "method", "peftsweep.method": "lora"}
    method = client.create_run(exp, tags=tags).info.run_id
    for lr, value in ((1e-4, 0.5), (1e-3, 0.8)):
        tags = {"mlflow.parentRunId": method, "peftsweep.level": "trial", "peftsweep.method": "lora"}
        trial = client.create_run(exp, tags=tags).info.run_id
        client.log_batch(
            trial, [Metric("exact_match", value, 0, 1)], [Param("lr", str(lr)), Param("rank", "8")]
        )
        client.set_tag(trial, "peftsweep.outcome", "completed")
        client.set_terminated(trial)

    result = build_report(spec, tmp_path / "report", sweep)
    logged = Path(client.download_artifacts(sweep, "report", str(tmp_path / "dl")))
    for path in (result.markdown, result.html, logged / "report.md", logged / "report.html"):
        text = path.read_text()
        assert "sweepsecret42" not in text
        assert "Sweep report: ***" in text


def test_env_values_of_compound_secret_names_are_masked() -> None:
    r = Redactor({"PGPASSWORD": "pg-Secret-91", "HFTOKEN": "hf_compound_42", "DB_PASS": "db-pass-733"})
    assert r.text("pg-Secret-91 hf_compound_42 db-pass-733") == "*** *** ***"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("https://h/api?token=tok123456&page=2", "https://h/api?token=***&page=2"),
        ("https://acct.blob/c/f?sv=2022&sig=AbC%2Bd3F%3D&se=1", "https://acct.blob/c/f?sv=2022&sig=***&se=1"),
        (
            "https://s3/b/k?X-Amz-Signature=f00ba4&X-Amz-Expires=60",
            "https://s3/b/k?X-Amz-Signature=***&X-Amz-Expires=60",
        ),
        ("Authorization: Bearer eyJhbGciOi.pay.load", "Authorization: Bearer ***"),
        ("curl -H 'Authorization: Basic dXNlcjpwYXNz' h", "curl -H 'Authorization: Basic ***' h"),
        ("401 for Bearer eyJhbGciOiJIUzI1NiJ9", "401 for Bearer ***"),
        ("host=db port=5432 password=hunter2 dbname=o", "host=db port=5432 password=*** dbname=o"),
        ("host=db password='two words'", "host=db password='***'"),
        ("PGPASSWORD=pg-Secret-91 psql -h db", "PGPASSWORD=*** psql -h db"),
        ('{"api_key": "sk-123456", "lr": 0.1}', '{"api_key": "***", "lr": 0.1}'),
        ("postgresql://u:p@ss@host/db", "postgresql://u:***@host/db"),
        (
            "postgresql://u:p@ss@host:5432/db?sslmode=require",
            "postgresql://u:***@host:5432/db?sslmode=require",
        ),
        # not secrets: counts and scores under token names, ports, paths with @, ordinary query parameters
        ("max_new_tokens=5 token_f1=0.51 token_f1: 0.5", "max_new_tokens=5 token_f1=0.51 token_f1: 0.5"),
        ("https://host:8080/a@b?page=2", "https://host:8080/a@b?page=2"),
    ],
)
def test_credentials_in_text_are_masked(text: str, masked: str) -> None:
    assert Redactor({}).text(text) == masked
