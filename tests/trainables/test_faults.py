"""The drill rules (PEFTSWEEP_FAULTS) and the hang watchdog, on their own; the sweep-level drills are in
tests/orchestrator/test_faults.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from peftsweep.trainables.faults import (
    FAULTS_ENV,
    Fault,
    after_report,
    fault_for,
    faults_from_env,
    trial_index,
)


def test_no_drill_unless_the_environment_asks() -> None:
    assert faults_from_env({}) == []
    assert faults_from_env({FAULTS_ENV: "  "}) == []


@pytest.mark.parametrize(
    "raw",
    ["{not json", '{"kind": "nan", "step": 1}', '[{"kind": "melt", "step": 1}]', '[{"kind": "nan"}]'],
)
def test_a_malformed_drill_is_an_error_not_a_silent_no_op(raw: str) -> None:
    with pytest.raises(ValueError, match=FAULTS_ENV):
        faults_from_env({FAULTS_ENV: raw})


def test_rules_match_method_and_trial_index() -> None:
    rules = faults_from_env(
        {
            FAULTS_ENV: json.dumps(
                [{"method": "lora", "trial": 1, "kind": "kill", "step": 5}, {"kind": "nan", "step": 2}]
            )
        }
    )
    assert fault_for(rules, "lora", 1) == Fault("kill", 5)
    # The catch-all rule (no method, no trial) matches anything the first one does not.
    assert fault_for(rules, "lora", 2) == Fault("nan", 2)
    assert fault_for(rules[:1], "dora", 1) is None
    assert fault_for(rules[:1], "lora", -1) is None  # unknown order: no targeted rule matches


def test_trial_index_is_tunes_creation_counter() -> None:
    name = "tune_trial_ab12cd34"
    assert trial_index(name, f"/runs/tune/x/{name}_3_lr=0.001,rank=4_2026-11-24_08-06-10/") == 2
    assert trial_index(name, f"/runs/tune/x/{name}_12_lr=0.001_2026-11-24_08-06-10") == 11
    assert trial_index(name, "/runs/tune/x/custom-dirname") == -1


def test_crash_fires_only_at_its_step() -> None:
    after_report(Fault("crash", 5), 4)
    after_report(None, 5)
    with pytest.raises(RuntimeError, match="injected fault: crash after step 5"):
        after_report(Fault("crash", 5), 5)


def _child(body: str) -> subprocess.CompletedProcess:
    code = "from peftsweep.trainables.faults import Watchdog\nimport time\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_watchdog_kills_a_silent_process() -> None:
    t0 = time.monotonic()
    proc = _child(
        """
        with Watchdog(1.0) as dog:
            dog.beat()
            time.sleep(30)
        """
    )
    assert proc.returncode == -signal.SIGKILL
    assert "no progress for" in proc.stderr
    assert time.monotonic() - t0 < 20


def test_watchdog_spares_a_beating_process_and_waits_for_its_first_beat() -> None:
    proc = _child(
        """
        with Watchdog(1.0) as dog:
            time.sleep(2.5)  # setup (e.g. loading a base model): not watched yet
            for _ in range(10):
                dog.beat()
                time.sleep(0.25)
        print("done")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
