"""The GPU path: bf16, ZeRO-2/3 (PiSSA's SVD on unsharded weights), accumulation, memory released after a
trial. Skipped without CUDA; the CPU suite covers everything these share (loop, resume, accumulation)."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftsweep.spec import parse_spec

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize(("method", "zero_stage"), [("lora", 2), ("pissa", 3), ("milora", 3)])
def test_bf16_trial_on_gpu_reports_throughput_and_frees_memory(
    method: str, zero_stage: int, tmp_path: Path
) -> None:
    from peftsweep.trainables.loop import run_trial
    from peftsweep.trainables.trial_config import standalone_trial

    spec = parse_spec(
        {
            "name": "gpu",
            "methods": [method],
            "data": {"max_eval_examples": 32},
            "training": {"max_steps": 20, "eval_every": 10, "batch_size": 16, "global_batch_size": 32},
            "resources": {"gpus_per_worker": 1, "precision": "bf16", "zero_stage": zero_stage},
        },
        base_dir=tmp_path,
    )
    before = torch.cuda.memory_allocated()
    reports: list[dict] = []
    run_trial(standalone_trial(spec, method, 1e-3, 8, 0), lambda metrics, _ckpt: reports.append(metrics))
    assert [r["step"] for r in reports] == [10, 20] and reports[-1]["diverged"] == 0.0
    assert reports[-1]["tokens_per_s"] > 0 and reports[-1]["peak_memory_mb"] > 0
    assert reports[-1]["train_loss"] < reports[0]["train_loss"] * 1.5  # trains without blowing up in bf16
    # Everything the trial allocated is released (a few MiB of allocator slack at most).
    assert torch.cuda.memory_allocated() - before < 16 * 2**20


def _trial(tmp_path: Path, method: str, training: dict, resources: dict) -> list[dict]:
    from peftsweep.trainables.loop import run_trial
    from peftsweep.trainables.trial_config import standalone_trial

    spec = parse_spec(
        {
            "name": "gpu",
            "methods": [method],
            "data": {"max_eval_examples": 32},
            "training": {"max_steps": 20, "eval_every": 10, "batch_size": 16, **training},
            "resources": {"gpus_per_worker": 1, **resources},
        },
        base_dir=tmp_path,
    )
    reports: list[dict] = []
    run_trial(standalone_trial(spec, method, 1e-3, 8, 0), lambda metrics, _ckpt: reports.append(metrics))
    assert [r["step"] for r in reports] == [10, 20] and reports[-1]["diverged"] == 0.0
    return reports


def test_qlora_loads_its_base_in_4bit_directly_and_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loader asks QLoRA how to load (its registry's load_kwargs): one 4-bit load, no fp32 copy first."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    loads: list[dict] = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args: object, **kwargs: object) -> object:
        loads.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    _trial(tmp_path, "qlora", {"engine": "torch"}, {"precision": "fp32"})
    assert len(loads) == 1 and loads[0]["quantization_config"].load_in_4bit


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_gradient_checkpointing_and_the_attention_kernel_on_zero3_bf16(attn: str, tmp_path: Path) -> None:
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    reports = _trial(
        tmp_path,
        "pissa",
        {"gradient_checkpointing": True, "attn_implementation": attn},
        {"precision": "bf16", "zero_stage": 3},
    )
    assert reports[-1]["train_loss"] < reports[0]["train_loss"] * 1.5
