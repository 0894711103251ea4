"""The sandbox must turn every kind of misbehaving program into a bounded, non-passing result."""

from __future__ import annotations

import os
import signal
import time

import pytest

from peftsweep.trainables import sandbox
from peftsweep.trainables.sandbox import BLOCKED_EXIT, network_namespace_available, run_python

_TIMEOUT_S = 1.5
_SLACK_S = 5.0  # interpreter start-up and teardown on a loaded 2-core CI node; not a speed requirement


def test_passing_program() -> None:
    res = run_python("def f(x):\n    return x * 2\n\nassert f(3) == 6\n", timeout_s=_TIMEOUT_S)
    assert (res.passed, res.reason) == (True, "ok")


def test_failing_assert() -> None:
    res = run_python("assert 1 + 1 == 3\n", timeout_s=_TIMEOUT_S)
    assert (res.passed, res.reason) == (False, "failed")
    assert "AssertionError" in res.stderr_tail


def test_early_exit_zero_is_not_a_pass() -> None:
    res = run_python("import sys\nsys.exit(0)\nassert False\n", timeout_s=_TIMEOUT_S)
    assert not res.passed and res.reason == "failed"


def test_infinite_loop_times_out() -> None:
    start = time.monotonic()
    res = run_python("while True:\n    pass\n", timeout_s=_TIMEOUT_S)
    elapsed = time.monotonic() - start
    assert (res.passed, res.reason) == (False, "timeout")
    assert res.seconds >= _TIMEOUT_S and elapsed < _TIMEOUT_S + _SLACK_S


@pytest.mark.parametrize(
    "code",
    [
        "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n",
        "import subprocess\nsubprocess.run(['echo'])\n",
        "import os\nos.system('echo hi')\n",
        "import os\nfor _ in range(100):\n    os.fork()\n",
        "import ctypes\n",
        "open('/tmp/peftsweep-sandbox-escape.txt', 'w').write('x')\n",
    ],
    ids=["connect", "socket", "subprocess", "system", "fork", "ctypes", "write-outside"],
)
def test_dangerous_calls_are_blocked(code: str) -> None:
    # Each would pass if it were allowed (no assert fails), so "blocked" is the hook's doing.
    res = run_python(code, timeout_s=_TIMEOUT_S)
    assert (res.passed, res.reason) == (False, "blocked"), res.stderr_tail
    assert "sandbox: blocked" in res.stderr_tail
    assert not os.path.exists("/tmp/peftsweep-sandbox-escape.txt")


