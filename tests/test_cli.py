"""CLI commands that need no sweep: `ui` really serves MLflow on loopback; `best` says when there is none."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from peftsweep.cli import app
from peftsweep.cluster.local import free_port


def _spec(tmp_path: Path) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump({"name": "cli", "methods": ["lora"], "tracking": {"root": str(tmp_path / "r")}})
    )
    return path


@pytest.mark.parametrize(
    ("flags", "path", "expect"),
    [
        ([], "/health", b"OK"),
        (["--optuna"], "/api/studies", b'"study_name": "cli/lora"'),
    ],  # MLflow UI; optuna-dashboard
    ids=["mlflow", "optuna"],
)
def test_ui_serves_the_sweep_store_on_loopback_only(
    flags: list[str], path: str, expect: bytes, tmp_path: Path
) -> None:
    port = free_port()
    spec = _spec(tmp_path)
    if flags:  # the dashboard reads the study store; an empty one is created by the first Optuna access
        import optuna

        (tmp_path / "r").mkdir()
        optuna.create_study(study_name="cli/lora", storage=f"sqlite:///{tmp_path / 'r' / 'optuna.db'}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftsweep.cli", "ui", str(spec), "--port", str(port), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # so the server's own workers are stopped with it, by process group
    )
    try:
        deadline, body = time.monotonic() + 90, b""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
                    body = resp.read()
                    break
            except OSError:
                time.sleep(1)
        assert expect in body, (
            proc.stdout.read() if proc.poll() is not None else f"no answer in time: {body!r}"
        )
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        local_addresses = {line.split()[3] for line in listening.splitlines()}
        assert local_addresses == {f"127.0.0.1:{port}"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_best_without_a_sweep_explains_and_fails(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["best", str(_spec(tmp_path))])
    assert result.exit_code == 1
    assert "no champion registered yet" in result.output


def test_methods_lists_every_method_and_whether_it_runs_here() -> None:
    import torch

    from peftsweep import search_spaces

    result = CliRunner().invoke(app, ["methods"])
    assert result.exit_code == 0, result.output
    for name in search_spaces.method_names():
        method = search_spaces.get_method(name)
        (row,) = [line for line in result.output.splitlines() if line.startswith(f"│ {name} ")]
        assert f"{method.lr_range[0]:g}" in row
        if method.requires_cuda and not torch.cuda.is_available():
            assert "no: needs CUDA" in row
        else:
            assert "yes" in row


def test_run_help_offers_nightly_and_unlock_exists() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "--nightly" in result.output and "peftsweep.nightly" in result.output
    unlock = runner.invoke(app, ["unlock", "--help"], env={"COLUMNS": "160"})
    assert unlock.exit_code == 0 and "--force" in unlock.output


_PW = "hunter2-cli-secret"


def test_spec_errors_print_no_password(tmp_path: Path) -> None:
    """A spec error echoes the bad value; a tracking URI's password must not reach the terminal."""
    path = tmp_path / "s.yaml"
    uri = f"postgresql://sweeps:{_PW}@db/mlflow\t"  # a tab: not a URI, so the error quotes it
    path.write_text(yaml.safe_dump({"name": "cli", "methods": ["lora"], "tracking": {"mlflow_uri": uri}}))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "mlflow_uri" in result.output and "postgresql://sweeps:***@db" in result.output
    assert _PW not in result.output


def test_uncaught_errors_print_no_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An exception nobody caught is printed as a traceback, its message redacted, exit 1."""
    from peftsweep.orchestrator import champion

    def refuse(spec: object) -> None:
        raise RuntimeError(f"cannot reach host=db password={_PW} (Authorization: Bearer {_PW})")

    monkeypatch.setattr(champion, "champion_info", refuse)
    with pytest.raises(SystemExit) as exit_info:
        app(["best", str(_spec(tmp_path))], prog_name="peftsweep")
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    assert "RuntimeError: cannot reach host=db password=***" in stderr
    assert _PW not in stderr
