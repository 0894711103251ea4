"""The method registry: plain data plus an `apply` callable, importable without torch.

Spec validation and `peftsweep --help` import this, so nothing here may import torch/peft/transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

PAPER_LR_RANGE = (1e-5, 1e-2)  # arXiv 2602.04998 protocol: one log-uniform range for all LoRA-family methods
# r ≤ 16 keeps every adapter well under the built-in tiny model's width (hidden 64) and trials cheap on CPU;
# paper-scale specs pass their own ranks.
DEFAULT_RANKS = (4, 8, 16)


@dataclass(frozen=True)
class AdapterHParams:
    """One trial's adapter hyper-parameters, already resolved by the spec (which owns the user defaults)."""

    rank: int
    alpha: float  # lora_alpha; the spec passes rank * alpha_over_rank (paper: alpha = r)
    dropout: float = 0.0  # paper protocol: no adapter dropout
    target_modules: str | list[str] = "all-linear"  # paper protocol: every linear projection, not lm_head
    options: Mapping[str, Any] = field(default_factory=dict)  # method knobs; empty: the method's defaults
    total_steps: int = (
        0  # the trial's optimizer steps (AdaLoRA's rank-allocation schedule needs it); 0: unknown
    )


@dataclass(frozen=True)
class Method:
    """How to build one PEFT method, plus its default search space."""

    name: str
    summary: str  # one line, shown by the CLI
    lr_range: tuple[float, float]  # default log-uniform LR search range
    ranks: tuple[int, ...]  # default rank choices
    options: Mapping[str, Any]  # knob defaults; a spec's unknown knobs are rejected against these keys
    # apply(base_model, hparams, workdir) -> PeftModel with only adapter params trainable. Inits that mutate
    # the base weights also write the initial-adapter snapshot to workdir / "initial" (see export_adapter).
    apply: Callable[[PreTrainedModel, AdapterHParams, Path], PeftModel]
    # --- optional parts; the defaults fit a plain PEFT adapter ---------------------------------------------
    uses_rank: bool = True  # False: no rank in the search space (IA3, BitFit, full FT, prompt methods)
    # True: a rank above the layer width is no longer low-rank (LoRA's A, B factor the weight update), so the
    # spec is rejected. False where the rank is something else (VeRA: the shared random projection's rank).
    rank_bounded_by_width: bool = True
    # model_type (config.json) -> why this method cannot run on it; rejected before any trial starts.
    unsupported: Mapping[str, str] = field(default_factory=dict)
    requires_cuda: str | None = None  # why the method needs a CUDA GPU (QLoRA); rejected on CPU-only specs
    # load_kwargs(dtype) -> extra ``from_pretrained`` keywords for the base this method trains on, given the
    # dtype the loader would use (QLoRA: quantise to 4-bit while loading). None: the plain base.
    load_kwargs: Callable[[Any], dict[str, Any]] | None = None
    # export(model, out_dir, workdir): None → export_adapter (PEFT save_pretrained, mutating inits converted).
    export: Callable[[Any, Path, Path], None] | None = None
    # load(base_model, out_dir) -> trained model, for results plain PEFT cannot load (full FT, BitFit, ...).
    load: Callable[[Any, Path], Any] | None = None
    # extra_loss(model) -> tensor added to the task loss each step (e.g. FineGates' sparsity loss).
    extra_loss: Callable[[Any], Any] | None = None
    # after_backward(model, step): called after backward, BEFORE the optimizer step clears the gradients
    # (AdaLoRA's update_and_allocate scores ranks from them). `step` counts from 1.
    after_backward: Callable[[Any, int], None] | None = None
    max_zero_stage: int = 3  # highest DeepSpeed ZeRO stage the method works under (e.g. needs full .grad)
    # True: the model with its adapter switched off is the original base (what the gradual objective needs).
    # False for methods that train the base weights themselves or rewrite them at init (PiSSA, MiLoRA, ...).
    separable: bool = True

    def __post_init__(self) -> None:
        # Read-only view, so one caller cannot change another's defaults through the shared registry entry.
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        object.__setattr__(self, "unsupported", MappingProxyType(dict(self.unsupported)))

    def merged_options(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The method's defaults updated by `overrides`; unknown knobs are an error, not silently ignored."""
        unknown = sorted(set(overrides) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise ValueError(f"unknown option(s) {unknown} for method {self.name!r} (known: {known})")
        return {**self.options, **overrides}

    def rejection(self, model_type: str | None, cuda: bool) -> str | None:
        """Why this method cannot run on this architecture / hardware, or None if it can."""
        if model_type in self.unsupported:
            return f"{self.name} does not support {model_type} models: {self.unsupported[model_type]}"
        if self.requires_cuda and not cuda:
            return f"{self.name} needs a CUDA GPU: {self.requires_cuda}"
        return None


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method under its name; a duplicate name is a bug (two modules claiming one method)."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called `name`; the KeyError lists the known names so typos are easy to fix."""
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r} (known: {', '.join(method_names())})") from None


def method_names() -> list[str]:
    """All registered method names, sorted."""
    return sorted(_METHODS)
