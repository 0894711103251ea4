"""VeRA (Kopiczko et al. 2024): frozen random low-rank matrices shared by all layers, only two scaling
vectors per layer trained, so it needs far fewer parameters than LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peftsweep.search_spaces._registry import DEFAULT_RANKS, AdapterHParams, Method, register

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


def _apply(model: PreTrainedModel, hparams: AdapterHParams, workdir: Path) -> PeftModel:
    from peft import VeraConfig, get_peft_model

    options = METHOD.merged_options(hparams.options)
    config = VeraConfig(
        r=hparams.rank,  # VeRA has no alpha: the trained vectors set the scale
        vera_dropout=hparams.dropout,
        target_modules=hparams.target_modules,
        d_initial=options["d_initial"],
        # The shared random matrices are saved with the adapter, so a fresh base reloads it exactly.
        save_projection=True,
        task_type="CAUSAL_LM",  # the sweep trains causal LMs; from_pretrained then gives generate + labels
    )
    return get_peft_model(model, config)


METHOD = register(
    Method(
        name="vera",
        summary="VeRA: shared frozen random A, B; only per-layer scaling vectors b and d are trained",
        # Only scaling vectors are trained (b starts at zero): the VeRA paper needs LRs ~10x LoRA's.
        lr_range=(1e-4, 1e-1),
        ranks=DEFAULT_RANKS,
        options={"d_initial": 0.1},  # VeRA paper / PEFT default: small d keeps the early updates small
        apply=_apply,
        # The rank is the frozen random projection's: the paper uses ranks above the hidden size (1024 on
        # RoBERTa-base, width 768), and only the per-layer scaling vectors are trained.
        rank_bounded_by_width=False,
    )
)
