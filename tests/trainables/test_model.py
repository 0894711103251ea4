"""How a trial's base loads (precision, attention kernel, the method's own load keywords) and gradient
checkpointing: it recomputes, adapters still get their gradients, and the losses do not change."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from peftsweep.search_spaces import AdapterHParams, get_method
from peftsweep.search_spaces import _registry as registry
from peftsweep.spec import SpecError, SweepSpec, parse_spec
from peftsweep.trainables.loop import run_trial
from peftsweep.trainables.model import enable_gradient_checkpointing, load_base_model
from peftsweep.trainables.trial_config import standalone_trial
from peftsweep.vocab import TRAINER_STATE

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def _spec(
    tmp_path: Path, training: dict | None = None, resources: dict | None = None, **top: Any
) -> SweepSpec:
    return parse_spec(
        {
            "name": "model",
            "methods": [{"name": "lora", "dropout": 0.1}],  # dropout: recomputation must replay its masks
            "training": {"max_steps": 20, "eval_every": 10, **(training or {})},
            "data": {"max_eval_examples": 32},
            "resources": resources or {},
            "tracking": {"root": str(tmp_path / "runs")},
            **top,
        },
        base_dir=tmp_path,
    )


def test_the_base_loads_in_the_training_precision_with_the_asked_attention(tmp_path: Path) -> None:
    model = load_base_model(_spec(tmp_path))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    spec = _spec(tmp_path, {"attn_implementation": "eager"}, {"precision": "bf16"})
    model = load_base_model(spec, "lora")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # no fp32 copy for DeepSpeed to cast
    assert model.config._attn_implementation == "eager"


def test_the_method_says_how_its_base_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry's load_kwargs hook reaches from_pretrained (QLoRA's 4-bit config goes this way), given
    the precision's dtype; on CPU QLoRA's own hook refuses clearly."""
    seen: list[torch.dtype] = []

    def hook(dtype: torch.dtype) -> dict[str, Any]:
        seen.append(dtype)
        return {"attn_implementation": "eager"}

    monkeypatch.setitem(registry._METHODS, "lora", replace(get_method("lora"), load_kwargs=hook))
    model = load_base_model(_spec(tmp_path, resources={"precision": "bf16"}), "lora")
    assert seen == [torch.bfloat16] and model.config._attn_implementation == "eager"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="qlora: QLoRA quantises the base to 4-bit"):
            get_method("qlora").load_kwargs(torch.bfloat16)
        with pytest.raises(ValueError, match="qlora trains on a base loaded in 4-bit"):
            get_method("qlora").apply(model, AdapterHParams(rank=4, alpha=4.0), tmp_path)


def test_flash_attention_needs_cuda_and_half_precision(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="'flash_attention_2' runs only on CUDA GPUs"):
        _spec(tmp_path, {"attn_implementation": "flash_attention_2"})
    with pytest.raises(SpecError, match="'flash_attention_2' computes in bf16/fp16 only"):
        _spec(tmp_path, {"attn_implementation": "flash_attention_2"}, {"gpus_per_worker": 1})
    spec = _spec(
        tmp_path, {"attn_implementation": "flash_attention_2"}, {"gpus_per_worker": 1, "precision": "bf16"}
    )
    assert spec.training.attn_implementation == "flash_attention_2"
    with pytest.raises(SpecError, match="attn_implementation"):
        _spec(tmp_path, {"attn_implementation": "flash"})


def test_checkpointed_blocks_recompute_and_adapters_get_gradients(tmp_path: Path) -> None:
    """Every block's forward runs again in the backward pass, and with a frozen base and embedding the
    adapters inside every block still get their gradients."""
    spec = _spec(tmp_path)
    torch.manual_seed(0)
    model = get_method("lora").apply(load_base_model(spec), AdapterHParams(rank=4, alpha=4.0), tmp_path)
    enable_gradient_checkpointing(model)
    layers = model.base_model.model.model.layers
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):  # transformers checkpoints a block's forward: count what it calls
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    model.train()
    tokens = torch.randint(4, 17, (4, 11), generator=torch.Generator().manual_seed(1))
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert calls == [2] * len(layers)  # forward, then again in the backward pass: really checkpointed
    # lora_B: at init B = 0, so A's gradient (through B) is 0 with or without checkpointing
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert len(grads) == 7 * len(layers)  # all-linear: q, k, v, o, gate, up, down
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads


