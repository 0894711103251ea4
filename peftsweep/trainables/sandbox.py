"""Run untrusted, model-generated Python (code-task evaluation) in a throw-away subprocess.

Why: pass@k needs to *execute* what the adapter generated, inside a sweep that runs as root next to Ray
workers and MLflow. A generated program must not be able to hang the evaluation, eat the node's memory,
reach the network, spawn processes or scribble outside its own scratch directory. Layers, cheapest first:

* a fresh interpreter ``sys.executable -I -S`` (no site-packages, no ``PYTHON*`` env) in a fresh temporary
  working directory (deleted afterwards) with an environment holding only ``PATH`` (``HOME``/``TMPDIR`` point
  at the scratch directory: no secrets, no proxy variables);
* resource limits set by the child's prelude before the program runs: ``RLIMIT_CPU`` (≈ timeout),
  ``RLIMIT_AS`` (``memory_mb``), ``RLIMIT_FSIZE`` (a few MB), ``RLIMIT_CORE`` 0. They are set in the child
  rather than in ``preexec_fn`` because ``preexec_fn`` is unsafe in a threaded parent and :func:`score` runs
  programs from a thread pool. ``RLIMIT_NPROC`` is deliberately *not* set: it counts every process of the
  user (the sweep's own Ray workers included), and root ignores it anyway; process creation is stopped by
  the audit hook instead;
* ``start_new_session=True`` and, on timeout (and after every run), ``SIGKILL`` to the whole process group,
  sent before the leader is reaped so the group id cannot have been recycled;
* a ``sys.addaudithook`` hook (hooks cannot be removed) that ends the process with :data:`BLOCKED_EXIT`
  on sockets (except ``AF_UNIX`` socketpairs, which asyncio needs) and DNS, process creation
  (``subprocess.Popen``, ``os.system``, ``os.exec*``, ``os.posix_spawn``, ``os.fork``,
  ``_posixsubprocess.fork_exec``), signals, ``ctypes``, changing resource limits, symlinks/hard links, and
  writes/deletes outside the scratch directory. Catching the exception cannot undo it: the hook exits;
* when the kernel allows it, ``unshare --user --net`` (probed once per process, silently skipped otherwise):
  a private network namespace with only a down loopback, so even a bypass of the hook has no network.

Found on the development machine (Linux 6.18, container, root, util-linux ``unshare``, no seccomp): user
namespaces are enabled (``user.max_user_namespaces`` > 0), ``unshare --user --net`` works, the program runs
as the overflow uid 65534 and sees only a down ``lo``; ``connect`` fails with ``ENETUNREACH`` and DNS with
``EAI_AGAIN``. Kernels/containers that forbid user namespaces (seccomp, AppArmor
``apparmor_restrict_unprivileged_userns``) make the probe fail and leave the audit hook as the only guard.

The audit hook is a guard against *accidental* damage by generated code, not a security boundary against
an adversary (e.g. ``os.open(..., dir_fd=...)`` or re-importing C modules can dodge it). For hostile code,
run the evaluation in a container or VM.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

# Exit status of a program stopped by the audit hook: not 0/1 (Python's own), not 2 (argparse/usage),
# below 128 (shells' 128+signal), so it cannot be confused with an ordinary outcome.
BLOCKED_EXIT = 87

Reason = Literal["ok", "failed", "timeout", "blocked", "crashed"]

_STDERR_TAIL_BYTES = 2048  # enough for the last traceback; the result is logged, not stored per sample
_FSIZE_BYTES = 4 << 20  # 4 MiB per written file (stderr included): tests need none, a runaway loop is capped
_POLL_S = 0.01  # wait granularity; adds at most 10 ms to a run, negligible next to interpreter start-up
_PROBE_TIMEOUT_S = 10.0  # a cold interpreter start on a loaded 2-core node takes well under a second

# Runs in the child before the program. Everything the hook needs is bound as a default argument so that
# the program cannot reach or rebind it through module globals.
_PRELUDE = r"""
import os, sys, resource, types, builtins

