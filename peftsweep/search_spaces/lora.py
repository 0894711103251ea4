"""Plain LoRA (Hu et al. 2021): the baseline every other method is compared with."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peftsweep.search_spaces._lora import build_lora
from peftsweep.search_spaces._registry import DEFAULT_RANKS, PAPER_LR_RANGE, AdapterHParams, Method, register

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


def _apply(model: PreTrainedModel, hparams: AdapterHParams, workdir: Path) -> PeftModel:
    METHOD.merged_options(hparams.options)  # rejects knobs LoRA does not have
    return build_lora(model, hparams, workdir, mutates_base=False)


METHOD = register(
    Method(
        name="lora",
        summary="LoRA: low-rank update B·A, A random and B zero, base weights untouched",
        lr_range=PAPER_LR_RANGE,
        ranks=DEFAULT_RANKS,
        options={},
        apply=_apply,
    )
)
