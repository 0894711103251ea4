"""Issue 22: a process killed while torch JIT-loads DeepSpeed's op leaves torch's lock file behind; later
DeepSpeed trials must still start (torch's loader would wait for that file forever), while a live loader's
lock is respected."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from peftsweep.trainables.engine import deepspeed_ops_lock, extensions_root

OP = "deepspeed_shm_comm"  # the op DeepSpeed's communication backend JIT-loads at every initialize


@pytest.fixture
def extensions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the built extension cache (so the test cannot disturb other processes' ops), with
    the op built once if this machine never built it."""
    built = extensions_root() / OP
    if not (built / f"{OP}.so").is_file():
        _python("from peftsweep.trainables.engine import load_deepspeed_ops; load_deepspeed_ops()", {})
    root = tmp_path / "torch_extensions"
    shutil.copytree(built, root / OP, ignore=shutil.ignore_patterns("lock"))  # copy2 keeps mtimes: no rebuild
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    return root


def _python(code: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


DEEPSPEED_TRIAL = """
    import tempfile
    from pathlib import Path
    from peftsweep.spec import parse_spec
    from peftsweep.trainables.loop import run_trial
    from peftsweep.trainables.trial_config import standalone_trial
    tmp = Path(tempfile.mkdtemp())
    spec = parse_spec({"name": "lock", "methods": ["lora"], "training": {"max_steps": 4, "eval_every": 4,
        "engine": "deepspeed"}, "data": {"max_eval_examples": 8}, "tracking": {"root": str(tmp)}})
    reports = []
    run_trial(standalone_trial(spec, "lora", 1e-3, 4, 0), lambda m, _d: reports.append(m))
    print("finished at step", reports[-1]["step"])
"""


def _killed_holding_the_baton(lock: Path) -> None:
    """A process that takes torch's own lock (FileBaton, as its JIT loader does) and is SIGKILLed in the
    window, like a worker killed by the hang watchdog or the OOM killer mid-load."""
    proc = _python(
        f"""
        import os, signal
        from torch.utils.file_baton import FileBaton
        assert FileBaton({str(lock)!r}).try_acquire()
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        {},
    )
    assert proc.returncode == -signal.SIGKILL and lock.exists()


@pytest.mark.parametrize("how", ["planted", "holder-sigkilled"])
def test_a_lock_left_by_a_dead_loader_does_not_stop_deepspeed_trials(extensions: Path, how: str) -> None:
    lock = extensions / OP / "lock"
    if how == "planted":
        lock.touch()  # an ownerless 0-byte lock, as found on the CI machine
    else:
        _killed_holding_the_baton(lock)
    for _ in range(2):  # every later trial, not only the first
        proc = _python(DEEPSPEED_TRIAL, {"TORCH_EXTENSIONS_DIR": str(extensions)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "finished at step 4" in proc.stdout
    assert not lock.exists()


def test_a_live_loaders_lock_is_respected_and_the_wait_is_bounded(extensions: Path) -> None:
    """While another process holds our kernel lock (it is loading ops right now), its torch lock file is
    real: a second loader waits (bounded) instead of deleting it."""
    lock = extensions / OP / "lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nfrom peftsweep.trainables.engine import deepspeed_ops_lock\n"
            f"from pathlib import Path\nwith deepspeed_ops_lock():\n    Path({str(lock)!r}).touch()\n"
            "    print('holding', flush=True)\n    time.sleep(60)\n",
        ],
        env=os.environ | {"TORCH_EXTENSIONS_DIR": str(extensions)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        with pytest.raises(TimeoutError, match="loading DeepSpeed's ops"), deepspeed_ops_lock(timeout_s=1.5):
            pass
        assert lock.exists()  # not deleted under a live holder
    finally:
        holder.kill()
        holder.wait()
    with deepspeed_ops_lock(timeout_s=5):  # the holder died: the kernel released it, and its file is stale
        assert not lock.exists()
