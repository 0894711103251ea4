"""LR priors: the reference goes first, ranges are re-centred, transferred points stay in range."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from peftsweep.orchestrator.priors import (
    centred_range,
    probe_curvature,
    reference_method,
    search_order,
    transfer_points,
    usable_curvature,
)
from peftsweep.spec import parse_spec


def _spec(tmp_path: Path, methods: list, prior: str = "curvature") -> object:
    return parse_spec({"name": "p", "methods": methods, "search": {"lr_prior": prior}}, base_dir=tmp_path)


def test_the_reference_is_searched_first(tmp_path: Path) -> None:
    spec = _spec(tmp_path, ["pissa", "lora", "dora"])
    assert reference_method(spec) == "lora"
    assert [m.name for m in search_order(spec)] == ["lora", "pissa", "dora"]
    assert [m.name for m in search_order(_spec(tmp_path, ["pissa", "lora"], "none"))] == ["pissa", "lora"]
    assert reference_method(_spec(tmp_path, ["dora", "pissa"])) == "dora"  # no LoRA: the first method


def test_centred_range_keeps_the_log_width(tmp_path: Path) -> None:
    mspec = _spec(tmp_path, [{"name": "pissa", "lr_min": 1e-4, "lr_max": 1e-2}]).method("pissa")
    lo, hi = centred_range(mspec, 3e-4)
    assert hi / lo == pytest.approx(100) and math.sqrt(lo * hi) == pytest.approx(3e-4)


def test_transfer_points_are_clipped_into_the_methods_space(tmp_path: Path) -> None:
    mspec = _spec(tmp_path, [{"name": "pissa", "lr_min": 1e-4, "lr_max": 1e-2, "ranks": [4, 8]}]).method(
        "pissa"
    )
    points = transfer_points(mspec, [(5e-3, 8), (1.0, 16), (1e-9, 4)], 0.5)
    assert points == [{"lr": 2.5e-3, "rank": 8}, {"lr": 1e-2, "rank": 4}, {"lr": 1e-4, "rank": 4}]


def test_curvature_probe_runs_on_the_sweeps_prepared_data(tmp_path: Path) -> None:
    from peftsweep.trainables.prepared import prepare_data

    spec = parse_spec(
        {"name": "p", "methods": [{"name": "lora", "ranks": [4]}], "data": {"max_eval_examples": 64}},
        base_dir=tmp_path,
    )
    data_dir = prepare_data(spec)
    first = probe_curvature(spec, str(data_dir), "lora")
    assert math.isfinite(first) and first > 0
    assert probe_curvature(spec, str(data_dir), "lora") == first  # seeded


class _Tracker:
    """The two tracker calls `_prior` makes (a unit test: no MLflow)."""

    def __init__(self, lr: float) -> None:
        self.notes: dict[str, tuple[dict, dict]] = {}
        self.lr = lr

    def method_score(self, method: str) -> object:
        from peftsweep.orchestrator.scoring import ConfigScore, RunRecord

        return ConfigScore(method, self.lr, 4, (RunRecord(method, self.lr, 4, 0, 0.5),))

    def note_method(self, method: str, metrics: dict, tags: dict) -> None:
        self.notes[method] = (metrics, tags)


@pytest.mark.parametrize("prior", ["curvature", "transfer"])
def test_a_non_positive_curvature_gives_no_prior_instead_of_a_negative_range(
    tmp_path: Path, prior: str
) -> None:
    from peftsweep.orchestrator.sweep import _prior

    spec = _spec(tmp_path, ["lora", "pissa", "dora"], prior)
    tracker = _Tracker(lr=1e-2)
    curvature = {"lora": 20.0, "pissa": -416.0, "dora": 40.0}  # PiSSA's probe on the built-in task: < 0
    assert _prior(spec, "pissa", [spec.method("lora")], tracker, curvature) == (None, None)
    assert "is not > 0" in tracker.notes["pissa"][1]["lr_prior"]
    # A positive one still gets its prior, from the usable earlier methods only (not PiSSA's negative λ).
    lr_range, points = _prior(spec, "dora", [spec.method("lora"), spec.method("pissa")], tracker, curvature)
    if prior == "curvature":
        assert lr_range is not None and math.sqrt(lr_range[0] * lr_range[1]) == pytest.approx(1e-2 * 20 / 40)
    else:
        assert points is not None and [p["lr"] for p in points] == [pytest.approx(1e-2 * 20 / 40)]
    assert not usable_curvature(float("nan")) and not usable_curvature(0.0) and usable_curvature(1e-3)
