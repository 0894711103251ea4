"""DoRA (Liu et al. 2024): LoRA on the weight's direction plus a trainable per-row magnitude."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peftsweep.search_spaces._lora import build_lora
from peftsweep.search_spaces._registry import DEFAULT_RANKS, PAPER_LR_RANGE, AdapterHParams, Method, register

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


def _apply(model: PreTrainedModel, hparams: AdapterHParams, workdir: Path) -> PeftModel:
    METHOD.merged_options(hparams.options)  # rejects knobs DoRA does not have
    # The magnitude vector starts at the base weights' row norms, so W is unchanged and no snapshot is needed.
    return build_lora(model, hparams, workdir, mutates_base=False, use_dora=True)


METHOD = register(
    Method(
        name="dora",
        summary="DoRA: LoRA on the weight direction plus a trainable magnitude per output row",
        lr_range=PAPER_LR_RANGE,
        ranks=DEFAULT_RANKS,
        options={},
        apply=_apply,
    )
)
