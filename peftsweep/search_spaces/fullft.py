"""Full fine-tuning: every parameter trains; the reference the parameter-efficient methods approximate."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peftsweep.search_spaces._registry import AdapterHParams, Method, register

if TYPE_CHECKING:
    from torch import nn

# Lower than LoRA's 1e-5..1e-2: every weight moves, so a LoRA-sized step wrecks the pretrained model.
LR_RANGE = (1e-6, 1e-3)


def _apply(model: nn.Module, hparams: AdapterHParams, workdir: Path) -> nn.Module:
    METHOD.merged_options(hparams.options)  # rejects knobs full fine-tuning does not have
    model.requires_grad_(True)
    return model


def _export(model: nn.Module, out_dir: Path, workdir: Path) -> None:
    """The whole model as a `from_pretrained` directory (safetensors); save_pretrained does not mutate it."""
    model.save_pretrained(str(out_dir), safe_serialization=True)


def _load(base_model: nn.Module, out_dir: Path) -> nn.Module:
    """The exported directory is a complete model, so `base_model` is ignored (only its dtype is kept)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=base_model.dtype)


METHOD = register(
    Method(
        name="fullft",
        summary="Full fine-tuning: all parameters train; export is the whole model",
        lr_range=LR_RANGE,
        ranks=(),  # no rank: every parameter trains
        options={},
        apply=_apply,
        uses_rank=False,
        export=_export,
        load=_load,
        separable=False,  # the trained weights are the model's own: no adapter to switch off
    )
)
