"""The base model and its tokenizer: where they come from and how they load (once per process if safe).

Why a cache: a warm trial actor (the inline executor) runs many trials; the tokenizer is immutable and is
loaded once per process. The base model is loaded fresh for every trial, because some methods rewrite its
weights at init (PiSSA, MiLoRA, OLoRA) and a trial must start from the original base.
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


def load_base_model(spec: SweepSpec) -> Any:
    """A fresh copy of the base model in fp32 master weights (DeepSpeed casts to bf16/fp16 when asked).

    The full base is loaded (never ``zero.Init``), so SVD inits (PiSSA, MiLoRA) see whole weights before
    ZeRO-3 shards them.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-trial weight-loading bars only clutter worker logs
    path = resolve_base_model(spec.base_model)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **hub_options(spec))
