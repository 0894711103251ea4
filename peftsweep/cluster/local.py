"""Start (or join) Ray for one sweep, and stop only what we started."""

from __future__ import annotations

import os
import socket


def connect(address: str | None = None, *, show_worker_logs: bool = False) -> bool:
    """Join the cluster at `address` ('auto', 'ray://…'), or start an embedded local one.

    Returns True when this call started Ray (so the caller must `disconnect`). The dashboard stays on:
    Ray Train V2 needs its state API to release the placement groups of stopped trials.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    embedded = address is None
    ray.init(
        address=address,
        include_dashboard=embedded or None,
        dashboard_host="127.0.0.1",  # never expose the embedded dashboard beyond this machine
        # Its own port, not 8265: two embedded sweeps started side by side both stalled in
        # WorkerGroupStartupTimeoutError (Train V2 releases placement groups through the dashboard's API).
        **({"dashboard_port": free_port()} if embedded else {}),
        log_to_driver=show_worker_logs,
        configure_logging=True,
        logging_level="WARNING",
    )
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def disconnect() -> None:
    import ray

    ray.shutdown()


def cluster_resources() -> dict[str, float]:
    """Total CPUs/GPUs of the connected cluster."""
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
