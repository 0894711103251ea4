"""Fault injection for reliability drills and tests, and the worker-side hang watchdog.

Faults are off unless the driver's environment sets ``PEFTSWEEP_FAULTS`` to a JSON list of rules, e.g.
``[{"method": "lora", "trial": 1, "kind": "kill", "step": 5}]``: the second Tune trial of LoRA's search (in
the order Tune created them)
SIGKILLs its worker after its step-5 report. A rule fires once per trial (a marker file in the trial's
storage remembers it across worker restarts), so a drill shows what recovery does. Kinds:

- ``nan``: the loss is NaN from ``step`` on (the divergence guard must stop the trial);
- ``oom``: an out-of-memory error at ``step`` (the trial must fail with that reason, not be retried), in the
  rule's ``phase``: ``forward`` (the forward/backward pass, the default), ``optimizer`` (inside the optimizer
  step, where the optimizer's state is first allocated), ``eval`` or ``export`` (the first eval point at or
  after ``step``: its evaluation, or the adapter export); with ``rank``, only on that worker (a real OOM hits
  one rank first while the others wait in a collective);
- ``crash``: a Python exception after the report at ``step`` (Ray Train restarts the workers);
- ``kill``: SIGKILL of the worker process after the report at ``step`` (likewise);
- ``hang``: the worker stops reporting after ``step`` (the watchdog must kill it; then as ``kill``).

The watchdog is not a drill: every worker runs one (``resources.hang_timeout_s``).
"""

from __future__ import annotations

import json
import os
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
Phase = Literal["forward", "optimizer", "eval", "export"]  # where an `oom` drill strikes
PHASES = ("forward", "optimizer", "eval", "export")
# Ray Train V2's controller collects workers' reports every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (0.25 s in a
# sweep, orchestrator/trial.py); a worker killed before that loses its last report (and the checkpoint with
# it). A crash/kill drill in a Ray Train worker waits this long after its report, so it tests the recovery
# from that checkpoint rather than this race. Inline trials need no wait: Tune's report returns only once
# the driver has taken the result.
TRAIN_SETTLE_S = 2.0


@dataclass(frozen=True)
class Fault:
    """One injected fault of one trial: what, at which optimizer step, and its fired-marker file."""

    kind: Kind
    step: int
    marker: str = ""  # created when the fault fires, so that it fires once per trial, restarts included
    phase: Phase = "forward"  # oom only: where in the loop
    rank: int | None = None  # oom only: the one worker it strikes (None: every worker)

    def to_config(self) -> dict[str, Any]:
        return asdict(self)

    def label(self) -> str:
        """``kind@step``, then ``/phase`` and ``#rankN`` where an oom drill sets them (the trial's tag)."""
        phase = f"/{self.phase}" if self.phase != "forward" else ""
        return f"{self.kind}@{self.step}{phase}" + (f"#rank{self.rank}" if self.rank is not None else "")

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
        valid = (
            isinstance(rule, dict)
            and rule.get("kind") in _KINDS
            and isinstance(rule.get("step"), int)
            and rule.get("phase", "forward") in PHASES
            and isinstance(rule.get("rank", 0), int)
            and (rule["kind"] == "oom" or not {"phase", "rank"} & set(rule))
        )
        if not valid:
            raise ValueError(
                f"{FAULTS_ENV}[{i}]: expected {{'method', 'trial', 'kind': one of {_KINDS}, 'step': int}}, "
                f"and for 'oom' optionally 'phase': one of {PHASES} and 'rank': int"
            )
    return rules


def fault_for(rules: list[dict[str, Any]], method: str, index: int) -> Fault | None:
    """The first rule matching this method and trial index (a rule without either matches any)."""
    for rule in rules:
        if rule.get("method", method) == method and rule.get("trial", index) == index:
            return Fault(
                rule["kind"], rule["step"], phase=rule.get("phase", "forward"), rank=rule.get("rank")
            )
    return None