def test_hook_blocks_network_without_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where unshare is unavailable the audit hook alone must still stop the connection."""
    monkeypatch.setattr(sandbox, "_unshare_prefix", lambda: ())
    res = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n", timeout_s=2)
    assert res.reason == "blocked"


@pytest.mark.skipif(not network_namespace_available(), reason="user/net namespaces not allowed here")
def test_network_namespace_has_only_loopback() -> None:
    code = (
        "ifaces = [line.split(':')[0].strip() for line in open('/proc/net/dev').readlines()[2:]]\n"
        "assert ifaces == ['lo'], ifaces\n"
    )
    res = run_python(code, timeout_s=_TIMEOUT_S)
    assert res.passed, res.stderr_tail


def test_blocked_even_if_the_program_catches_exceptions() -> None:
    code = "try:\n    import os\n    os.fork()\nexcept BaseException:\n    pass\n"
    assert run_python(code, timeout_s=_TIMEOUT_S).reason == "blocked"


def test_sys_exit_with_blocked_code_is_not_a_pass() -> None:
    res = run_python(f"raise SystemExit({BLOCKED_EXIT})\n", timeout_s=_TIMEOUT_S)
    assert not res.passed


def test_memory_bomb_does_not_pass() -> None:
    res = run_python("x = bytearray(10**10)\n", timeout_s=_TIMEOUT_S, memory_mb=256)
    assert not res.passed and res.reason in ("failed", "crashed")
    assert "MemoryError" in res.stderr_tail


def test_local_files_and_asyncio_still_work() -> None:
    code = (
        "import asyncio, tempfile\n"
        "open('scratch.txt', 'w').write('hi')\n"
        "assert open('scratch.txt').read() == 'hi'\n"
        "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')\n"
        "with tempfile.TemporaryDirectory() as d:\n    open(d + '/x', 'w').write('x')\n"
        "async def f():\n    return 1\n"
        "assert asyncio.run(f()) == 1\n"
    )
    res = run_python(code, timeout_s=_TIMEOUT_S)
    assert res.passed, res.stderr_tail


def test_clean_environment_and_temp_dir_removed() -> None:
    os.environ["PEFTSWEEP_SANDBOX_SECRET"] = "s3cret"
    try:
        code = (
            "import os, sys\n"
            "assert 'PEFTSWEEP_SANDBOX_SECRET' not in os.environ\n"
            "assert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LC_ALL', 'LC_CTYPE'}, set(os.environ)\n"
            "sys.stderr.write('CWD=' + os.getcwd() + '\\n')\n"
        )
        res = run_python(code, timeout_s=_TIMEOUT_S)
    finally:
        del os.environ["PEFTSWEEP_SANDBOX_SECRET"]
    assert res.passed, res.stderr_tail
    cwd = res.stderr_tail.split("CWD=", 1)[1].strip()
    assert "peftsweep-sandbox-" in cwd and not os.path.exists(cwd)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        run_python("pass", timeout_s=0)


def test_os_exit_zero_before_the_tests_is_not_a_pass() -> None:
    """os._exit raises no audit event and skips SystemExit handling: only the completion proof catches it."""
    res = run_python("import os\nos._exit(0)\nassert False\n", timeout_s=_TIMEOUT_S)
    assert (res.passed, res.reason, res.returncode) == (False, "failed", 0)
    assert "no completion proof" in res.stderr_tail


def test_a_forged_proof_without_the_nonce_is_not_a_pass() -> None:
    code = (
        "import os\n"
        "for fd in range(3, 64):\n"
        "    try:\n        os.write(fd, b'done 00000000000000000000000000000000\\n')\n"
        "    except OSError:\n        pass\n"
        "os._exit(0)\n"
    )
    assert not run_python(code, timeout_s=_TIMEOUT_S).passed


# Escapes found in the issue-20 review. Each reaches outside the scratch directory through a door the audit
# hook cannot see or check (dir_fd, C libraries, calls without audit events, reads). `{out}` is a directory
# outside the scratch, `{victim}` a root-owned 0600 file in it, `{secret}` a token like ~/.ray/auth_token.
_PROBES = {
    "open-dir_fd": (
        "d = os.open({out!r}, os.O_PATH)\nos.close(os.open('escape', os.O_WRONLY | os.O_CREAT, dir_fd=d))\n"
    ),
    "rename-dst_dir_fd": (
        "open('local', 'w').write('x')\nd = os.open({out!r}, os.O_PATH)\n"
        "os.rename('local', 'escape', dst_dir_fd=d)\n"
    ),
    "sqlite": "import sqlite3\nsqlite3.connect({out!r} + '/escape').execute('create table t (x)')\n",
    "mkfifo": "os.mkfifo({out!r} + '/escape')\n",
    "setxattr": "os.setxattr({victim!r}, 'user.escape', b'1')\n",
    "overwrite-root-0600": (
        "d = os.open(os.path.dirname({victim!r}), os.O_PATH)\n"
        "f = os.open(os.path.basename({victim!r}), os.O_WRONLY | os.O_TRUNC, dir_fd=d)\n"
        "os.write(f, b'pwned')\n"
    ),
    "read-secret": "sys.stderr.write('leaked:' + open({secret!r}).read())\n",
}
_SECRET = "ray-token-1b2c3d"


@pytest.fixture
def outside(tmp_path: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path / "outside"  # type: ignore[operator]
    out.mkdir()
    victim, secret = out / "victim", out / "auth_token"
    victim.write_text("original")
    secret.write_text(_SECRET)
    victim.chmod(0o600)
    secret.chmod(0o600)
    return {"out": str(out), "victim": str(victim), "secret": str(secret)}


def _escaped(name: str, where: dict[str, str], res: sandbox.SandboxResult) -> bool:
    """Did the probe leave a trace outside (or read the secret)? Checked here, not trusted to the child."""
    if name == "setxattr":
        return "user.escape" in os.listxattr(where["victim"])
    if name == "overwrite-root-0600":
        return open(where["victim"]).read() != "original"
    if name == "read-secret":
        return _SECRET in res.stderr_tail
    return os.path.lexists(os.path.join(where["out"], "escape"))


def _probe(name: str, where: dict[str, str]) -> str:
    return "import os, sys\n" + _PROBES[name].format(**where)


@pytest.mark.parametrize("name", sorted(_PROBES))
def test_probes_cannot_reach_outside_the_scratch_directory(name: str, outside: dict[str, str]) -> None:
    """The sandbox as the sweep runs it, every layer on."""
    res = run_python(_probe(name, outside), timeout_s=_TIMEOUT_S)
    assert not _escaped(name, outside, res), res
    assert not res.passed, res


def _layers_here() -> frozenset[str]:
    return sandbox.isolation().layers


# Which kernel layer stops each probe; a probe is skipped only where none of its layers exists here.
_KERNEL_GUARDS = {
    "open-dir_fd": {"readonly-root", "landlock"},
    "rename-dst_dir_fd": {"readonly-root", "landlock"},
    "sqlite": {"readonly-root", "landlock"},
    "mkfifo": {"readonly-root", "landlock"},
    "setxattr": {"readonly-root"},  # Landlock does not cover extended attributes
    "overwrite-root-0600": {"readonly-root", "landlock"},
    "read-secret": {"landlock"},
}


@pytest.mark.parametrize("name", sorted(_PROBES))
def test_kernel_layers_alone_stop_each_probe(name: str, outside: dict[str, str]) -> None:
    """With the audit hook off, the kernel must still refuse: the hook is only the second layer."""
    if not _KERNEL_GUARDS[name] & _layers_here():
        pytest.skip(f"none of {sorted(_KERNEL_GUARDS[name])} is available in this kernel/container")
    res = sandbox._run(
        _probe(name, outside), timeout_s=_TIMEOUT_S, limits=sandbox._limits(_TIMEOUT_S, 512), audit_hook=False
    )
    assert not _escaped(name, outside, res), res
    assert res.reason == "failed" and ("Error" in res.stderr_tail), res


@pytest.mark.parametrize(
    "name", ["open-dir_fd", "rename-dst_dir_fd", "sqlite", "mkfifo", "overwrite-root-0600", "read-secret"]
)
def test_landlock_alone_stops_each_probe(
    name: str, outside: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where user namespaces are refused (no read-only root), Landlock must still hold writes and reads."""
    if "landlock" not in _layers_here():
        pytest.skip("Landlock is absent or disabled in this kernel")
    monkeypatch.setattr(sandbox, "_unshare_prefix", lambda: ())
    res = sandbox._run(
        _probe(name, outside), timeout_s=_TIMEOUT_S, limits=sandbox._limits(_TIMEOUT_S, 512), audit_hook=False
    )
    assert "landlock" in res.layers and "readonly-root" not in res.layers
    assert not _escaped(name, outside, res), res
    assert not res.passed


