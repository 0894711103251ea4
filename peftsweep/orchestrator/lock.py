"""The sweep's lock: one driver per sweep at a time (`run`, `run --nightly`, `resume`), across machines.

Why: two drivers on one sweep both write its Optuna studies and MLflow runs (a resume settles the other's
RUNNING trials as FAIL, TPE's constant liar counts the other's trials as its own), and cron's overlap guard
or a CronJob's `concurrencyPolicy: Forbid` cannot see a manual run beside the scheduled one.
Where: the Optuna RDB storage, the studies' own database, which every driver of the sweep reaches from any
machine. The lock is a study named ``<sweep>/_lock``: creating a study is one INSERT under the unique
constraint on study names, so of two racing drivers exactly one gets it (the other: DuplicatedStudyError).
Its user attrs say who holds it. The holder refreshes a heartbeat; a lock whose holder is gone (its pid is
dead on this host, or it sent no heartbeat for ``tracking.lock_max_age_s``) is stale and broken with a
warning. Release deletes the study, only while it still carries the holder's token.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from peftsweep.spec import SweepSpec

if TYPE_CHECKING:
    from optuna.storages import RDBStorage

LOCK_STUDY = "_lock"  # no method is named so: the registry's names are PEFT methods
HOLDER_ATTR = "holder"  # one attr, written once: a reader sees the whole holder or none of it
HEARTBEAT_ATTR = "heartbeat"
HEARTBEAT_EVERY_S = 60.0  # far below any sensible lock_max_age_s; shorter when that is short (tests)


class SweepLocked(RuntimeError):
    """Another run of the sweep holds its lock; the message names the holder and how to clear it."""


@dataclass(frozen=True)
class Holder:
    """Who holds a sweep's lock. A lock seen between its creation and its holder's write has ``token`` ''."""

    host: str
    pid: int
    started: str  # ISO 8601, UTC
    token: str  # this acquisition's id: release and stale-breaking delete only the lock they looked at
    heartbeat: str = ""  # ISO 8601, UTC; refreshed by the holder every HEARTBEAT_EVERY_S

    def describe(self) -> str:
        if not self.token:
            return "an unknown holder (it is taking the lock right now, or died while taking it)"
        return (
            f"pid {self.pid} on {self.host}, started {self.started}, "
            f"last heartbeat {self.heartbeat or self.started}"
        )


def lock_name(spec: SweepSpec) -> str:
    return f"{spec.name}/{LOCK_STUDY}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _storage(spec: SweepSpec) -> RDBStorage:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line per run
    from peftsweep.orchestrator.status import open_storage

    return open_storage(spec.tracking.optuna_storage_url())


def _find(storage: RDBStorage, name: str) -> tuple[int, Holder] | None:
    """The lock study's id and holder, or None when the sweep is not locked."""
    try:
        study_id = storage.get_study_id_from_name(name)
        attrs = storage.get_study_user_attrs(study_id)
    except KeyError:  # no such study (or deleted between the two reads)
        return None
    raw = attrs.get(HOLDER_ATTR) or {}
    holder = Holder(
        host=str(raw.get("host", "")),
        pid=int(raw.get("pid", 0)),
        started=str(raw.get("started", "")),
        token=str(raw.get("token", "")),
        heartbeat=str(attrs.get(HEARTBEAT_ATTR, "")),
    )
    return study_id, holder


def read_lock(spec: SweepSpec) -> Holder | None:
    """The holder of the sweep's lock, or None when no run holds it."""
    found = _find(_storage(spec), lock_name(spec))
    return found[1] if found else None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie does not: it is dead but not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (macOS): the signal said it exists
        return True
    return state != "Z"


def stale_reason(holder: Holder, max_age_s: float, now: datetime | None = None) -> str | None:
    """Why the holder is gone, or None while it may still run (then the lock holds)."""
    if not holder.token:
        return None  # no holder info: it may be being written this instant
    if holder.host == socket.gethostname() and not _alive(holder.pid):
        return f"its process {holder.pid} on this host is gone"
    try:
        seen = datetime.fromisoformat(holder.heartbeat or holder.started)
    except ValueError:
        return None
    age = ((now or datetime.now(UTC)) - seen).total_seconds()
    if age > max_age_s:
        return f"no heartbeat for {age:.0f} s (tracking.lock_max_age_s: {max_age_s:g})"
    return None


