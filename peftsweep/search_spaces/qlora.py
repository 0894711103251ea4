"""QLoRA (Dettmers et al. 2023): LoRA on a base re-loaded in 4-bit NF4 (bitsandbytes), to save GPU memory.

Untestable on CPU: bitsandbytes' 4-bit kernels need CUDA, so the registry marks it `requires_cuda` and a
CPU-only spec is rejected before any trial starts. The exported adapter is plain LoRA; it was trained
against the quantised base, so on the full-precision base it reproduces outputs only up to the NF4 error.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peftsweep.search_spaces._lora import build_lora
from peftsweep.search_spaces._registry import DEFAULT_RANKS, PAPER_LR_RANGE, AdapterHParams, Method, register

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

REQUIRES_CUDA = "QLoRA quantises the base to 4-bit with bitsandbytes, which needs a CUDA GPU"


def _apply(model: PreTrainedModel, hparams: AdapterHParams, workdir: Path) -> PeftModel:
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    METHOD.merged_options(hparams.options)  # rejects knobs QLoRA does not have
    if not torch.cuda.is_available():
        raise RuntimeError(f"qlora: {REQUIRES_CUDA}")
    source = model.config.name_or_path
    if not source:
        raise ValueError("qlora re-loads the base in 4-bit and needs the path it was loaded from")
    # transformers quantises only while loading, so the full-precision copy is dropped and re-read 4-bit.
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # QLoRA paper: NF4 suits normally distributed weights best
        bnb_4bit_use_double_quant=True,  # QLoRA paper: also quantise the scales, ~0.4 bit/param saved
        bnb_4bit_compute_dtype=torch.bfloat16,  # QLoRA paper: bf16 compute, the 4-bit storage is only storage
    )
    del model
    quantised = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=quantization, device_map={"": torch.cuda.current_device()}
    )
    # Casts norms to fp32 and enables input grads, as QLoRA training needs; no gradient checkpointing here
    # (the loop does not use it for any other method either, so memory comparisons stay fair).
    quantised = prepare_model_for_kbit_training(quantised, use_gradient_checkpointing=False)
    return build_lora(quantised, hparams, workdir, mutates_base=False)


METHOD = register(
    Method(
        name="qlora",
        summary="QLoRA: LoRA on a 4-bit NF4-quantised base (bitsandbytes, CUDA only)",
        lr_range=PAPER_LR_RANGE,
        ranks=DEFAULT_RANKS,
        options={},
        apply=_apply,
        requires_cuda=REQUIRES_CUDA,
    )
)
