"""AdaLoRA (Zhang et al. 2023): SVD-shaped adapters P·Λ·Q whose ranks are re-allocated during training.

Every step scores the singular values from their gradients and prunes the least important ones until the
total budget reaches target_r per layer on average, which is why it needs the trial's step count and a
hook after backward.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftsweep.search_spaces._registry import DEFAULT_RANKS, PAPER_LR_RANGE, AdapterHParams, Method, register

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

# Share of the trial spent before pruning starts (importance scores need a few steps to settle) and at the
# end with the final ranks fixed (the pruned adapter needs time to recover); AdaLoRA's GLUE runs use about
# these proportions.
WARMUP_SHARE = 0.1
FINAL_SHARE = 0.2


def schedule(total_steps: int) -> dict[str, int]:
    """AdaLoRA's tinit/tfinal/total_step for a trial of `total_steps` optimizer steps."""
    if total_steps <= 0:
        raise ValueError("AdaLoRA needs the trial's total optimizer steps (AdapterHParams.total_steps > 0)")
    return {
        "total_step": total_steps,
        "tinit": int(WARMUP_SHARE * total_steps),
        "tfinal": int(FINAL_SHARE * total_steps),
    }


def _apply(model: PreTrainedModel, hparams: AdapterHParams, workdir: Path) -> PeftModel:
    from peft import AdaLoraConfig, get_peft_model

    options = METHOD.merged_options(hparams.options)
    ratio = options["target_ratio"]
    if not 0 < ratio <= 1:
        raise ValueError(f"adalora option target_ratio must be in (0, 1], got {ratio!r}")
    config = AdaLoraConfig(
        init_r=hparams.rank,
        target_r=max(1, round(ratio * hparams.rank)),
        lora_alpha=hparams.alpha,
        lora_dropout=hparams.dropout,
        target_modules=hparams.target_modules,
        task_type="CAUSAL_LM",  # the sweep trains causal LMs; from_pretrained then gives generate + labels
        **schedule(hparams.total_steps),
    )
    peft_model = get_peft_model(model, config)
    # The loop's hook runs BEFORE the optimizer step (DeepSpeed's step clears the gradients the scores need),
    # but PEFT masks pruned singular values in place, expecting to run AFTER it: the step would revive them.
    # So the current mask is re-applied before every forward (training, evaluation and generate alike).
    # Both modules: PeftModel.forward calls the tuner, generate calls the transformers model directly.
    for module in (peft_model.base_model, peft_model.base_model.model):
        module.register_forward_pre_hook(lambda _module, _args: _mask(peft_model))
    return peft_model


def _mask(model: Any) -> None:
    """Zero the singular values AdaLoRA has pruned so far (nothing before its budgeting phase)."""
    rank_pattern = model.peft_config["default"].rank_pattern
    if rank_pattern:
        model.base_model.rankallocator.mask_using_rank_pattern(model.base_model.model, rank_pattern)


def _after_backward(model: Any, step: int) -> None:
    # Scores ranks from the fresh gradients, so it must run before the optimizer step clears them.
    model.base_model.update_and_allocate(step)


def _export(model: Any, out_dir: Path, workdir: Path) -> None:
    """Save as a plain LoRA with per-layer ranks = the kept singular values, folding E and the scaling into A.

    PEFT 0.21.2 reloads its own AdaLoRA format wrongly once ranks are pruned (the saved rank_pattern keys
    match no module, ~5e-3 logit error, and a layer pruned to rank 0 is saved as a 0-size tensor), while a
    plain LoRA loads exactly with PeftModel.from_pretrained.
    """
    import torch
    from peft import LoraConfig
    from peft.tuners.adalora import AdaLoraLayer
    from safetensors.torch import save_file

    _mask(model)  # the last optimizer step may have revived pruned values; the forward never sees them
    ada = model.peft_config["default"]
    inner_prefix = "base_model.model."
    tensors, ranks = {}, {}
    with torch.no_grad():
        for name, layer in model.named_modules():
            if not isinstance(layer, AdaLoraLayer) or "default" not in layer.lora_A:
                continue
            scale = layer.scaling["default"] / (layer.ranknum["default"] + 1e-5)  # as in SVDLinear.forward
            lora_e = layer.lora_E["default"]
            kept = (lora_e[:, 0] != 0).nonzero()[:, 0]
            if kept.numel() == 0:  # pruned away: one zero direction, since LoRA needs r >= 1
                kept = torch.zeros(1, dtype=torch.long)
            lora_a = (layer.lora_A["default"] * lora_e * scale)[kept]
            lora_b = layer.lora_B["default"][:, kept]
            if (lora_e[kept] == 0).all():
                lora_a = torch.zeros_like(lora_a)
            tensors[f"{name}.lora_A.weight"] = lora_a.detach().float().contiguous().cpu()
            tensors[f"{name}.lora_B.weight"] = lora_b.detach().float().contiguous().cpu()
            ranks[name.removeprefix(inner_prefix)] = int(kept.numel())
    config = LoraConfig(
        r=ada.init_r,
        lora_alpha=ada.init_r,
        # Scaling 1 everywhere: the AdaLoRA scaling is already folded into A.
        rank_pattern=ranks,
        alpha_pattern=ranks,
        target_modules=sorted(ranks),
        fan_in_fan_out=ada.fan_in_fan_out,
        task_type=ada.task_type,
        base_model_name_or_path=ada.base_model_name_or_path,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})


METHOD = register(
    Method(
        name="adalora",
        summary="AdaLoRA: SVD-form adapter whose per-layer ranks are pruned to a budget during training",
        lr_range=PAPER_LR_RANGE,
        ranks=DEFAULT_RANKS,  # the initial rank init_r; the budget shrinks it to target_ratio of that
        # Half the initial rank on average: the AdaLoRA paper starts 1.5x above its target budget; 0.5 prunes
        # a bit harder so the re-allocation visibly matters, and the final average rank is r/2.
        options={"target_ratio": 0.5},
        apply=_apply,
        after_backward=_after_backward,
        export=_export,
        # Checked with the real loop: under ZeRO-1/2 DeepSpeed moves gradients into its partitioned buffers,
        # so param.grad is None after engine.backward and PEFT's rank scoring (p * p.grad) raises TypeError.
        max_zero_stage=0,
    )
)
