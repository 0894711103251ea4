"""QLoRA (Dettmers et al. 2023): LoRA on a base loaded in 4-bit NF4 (bitsandbytes), to save GPU memory.

The base is quantised while it loads: the registry entry's `load_kwargs` gives the loader
(`trainables.model.load_base_model`) the ``BitsAndBytesConfig``, so a worker never holds the full-precision
base (it used to load it in full precision, drop it and read it again in 4-bit). `_apply` then only prepares
the quantised model for training and adds LoRA.

Untestable on CPU: bitsandbytes' 4-bit kernels need CUDA, so the registry marks it `requires_cuda` and a
CPU-only spec is rejected before any trial starts. The exported adapter is plain LoRA; it was trained
against the quantised base, so on the full-precision base it reproduces outputs only up to the NF4 error.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftsweep.search_spaces._lora import build_lora
from peftsweep.search_spaces._registry import DEFAULT_RANKS, PAPER_LR_RANGE, AdapterHParams, Method, register

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

REQUIRES_CUDA = "QLoRA quantises the base to 4-bit with bitsandbytes, which needs a CUDA GPU"


def _load_kwargs(dtype: Any) -> dict[str, Any]:
    """``from_pretrained`` keywords that load the base straight into 4-bit NF4 on this worker's GPU.

    ``dtype`` (the training precision) stays the dtype of what is not quantised (embeddings, norms, head).
    """
    import torch
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise RuntimeError(f"qlora: {REQUIRES_CUDA}")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # QLoRA paper: NF4 suits normally distributed weights best
        bnb_4bit_use_double_quant=True,  # QLoRA paper: also quantise the scales, ~0.4 bit/param saved
        bnb_4bit_compute_dtype=torch.bfloat16,  # QLoRA paper: bf16 compute, the 4-bit storage is only storage
    )
    return {"quantization_config": quantization, "device_map": {"": torch.cuda.current_device()}}


def _apply(model: PreTrainedModel, hparams: AdapterHParams, workdir: Path) -> PeftModel:
    from peft import prepare_model_for_kbit_training

    METHOD.merged_options(hparams.options)  # rejects knobs QLoRA does not have
    if not getattr(model, "is_loaded_in_4bit", False):
        raise ValueError(
            "qlora trains on a base loaded in 4-bit: load it with load_base_model(spec, 'qlora'), which "
            "applies QLoRA's load_kwargs"
        )
    # Casts norms to fp32 and enables input grads, as QLoRA training needs. Gradient checkpointing is the
    # loop's, as for every method (training.gradient_checkpointing), so memory comparisons stay fair.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return build_lora(model, hparams, workdir, mutates_base=False)


METHOD = register(
    Method(
        name="qlora",
        summary="QLoRA: LoRA on a 4-bit NF4-quantised base (bitsandbytes, CUDA only)",
        lr_range=PAPER_LR_RANGE,
        ranks=DEFAULT_RANKS,
        options={},
        apply=_apply,
        requires_cuda=REQUIRES_CUDA,
        load_kwargs=_load_kwargs,
    )
)
