"""PiSSA (Meng et al. 2024): the adapter starts on the base weight's LARGEST r singular triplets.

The base weights become the residual W - B·A, so the initial adapter is snapshotted for export.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peftsweep.search_spaces._lora import build_lora, snapshot_initial
from peftsweep.search_spaces._registry import DEFAULT_RANKS, PAPER_LR_RANGE, AdapterHParams, Method, register

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


def init_name(niter: int | None) -> str:
    """PEFT's init_lora_weights value: None → exact SVD ("pissa"), n ≥ 0 → randomized SVD with n iterations.

    niter=0 stays randomized (PEFT accepts it) rather than meaning "exact": every int means the same thing.
    """
    if niter is None:
        return "pissa"
    if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
        raise ValueError(f"pissa option niter must be None (exact SVD) or an int >= 0, got {niter!r}")
    return f"pissa_niter_{niter}"


def _apply(model: PreTrainedModel, hparams: AdapterHParams, workdir: Path) -> PeftModel:
    niter = METHOD.merged_options(hparams.options)["niter"]
    peft_model = build_lora(model, hparams, workdir, mutates_base=True, init_lora_weights=init_name(niter))
    snapshot_initial(peft_model, workdir)
    return peft_model


METHOD = register(
    Method(
        name="pissa",
        summary="PiSSA: adapter starts on the top-r singular triplets of W, base keeps the residual",
        lr_range=PAPER_LR_RANGE,
        ranks=DEFAULT_RANKS,
        # PiSSA paper: randomized SVD with a few power iterations matches exact SVD at a fraction of the cost;
        # None selects exact SVD.
        options={"niter": 4},
        apply=_apply,
        separable=False,  # the init rewrites the base weights: adapter off ≠ the original model
    )
)