def delete_lock(spec: SweepSpec, token: str | None = None) -> bool:
    """Delete the sweep's lock if it still carries ``token`` (None: whoever holds it); True if deleted.

    The token check keeps a release or a stale-breaking from deleting a lock that another run has taken
    since it was looked at.
    """
    storage = _storage(spec)
    found = _find(storage, lock_name(spec))
    if found is None or (token is not None and found[1].token != token):
        return False
    try:
        storage.delete_study(found[0])
    except KeyError:  # deleted meanwhile by another release or unlock
        return False
    return True


def acquire(spec: SweepSpec, warn: Callable[[str], None] = print) -> Holder:
    """Take the sweep's lock, breaking a stale one (with a warning); SweepLocked if a live run holds it."""
    import optuna

    storage, name = _storage(spec), lock_name(spec)
    max_age = spec.tracking.lock_max_age_s
    me = Holder(socket.gethostname(), os.getpid(), _now(), uuid.uuid4().hex)
    for _ in range(3):  # a retry after breaking a stale lock, or after a release seen mid-way
        try:
            study_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], name)
        except optuna.exceptions.DuplicatedStudyError:
            found = _find(storage, name)
            if found is None:  # released since: try again
                continue
            holder = found[1]
            why = stale_reason(holder, max_age)
            if why is None:
                break
            if delete_lock(spec, holder.token):
                warn(f"warning: broke the stale lock of sweep {spec.name!r} ({holder.describe()}): {why}")
            continue
        storage.set_study_user_attr(study_id, HOLDER_ATTR, {k: v for k, v in asdict(me).items() if v})
        return me
    found = _find(storage, name)
    who = found[1].describe() if found else "another run"
    raise SweepLocked(
        f"sweep {spec.name!r} is locked by another run: {who}.\n"
        "Two drivers on one sweep corrupt its studies, so this run does not start. If that run is gone, "
        "clear the lock with `peftsweep unlock SPEC` (it is broken by itself once its pid is dead on this "
        f"host, or after {max_age:g} s without a heartbeat: tracking.lock_max_age_s)."
    )


class _Heartbeat(threading.Thread):
    """Refreshes the holder's heartbeat so that a run longer than lock_max_age_s keeps its lock."""

    def __init__(self, spec: SweepSpec, holder: Holder) -> None:
        super().__init__(name=f"peftsweep-lock-{spec.name}", daemon=True)
        self.spec, self.holder = spec, holder
        self.every = min(HEARTBEAT_EVERY_S, spec.tracking.lock_max_age_s / 10)
        self.done = threading.Event()

    def run(self) -> None:
        storage, name = _storage(self.spec), lock_name(self.spec)
        while not self.done.wait(self.every):
            try:
                found = _find(storage, name)
                if found is None or found[1].token != self.holder.token:
                    return  # broken (as stale) or cleared: nothing of ours to refresh; release says so
                storage.set_study_user_attr(found[0], HEARTBEAT_ATTR, _now())
            except Exception:  # a busy database: the next beat tries again; the age limit allows many
                continue

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)


@contextmanager
def sweep_lock(spec: SweepSpec, warn: Callable[[str], None] = print) -> Iterator[Holder]:
    """Hold the sweep's lock (see the module docstring) for the ``with`` block; released however it ends."""
    holder = acquire(spec, warn)
    beat = _Heartbeat(spec, holder)
    beat.start()
    try:
        yield holder
    finally:
        beat.stop()
        if not delete_lock(spec, holder.token):
            warn(
                f"warning: the lock of sweep {spec.name!r} was no longer this run's (cleared with `peftsweep "
                "unlock`, or broken as stale): another run may have overlapped with this one"
            )
