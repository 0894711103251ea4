"""(IA)³ (Liu et al. 2022): learned per-channel scaling vectors on the targeted layers, initialised to one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peftsweep.search_spaces._registry import AdapterHParams, Method, register

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


def _apply(model: PreTrainedModel, hparams: AdapterHParams, workdir: Path) -> PeftModel:
    from peft import IA3Config, get_peft_model

    METHOD.merged_options(hparams.options)  # rejects knobs IA3 does not have
    # Same targets as every other method (the spec's target_modules), each projection's output scaled. No
    # layer is feed-forward (input-scaled): an explicit empty list, because None is replaced on reload by
    # PEFT's per-model default, which is then no subset of the saved target list and the load fails.
    config = IA3Config(target_modules=hparams.target_modules, feedforward_modules=[], task_type="CAUSAL_LM")
    return get_peft_model(model, config)


METHOD = register(
    Method(
        name="ia3",
        summary="(IA)3: trained per-channel scaling vectors (start at 1) on the targeted projections",
        # Only ~one scalar per channel, all starting at 1: useful moves are large relative steps, so the
        # range sits a decade above LoRA's (the IA3 paper trains with 3e-3).
        lr_range=(1e-4, 1e-1),
        ranks=(),
        options={},
        apply=_apply,
        uses_rank=False,
    )
)