def _losses(
    spec: SweepSpec, tmp_path: Path, name: str, method: str = "lora"
) -> tuple[list[float], list[dict]]:
    """Every step's train loss and the eval points' reports of one trial."""
    reports: list[dict] = []
    history: list[float] = []

    def record(metrics: dict, ckpt: Path | None) -> None:
        reports.append(metrics)
        if ckpt is not None and metrics["step"] == spec.training.max_steps:
            copy = Path(shutil.copytree(ckpt, tmp_path / name))
            history.extend(json.loads((copy / TRAINER_STATE / "progress.json").read_text())["history"])

    run_trial(standalone_trial(spec, method, 1e-2 if method == "lora" else 1e-3, 4, 0), record)
    return history, reports


def test_a_lora_trial_with_gradient_checkpointing_trains_the_same_losses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from peftsweep.trainables import model as model_module

    enabled: list[Any] = []
    monkeypatch.setattr(
        model_module,
        "enable_gradient_checkpointing",
        lambda m: enabled.append(m) or enable_gradient_checkpointing(m),
    )
    plain, plain_reports = _losses(_spec(tmp_path), tmp_path, "plain")
    assert not enabled
    checkpointed, gc_reports = _losses(_spec(tmp_path, {"gradient_checkpointing": True}), tmp_path, "gc")
    assert len(enabled) == 1  # the option reached the loop
    assert len(plain) == 20 and plain[-1] < plain[0]  # it trains
    assert checkpointed == pytest.approx(plain, abs=1e-5)
    for a, b in zip(plain_reports, gc_reports, strict=True):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-5)
        assert b["exact_match"] == a["exact_match"]


def _bf16_copy_of_the_builtin_base(tmp_path: Path) -> str:
    """The built-in base as most hub checkpoints are stored: bf16 weights (the packaged one is fp32)."""
    from transformers import AutoModelForCausalLM

    from peftsweep.trainables.builtin import builtin_model_dir

    out = tmp_path / "bf16-base"
    shutil.copytree(builtin_model_dir(), out, ignore=shutil.ignore_patterns("*.safetensors"))
    AutoModelForCausalLM.from_pretrained(builtin_model_dir(), dtype=torch.bfloat16).save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_a_bf16_loaded_base_trains_as_deepspeed_casting_an_fp32_one(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeepSpeed casts the parameters to bf16 before it makes its fp32 masters, so loading the base in bf16
    (half the memory per worker) trains the same losses as loading it in fp32 and letting DeepSpeed cast.
    PiSSA's SVD init reads the base weights before that cast: it is the same on a bf16-stored checkpoint (the
    usual hub format; on an fp32-stored one it sees the weights rounded to bf16, a difference at bf16's
    rounding level, see trainables/model.py)."""
    from peftsweep.trainables import model as model_module

    spec = _spec(
        tmp_path,
        {"max_steps": 10, "eval_every": 10, "engine": "deepspeed"},
        {"precision": "bf16", "zero_stage": 2},
        methods=[method],
        **({"base_model": _bf16_copy_of_the_builtin_base(tmp_path)} if method == "pissa" else {}),
    )
    direct, direct_reports = _losses(spec, tmp_path, "bf16", method)
    monkeypatch.setattr(model_module, "load_dtype", lambda spec: torch.float32)  # the old way
    cast, cast_reports = _losses(spec, tmp_path, "fp32", method)
    assert len(direct) == 10 and direct[-1] < direct[0]
    assert direct == pytest.approx(cast, abs=1e-6)
    assert direct_reports[-1]["eval_loss"] == pytest.approx(cast_reports[-1]["eval_loss"], abs=1e-6)
