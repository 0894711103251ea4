"""The child side of :mod:`sandbox`: confine this interpreter, run one generated program, prove it finished.

Run as ``python -I -S sandbox_child.py CONFIG_JSON`` (standard library only: ``-I -S`` sees no site-packages).
In order: read the per-run nonce from stdin; read the program; apply the kernel layers of
:mod:`sandbox_kernel`; set resource limits; report which layers hold (a JSON line on the proof descriptor);
install the audit hook; run the program as ``__main__``; and only if it ran to its end, write
``done <nonce>`` on the proof descriptor. The parent scores a sample on that line, never on the exit code
alone: ``os._exit(0)`` or ``SystemExit(0)`` before the tests exits 0 without it.

The nonce lives only in this process's memory, so a program that digs through the interpreter (frames, gc)
could forge it, as it could dodge the audit hook; the kernel layers do not depend on either.
"""

from __future__ import annotations

import builtins
import json
import os
import resource
import sys
import types
from typing import Any

# What a program may read besides its scratch directory: the interpreter's library (sys.path), the system's
# shared libraries and data, its own /proc entry, and the harmless devices. Not /etc, /home, /root, /tmp.
_SYSTEM_READ = ("/usr", "/lib", "/lib64", "/bin", "/proc/self", "/dev/zero", "/dev/urandom", "/dev/random")
_SYSTEM_WRITE = ("/dev/null",)
_KERNEL_MODULES = ("sandbox_kernel", "ctypes", "_ctypes", "ctypes._endian")


