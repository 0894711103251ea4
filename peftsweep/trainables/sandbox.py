"""Run untrusted, model-generated Python (code-task evaluation) in a throw-away, confined subprocess.

Why: pass@k needs to *execute* what the adapter generated, inside a sweep that runs as root next to Ray
workers and MLflow. A generated program must not be able to hang the evaluation, eat the node's memory,
reach the network, spawn processes, read the node's secrets or write outside its own scratch directory, and
it must not score as passed unless its tests ran to their end. Layers, applied by the child
(:mod:`sandbox_child`, kernel parts in :mod:`sandbox_kernel`) before the program runs:

* a fresh interpreter ``sys.executable -I -S`` in a fresh scratch directory (deleted afterwards) with an
  environment holding only ``PATH``, ``LC_ALL`` and ``HOME``/``TMPDIR`` (the scratch directory);
* where the kernel allows it, ``unshare --user --map-root-user --mount --net``: a network namespace with only
  a down loopback, and a mount namespace in which every mount is read-only and the scratch directory is a
  tmpfs of ``_SCRATCH_BYTES`` and ``_MAX_FILES`` files;
* Landlock (reads only from the interpreter's library and system directories, writes only in the scratch
  directory, no TCP, no signals out); a seccomp filter (no fork, vfork or exec; clone only for threads);
  no capabilities;
* resource limits: ``RLIMIT_CPU`` (≈ timeout), ``RLIMIT_AS`` (``memory_mb``), ``RLIMIT_FSIZE`` (a few MB),
  ``RLIMIT_CORE`` 0 (set in the child, not in ``preexec_fn``, which is unsafe in a threaded parent; the
  kernel uid stays 0 in the namespace, so ``RLIMIT_NPROC`` would not bind and seccomp stops forks instead);
* ``start_new_session=True`` and ``SIGKILL`` to the whole process group after every run;
* a ``sys.addaudithook`` hook, the second layer: it ends the process with :data:`BLOCKED_EXIT` on sockets,
  process creation, signals, ``ctypes``, changing limits, links, and writes or metadata changes outside
  the scratch directory; it cannot see everything (``os.mkfifo`` raises no audit event), the kernel can;
* completion proof: the parent sends a fresh nonce on stdin and scores the sample only if the child wrote
  it back after the program's last line, so ``os._exit(0)`` before the tests is a failure.

Which kernel layers hold is probed once per process (:func:`isolation`); each missing one is reported once,
as a ``RuntimeWarning``. Without them the audit hook guards against accidents only: run untrusted models'
code in a container or VM.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Literal

# Exit status of a program stopped by the audit hook: not 0/1 (Python's own), not 2 (argparse/usage),
# below 128 (shells' 128+signal), so it cannot be confused with an ordinary outcome.
BLOCKED_EXIT = 87

Reason = Literal["ok", "failed", "timeout", "blocked", "crashed"]

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
_NAMESPACES = ("--user", "--map-root-user", "--mount", "--net")
_STDERR_TAIL_BYTES = 2048  # enough for the last traceback; the result is logged, not stored per sample
_FSIZE_BYTES = 4 << 20  # 4 MiB per written file (stderr included): tests need none, a runaway loop is capped
_SCRATCH_BYTES = 64 << 20  # all files of one program together; tmpfs pages are memory, only when written
_MAX_FILES = 256  # files and directories in the scratch tmpfs (its root counts): tests need a handful
_PROOF_MAX_BYTES = 4096  # the layers line and the nonce line; anything longer is the program's noise
_POLL_S = 0.01  # wait granularity; adds at most 10 ms to a run, negligible next to interpreter start-up
_PROBE_TIMEOUT_S = 10.0  # a cold interpreter start on a loaded 2-core node takes well under a second


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run; :func:`run_python` derives them from its arguments."""

    cpu_s: int
    memory_bytes: int
    file_bytes: int = _FSIZE_BYTES
    scratch_bytes: int = _SCRATCH_BYTES
    max_files: int = _MAX_FILES


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program; only ``passed`` feeds metrics, the rest is for logs and tests."""

    passed: bool
    reason: Reason
    stderr_tail: str
    seconds: float
    layers: frozenset[str] = field(default_factory=frozenset)  # the kernel isolation that held for this run
    missing: dict[str, str] = field(default_factory=dict)  # the layers that did not, and why
    returncode: int | None = None


@dataclass(frozen=True)
class Isolation:
    """The kernel layers a program gets on this machine, and why each missing one is missing."""

    layers: frozenset[str]
    missing: dict[str, str]


def _base_env(work: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": work,
        "TMPDIR": work,
        "LC_ALL": "C.UTF-8",
    }


@functools.cache
def _unshare_prefix() -> tuple[str, ...]:
    """``("unshare", "--user", "--map-root-user", "--mount", "--net")`` if it works here (checked once)."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    cmd = (exe, *_NAMESPACES)
    try:
        done = subprocess.run(
            [*cmd, sys.executable, "-I", "-S", "-c", "pass"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_base_env(tempfile.gettempdir()),
            timeout=_PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    return cmd if done.returncode == 0 else ()


def network_namespace_available() -> bool:
    """Whether programs get a private, unconnected network namespace on this machine."""
    return bool(_unshare_prefix())


@functools.cache
def isolation() -> Isolation:
    """Probe once which kernel layers hold here; warn once, naming each missing one and why."""
    res = _run("pass", timeout_s=_PROBE_TIMEOUT_S, limits=_limits(_PROBE_TIMEOUT_S, 512))
    missing = dict(res.missing)
    if not res.passed:
        missing["all"] = f"the sandbox probe failed ({res.reason}): {res.stderr_tail.strip()[-300:]}"
    if missing:
        warnings.warn(
            "peftsweep sandbox: generated code runs without "
            + "; ".join(f"{k} ({v})" for k, v in sorted(missing.items()))
            + ". The audit hook guards against accidents only: run untrusted models' code in a container.",
            RuntimeWarning,
            stacklevel=2,
        )
    return Isolation(res.layers, missing)


def _limits(timeout_s: float, memory_mb: int) -> Limits:
    # CPU one second past the wall timeout: a single-threaded loop meets the (gentler) wall timeout first.
    return Limits(cpu_s=math.ceil(timeout_s) + 1, memory_bytes=memory_mb << 20)


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Execute ``code`` as ``__main__`` in the sandbox; passed iff it ran to its end and exited 0 in time.

    Never raises for anything the program does; a failure to start the interpreter is reported as
    ``reason="crashed"`` so one broken sample cannot abort an evaluation.
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be positive, got {timeout_s}, {memory_mb}")
    isolation()  # warns once where a layer is missing
    return _run(code, timeout_s=timeout_s, limits=_limits(timeout_s, memory_mb))


def _wait_unreaped(pid: int, deadline: float) -> bool:
    """Wait until ``pid`` exits or ``deadline``; True if it exited. Leaves it unreaped (a zombie)."""
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # reaped behind our back (a SIGCHLD handler elsewhere): it has exited
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(_POLL_S, left))


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # group already gone
        os.killpg(pgid, signal.SIGKILL)


def _read_tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _STDERR_TAIL_BYTES))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _read_proof(fd: int) -> list[str]:
    """What the child wrote on its proof pipe (it has exited; a leftover writer must not block us)."""
    os.set_blocking(fd, False)
    data = b""
    with contextlib.suppress(BlockingIOError):
        while len(data) < _PROOF_MAX_BYTES and (chunk := os.read(fd, _PROOF_MAX_BYTES)):
            data += chunk
    return data.decode("utf-8", "replace").splitlines()


