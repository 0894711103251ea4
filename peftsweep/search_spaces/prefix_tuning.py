"""Prefix tuning (Li & Liang 2021): trainable key/value prefixes prepended in every attention layer.

Changes the model's output from step 0 (the virtual tokens are random), unlike the LoRA family.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peftsweep.search_spaces._registry import AdapterHParams, Method, register

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


def _apply(model: PreTrainedModel, hparams: AdapterHParams, workdir: Path) -> PeftModel:
    from peft import PrefixTuningConfig, get_peft_model

    options = METHOD.merged_options(hparams.options)
    config = PrefixTuningConfig(
        num_virtual_tokens=options["num_virtual_tokens"],
        task_type="CAUSAL_LM",  # prompt learning needs it: the labels are padded for the virtual tokens
    )
    return get_peft_model(model, config)


METHOD = register(
    Method(
        name="prefix_tuning",
        summary="prefix tuning: trainable key/value prefixes in every attention layer",
        # A few thousand parameters steering a frozen model: prompt methods are trained with LRs of 1e-3..0.3
        # in their papers, a decade or more above LoRA's.
        lr_range=(1e-4, 1e-1),
        ranks=(),
        # Short task prompts on tiny models (the built-in one has 32 positions): 8 virtual tokens leave room
        # for prompt and answer; the prompt-tuning paper sees little gain beyond ~20 even on large models.
        options={"num_virtual_tokens": 8},
        apply=_apply,
        uses_rank=False,
    )
)