def _setup(prog, work, cpu_s, mem, fsize, blocked_exit):
    for lim, soft, hard in (
        (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),  # SIGXCPU at soft, SIGKILL at hard if it is ignored
        (resource.RLIMIT_AS, mem, mem),
        (resource.RLIMIT_FSIZE, fsize, fsize),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        cur_hard = resource.getrlimit(lim)[1]
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(lim, (soft, hard))
    with open(prog, encoding="utf-8") as f:
        src = f.read()

    def _die(what, _write=os.write, _exit=os._exit, _code=blocked_exit):
        _write(2, ("\nsandbox: blocked " + what + "\n").encode("utf-8", "replace"))
        _exit(_code)

    # Imported now (the hook then refuses re-imports) and defanged: it forks without an audit event.
    import _posixsubprocess
    _posixsubprocess.fork_exec = lambda *a, **k: _die("_posixsubprocess.fork_exec")

    banned = frozenset((
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "resource.setrlimit", "resource.prlimit",
        "os.symlink", "os.link", "sys.remote_exec",
    ))
    banned_prefixes = ("socket.", "ctypes.", "winreg.", "_winapi.")
    banned_imports = frozenset(("ctypes", "_ctypes", "_posixsubprocess"))
    path_events = {  # event -> indices of the path arguments that must stay inside the scratch directory
        "os.remove": (0,), "os.rename": (0, 1), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,),
        "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,), "shutil.rmtree": (0,),
        "shutil.copyfile": (1,), "shutil.copytree": (1,), "shutil.move": (1,),
    }
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    root = os.path.realpath(work) + "/"

    def _outside(p, _abs=os.path.abspath, _fsdecode=os.fsdecode):
        if isinstance(p, int):  # an already open descriptor: its opening was checked
            return False
        return not (_abs(_fsdecode(p)) + "/").startswith(root)

    def hook(event, args, _unix=getattr(__import__("socket"), "AF_UNIX", None)):
        if event == "socket.__new__" and args[1] == _unix:
            return  # socketpair() for asyncio's self-pipe; connect/bind on it are still refused
        if event in banned or event.startswith(banned_prefixes):
            _die(event)
        elif event == "import" and args[0] in banned_imports:
            _die("import " + args[0])
        elif event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & write_flags)
            if writing and path is not None and _outside(path):
                _die("write to " + repr(path))
        elif event in path_events:
            for i in path_events[event]:
                if i < len(args) and args[i] is not None and _outside(args[i]):
                    _die(event + " " + repr(args[i]))

    sys.addaudithook(hook)
    main = types.ModuleType("__main__")
    main.__file__ = prog
    main.__builtins__ = builtins
    return main, compile(src, prog, "exec")

_main, _code = _setup(sys.argv[1], os.getcwd(), *map(int, sys.argv[2:6]))
_keep, sys.modules["__main__"], sys.argv = sys.modules["__main__"], _main, [sys.argv[1]]
try:
    exec(_code, _main.__dict__)
except SystemExit as e:
    if e.code not in (None, 0):
        raise
    # An early exit(0) would skip the asserts after it and read as a pass.
    sys.stderr.write("sandbox: SystemExit(0) before the program finished; counted as a failure\n")
    sys.stderr.flush()
    os._exit(1)
"""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program; only ``passed`` feeds metrics, the rest is for logs and tests."""

    passed: bool
    reason: Reason
    stderr_tail: str
    seconds: float


@functools.cache
def _unshare_prefix() -> tuple[str, ...]:
    """``("unshare", "--user", "--net")`` if it works here (checked once), else ``()``."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    cmd = (exe, "--user", "--net")
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


def _base_env(work: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": work,
        "TMPDIR": work,
        "LC_ALL": "C.UTF-8",
    }


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


def _reason(returncode: int, timed_out: bool) -> Reason:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "ok"
    if returncode == BLOCKED_EXIT:
        return "blocked"
    return "crashed" if returncode < 0 else "failed"


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Execute ``code`` as ``__main__`` in a sandboxed interpreter; passed iff it exits 0 within the timeout.

    Never raises for anything the program does; a failure to start the interpreter is reported as
    ``reason="crashed"`` so one broken sample cannot abort an evaluation.
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be positive, got {timeout_s}, {memory_mb}")
    root = tempfile.mkdtemp(prefix="peftsweep-sandbox-")
    try:
        work = os.path.join(root, "work")
        os.mkdir(work)
        prog = os.path.join(root, "program.py")  # outside `work`: the program cannot rewrite itself
        with open(prog, "w", encoding="utf-8") as f:
            f.write(code)
        limits = (math.ceil(timeout_s) + 1, memory_mb << 20, _FSIZE_BYTES, BLOCKED_EXIT)
        cmd = [*_unshare_prefix(), sys.executable, "-I", "-S", "-c", _PRELUDE, prog, *map(str, limits)]
        err_path = os.path.join(root, "stderr.txt")
        start = time.monotonic()
        with open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    cmd,
                    cwd=work,
                    env=_base_env(work),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,
                )
            except OSError as e:
                return SandboxResult(False, "crashed", f"cannot start sandbox: {e}", 0.0)
        try:
            exited = _wait_unreaped(proc.pid, start + timeout_s)
        finally:
            _killpg(proc.pid)  # also reaps leftovers of a finished program; leader unreaped => pgid valid
            proc.wait()
        seconds = time.monotonic() - start
        reason = _reason(proc.returncode, timed_out=not exited)
        return SandboxResult(reason == "ok", reason, _read_tail(err_path), seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
