"""The sandbox must turn every kind of misbehaving program into a bounded, non-passing result."""

from __future__ import annotations

import os
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
