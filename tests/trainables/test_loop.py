"""The per-worker loop: runs with 1 and 2 Ray Train workers, reports at eval points, stops on divergence."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from peftsweep.spec import SweepSpec, parse_spec
from peftsweep.trainables.loop import deepspeed_config, init_standalone, run_trial, train_loop_per_worker


def _spec(tmp_path: Path, **training: object) -> SweepSpec:
    return parse_spec(
        {
            "name": "loop",
            "methods": ["lora"],
            "training": {"max_steps": 20, "eval_every": 10, **training},
            "data": {"max_eval_examples": 32},
            "resources": {"zero_stage": 2},
        },
        base_dir=tmp_path,
    )


def test_deepspeed_config_follows_the_spec(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    cfg = deepspeed_config(spec)
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["train_micro_batch_size_per_gpu"] == spec.training.batch_size
    assert cfg["gradient_clipping"] == spec.training.max_grad_norm
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]


def test_two_workers_per_trial_train_and_checkpoint(ray_session: None, tmp_path: Path) -> None:
    """Data-parallel trial over gloo: both workers step in lockstep and rank 0's adapter is checkpointed."""
    import ray.train
    from ray.train.torch import TorchTrainer

    spec = _spec(tmp_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": spec.model_dump(mode="json"),
            **{"method": "lora", "lr": 5e-3, "rank": 4, "seed": 0},
        },
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.45}),
        run_config=ray.train.RunConfig(name="two-workers", storage_path=str(tmp_path / "ray")),
    )
    result = trainer.fit()
    assert result.metrics["step"] == 20 and result.metrics["diverged"] == 0.0
    assert 0.0 <= result.metrics["exact_match"] <= 1.0 and math.isfinite(result.metrics["eval_loss"])
    files = {p.name for p in Path(result.checkpoint.path).iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files


def test_divergence_guard_reports_worst_score_and_stops(tmp_path: Path) -> None:
    """A loss above divergence_factor × the first loss ends the trial at once with the worst score."""
    init_standalone()
    spec = _spec(tmp_path, divergence_factor=0.5)  # any step-1 loss exceeds half of itself
    reports: list[tuple[dict, Path | None]] = []
    run_trial(spec, "lora", 1e-3, 4, 0, lambda metrics, adapter: reports.append((metrics, adapter)))
    assert len(reports) == 1
    metrics, adapter = reports[0]
    assert metrics["diverged"] == 1.0 and metrics["step"] == 1
    assert metrics["exact_match"] == 0.0 and adapter is None


def test_standalone_trial_reports_every_eval_point_with_an_adapter(tmp_path: Path) -> None:
    init_standalone()
    spec = _spec(tmp_path)
    reports: list[tuple[dict, list[str]]] = []

    def record(metrics: dict, adapter: Path | None) -> None:
        reports.append((metrics, sorted(p.name for p in adapter.iterdir()) if adapter else []))

    run_trial(spec, "lora", 1e-2, 4, 0, record)
    assert [m["step"] for m, _ in reports] == [10, 20]
    assert all("adapter_model.safetensors" in files for _, files in reports)
    assert reports[-1][0]["train_loss"] < reports[0][0]["train_loss"]  # it learns


def _cpu_methods() -> list[str]:
    from peftsweep import search_spaces

    return [n for n in search_spaces.method_names() if not search_spaces.get_method(n).requires_cuda]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", _cpu_methods())
def test_every_cpu_method_runs_in_the_real_loop_and_reloads(method: str, tmp_path: Path) -> None:
    """DeepSpeed engine, the method's hooks, greedy eval and export → load_trained, for every method."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftsweep.search_spaces import load_trained
    from peftsweep.trainables.builtin import builtin_model_dir
    from peftsweep.trainables.data import load_split
    from peftsweep.trainables.metrics import evaluate

    init_standalone()
    spec = parse_spec(
        {
            "name": "loop",
            "methods": [method],
            "training": {"max_steps": 8, "eval_every": 8},
            "data": {"max_eval_examples": 16},
            "resources": {"zero_stage": 0},  # AdaLoRA's cap; every method runs at 0
        },
        base_dir=tmp_path,
    )
    rank = 4 if spec.method(method).ranks else 0
    lr = spec.method(method).lr_max
    saved = tmp_path / "export"

    def record(metrics: dict, adapter: Path | None) -> None:
        reports.append(metrics)
        shutil.copytree(adapter, saved)

    reports: list[dict] = []
    run_trial(spec, method, lr, rank, 0, record)
    (metrics,) = reports
    assert metrics["step"] == 8 and metrics["trainable_params"] > 0 and metrics["adapter_bytes"] > 0
    model = load_trained(AutoModelForCausalLM.from_pretrained(builtin_model_dir()), saved)
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    again = evaluate(model, tokenizer, load_split("builtin:arith-sub", "eval", limit=16))
    assert again["exact_match"] == pytest.approx(metrics["exact_match"], abs=1e-9)
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-3)