def after_report(fault: Fault | None, step: int, settle_s: float = 0.0) -> None:
    """The post-report faults: crash, kill, hang (the watchdog ends a hang), ``settle_s`` after the report."""
    if fault is None or step != fault.step or fault.kind not in ("crash", "kill", "hang"):
        return
    if fault.kind != "hang":
        time.sleep(settle_s)
    fault.fire()
    if fault.kind == "crash":
        raise RuntimeError(f"injected fault: crash after step {step}")
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Event().wait()  # hang, forever: only the watchdog gets this worker out


class SetupStalled(RuntimeError):
    """A trial's set-up made no progress for ``resources.setup_timeout_s`` (raised in the trial's thread)."""

    reason = "trial set-up made no progress"

    def __init__(self, *args: object) -> None:
        # Raised asynchronously (the class, not an instance): the message comes from the class attribute.
        super().__init__(*(args or (self.reason,)))


class Watchdog:
    """Ends a trial that stopped making progress: a stalled set-up fails with its reason, a hung training
    loop is SIGKILLed so that it restarts from its last checkpoint.

    Why a thread of the trial's own process: a hung worker (a stuck collective, a deadlocked data loader, a
    lock file nobody will delete) never errors, so Ray would wait on it forever, and the driver cannot tell a
    slow eval from a hang without a heartbeat. The loop beats at each set-up stage (naming it), after every
    optimizer step and after every report.

    - Set-up (until `training` is called): after ``setup_timeout_s`` without a beat, `SetupStalled` naming
      the stage is raised in the trial's thread, so the trial fails with that reason; if the thread is stuck
      in C code and does not take it within ``grace_s``, the process is killed.
    - Training: after ``timeout_s`` without a beat the process is SIGKILLed, and the executor restarts it from
      its last checkpoint like a crashed one.
    """

    def __init__(
        self, timeout_s: float | None, setup_timeout_s: float | None = None, grace_s: float = 30.0
    ) -> None:
        self.timeout_s, self.setup_timeout_s, self.grace_s = timeout_s, setup_timeout_s, grace_s
        self._last = time.monotonic()
        self._stage = "starting"
        self._in_setup = True
        self._raised_at: float | None = None
        self._target = threading.current_thread()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="peftsweep-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        if self.timeout_s is not None or self.setup_timeout_s is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def beat(self, stage: str | None = None) -> None:
        """Progress; ``stage`` names the set-up stage that starts now (shown if it stalls)."""
        self._last = time.monotonic()
        if stage is not None:
            self._stage = stage

    def training(self) -> None:
        """Set-up is over: from now on the training hang timeout applies."""
        self._in_setup = False
        self.beat()

    def _watch(self) -> None:
        limits = [t for t in (self.timeout_s, self.setup_timeout_s) if t is not None]
        while not self._stop.wait(min(1.0, min(limits) / 4)):
            silent = time.monotonic() - self._last
            if self._in_setup and self.setup_timeout_s is not None:
                if self._raised_at is None and silent > self.setup_timeout_s:
                    self._fail_setup(silent)
                elif self._raised_at is not None and time.monotonic() - self._raised_at > self.grace_s:
                    self._kill(
                        f"set-up stuck at {self._stage!r} did not take the error within {self.grace_s:g} s"
                    )
            elif not self._in_setup and self.timeout_s is not None and silent > self.timeout_s:
                self._kill(
                    f"no progress for {silent:.0f} s (resources.hang_timeout_s = {self.timeout_s:g}); "
                    "killing this worker so that it restarts from its last checkpoint"
                )

    def _fail_setup(self, silent: float) -> None:
        import ctypes

        reason = (
            f"trial set-up made no progress for {silent:.0f} s at stage {self._stage!r} "
            f"(resources.setup_timeout_s = {self.setup_timeout_s:g})"
        )
        print(f"peftsweep watchdog: {reason}", file=sys.stderr, flush=True)
        stalled = type("SetupStalled", (SetupStalled,), {"reason": reason})
        ident = self._target.ident
        if ident is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(stalled))
        self._raised_at = time.monotonic()

    def _kill(self, why: str) -> None:
        print(f"peftsweep watchdog: {why}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
