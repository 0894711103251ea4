"""Shared fixtures: one Ray cluster per test session (starting Ray costs seconds; 2 cores in CI)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# No model hub here or in CI: a hub id must fail at once (as offline), not after five network retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """The embedded local Ray, started once; `peftsweep run` joins it instead of starting its own."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    from peftsweep.cluster.local import free_port

    ray.init(
        address="local",  # a cluster of the tests' own, never one already running on this machine
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),  # not 8265: a sweep running beside the tests must not share it
        log_to_driver=False,
        logging_level="WARNING",
    )
    yield
    ray.shutdown()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files holding slow or cluster tests first (each file's own order kept). Why: `make test` runs two
    xdist workers, each taking whole files (`--dist loadfile`); a long file started last would leave the
    other worker idle while it runs, so the long ones start first and the short ones fill the gaps."""
    long_files = {
        item.path for item in items if item.get_closest_marker("slow") or item.get_closest_marker("cluster")
    }
    items.sort(key=lambda item: item.path not in long_files)
