"""BitFit (Ben Zaken et al. 2021): train only the biases of the linear projections, everything else frozen.

Llama-shaped models have no biases, so BitFit there first creates zero biases on the targeted projections
(attention q/k/v/o and MLP gate/up/down; GPT-2: c_attn, attn c_proj, c_fc, mlp c_proj, which already have
biases). Zero init keeps the step-0 output identical to the base model. The helpers here (which layers are
targeted, adding zero biases) are shared with FineGates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftsweep.search_spaces._registry import AdapterHParams, Method, register

if TYPE_CHECKING:
    from torch import nn

# Only biases move, so larger steps than LoRA's are safe; BitFit paper used 1e-4..1e-3 on BERT, tiny
# models on the built-in task want up to 1e-1.
LR_RANGE = (1e-4, 1e-1)
WEIGHTS_FILE = "bitfit_biases.safetensors"
MANIFEST_FILE = "bitfit.json"


def target_linears(model: nn.Module, target_modules: str | list[str] = "all-linear") -> list[tuple[str, Any]]:
    """The (name, layer) pairs a bias/gate method adapts: nn.Linear and GPT-2 Conv1D, never the LM head.

    "all-linear" means every projection (PEFT's meaning); a list keeps layers whose name equals an entry or
    ends with "." + entry, as PEFT matches target_modules.
    """
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) or module is head:
            continue
        if target_modules != "all-linear" and not any(
            name == t or name.endswith("." + t) for t in target_modules
        ):
            continue
        found.append((name, module))
    if not found:
        raise ValueError(f"no linear layer matches target_modules={target_modules!r}")
    return found


def out_features(module: Any) -> int:
    """Output width of an nn.Linear ([out, in] weight) or a GPT-2 Conv1D ([in, out] weight)."""
    from torch import nn

    return module.out_features if isinstance(module, nn.Linear) else module.weight.shape[1]


def add_zero_biases(model: nn.Module, names: list[str]) -> list[str]:
    """Give each named layer lacking a bias a zero one (output unchanged); returns the layers that got one."""
    import torch

    added = []
    for name in names:
        module = model.get_submodule(name)
        if module.bias is None:
            w = module.weight
            module.bias = torch.nn.Parameter(
                torch.zeros(out_features(module), dtype=w.dtype, device=w.device)
            )
            added.append(name)
    return added


def _apply(model: nn.Module, hparams: AdapterHParams, workdir: Path) -> nn.Module:
    METHOD.merged_options(hparams.options)  # rejects knobs BitFit does not have
    names = [n for n, _ in target_linears(model, hparams.target_modules)]
    added = add_zero_biases(model, names)
    model.requires_grad_(False)
    for name in names:
        model.get_submodule(name).bias.requires_grad_(True)
    # Recorded on the model so export can say which biases a fresh base must first create.
    model._peftsweep_bitfit = {"targets": names, "added_biases": added}
    return model


def _export(model: nn.Module, out_dir: Path, workdir: Path) -> None:
    """Only the trained bias tensors plus the manifest of targeted layers; never mutates the model."""
    from safetensors.torch import save_file

    info = model._peftsweep_bitfit
    tensors = {f"{n}.bias": model.get_submodule(n).bias.detach().cpu().contiguous() for n in info["targets"]}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    (out_dir / MANIFEST_FILE).write_text(json.dumps(info, indent=2))


def _load(base_model: nn.Module, out_dir: Path) -> nn.Module:
    """Create the same zero biases on `base_model` (modified in place), then load the trained values."""
    from safetensors.torch import load_file

    info = json.loads((Path(out_dir) / MANIFEST_FILE).read_text())
    add_zero_biases(base_model, info["added_biases"])
    tensors = load_file(str(Path(out_dir) / WEIGHTS_FILE))
    missing = set(tensors) - set(base_model.state_dict())
    if missing:
        raise ValueError(f"{out_dir}: base model has no layer for {sorted(missing)[:3]}; wrong base?")
    base_model.load_state_dict(tensors, strict=False)
    return base_model


METHOD = register(
    Method(
        name="bitfit",
        summary="BitFit: only the linear projections' biases train (zero biases added where missing)",
        lr_range=LR_RANGE,
        ranks=(),  # no rank: BitFit's size is fixed by the architecture
        options={},
        apply=_apply,
        uses_rank=False,
        export=_export,
        load=_load,
        separable=False,  # the trained weights are the model's own: no adapter to switch off
    )
)