def _read_nonce() -> str:
    """The parent writes one line on stdin and closes it; the program then gets /dev/null as stdin."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(0, 128)
        if not chunk:
            break
        data += chunk
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return data.decode("ascii").strip()


def _isolate(cfg: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """Apply every kernel layer the machine allows; return (applied, {missing: why})."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import sandbox_kernel as kernel
    finally:
        del sys.path[0]
    applied: list[str] = []
    missing: dict[str, str] = {}

    def attempt(name: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
            applied.append(name)
        except OSError as e:
            missing[name] = str(e)

    if cfg["private_fs"]:
        attempt("readonly-root", kernel.readonly_root_with_scratch, cfg["scratch"], *cfg["scratch_caps"])
    else:
        missing["readonly-root"] = "no private user+mount namespace (unshare unavailable or refused)"
    read = [p for p in sys.path if os.path.exists(p)] + [*_SYSTEM_READ, cfg["program"]]
    attempt("landlock", kernel.landlock_restrict, read, [os.getcwd(), *_SYSTEM_WRITE])
    attempt("seccomp", kernel.deny_new_processes)
    attempt("no-capabilities", kernel.drop_capabilities)
    for name in _KERNEL_MODULES:  # a program that wants ctypes must import it again: the hook refuses
        sys.modules.pop(name, None)
    return applied, missing


def _set_limits(cpu_s: int, memory_bytes: int, file_bytes: int) -> None:
    for lim, soft, hard in (
        (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),  # SIGXCPU at soft, SIGKILL at hard if it is ignored
        (resource.RLIMIT_AS, memory_bytes, memory_bytes),
        (resource.RLIMIT_FSIZE, file_bytes, file_bytes),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        cur_hard = resource.getrlimit(lim)[1]
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(lim, (soft, hard))


def _install_hook(scratch: str, blocked_exit: int) -> None:
    """The second layer: end the process on audited events that a test program has no business raising.

    Everything the hook needs is bound as a default argument so the program cannot rebind it through globals.
    """

    def _die(what: str, _write: Any = os.write, _exit: Any = os._exit, _code: int = blocked_exit) -> None:
        _write(2, ("\nsandbox: blocked " + what + "\n").encode("utf-8", "replace"))
        _exit(_code)

    # Imported now (the hook then refuses re-imports) and defanged: it forks without an audit event.
    import _posixsubprocess

    _posixsubprocess.fork_exec = lambda *a, **k: _die("_posixsubprocess.fork_exec")

    banned = frozenset((
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "resource.setrlimit", "resource.prlimit",
        "os.symlink", "os.link", "sys.remote_exec",
    ))  # fmt: skip
    banned_prefixes = ("socket.", "ctypes.", "winreg.", "_winapi.")
    banned_imports = frozenset(("ctypes", "_ctypes", "_posixsubprocess"))
    # event -> (indices of the path arguments, indices of the dir_fd arguments): both must point inside the
    # scratch directory (a relative path under a dir_fd is where the descriptor is; shutil.rmtree uses them)
    path_events = {
        "os.remove": ((0,), (1,)), "os.rename": ((0, 1), (2, 3)), "os.rmdir": ((0,), (1,)),
        "os.mkdir": ((0,), (2,)), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
        "os.truncate": ((0,), ()), "os.utime": ((0,), (3,)), "os.setxattr": ((0,), ()),
        "os.removexattr": ((0,), ()), "shutil.rmtree": ((0,), ()), "shutil.copyfile": ((1,), ()),
        "shutil.copytree": ((1,), ()), "shutil.move": ((1,), ()), "sqlite3.connect": ((0,), ()),
    }  # fmt: skip
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    root = os.path.realpath(scratch) + "/"

    def _resolve(p: Any, _readlink: Any = os.readlink, _fsdecode: Any = os.fsdecode) -> str:
        if isinstance(p, int):  # a descriptor (fchmod, fsetxattr…): where it points
            try:
                return _readlink(f"/proc/self/fd/{p}")
            except OSError:
                return "/"
        s = _fsdecode(p)
        if s in (":memory:", ""):  # sqlite's in-memory databases
            return root
        if s.startswith("file:"):  # a sqlite URI
            s = s[5:].split("?", 1)[0] or root
        return s

    def _outside(p: Any, _abs: Any = os.path.abspath) -> bool:
        return not (_abs(_resolve(p)) + "/").startswith(root)

    import socket

    def hook(event: str, args: tuple, _unix: Any = socket.AF_UNIX) -> None:
        if event == "socket.__new__" and args[1] == _unix:
            return  # socketpair() for asyncio's self-pipe; connect/bind on it are still refused
        if event in banned or event.startswith(banned_prefixes):
            _die(event)
        elif event == "import" and args[0] in banned_imports:
            _die("import " + args[0])
        elif event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & write_flags)
            # an int path re-opens an inherited descriptor (stdout, stderr): its opening was checked
            if writing and path is not None and not isinstance(path, int) and _outside(path):
                _die("write to " + repr(path))
        elif event in path_events:
            paths, dir_fds = path_events[event]
            for i in dir_fds:
                if i < len(args) and args[i] not in (None, -1) and _outside(args[i]):
                    _die(event + " with a dir_fd outside")
            for i in paths:
                if i < len(args) and args[i] is not None and _outside(args[i]):
                    _die(event + " " + repr(args[i]))

    sys.addaudithook(hook)


def _run(src: str, program: str) -> None:
    main = types.ModuleType("__main__")
    main.__file__ = program
    main.__builtins__ = builtins
    code = compile(src, program, "exec")
    sys.modules["__main__"], sys.argv = main, [program]
    exec(code, main.__dict__)


def main(cfg: dict[str, Any]) -> None:
    nonce = _read_nonce()
    with open(cfg["program"], encoding="utf-8") as f:
        src = f.read()
    applied, missing = _isolate(cfg) if cfg["kernel"] else ([], {"all": "kernel layers turned off"})
    scratch = os.getcwd()  # after _isolate: the tmpfs when there is one
    _set_limits(cfg["cpu_s"], cfg["memory_bytes"], cfg["file_bytes"])
    proof = cfg["proof_fd"]
    os.write(proof, (json.dumps({"layers": applied, "missing": missing}) + "\n").encode())
    if cfg["audit_hook"]:
        _install_hook(scratch, cfg["blocked_exit"])
    _run(src, cfg["program"])
    os.write(proof, ("done " + nonce + "\n").encode())


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
