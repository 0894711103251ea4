"""LoHa (Hyeon-Woo et al. 2022, FedPara): the update is a Hadamard product of two low-rank products."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peftsweep.search_spaces._registry import DEFAULT_RANKS, PAPER_LR_RANGE, AdapterHParams, Method, register

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


def _apply(model: PreTrainedModel, hparams: AdapterHParams, workdir: Path) -> PeftModel:
    from peft import LoHaConfig, get_peft_model

    METHOD.merged_options(hparams.options)  # rejects knobs LoHa does not have
    config = LoHaConfig(
        r=hparams.rank,
        alpha=hparams.alpha,
        module_dropout=hparams.dropout,
        target_modules=hparams.target_modules,
        task_type="CAUSAL_LM",  # the sweep trains causal LMs; from_pretrained then gives generate + labels
    )
    return get_peft_model(model, config)


METHOD = register(
    Method(
        name="loha",
        summary="LoHa: update (B1·A1) * (B2·A2), Hadamard product of two low-rank products",
        lr_range=PAPER_LR_RANGE,
        ranks=DEFAULT_RANKS,
        options={},
        apply=_apply,
        unsupported={"gpt2": "PEFT's LoHa has no layer for GPT-2's Conv1D (only Linear, Conv1d, Conv2d)"},
    )
)
