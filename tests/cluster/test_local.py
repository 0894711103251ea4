"""The embedded Ray cluster: a new one of its own, and one line when Ray's token authentication is off."""

from __future__ import annotations

import warnings

import pytest

from peftsweep.cluster import local


@pytest.fixture
def no_ray_start(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record ray.init's arguments instead of starting a cluster."""
    import ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    return calls


def test_embedded_cluster_without_ray_auth_warns(monkeypatch: pytest.MonkeyPatch, no_ray_start: list) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.warns(
        RuntimeWarning, match="RAY_AUTH_MODE=disabled: the embedded Ray cluster starts without"
    ):
        assert local.connect() is True
    assert no_ray_start  # it still starts: a warning, not a refusal


@pytest.mark.parametrize("mode", [None, "token"])
def test_embedded_cluster_with_ray_auth_is_quiet(
    mode: str | None, monkeypatch: pytest.MonkeyPatch, no_ray_start: list
) -> None:
    if mode is None:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    else:
        monkeypatch.setenv("RAY_AUTH_MODE", mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        local.connect()
    assert no_ray_start


def test_the_embedded_cluster_is_a_new_one_never_a_running_one(no_ray_start: list) -> None:
    """ray.init() without an address joins a Ray instance already running on the machine (`ray start`, a
    cluster in /tmp/ray/ray_current_cluster): an embedded sweep must start its own instead."""
    local.connect()
    (call,) = no_ray_start
    assert call["address"] == "local" and call["include_dashboard"] is True


def test_an_address_is_joined_as_given(no_ray_start: list) -> None:
    local.connect("auto")
    (call,) = no_ray_start
    assert call["address"] == "auto"


def test_an_embedded_cluster_can_start_without_the_dashboard(no_ray_start: list) -> None:
    local.connect(dashboard=False)
    (call,) = no_ray_start
    assert call["address"] == "local" and call["include_dashboard"] is False  # None would start it