@pytest.mark.parametrize("name", ["rename-dst_dir_fd", "sqlite", "setxattr"])
def test_audit_hook_alone_blocks_what_it_can_see(name: str, outside: dict[str, str]) -> None:
    """The second layer on its own (kernel layers off). It cannot see os.open's dir_fd, mkfifo or reads."""
    res = sandbox._run(
        _probe(name, outside), timeout_s=_TIMEOUT_S, limits=sandbox._limits(_TIMEOUT_S, 512), kernel=False
    )
    assert res.reason == "blocked", res
    assert not _escaped(name, outside, res)


def test_number_of_files_is_capped() -> None:
    if "readonly-root" not in _layers_here():
        pytest.skip("no private mount namespace here, so no tmpfs scratch with an inode cap")
    code = "for i in range(100_000):\n    open(f'f{i}', 'w').close()\n"
    res = run_python(code, timeout_s=_TIMEOUT_S)
    assert res.reason == "failed" and "No space left on device" in res.stderr_tail, res


def test_fork_bomb_fails_in_the_kernel_without_the_hook() -> None:
    # Runs only under the seccomp filter: with neither it nor the hook this would take the machine down.
    if "seccomp" not in _layers_here():
        pytest.skip("seccomp filters unavailable here (or no syscall table for this architecture)")
    code = "import os\nwhile True:\n    os.fork()\n"
    res = sandbox._run(code, timeout_s=_TIMEOUT_S, limits=sandbox._limits(_TIMEOUT_S, 512), audit_hook=False)
    assert "seccomp" in res.layers
    assert res.reason == "failed" and "PermissionError" in res.stderr_tail, res


