"""`peftsweep tracking serve`: the MLflow server many nodes share, and the rule for exposing it.

Why a rule: the server's API can move the registry's ``champion`` alias, delete runs and read every adapter,
and MLflow's server has no authentication unless it runs its ``basic-auth`` app. So a server bound beyond
loopback is refused unless authentication is configured; with credentials it always runs the auth app.

Credentials come from the environment, never from argv: ``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD`` (the pair MLflow clients send, so the sweep's driver and the server read the
same variables; the server makes that user its admin on first start), or MLflow's own
``MLFLOW_AUTH_ADMIN_USERNAME`` and ``MLFLOW_AUTH_ADMIN_PASSWORD``, or ``MLFLOW_AUTH_CONFIG_PATH`` (a
``basic_auth.ini``). The auth app also needs ``MLFLOW_FLASK_SERVER_SECRET_KEY`` (CSRF); one is generated
per start when unset (API clients use basic auth, not sessions).
"""

from __future__ import annotations

import ipaddress
import secrets
import sys
from collections.abc import Mapping

DEFAULT_ADMIN = "admin"  # MLflow's own default admin name, when only a password is given


class ExposureError(ValueError):
    """A server that would listen beyond loopback without authentication."""


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; everything else (0.0.0.0, ::, a name, an address) reaches others."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_configured(environ: Mapping[str, str]) -> bool:
    """Whether the environment gives the basic-auth app an admin (or a config of its own)."""
    return any(
        environ.get(name)
        for name in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_CONFIG_PATH")
    )


def server_env(host: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The server's environment: the auth app's admin and CSRF key filled in; refuses an open exposure."""
    env = dict(environ)
    if not auth_configured(env):
        if not is_loopback(host):
            raise ExposureError(
                f"--host {host} would let anyone who reaches it move @champion and read every adapter: "
                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (the server runs MLflow's "
                "basic-auth app with that admin; clients send the same variables), or bind 127.0.0.1"
            )
        return env
    if env.get("MLFLOW_TRACKING_PASSWORD") and not env.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
        env["MLFLOW_AUTH_ADMIN_USERNAME"] = env.get("MLFLOW_TRACKING_USERNAME") or DEFAULT_ADMIN
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = env["MLFLOW_TRACKING_PASSWORD"]
    env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
    return env


def server_command(
    backend_store_uri: str,
    artifacts_destination: str,
    *,
    host: str,
    port: int,
    workers: int,
    allowed_hosts: str | None,
    auth: bool,
) -> list[str]:
    """`mlflow server` with a database backend and proxied artifacts (and the basic-auth app if `auth`)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri]
    cmd += ["--serve-artifacts", "--artifacts-destination", artifacts_destination]
    cmd += ["--host", host, "--port", str(port), "--workers", str(workers)]
    cmd += ["--allowed-hosts", allowed_hosts] if allowed_hosts else []
    return cmd + (["--app-name", "basic-auth"] if auth else [])
