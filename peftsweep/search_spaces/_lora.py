"""What the LoRA-family methods share: building the PEFT model, the initial snapshot, and the export.

torch/peft/transformers are imported inside the functions so that importing the registry stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

    from peftsweep.search_spaces._registry import AdapterHParams

# PEFT's weight conversion loads the snapshot as an adapter named after this folder and deletes it afterwards,
# so the name must never clash with the trained adapter ("default").
INITIAL_DIRNAME = "initial"


def build_lora(
    model: PreTrainedModel, hparams: AdapterHParams, workdir: Path, *, mutates_base: bool, **config: Any
) -> PeftModel:
    """Wrap `model` in a LoRA PeftModel; `config` adds method-specific LoraConfig fields (use_dora, ...)."""
    from peft import LoraConfig, get_peft_model
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not mutates_base and (workdir / INITIAL_DIRNAME).exists():
        # export_adapter would treat this plain adapter as a mutated-init one and write a wrong delta.
        raise FileExistsError(f"{workdir / INITIAL_DIRNAME} is left from a mutating init; use a new workdir")
    causal_lm = type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    lora_config = LoraConfig(
        r=hparams.rank,
        lora_alpha=hparams.alpha,
        lora_dropout=hparams.dropout,
        target_modules=hparams.target_modules,
        # CAUSAL_LM: from_pretrained then returns PeftModelForCausalLM (generate, labels); None otherwise.
        task_type="CAUSAL_LM" if causal_lm else None,
        **config,
    )
    return get_peft_model(model, lora_config)


def snapshot_initial(model: PeftModel, workdir: Path) -> None:
    """Save the just-initialised adapter, which export_adapter needs to turn a mutated-init adapter into LoRA.

    Saved with init_lora_weights=True so that PEFT, when loading it during the conversion, does not decompose
    the (already residual) base weights a second time.
    """
    config = model.peft_config["default"]
    original = config.init_lora_weights
    config.init_lora_weights = True
    try:
        model.save_pretrained(workdir / INITIAL_DIRNAME)
    finally:
        config.init_lora_weights = original


def export_adapter(model: PeftModel, out_dir: Path, workdir: Path) -> None:
    """Save the adapter so that `PeftModel.from_pretrained(fresh_base, out_dir)` reproduces `model`.

    Mutated-init adapters (a snapshot in workdir/"initial") are saved as a rank-2r plain LoRA delta on the
    ORIGINAL base, since a fresh base lacks the residual weights. PEFT's conversion loads the snapshot with
    load_adapter, which switches the whole model to eval(); each module's train/eval mode is restored here
    because the training loop may go on training after a checkpoint export.
    """
    initial = workdir / INITIAL_DIRNAME
    modes = [(module, module.training) for module in model.modules()]
    try:
        if initial.is_dir():
            model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=str(initial))
        else:
            model.save_pretrained(out_dir)
    finally:
        for module, training in modes:
            module.training = training