def test_threads_still_work_under_the_seccomp_filter() -> None:
    code = (
        "from concurrent.futures import ThreadPoolExecutor\n"
        "with ThreadPoolExecutor(4) as pool:\n    assert list(pool.map(abs, [-1, -2])) == [1, 2]\n"
    )
    res = run_python(code, timeout_s=_TIMEOUT_S)
    assert res.passed, res.stderr_tail


def test_rlimit_cpu_fires() -> None:
    """CPU time runs out long before the generous wall-clock timeout: the kernel's SIGXCPU ends it."""
    limits = sandbox.Limits(cpu_s=1, memory_bytes=512 << 20)
    res = sandbox._run("while True:\n    pass\n", timeout_s=60, limits=limits)
    assert (res.reason, res.returncode) == ("timeout", -signal.SIGXCPU), res


def test_rlimit_fsize_fires() -> None:
    res = run_python("open('big', 'wb').write(b'x' * (5 << 20))\n", timeout_s=_TIMEOUT_S)
    assert res.reason == "failed" and "File too large" in res.stderr_tail, res


def test_no_capabilities_left() -> None:
    if "no-capabilities" not in _layers_here():
        pytest.skip("capabilities could not be dropped here")
    code = (
        "lines = open('/proc/self/status').read().splitlines()\n"
        "caps = dict(line.split(':\\t') for line in lines if line.startswith('Cap'))\n"
        "assert int(caps['CapEff'], 16) == int(caps['CapBnd'], 16) == 0, caps\n"
    )
    res = run_python(code, timeout_s=_TIMEOUT_S)
    assert res.passed, res.stderr_tail


def test_missing_layers_are_named_in_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_unshare_prefix", lambda: ())
    sandbox.isolation.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="readonly-root") as caught:
            found = sandbox.isolation()
            sandbox.isolation()  # cached: no second warning
    finally:
        sandbox.isolation.cache_clear()
    assert len(caught) == 1
    assert "readonly-root" in found.missing and "network-namespace" in found.missing


def test_read_only_root_cannot_be_remounted(outside: dict[str, str]) -> None:
    """The namespace's root could remount / read-write; Landlock (no mount changes) and the dropped
    capabilities must stop it even with the audit hook off."""
    if "readonly-root" not in _layers_here():
        pytest.skip("no private mount namespace here")
    code = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "MS_REMOUNT, MS_BIND = 32, 4096\n"
        "rc = libc.mount(None, b'/', None, MS_REMOUNT | MS_BIND, None)\n"
        "assert rc == 0, os.strerror(ctypes.get_errno())\n"
        f"open({outside['out'] + '/escape'!r}, 'w').write('x')\n"
    )
    res = sandbox._run(code, timeout_s=_TIMEOUT_S, limits=sandbox._limits(_TIMEOUT_S, 512), audit_hook=False)
    assert res.reason == "failed" and "Operation not permitted" in res.stderr_tail, res
    assert not os.path.exists(outside["out"] + "/escape")
