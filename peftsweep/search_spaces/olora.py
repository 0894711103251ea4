"""OLoRA (Büyükakyüz 2024): the adapter starts on a QR decomposition of W, the base keeps the residual.

The base weights are mutated, so the initial adapter is snapshotted and the export converted to plain LoRA.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peftsweep.search_spaces._lora import build_lora, snapshot_initial
from peftsweep.search_spaces._registry import DEFAULT_RANKS, PAPER_LR_RANGE, AdapterHParams, Method, register

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

# PEFT 0.21.2's olora_init ignores fan_in_fan_out, so a Conv1D's (in, out) weight gets factors of the wrong
# orientation and the first forward fails with a matmul shape error.
CONV1D_REASON = "PEFT's OLoRA init ignores the transposed Conv1D weights of GPT-2 (matmul shape error)"


def _apply(model: PreTrainedModel, hparams: AdapterHParams, workdir: Path) -> PeftModel:
    METHOD.merged_options(hparams.options)  # rejects knobs OLoRA does not have
    if any(type(m).__name__ == "Conv1D" for m in model.modules()):
        # Fail here with the reason; PEFT would mutate the base and only fail at the first forward.
        raise NotImplementedError(f"olora: {CONV1D_REASON}")
    peft_model = build_lora(model, hparams, workdir, mutates_base=True, init_lora_weights="olora")
    snapshot_initial(peft_model, workdir)
    return peft_model


METHOD = register(
    Method(
        name="olora",
        summary="OLoRA: adapter starts on the QR factors of W, base keeps the residual",
        lr_range=PAPER_LR_RANGE,
        ranks=DEFAULT_RANKS,
        options={},
        apply=_apply,
        separable=False,  # the init rewrites the base weights: adapter off ≠ the original model
        unsupported={"gpt2": CONV1D_REASON},
    )
)
