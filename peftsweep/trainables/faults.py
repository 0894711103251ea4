"""Fault injection for reliability drills and tests, and the worker-side hang watchdog.

Faults are off unless the driver's environment sets ``PEFTSWEEP_FAULTS`` to a JSON list of rules, e.g.
``[{"method": "lora", "trial": 1, "kind": "kill", "step": 5}]``: the second Tune trial of LoRA's search (in
the order Tune created them)
SIGKILLs its worker after its step-5 report. A rule fires once per trial (a marker file in the trial's
storage remembers it across worker restarts), so a drill shows what recovery does. Kinds:

- ``nan``: the loss is NaN from ``step`` on (the divergence guard must stop the trial);
- ``oom``: an out-of-memory error at ``step`` (the trial must fail with that reason, not be retried);
- ``crash``: a Python exception after the report at ``step`` (Ray Train restarts the workers);
- ``kill``: SIGKILL of the worker process after the report at ``step`` (likewise);
- ``hang``: the worker stops reporting after ``step`` (the watchdog must kill it; then as ``kill``).

The watchdog is not a drill: every worker runs one (``resources.hang_timeout_s``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

FAULTS_ENV = "PEFTSWEEP_FAULTS"
Kind = Literal["nan", "oom", "crash", "kill", "hang"]
_KINDS = ("nan", "oom", "crash", "kill", "hang")
# Ray Train V2's controller collects workers' reports every 2 s; a worker killed before that loses its last
# report (and the checkpoint with it). A crash/kill drill waits this long after its report, so it tests the
# recovery from that checkpoint rather than this race.
_SETTLE_S = 5.0


@dataclass(frozen=True)
class Fault:
    """One injected fault of one trial: what, at which optimizer step, and its fired-marker file."""

    kind: Kind
    step: int
    marker: str = ""  # created when the fault fires, so that it fires once per trial, restarts included

    def to_config(self) -> dict[str, Any]:
        return asdict(self)

    def armed(self) -> bool:
        return not (self.marker and Path(self.marker).exists())

    def fire(self) -> None:
        """Remember that the fault fired (before it takes the process down)."""
        if self.marker:
            Path(self.marker).parent.mkdir(parents=True, exist_ok=True)
            Path(self.marker).touch()


def faults_from_env(environ: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The drill's rules from ``PEFTSWEEP_FAULTS`` (none when unset); a malformed value is an error, not a
    silently skipped drill."""
    raw = (environ if environ is not None else os.environ).get(FAULTS_ENV, "").strip()
    if not raw:
        return []
    try:
        rules = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{FAULTS_ENV}: not JSON ({exc})") from None
    if not isinstance(rules, list):
        raise ValueError(f"{FAULTS_ENV}: expected a JSON list of rules")
    for i, rule in enumerate(rules):
        valid = isinstance(rule, dict) and rule.get("kind") in _KINDS and isinstance(rule.get("step"), int)
        if not valid:
            raise ValueError(
                f"{FAULTS_ENV}[{i}]: expected {{'method', 'trial', 'kind': one of {_KINDS}, 'step': int}}"
            )
    return rules


def trial_index(trial_name: str, trial_dir: str) -> int:
    """A Tune trial's 0-based creation order within its run, or -1 when unknown.

    Tune's trial ids are random; the order is the counter that starts its experiment tag, which Tune's
    default trial directory name carries after the trial name (``tune_trial_ab12cd34_3_lr=…``).
    """
    match = re.match(re.escape(trial_name) + r"_(\d+)_", os.path.basename(trial_dir.rstrip("/")))
    return int(match.group(1)) - 1 if match else -1


def fault_for(rules: list[dict[str, Any]], method: str, index: int) -> Fault | None:
    """The first rule matching this method and trial index (a rule without either matches any)."""
    for rule in rules:
        if rule.get("method", method) == method and rule.get("trial", index) == index:
            return Fault(rule["kind"], rule["step"])
    return None


def after_report(fault: Fault | None, step: int) -> None:
    """The post-report faults: crash, kill, hang (the watchdog ends a hang)."""
    if fault is None or step != fault.step or fault.kind not in ("crash", "kill", "hang"):
        return
    if fault.kind != "hang":
        time.sleep(_SETTLE_S)
    fault.fire()
    if fault.kind == "crash":
        raise RuntimeError(f"injected fault: crash after step {step}")
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Event().wait()  # hang, forever: only the watchdog gets this worker out


class Watchdog:
    """Kills its own worker process (SIGKILL) when the training loop made no progress for ``timeout_s``.

    A hung worker (a stuck collective, a deadlocked data loader) never errors, so Ray Train would wait on it
    forever; a dead one is restarted from the last checkpoint (``FailureConfig``). A thread of the process
    itself does it, because the driver cannot tell a slow eval from a hang without a heartbeat. The loop
    beats at each setup stage (base model loaded, adapter applied, engine built), after every optimizer step
    and after every report; the watch starts at the first beat.
    """

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self._last: float | None = None  # not armed before the first beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="peftsweep-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        if self.timeout_s is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def beat(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        assert self.timeout_s is not None
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            if self._last is None:
                continue
            silent = time.monotonic() - self._last
            if silent > self.timeout_s:
                print(
                    f"peftsweep watchdog: no progress for {silent:.0f} s (resources.hang_timeout_s = "
                    f"{self.timeout_s:g}); killing this worker so that Ray Train restarts it from its last "
                    "checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
                os.kill(os.getpid(), signal.SIGKILL)
