"""MiLoRA (Wang et al. 2024): the adapter starts on the base weight's SMALLEST r singular triplets.

Not in PEFT, so the init is done here on top of a default LoRA, as MiLoRA's official code does (PEFT's
pissa_init with the last r triplets instead of the first). PEFT's "mica" init is a different method.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peftsweep.search_spaces._lora import build_lora, snapshot_initial
from peftsweep.search_spaces._registry import DEFAULT_RANKS, PAPER_LR_RANGE, AdapterHParams, Method, register

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


def milora_init(model: PeftModel, adapter: str = "default") -> None:
    """Per LoRA layer: A, B ← the minor r singular triplets of W (√S on each side), W ← W − s·B·A."""
    import torch
    from peft.tuners.lora import Linear, LoraLayer
    from peft.utils.other import transpose

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.r]
    if not layers:
        raise ValueError("MiLoRA found no LoRA layers to initialise")
    with torch.no_grad():
        for layer in layers:
            if not isinstance(layer, Linear):
                raise NotImplementedError(f"MiLoRA supports linear layers only, not {type(layer).__name__}")
            base_weight = layer.get_base_layer().weight
            if base_weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise TypeError(f"MiLoRA needs float base weights for the SVD, got {base_weight.dtype}")
            r, scaling = layer.r[adapter], layer.scaling[adapter]
            weight = transpose(base_weight.to(torch.float32), layer.fan_in_fan_out)  # (out, in)
            if r > min(weight.shape):
                raise ValueError(f"MiLoRA rank {r} exceeds the smaller side of weight {tuple(weight.shape)}")
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # s descending: minor triplets last
            sqrt_s = torch.sqrt(s[-r:] / scaling)
            lora_a = sqrt_s[:, None] * vh[-r:]  # diag(√S_r) @ Vh_r
            lora_b = u[:, -r:] * sqrt_s[None, :]  # U_r @ diag(√S_r)
            layer.lora_A[adapter].weight.data = lora_a.to(layer.lora_A[adapter].weight.dtype).contiguous()
            layer.lora_B[adapter].weight.data = lora_b.to(layer.lora_B[adapter].weight.dtype).contiguous()
            residual = weight - scaling * lora_b @ lora_a
            base_weight.data = transpose(residual, layer.fan_in_fan_out).to(base_weight.dtype).contiguous()


def _apply(model: PreTrainedModel, hparams: AdapterHParams, workdir: Path) -> PeftModel:
    METHOD.merged_options(hparams.options)  # rejects knobs MiLoRA does not have
    peft_model = build_lora(model, hparams, workdir, mutates_base=True)
    milora_init(peft_model)
    snapshot_initial(peft_model, workdir)
    return peft_model


METHOD = register(
    Method(
        name="milora",
        summary="MiLoRA: adapter starts on the bottom-r singular triplets of W, base keeps the residual",
        lr_range=PAPER_LR_RANGE,
        ranks=DEFAULT_RANKS,
        options={},
        apply=_apply,
        separable=False,  # the init rewrites the base weights: adapter off ≠ the original model
    )
)
