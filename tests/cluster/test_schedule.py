"""`peftsweep schedule`: one crontab entry per sweep (replace, remove), strict cron checks, the k8s CronJob.

Every test edits a temporary crontab file (or a fake `crontab` command); the user's crontab is never touched.
"""

from __future__ import annotations

import shutil
import stat
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from peftsweep.cli import app
from peftsweep.cluster import templates
from peftsweep.cluster.schedule import MARKER, validate_cron

USER_LINES = "MAILTO=me@example.com\n# my own job\n*/5 * * * * echo hi\n"


@pytest.fixture
def spec_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the entry runs from the directory `schedule` ran in
    path = tmp_path / "sweeps" / "nightly.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"name": "nightly", "methods": ["lora"], "tracking": {"root": "runs"}}))
    return path


def _schedule(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["schedule", *args])
    return result.exit_code, result.output


def test_scheduling_twice_keeps_one_entry_and_remove_deletes_it(spec_path: Path, tmp_path: Path) -> None:
    crontab = tmp_path / "crontab"
    crontab.write_text(USER_LINES)
    for cron in ("0 2 * * *", "30 3 * * 1-5"):
        code, out = _schedule(str(spec_path), "--cron", cron, "--crontab-file", str(crontab))
        assert code == 0, out
    lines = crontab.read_text().splitlines()
    assert lines[:3] == USER_LINES.splitlines()  # the user's own lines stay as they were
    assert lines[3:4] == [f"{MARKER}nightly"] and len(lines) == 5
    entry = lines[4]
    exe = Path(sys.executable).parent / "peftsweep"
    root = tmp_path / "runs"
    assert entry == (
        f"30 3 * * 1-5 cd {tmp_path} && mkdir -p {root} && {exe} run --nightly {spec_path}"
        f" >> {root / 'nightly-nightly.log'} 2>&1"
    )
    assert entry in out

    code, out = _schedule(str(spec_path), "--remove", "--crontab-file", str(crontab))
    assert code == 0 and "removed sweep 'nightly'" in out
    assert crontab.read_text() == USER_LINES
    code, out = _schedule(str(spec_path), "--remove", "--crontab-file", str(crontab))
    assert code == 0 and "no entry for sweep 'nightly'" in out
    assert crontab.read_text() == USER_LINES


@pytest.mark.parametrize(
    ("cron", "says"),
    [
        ("0 2 * *", "needs 5 fields, got 4"),
        ("@daily", "needs 5 fields, got 1"),
        ("60 2 * * *", "minute '60': 60 is outside 0-59"),
        ("0 24 * * *", "hour '24': 24 is outside 0-23"),
        ("0 2 0 * *", "day of month '0': 0 is outside 1-31"),
        ("0 2 * 13 *", "month '13': 13 is outside 1-12"),
        ("0 2 * * 7", "day of week '7': 7 is outside 0-6"),
        ("*/0 * * * *", "step '0' must be a positive number"),
        ("5-1 * * * *", "range '5-1' runs backwards"),
        ("5/10 * * * *", "a step needs '*' or a range before it"),
        ("1,,2 * * * *", "'' is not a number"),
        ("0 2 * * mon-fri", "names (sun, mon, …) only stand alone"),
        ("0 two * * *", "hour 'two': 'two' is not a number"),
        ("0 ２ * * *", "is not a number"),  # a full-width digit: str.isdigit() would take it
    ],
)
def test_an_invalid_cron_exits_2_and_writes_nothing(
    spec_path: Path, tmp_path: Path, cron: str, says: str
) -> None:
    crontab = tmp_path / "crontab"
    crontab.write_text(USER_LINES)
    before = crontab.stat().st_mtime_ns
    code, out = _schedule(str(spec_path), "--cron", cron, "--crontab-file", str(crontab))
    assert code == 2
    assert "cron expression" in out and says in " ".join(out.split()), out
    assert crontab.read_text() == USER_LINES and crontab.stat().st_mtime_ns == before
    code, out = _schedule(str(spec_path), "--cron", cron, "--k8s")
    assert code == 2 and "CronJob" not in out


