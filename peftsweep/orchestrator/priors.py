"""LR priors across methods: once a reference method is tuned, start the others where it predicts.

Why (arXiv 2602.04998): methods differ mostly by *where* their good LRs lie, and the top Hessian eigenvalue
of the loss w.r.t. the adapter at init is the paper's explanation of that shift (λ up → stable LR down). So
with ``search.lr_prior``:

- ``curvature``: each later method searches a range of the spec's log-width centred at
  best_lr(reference) × λ_reference / λ_method;
- ``transfer``: each later method's study is warmed with the earlier methods' best configurations, their LRs
  scaled by the same curvature ratio (Optuna ``enqueue_trial`` through OptunaSearch's points_to_evaluate).

Whether this reaches each method's optimum in fewer trials is measured, not assumed (``bench/``); on the
built-in task the curvature ratio overstates PiSSA's shift and inverts MiLoRA's (bench/README.md).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from peftsweep.spec import MethodSpec, SweepSpec

REFERENCE = "lora"  # the paper's baseline; the first method of the spec when the sweep has no LoRA
TRANSFER_POINTS = 3  # earlier configurations enqueued per method: enough to seed TPE, few enough to explore


def reference_method(spec: SweepSpec) -> str:
    names = [m.name for m in spec.methods]
    return REFERENCE if REFERENCE in names else names[0]


def search_order(spec: SweepSpec) -> list[MethodSpec]:
    """The spec's methods with the reference first when a prior needs it tuned before the others."""
    if spec.search.lr_prior == "none":
        return list(spec.methods)
    ref = reference_method(spec)
    return [spec.method(ref)] + [m for m in spec.methods if m.name != ref]


def probe_curvature(spec: SweepSpec, data_dir: str, method: str) -> float:
    """λ_max of ``method``'s adapter at init on the sweep's validation rows (a Ray task in a sweep)."""
    from transformers import AutoTokenizer

    from peftsweep.trainables.curvature import probe_method
    from peftsweep.trainables.model import resolve_base_model
    from peftsweep.trainables.prepared import load_prepared

    mspec = spec.method(method)
    rank = min(mspec.ranks) if mspec.ranks else 0
    base = resolve_base_model(spec.base_model)
    with tempfile.TemporaryDirectory(prefix="peftsweep-probe-") as workdir:
        result = probe_method(
            method,
            base,
            load_prepared(Path(data_dir)).validation,
            AutoTokenizer.from_pretrained(base, trust_remote_code=spec.trust_remote_code),
            rank=rank,
            alpha=rank * mspec.alpha_over_rank,
            seed=spec.training.seed,
            workdir=Path(workdir),
            options=mspec.options,
            max_length=spec.training.max_length,
            trust_remote_code=spec.trust_remote_code,
        )
    return result.top_eigenvalue


def usable_curvature(value: float | None) -> bool:
    """A λ_max that can scale an LR: finite and positive (a saddle's negative top eigenvalue cannot)."""
    return value is not None and math.isfinite(value) and value > 0


def centred_range(mspec: MethodSpec, centre: float) -> tuple[float, float]:
    """The method's range, same log-width as in the spec, centred (geometrically) at ``centre``."""
    assert mspec.lr_min is not None and mspec.lr_max is not None  # filled from the registry
    half = math.sqrt(mspec.lr_max / mspec.lr_min)
    return centre / half, centre * half


def transfer_points(
    mspec: MethodSpec, earlier: list[tuple[float, int]], ratio: float
) -> list[dict[str, float | int]]:
    """Earlier methods' best (lr, rank) scaled by ``ratio`` into this method's space (clipped to it)."""
    assert mspec.lr_min is not None and mspec.lr_max is not None
    points: list[dict[str, float | int]] = []
    for lr, rank in earlier[:TRANSFER_POINTS]:
        point: dict[str, float | int] = {"lr": min(max(lr * ratio, mspec.lr_min), mspec.lr_max)}
        if mspec.ranks:
            point["rank"] = rank if rank in mspec.ranks else mspec.ranks[0]
        points.append(point)
    return points
