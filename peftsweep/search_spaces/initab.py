"""Init[AB]: LoRA with BOTH factors random, the base keeping W − s·B·A so the step-0 output is unchanged.

Tests whether LoRA's zero-B init matters: unlike LoRA, gradients reach A and B from the first step. The
base weights are mutated, so the initial adapter is snapshotted and the export converted to plain LoRA.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from peftsweep.search_spaces._lora import build_lora, snapshot_initial
from peftsweep.search_spaces._registry import DEFAULT_RANKS, PAPER_LR_RANGE, AdapterHParams, Method, register

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


def initab_init(model: PeftModel, adapter: str = "default") -> None:
    """Per LoRA layer: B ← the same law as PEFT's A (uniform ±1/√in_features), W ← W − s·B·A."""
    import torch
    from peft.tuners.lora import Linear, LoraLayer
    from peft.utils.other import transpose

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.r]
    if not layers:
        raise ValueError("Init[AB] found no LoRA layers to initialise")
    with torch.no_grad():
        for layer in layers:
            if not isinstance(layer, Linear):
                raise NotImplementedError(f"Init[AB] supports linear layers only, not {type(layer).__name__}")
            lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            # PEFT's A is kaiming-uniform(a=√5), i.e. uniform ±1/√in_features. B gets the same bound (not
            # kaiming on its own fan-in r, which is √(in/r)× larger): s·B·A is then O(s·√r/in) per entry, a
            # small perturbation of W, so the residual base stays close to the pretrained weights.
            bound = 1.0 / math.sqrt(lora_a.shape[1])
            torch.nn.init.uniform_(lora_b, -bound, bound)
            base_weight = layer.get_base_layer().weight
            scaling = layer.scaling[adapter]
            weight = transpose(base_weight.to(torch.float32), layer.fan_in_fan_out)  # (out, in)
            delta = scaling * lora_b.to(torch.float32) @ lora_a.to(torch.float32)
            residual = transpose(weight - delta, layer.fan_in_fan_out)
            base_weight.data = residual.to(base_weight.dtype).contiguous()


def _apply(model: PreTrainedModel, hparams: AdapterHParams, workdir: Path) -> PeftModel:
    METHOD.merged_options(hparams.options)  # rejects knobs Init[AB] does not have
    peft_model = build_lora(model, hparams, workdir, mutates_base=True)
    initab_init(peft_model)
    snapshot_initial(peft_model, workdir)
    return peft_model


METHOD = register(
    Method(
        name="initab",
        summary="Init[AB]: LoRA with A and B both random, base keeps W - s*B*A (output unchanged at step 0)",
        lr_range=PAPER_LR_RANGE,
        ranks=DEFAULT_RANKS,
        options={},
        apply=_apply,
        separable=False,  # the init rewrites the base weights: adapter off ≠ the original model
    )
)
