"""The base model and its tokenizer: where they come from and how they load (once per process if safe).

Why a cache: a warm trial actor (the inline executor) runs many trials; the tokenizer is immutable and is
loaded once per process. The base model is loaded fresh for every trial, because some methods rewrite its
weights at init (PiSSA, MiLoRA, OLoRA) and a trial must start from the original base; it is loaded once,
directly as the trial trains on it: in the training precision, with the spec's attention kernel, and as its
method asks (QLoRA: 4-bit while loading, never full precision first).
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftsweep.spec import SweepSpec


def resolve_base_model(name: str) -> str:
    """`builtin:NAME` → the packaged checkpoint dir; anything else goes to `from_pretrained` unchanged."""
    if name.startswith("builtin:"):
        from peftsweep.trainables.assets import builtin_model_dir

        return str(builtin_model_dir(name.removeprefix("builtin:")))
    return name


def hub_options(spec: SweepSpec) -> dict[str, Any]:
    """Keyword arguments of every ``from_pretrained`` of the base model or its tokenizer."""
    return {"trust_remote_code": spec.trust_remote_code}


@lru_cache(maxsize=4)
def _tokenizer(path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_tokenizer(spec: SweepSpec) -> Any:
    """The base model's tokenizer (cached per process: trials only read it)."""
    return _tokenizer(resolve_base_model(spec.base_model), spec.trust_remote_code)


# resources.precision → the dtype the base loads in
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_dtype(spec: SweepSpec) -> Any:
    """The dtype every worker loads the base in: the training precision (``resources.precision``).

    Why not fp32 with DeepSpeed casting it: DeepSpeed casts every parameter to bf16/fp16 in
    ``_configure_distributed_model`` *before* ``_configure_optimizer`` makes the fp32 master copies of the
    trainable ones, so the masters come from the cast values either way; an fp32 load only held twice the
    base's memory on every worker until then. Adapters PEFT creates on a bf16/fp16 base are fp32
    (``autocast_adapter_dtype``) until DeepSpeed casts them like the rest. Inits that rewrite base weights
    (PiSSA, MiLoRA, OLoRA, Init[AB]) compute in fp32 and store in the weights' dtype, as the cast would; they
    now see the weights as the checkpoint stores them rounded to the precision: nothing changes for the
    usual bf16 checkpoints, and on an fp32-stored one PiSSA's first losses move at bf16's rounding level
    (0.3 % on the built-in base). Measured: tests/trainables/test_model.py. The torch engine trains only
    fp32 (spec validation).
    """
    import torch

    return getattr(torch, PRECISION_DTYPES[spec.resources.precision])


def base_load_kwargs(spec: SweepSpec, method: str | None = None) -> dict[str, Any]:
    """Every ``from_pretrained`` keyword of the base a trial of ``method`` trains on: the training precision,
    the attention kernel (``training.attn_implementation``; None: transformers' default), and whatever the
    method asks for (its registry entry's ``load_kwargs``: QLoRA's 4-bit quantisation)."""
    from peftsweep.search_spaces import get_method

    dtype = load_dtype(spec)
    kwargs: dict[str, Any] = {"dtype": dtype, **hub_options(spec)}
    if spec.training.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.training.attn_implementation
    hook = get_method(method).load_kwargs if method else None
    return kwargs | (hook(dtype) if hook else {})


def load_base_model(spec: SweepSpec, method: str | None = None) -> Any:
    """A fresh copy of the base model, loaded once, as ``method`` trains on it (`base_load_kwargs`).

    Fresh per trial: some methods rewrite base weights at init (PiSSA, MiLoRA, OLoRA), so a warm actor's
    next trial must not reuse them. The full base is loaded (never ``zero.Init``), so SVD inits (PiSSA,
    MiLoRA) see whole weights before ZeRO-3 shards them.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-trial weight-loading bars only clutter worker logs
    path = resolve_base_model(spec.base_model)
    return AutoModelForCausalLM.from_pretrained(path, **base_load_kwargs(spec, method))


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass (``training.gradient_checkpointing``).

    Non-reentrant checkpointing (``use_reentrant=False``, PyTorch's recommended mode): it backpropagates into
    a checkpointed block whatever its inputs. The reentrant kind does so only if an input of the block
    requires grad, which with a frozen base and embedding none does; transformers patches that for
    ``input_ids`` models (``enable_input_require_grads``), but nothing here has to rely on it. Works on a PEFT
    model (the call reaches the wrapped transformers model) and on the methods that train the model itself.
    """
    # transformers 5 renamed it activation_checkpointing_enable; the old name warns until v6 (positional: the
    # keyword argument was renamed too)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
