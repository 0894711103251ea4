"""Start (or join) Ray for one sweep, and stop only what we started."""

from __future__ import annotations

import os
import socket
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path

from peftsweep.spec import SpecError, SweepSpec

# A pinned zero-CPU task starts within seconds on an idle node; a minute covers a busy or autoscaling one.
SHARED_CHECK_TIMEOUT_S = 60.0


def connect(address: str | None = None, *, show_worker_logs: bool = False, dashboard: bool = True) -> bool:
    """Join the cluster at `address` ('auto', 'ray://…'), or start an embedded local one.

    Returns True when this call started Ray (so the caller must `disconnect`). ``dashboard``: whether an
    embedded cluster starts Ray's dashboard. Ray Train V2 needs its state API to release the placement
    groups of stopped trials, so sweeps of Train trials keep it; a sweep of inline trials does not need it,
    and on a 2-core machine its processes took ~5 % of a core during the sweep (bench/overhead.py).
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    embedded = address is None
    if embedded:
        warn_if_auth_disabled(os.environ)
    ray.init(
        # "local": start a new cluster. ray.init() without an address would join any Ray instance running on
        # this machine (`ray start`, another sweep's), so an "embedded" sweep could land on someone's cluster.
        address=address or "local",
        include_dashboard=dashboard if embedded else None,  # None: the cluster's own choice
        dashboard_host="127.0.0.1",  # never expose the embedded dashboard beyond this machine
        # Its own port, not 8265: two embedded sweeps started side by side both stalled in
        # WorkerGroupStartupTimeoutError (Train V2 releases placement groups through the dashboard's API).
        **({"dashboard_port": free_port()} if embedded else {}),
        log_to_driver=show_worker_logs,
        configure_logging=True,
        logging_level="WARNING",
    )
    return True


def warn_if_auth_disabled(environ: Mapping[str, str]) -> None:
    """One clear line when the embedded cluster would start without Ray's token authentication.

    Why: Ray's ports (GCS, raylet, workers) listen on every interface; without the token anyone who reaches
    this machine can submit code to it. Ray turns tokens on by default for local clusters; this undoes it.
    """
    if environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        warnings.warn(
            "RAY_AUTH_MODE=disabled: the embedded Ray cluster starts without token authentication, and its "
            "ports listen on all interfaces, so anyone who reaches this machine can run code in it; unset "
            "RAY_AUTH_MODE",
            RuntimeWarning,
            stacklevel=3,
        )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def disconnect() -> None:
    import ray

    ray.shutdown()


class Disconnecting:
    """`disconnect` in a thread, for a caller with other work left (a report to write, a table to print):
    stopping a local cluster takes ~1.5 s of waiting for its processes to exit. `join` before returning."""

    def __init__(self) -> None:
        import threading

        self._thread = threading.Thread(target=disconnect, name="peftsweep-ray-shutdown", daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join()


def cluster_resources() -> dict[str, float]:
    """Total CPUs/GPUs of the connected cluster."""
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}


def trial_nodes() -> list[dict]:
    """The alive nodes that can run a trial worker (CPU or GPU), as `ray.nodes()` rows."""
    import ray

    return [
        n
        for n in ray.nodes()
        if n.get("Alive") and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)
    ]


def check_multinode(spec: SweepSpec) -> int:
    """Refuse, before any trial, what breaks once trials span nodes; return how many nodes can run them.

    sqlite: Optuna advises an RDB server for distributed optimisation, sqlite on shared storage gives
    'database is locked' and lost writes, and a head node's local disk dies with its pod. tracking.root:
    workers read the prepared data and write checkpoints under it, and the driver reads their checkpoints,
    so every node must mount it at the same path; a Ray task pinned to each node checks a marker file.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = trial_nodes()
    if len(nodes) <= 1:
        return len(nodes)
    tracking = spec.tracking
    sqlite = [
        f"tracking.{field} ({'default ' if value is None else ''}{url})"
        for field, value, url in (
            ("mlflow_uri", tracking.mlflow_uri, tracking.mlflow_tracking_uri()),
            ("optuna_storage", tracking.optuna_storage, tracking.optuna_storage_url()),
        )
        if url.startswith("sqlite")
    ]
    if sqlite:
        raise SpecError(
            f"trials would run on {len(nodes)} nodes but {' and '.join(sqlite)} is sqlite: sqlite cannot "
            "serve a cluster ('database is locked', lost writes on shared storage, gone with the head node). "
            "Use a database server: tracking.optuna_storage: postgresql://HOST/optuna and "
            "tracking.mlflow_uri: http://HOST:5000 from `peftsweep tracking serve` (README: Run on a cluster)"
        )
    marker = tracking.root / f".shared-check-{uuid.uuid4().hex}"
    marker.write_text(marker.name)

    def sees(path: str, expected: str) -> bool:
        try:
            return Path(path).read_text() == expected
        except OSError:
            return False

    try:
        probe = ray.remote(num_cpus=0)(sees)
        checks = {
            n["NodeID"]: probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(marker), marker.name)
            for n in nodes
        }
        blind = []
        for n in nodes:
            try:
                seen = ray.get(checks[n["NodeID"]], timeout=SHARED_CHECK_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                seen = False
            if not seen:
                blind.append(f"{n['NodeID'][:12]} ({n['NodeManagerAddress']})")
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise SpecError(
            f"tracking.root {tracking.root} is not visible on node(s) {', '.join(blind)}: trials there could "
            "not read the prepared data nor write checkpoints. Put tracking.root on storage that every node "
            "mounts at the same path (NFS, EFS, a ReadWriteMany volume)"
        )
    return len(nodes)