@pytest.mark.parametrize(
    ("cron", "normal"),
    [
        ("0 2 * * *", "0 2 * * *"),
        ("  */15   0-6,22-23 1-31/2 jan *", "*/15 0-6,22-23 1-31/2 jan *"),
        ("0 2 * * MON", "0 2 * * MON"),
        ("59 23 31 12 0,6", "59 23 31 12 0,6"),
    ],
)
def test_valid_cron_expressions_pass(cron: str, normal: str) -> None:
    assert validate_cron(cron) == normal


def test_a_missing_cron_or_remove_with_k8s_is_an_error(spec_path: Path, tmp_path: Path) -> None:
    code, out = _schedule(str(spec_path), "--crontab-file", str(tmp_path / "crontab"))
    assert code == 2 and "--cron is required" in out
    code, out = _schedule(str(spec_path), "--remove", "--k8s")
    assert code == 2 and "kubectl delete cronjob" in out
    assert not (tmp_path / "crontab").exists()


def test_percent_signs_are_escaped_for_cron(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cron turns a bare % into a newline (stdin of the command); a path with % must survive."""
    odd = tmp_path / "100%"
    odd.mkdir()
    monkeypatch.chdir(odd)
    path = odd / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "pct", "methods": ["lora"]}))
    crontab = tmp_path / "crontab"
    code, out = _schedule(str(path), "--cron", "0 2 * * *", "--crontab-file", str(crontab))
    assert code == 0, out
    entry = crontab.read_text().splitlines()[1]
    assert "100\\%" in entry and "%" not in entry.replace("\\%", "")


def test_without_crontab_file_it_uses_the_crontab_command(
    spec_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`crontab -l` (no crontab yet: exit 1) then `crontab -`, through a fake `crontab` first on PATH."""
    bin_dir, store = tmp_path / "bin", tmp_path / "fake-crontab"
    bin_dir.mkdir()
    fake = bin_dir / "crontab"
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-l" ]; then cat "{store}" 2>/dev/null || {{ echo "no crontab for me" >&2; exit 1; }}\n'
        f'elif [ "$1" = "-" ]; then cat > "{store}"; else exit 3; fi\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert shutil.which("crontab") == str(fake), "the real crontab must not be reached"
    for _ in range(2):
        code, out = _schedule(str(spec_path), "--cron", "0 2 * * *")
        assert code == 0 and "in your crontab" in out, out
    assert store.read_text().count(f"{MARKER}nightly\n") == 1
    assert _schedule(str(spec_path), "--remove")[0] == 0
    assert store.read_text() == ""


def test_k8s_prints_a_cronjob_on_the_spec_configmap(spec_path: Path) -> None:
    code, out = _schedule(str(spec_path), "--cron", "0 2 * * *", "--k8s")
    assert code == 0, out
    docs = [doc for doc in yaml.safe_load_all(out) if doc]
    (cron_job,) = [d for d in docs if d["kind"] == "CronJob"]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cron_job["apiVersion"] == "batch/v1"
    assert cron_job["spec"]["schedule"] == "0 2 * * *"
    assert cron_job["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron_job["metadata"]["name"]) <= 52
    pod = cron_job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:4] == ["peftsweep", "run", "--nightly", templates.SPEC_FILE]
    assert container["command"][4] == "--address" and container["command"][5].startswith(
        "ray://peftsweep-nightly"
    )
    assert container["image"].startswith("rayproject/ray:")
    assert config_map["data"]["spec.yaml"] == spec_path.read_text()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts[templates.SPEC_DIR]]["configMap"]["name"] == config_map["metadata"]["name"]
    assert pod["restartPolicy"] == "Never"

    code, out = _schedule(
        str(spec_path), "--cron", "0 2 * * *", "--k8s", "--address", "ray://ray:10001", "--image", "me/p:1"
    )
    (cron_job,) = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "CronJob"]
    (container,) = cron_job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"][-1] == "ray://ray:10001" and container["image"] == "me/p:1"