def _layers(lines: list[str], namespaced: bool) -> tuple[frozenset[str], dict[str, str]]:
    """The child's first proof line names the kernel layers that held; the parent adds the namespace's."""
    try:
        report = json.loads(lines[0])
        layers, missing = set(report["layers"]), dict(report["missing"])
    except (IndexError, ValueError, KeyError, TypeError):
        return frozenset(), {"all": "the child reported no isolation"}
    if namespaced:
        layers.add("network-namespace")
    else:
        missing["network-namespace"] = "unshare --user --mount --net unavailable or refused"
    return frozenset(layers), missing


def _reason(returncode: int, timed_out: bool, finished: bool) -> Reason:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == BLOCKED_EXIT:
        return "blocked"
    if returncode < 0:
        return "crashed"
    return "ok" if returncode == 0 and finished else "failed"


def _child_config(root: str, work: str, limits: Limits, proof_fd: int, kernel: bool, hook: bool) -> str:
    return json.dumps({
        "program": os.path.join(root, "program.py"),
        "scratch": work,
        "cpu_s": limits.cpu_s,
        "memory_bytes": limits.memory_bytes,
        "file_bytes": limits.file_bytes,
        "scratch_caps": [limits.scratch_bytes, limits.max_files],
        "blocked_exit": BLOCKED_EXIT,
        "proof_fd": proof_fd,
        "private_fs": kernel and bool(_unshare_prefix()),
        "kernel": kernel,
        "audit_hook": hook,
    })  # fmt: skip


def _run(
    code: str, *, timeout_s: float, limits: Limits, kernel: bool = True, audit_hook: bool = True
) -> SandboxResult:
    """One run; ``kernel`` and ``audit_hook`` let tests prove each layer alone (never turn both off)."""
    root = tempfile.mkdtemp(prefix="peftsweep-sandbox-")
    proof_r, proof_w = os.pipe()
    try:
        work = os.path.join(root, "work")
        os.mkdir(work)
        with open(os.path.join(root, "program.py"), "w", encoding="utf-8") as f:  # outside `work`
            f.write(code)
        prefix = _unshare_prefix() if kernel else ()
        config = _child_config(root, work, limits, proof_w, kernel, audit_hook)
        err_path = os.path.join(root, "stderr.txt")
        nonce = secrets.token_hex(16)
        start = time.monotonic()
        with open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    [*prefix, sys.executable, "-I", "-S", _CHILD, config],
                    cwd=work,
                    env=_base_env(work),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    pass_fds=(proof_w,),
                    start_new_session=True,
                )
            except OSError as e:
                return SandboxResult(False, "crashed", f"cannot start sandbox: {e}", 0.0)
        os.close(proof_w)
        proof_w = -1
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # a child that died at start-up
            proc.stdin.write(nonce.encode() + b"\n")
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        try:
            exited = _wait_unreaped(proc.pid, start + timeout_s)
        finally:
            _killpg(proc.pid)  # also reaps leftovers of a finished program; leader unreaped => pgid valid
            proc.wait()
        seconds = time.monotonic() - start
        lines = _read_proof(proof_r)
        finished = f"done {nonce}" in lines[1:]
        layers, missing = _layers(lines, bool(prefix)) if kernel else (frozenset(), {"all": "turned off"})
        reason = _reason(proc.returncode, timed_out=not exited, finished=finished)
        tail = _read_tail(err_path)
        if proc.returncode == 0 and not finished:
            tail += (
                "\nsandbox: exited 0 before the program's end (no completion proof): counted as a failure\n"
            )
        return SandboxResult(reason == "ok", reason, tail, seconds, layers, missing, proc.returncode)
    finally:
        os.close(proof_r)
        if proof_w >= 0:
            os.close(proof_w)
        shutil.rmtree(root, ignore_errors=True)
