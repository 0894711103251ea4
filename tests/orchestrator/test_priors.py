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
    first = probe_curvature(spec.model_dump(mode="json"), str(data_dir), "lora")
    assert math.isfinite(first) and first > 0
    assert probe_curvature(spec.model_dump(mode="json"), str(data_dir), "lora") == first  # seeded
