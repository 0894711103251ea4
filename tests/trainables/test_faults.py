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
)


def test_no_drill_unless_the_environment_asks() -> None:
    assert faults_from_env({}) == []
    assert faults_from_env({FAULTS_ENV: "  "}) == []


@pytest.mark.parametrize(
    "raw",
    [
        "{not json",
        '{"kind": "nan", "step": 1}',
        '[{"kind": "melt", "step": 1}]',
        '[{"kind": "nan"}]',
        '[{"kind": "oom", "step": 1, "phase": "lunch"}]',
        '[{"kind": "oom", "step": 1, "rank": "0"}]',
        '[{"kind": "nan", "step": 1, "phase": "eval"}]',  # phase and rank are the oom drill's
    ],
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


def test_an_oom_rule_names_its_phase_and_rank() -> None:
    rules = [{"kind": "oom", "step": 3, "phase": "optimizer", "rank": 1}, {"kind": "oom", "step": 4}]
    rules = faults_from_env({FAULTS_ENV: json.dumps(rules)})
    assert fault_for(rules, "lora", 0) == Fault("oom", 3, phase="optimizer", rank=1)
    assert fault_for(rules[1:], "lora", 0) == Fault("oom", 4, phase="forward", rank=None)  # every rank
    assert [fault_for([r], "lora", 0).label() for r in rules] == ["oom@3/optimizer#rank1", "oom@4"]


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
            dog.training()
            time.sleep(30)
        """
    )
    assert proc.returncode == -signal.SIGKILL
    assert "no progress for" in proc.stderr
    assert time.monotonic() - t0 < 20


def test_watchdog_spares_a_beating_process_and_leaves_set_up_to_its_own_limit() -> None:
    proc = _child(
        """
        with Watchdog(1.0, setup_timeout_s=None) as dog:
            time.sleep(2.5)  # set-up (e.g. loading a base model): the training hang limit does not apply
            dog.training()
            for _ in range(10):
                dog.beat()
                time.sleep(0.25)
        print("done")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"


def test_a_stalled_set_up_fails_with_its_stage_named() -> None:
    """A set-up that waits forever (like torch's loader on a lock nobody will delete: a Python sleep loop)
    gets SetupStalled naming the stage after setup_timeout_s, instead of waiting for the hang limit."""
    proc = _child(
        """
        from peftsweep.trainables.faults import SetupStalled
        t0 = time.monotonic()
        try:
            with Watchdog(3600.0, setup_timeout_s=1.0) as dog:
                dog.beat("loading DeepSpeed's ops")
                while True:  # what FileBaton.wait does
                    time.sleep(0.1)
        except SetupStalled as exc:
            print(f"{time.monotonic() - t0:.1f}|{exc}")
        """
    )
    assert proc.returncode == 0, proc.stderr
    seconds, message = proc.stdout.strip().split("|")
    assert 1.0 <= float(seconds) < 10.0
    assert "loading DeepSpeed's ops" in message and "setup_timeout_s" in message


def test_set_up_progress_keeps_the_set_up_watchdog_quiet() -> None:
    proc = _child(
        """
        with Watchdog(3600.0, setup_timeout_s=1.0) as dog:
            for stage in range(8):
                dog.beat(f"stage {stage}")
                time.sleep(0.4)
            dog.training()
            time.sleep(1.5)  # training: only the hour-long hang limit applies now
        print("done")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
