"""`peftsweep tracking serve` refuses an open server beyond loopback, and with credentials runs MLflow's
basic-auth app for real: an unauthenticated request is rejected, an authenticated one answered."""

from __future__ import annotations

import base64
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftsweep import cli
from tests.cluster.servers import mlflow_server, postgres, postgres_bin

AUTH_VARS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_AUTH_CONFIG_PATH",
)
ARGS = [
    "tracking",
    "serve",
    "--backend-store-uri",
    "postgresql://u@db/mlflow",
    "--artifacts-destination",
    "/a",
]


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[list[str], dict[str, str]]]]:
    """Record the server command instead of starting it; no auth variables in the environment."""
    for name in AUTH_VARS:
        monkeypatch.delenv(name, raising=False)
    calls: list[tuple[list[str], dict[str, str]]] = []

    def call(cmd: list[str], env: dict[str, str]) -> int:
        calls.append((cmd, env))
        return 0

    monkeypatch.setattr(cli.subprocess, "call", call)
    yield calls


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "mlflow.internal"])
def test_open_server_beyond_loopback_is_refused(host: str, launched: list) -> None:
    result = CliRunner().invoke(cli.app, [*ARGS, "--host", host])
    assert result.exit_code == 2, result.output
    assert "MLFLOW_TRACKING_PASSWORD" in result.output
    assert launched == []


def test_loopback_server_needs_no_credentials(launched: list) -> None:
    result = CliRunner().invoke(cli.app, [*ARGS, "--host", "127.0.0.1"])
    assert result.exit_code == 0, result.output
    ((cmd, _),) = launched
    assert "--app-name" not in cmd


def test_credentials_turn_on_basic_auth(launched: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "sweeper")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "long-enough-pass-1")
    result = CliRunner().invoke(cli.app, [*ARGS, "--host", "0.0.0.0"])
    assert result.exit_code == 0, result.output
    ((cmd, env),) = launched
    assert cmd[cmd.index("--app-name") + 1] == "basic-auth"
    assert (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"]) == (
        "sweeper",
        "long-enough-pass-1",
    )
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    assert "long-enough-pass-1" not in " ".join(cmd)  # never in argv (ps shows it to every user)


def _status(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow  # Postgres and an MLflow server with its auth app: about a minute on 2 cores
@pytest.mark.skipif(postgres_bin() is None, reason="needs a PostgreSQL server (initdb/pg_ctl)")
def test_authenticated_server_rejects_anonymous_requests() -> None:
    user, password = "sweeper", "long-enough-pass-2"
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env |= {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}
    with tempfile.TemporaryDirectory(prefix="psw-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)  # the postgres user must reach its data directory inside
        with postgres(base, ["mlflow"]) as pg, mlflow_server(base, pg.url("mlflow"), env=env) as uri:
            api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
            assert _status(api) == 401
            assert _status(api, user, "wrong-password-123") == 401
            assert _status(api, user, password) == 200
