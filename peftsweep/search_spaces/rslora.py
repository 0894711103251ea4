"""rsLoRA (Kalajdzievski 2023): LoRA scaled by alpha/√r instead of alpha/r, so high ranks still learn."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peftsweep.search_spaces._lora import build_lora
from peftsweep.search_spaces._registry import DEFAULT_RANKS, PAPER_LR_RANGE, AdapterHParams, Method, register

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


def _apply(model: PreTrainedModel, hparams: AdapterHParams, workdir: Path) -> PeftModel:
    METHOD.merged_options(hparams.options)  # rejects knobs rsLoRA does not have
    # Only the scaling differs from LoRA (B starts at zero), so W is unchanged and no snapshot is needed.
    return build_lora(model, hparams, workdir, mutates_base=False, use_rslora=True)


METHOD = register(
    Method(
        name="rslora",
        summary="rsLoRA: LoRA with rank-stabilised scaling alpha/sqrt(r)",
        lr_range=PAPER_LR_RANGE,
        ranks=DEFAULT_RANKS,
        options={},
        apply=_apply,
    )
)
