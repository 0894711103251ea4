"""Real servers for the multi-node test, all on 127.0.0.1 and all stopped by PID: Postgres, an MLflow
server (`peftsweep tracking serve`) and a two-node Ray cluster (`ray start`, head and worker)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil

from peftsweep.cluster.local import free_port

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120.0  # a cold server start on 2 busy cores takes seconds; this is a hang, not slowness
# `ray start --<name>-port` options given free ports per node (their defaults are fixed numbers).
AGENT_PORTS = ("dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent", "metrics-export")
AGENT_PORTS += ("node-manager", "object-manager")


def postgres_bin() -> Path | None:
    """The directory of initdb/pg_ctl: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    if found := shutil.which("initdb"):
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


def _as_postgres_user() -> list[str]:
    """initdb and postgres refuse to run as root: run them as the `postgres` user the package created."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def stop_pids(pids: list[int], timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL whatever is left after `timeout`."""
    procs = []
    for pid in pids:
        with suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout)


@dataclass
class Postgres:
    port: int
    user: str = "peftsweep"

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"


@contextmanager
def postgres(base: Path, databases: list[str]) -> Iterator[Postgres]:
    """A throwaway Postgres cluster (trust auth, TCP on 127.0.0.1 only) with the given databases."""
    import psycopg

    bindir = postgres_bin()
    assert bindir is not None
    data = base / "pgdata"
    data.mkdir(parents=True)
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    sudo = _as_postgres_user()
    server = Postgres(port=free_port())
    subprocess.run(
        [*sudo, str(bindir / "initdb"), "-D", str(data), "-U", server.user, "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    options = f"-h 127.0.0.1 -p {server.port} -k {data}"  # its Unix socket in its own directory
    subprocess.run(
        [*sudo, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"), "-o", options, "-w"]
        + ["-t", str(int(START_TIMEOUT_S)), "start"],
        check=True,
        capture_output=True,
    )
    pid = int((data / "postmaster.pid").read_text().split()[0])
    try:
        # autocommit: CREATE DATABASE cannot run in a transaction
        with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
            for name in databases:
                conn.execute(f"CREATE DATABASE {name}")
        yield server
    finally:
        os.kill(pid, signal.SIGINT)  # Postgres' "fast" shutdown
        psutil.wait_procs([psutil.Process(pid)] if psutil.pid_exists(pid) else [], timeout=30)


def _wait_http(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        with suppress(OSError):
            urllib.request.urlopen(url, timeout=2)
            return
        time.sleep(1)
    raise AssertionError(f"{url} did not answer in {START_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}")


@contextmanager
def mlflow_server(base: Path, backend: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`peftsweep tracking serve` on a free port (`env`: its environment); yields its http:// URI."""
    port = free_port()
    log = base / "mlflow-server.log"
    cmd = [str(VENV_BIN / "peftsweep"), "tracking", "serve", "--backend-store-uri", backend]
    cmd += ["--artifacts-destination", str(base / "artifacts"), "--port", str(port), "--workers", "1"]
    with log.open("w") as out:
        proc = subprocess.Popen(  # cwd: where the basic-auth app keeps its users (basic_auth.db)
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=base
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{uri}/health", proc, log)
        yield uri
    finally:
        # Its uvicorn workers are its children: stop the whole tree, by PID.
        tree = [proc.pid]
        with suppress(psutil.Error):
            tree += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        stop_pids(tree)


@dataclass
class RayCluster:
    gcs: str  # host:port, for `ray start --address` and `peftsweep run --address`
    dashboard: str  # http://host:port, the Jobs API
    env: dict[str, str]  # what a client needs: the auth token's path, PATH with this venv first


def _ray_pids(temp_dirs: list[Path]) -> list[int]:
    """Every process of the cluster: those naming one of its nodes' temp dirs, and all their descendants."""
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        with suppress(psutil.Error):
            named = any(f"{d}/" in part for part in proc.info["cmdline"] or [] for d in temp_dirs)
            if named and proc.pid != os.getpid():
                roots.append(proc)
    pids = {p.pid for p in roots}
    for proc in roots:
        with suppress(psutil.Error):
            pids.update(c.pid for c in proc.children(recursive=True))
    return sorted(pids)


@contextmanager
def ray_cluster(base: Path, nodes: list[dict[str, float]]) -> Iterator[RayCluster]:
    """A head and more nodes, each its own `ray start` with its own CPUs and a custom resource naming it
    (`node_0`, `node_1`, ...), with Ray's token authentication on a token of its own."""
    # One temp dir per node, as on separate machines: nodes sharing one would share their runtime_env
    # caches, and a node deleting its unused copy of the job's working_dir would delete the driver's cwd.
    # Short paths: Ray's Unix socket paths must stay under 108 bytes.
    temps = [base / f"ray{index}" for index in range(len(nodes))]
    token = base / "ray-token"
    token.write_text(os.urandom(32).hex())
    env = os.environ | {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    port, dash = free_port(), free_port()
    cluster = RayCluster(gcs=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dash}", env=env)
    ray = str(VENV_BIN / "ray")
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats", "--object-store-memory=200000000"]
    try:
        for index, resources in enumerate(nodes):
            custom = f'{{"node_{index}": 1}}'
            if index == 0:
                where = [
                    "--head",
                    f"--port={port}",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}",
                    f"--ray-client-server-port={free_port()}",
                ]
            else:
                where = [f"--address={cluster.gcs}"]
            own = [f"--temp-dir={temps[index]}", f"--num-cpus={resources['CPU']:g}", f"--resources={custom}"]
            # Ports of its own: the defaults (52365 for the job agent, ...) may be held by another Ray on this
            # machine (the test session's embedded one), and a node whose agent cannot bind takes no jobs.
            own += [f"--{name}-port={free_port()}" for name in AGENT_PORTS]
            subprocess.run(
                [ray, "start", *where, *common, *own],
                env=env,
                check=True,
                capture_output=True,
                timeout=START_TIMEOUT_S,
            )
        yield cluster
    finally:
        stop_pids(_ray_pids(temps), timeout=5.0)  # nothing of a test cluster needs a graceful exit
