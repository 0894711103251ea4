"""The per-worker loop: runs with 1 and 2 Ray Train workers, reports at eval points, stops on divergence."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from peftsweep.spec import SweepSpec, parse_spec
from peftsweep.trainables.engine import deepspeed_config
from peftsweep.trainables.executors import train_loop_per_worker
from peftsweep.trainables.faults import Fault
from peftsweep.trainables.loop import run_trial
from peftsweep.trainables.trial_config import TRIAL_KEY, standalone_trial
from peftsweep.vocab import FAILURE_KEY, TRAINER_STATE


def _spec(tmp_path: Path, workers: int = 1, **training: object) -> SweepSpec:
    return parse_spec(
        {
            "name": "loop",
            "methods": ["lora"],
            "training": {"max_steps": 20, "eval_every": 10, **training},
            "data": {"max_eval_examples": 32},
            "resources": {"zero_stage": 2, "workers_per_trial": workers},
            "tracking": {"root": str(tmp_path / "runs")},
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


def test_a_crashed_worker_group_resumes_from_its_last_checkpoint(ray_session: None, tmp_path: Path) -> None:
    """Two data-parallel workers over gloo (engine auto: DeepSpeed ZeRO-2) crash after step 10: Ray restarts
    the group (FailureConfig), the loop continues from the step-10 checkpoint, and the final checkpoint holds
    rank 0's adapter and both ranks' resume shards merged into one directory."""
    import ray.train
    from ray.train.torch import TorchTrainer

    spec = _spec(tmp_path, workers=2)
    trial = standalone_trial(spec, "lora", 5e-3, 4, 0)
    trial = replace(trial, fault=Fault("crash", 10, marker=str(tmp_path / "fired")))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={TRIAL_KEY: trial},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.45}),
        run_config=ray.train.RunConfig(
            name="restart",
            storage_path=str(tmp_path / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=1),
        ),
    )
    result = trainer.fit()
    assert result.error is None and result.metrics["step"] == 20 and result.metrics["diverged"] == 0.0
    assert 0.0 <= result.metrics["exact_match"] <= 1.0 and math.isfinite(result.metrics["eval_loss"])
    ckpt = Path(result.checkpoint.path)
    progress = json.loads((ckpt / TRAINER_STATE / "progress.json").read_text())
    assert progress["resumed_from_step"] == 10 and len(progress["history"]) == 20
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", TRAINER_STATE} <= files
    state = {p.name for p in (ckpt / TRAINER_STATE).iterdir()}
    assert {"rank0.pt", "rank1.pt", "progress.json", "state"} <= state  # "state": DeepSpeed's shards


# An `oom` drill at step 3 (eval points at 2, 4, 6) → the phase the failure names, the step it names, and the
# optimizer steps done when it struck (the failed report's step).
OOM_PHASES = {
    "forward": ("the forward/backward pass", 3, 2),
    "optimizer": ("the optimizer step", 3, 2),  # where AdamW first allocates its moments
    "eval": ("the eval point", 4, 4),  # the first eval point at or after step 3
    "export": ("the adapter export", 4, 4),
}


@pytest.mark.parametrize("phase", list(OOM_PHASES))
def test_out_of_memory_in_any_phase_fails_the_trial_naming_the_phase(phase: str, tmp_path: Path) -> None:
    """One worker: the OOM is reported once as a failed trial (worst score, no checkpoint, the phase and step
    named) and the loop ends there: no retry, no further step."""
    spec = _spec(tmp_path, max_steps=6, eval_every=2)
    trial = replace(standalone_trial(spec, "lora", 1e-2, 4, 0), fault=Fault("oom", 3, phase=phase))  # type: ignore[arg-type]
    reports: list[tuple[dict, Path | None]] = []
    run_trial(trial, lambda metrics, ckpt: reports.append((metrics, ckpt)))
    where, at, done = OOM_PHASES[phase]
    *before, (failed, ckpt) = reports
    assert [m["step"] for m, _ in before] == [2] and all(c is not None for _, c in before)
    assert failed[FAILURE_KEY].startswith(f"out of memory in {where} at step {at}: injected fault")
    assert failed["oom"] == 1.0 and failed["step"] == done and ckpt is None
    assert failed["exact_match"] == 0.0 and failed["eval_loss"] == math.inf  # the worst score


# One multi-worker case (the single-worker test drills every phase): the OOM where AdamW first allocates, on
# the rank that is not rank 0 (whose verdict the restart must still find).
@pytest.mark.parametrize(("phase", "rank"), [("optimizer", 1)], ids=["optimizer-rank1"])
def test_out_of_memory_on_one_of_two_workers_fails_the_trial_without_retraining(
    phase: str, rank: int, ray_session: None, tmp_path: Path
) -> None:
    """Two Ray Train workers (DeepSpeed ZeRO-2), one runs out of memory while the other waits in a
    collective: the group fails, Ray Train restarts it (max_failures=1), and the restart reads the verdict
    the failing rank left and reports the trial failed instead of training it again. Had it trained again,
    the drill (which fires once per trial) would not strike and the result would be step 6."""
    import ray.train
    from ray.train import UserCallback
    from ray.train.torch import TorchTrainer

    log = tmp_path / "reports.jsonl"

    class Reports(UserCallback):  # on the Ray Train controller: every report of rank 0, in order
        def after_report(self, run_context: object, metrics: list[dict], checkpoint: object) -> None:
            with open(log, "a") as out:
                out.write(json.dumps(metrics[0], default=str) + "\n")

    spec = _spec(tmp_path, workers=2, max_steps=6, eval_every=2)
    fault = Fault("oom", 3, marker=str(tmp_path / "fired"), phase=phase, rank=rank)  # type: ignore[arg-type]
    trial = replace(standalone_trial(spec, "lora", 5e-3, 4, 0), trial_id=f"oom-{phase}", fault=fault)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={TRIAL_KEY: trial},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.45}),
        run_config=ray.train.RunConfig(
            name=f"oom-{phase}",
            storage_path=str(tmp_path / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=1),
            callbacks=[Reports()],
        ),
    )
    result = trainer.fit()
    assert result.error is None
    where, at, done = OOM_PHASES[phase]
    reports = [json.loads(line) for line in log.read_text().splitlines()]
    # The last report, and the only failed one; nothing trained past the OOM (an eval at step 2 may come
    # first, or be lost with the failed group).
    *before, failed = reports
    assert [r["step"] for r in before] in ([], [2]) and not any(r.get("oom") for r in before)
    assert failed["oom"] == 1.0 and failed["step"] == done
    reason = failed[FAILURE_KEY]
    assert reason.startswith(f"out of memory in {where} at step {at}:") and f"on rank {rank}" in reason
    assert json.loads((trial.run_dir / "out-of-memory.json").read_text()) == {"reason": reason, "step": done}


def test_divergence_guard_reports_worst_score_and_stops(tmp_path: Path) -> None:
    """A loss above divergence_factor × the first loss ends the trial at once with the worst score."""
    spec = _spec(tmp_path, divergence_factor=0.5)  # any step-1 loss exceeds half of itself
    reports: list[tuple[dict, Path | None]] = []
    run_trial(
        standalone_trial(spec, "lora", 1e-3, 4, 0),
        lambda metrics, adapter: reports.append((metrics, adapter)),
    )
    assert len(reports) == 1
    metrics, adapter = reports[0]
    assert metrics["diverged"] == 1.0 and metrics["step"] == 1
    assert metrics["exact_match"] == 0.0 and adapter is None  # the search metric gets the worst value


def test_standalone_trial_reports_every_eval_point_with_an_adapter(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    reports: list[tuple[dict, list[str]]] = []

    def record(metrics: dict, adapter: Path | None) -> None:
        reports.append((metrics, sorted(p.name for p in adapter.iterdir()) if adapter else []))

    run_trial(standalone_trial(spec, "lora", 1e-2, 4, 0), record)
    assert [m["step"] for m, _ in reports] == [10, 20]
    assert all("adapter_model.safetensors" in files for _, files in reports)
    assert reports[-1][0]["train_loss"] < reports[0][0]["train_loss"]  # it learns


def _run(spec: SweepSpec, tmp_path: Path, name: str, **kwargs: object) -> tuple[list[dict], list[Path]]:
    """Run a standalone trial; keep a copy of every checkpoint (the loop deletes its own after reporting)."""
    reports: list[dict] = []
    copies: list[Path] = []

    def record(metrics: dict, ckpt: Path | None) -> None:
        reports.append(metrics)
        if ckpt is not None:
            copies.append(Path(shutil.copytree(ckpt, tmp_path / f"{name}-{metrics['step']}")))

    run_trial(standalone_trial(spec, "lora", kwargs.pop("lr", 1e-2), 4, 0), record, **kwargs)  # type: ignore[arg-type]
    return reports, copies


def _history(ckpt: Path) -> list[float]:
    return json.loads((ckpt / TRAINER_STATE / "progress.json").read_text())["history"]


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
@pytest.mark.parametrize("optimizer", ["adamw", "sl_sam"])
def test_resuming_from_a_checkpoint_continues_the_same_loss_curve(
    optimizer: str, engine: str, tmp_path: Path
) -> None:
    """Stop-and-resume at step 10 gives the uninterrupted run's losses (dropout RNG, data order, optimizer
    moments, LR schedule and the SL-SAM bandit all restored), on both engines."""
    spec = _spec(tmp_path, optimizer=optimizer, engine=engine)
    spec = spec.model_copy(update={"methods": [spec.methods[0].model_copy(update={"dropout": 0.1})]})
    full, ckpts = _run(spec, tmp_path, "full")
    resumed, again = _run(spec, tmp_path, "resumed", resume_from=ckpts[0])
    assert [r["step"] for r in resumed] == [20]
    assert _history(again[-1]) == pytest.approx(_history(ckpts[-1]), rel=1e-5, abs=1e-6)
    assert resumed[-1]["eval_loss"] == pytest.approx(full[-1]["eval_loss"], rel=1e-5)
    # The continuation is not trivially equal: the second half of the curve differs from the first.
    assert _history(ckpts[-1])[10:] != pytest.approx(_history(ckpts[-1])[:10], rel=1e-3)


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_gradient_accumulation_reaches_the_global_batch(engine: str, tmp_path: Path) -> None:
    """2 micro-batches of 16 accumulate to the same steps as one batch of 32 (arith-sub answers all have
    the same token count, so the per-token mean loss is identical)."""
    big, big_ckpts = _run(_spec(tmp_path, batch_size=32, engine=engine), tmp_path, "big")
    acc, acc_ckpts = _run(
        _spec(tmp_path, batch_size=16, global_batch_size=32, engine=engine), tmp_path, "acc"
    )
    assert [r["step"] for r in acc] == [10, 20]
    assert _history(acc_ckpts[-1]) == pytest.approx(_history(big_ckpts[-1]), rel=1e-4)
    assert (
        deepspeed_config(_spec(tmp_path, batch_size=16, global_batch_size=64))["gradient_accumulation_steps"]
        == 4
    )


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_forgetting_check_gradual_objective_and_test_split_are_reported(engine: str, tmp_path: Path) -> None:
    from peftsweep.trainables.builtin import builtin_task_dir

    one_file = tmp_path / "sub.jsonl"  # a single file: split 80/10/10 by data.split
    one_file.write_text(
        "".join((builtin_task_dir("arith-sub") / "train.jsonl").read_text().splitlines(True)[:640])
    )
    spec = parse_spec(
        {
            "name": "loop",
            "methods": ["lora"],
            "data": {"task": str(one_file), "max_eval_examples": 16},
            "training": {
                "max_steps": 10,
                "eval_every": 5,
                "objective": "gradual",
                "gradual": {"tau0": 0.2, "anneal_fraction": 1.0},
                "engine": engine,
            },
            "forgetting": {"task": "builtin:arith-add", "max_examples": 32, "max_increase": 1e-9},
            "search": {"metric": "exact_match"},
        },
        base_dir=tmp_path,
    )
    reports, _ = _run(spec, tmp_path, "gradual", lr=3e-2)
    first, last = reports
    assert first["tau"] == pytest.approx(0.6) and last["tau"] == 1.0  # 0.2 → 1 over the 10 steps
    assert math.isfinite(last["general_loss"]) and last["forgetting"] > 1e-9  # subtracting costs addition
    assert last["forgetting_violated"] == 1.0 and last["exact_match"] == 0.0  # the constraint scores it worst
    assert "test_exact_match" in last and "test_exact_match" not in first  # test split at the last step only
    assert last["tokens_per_s"] > 0


def _cpu_methods() -> list[str]:
    from peftsweep import search_spaces

    return [n for n in search_spaces.method_names() if not search_spaces.get_method(n).requires_cuda]


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_torch_and_deepspeed_engines_train_the_same_losses(zero_stage: int, tmp_path: Path) -> None:
    """At world size 1 plain torch AdamW and DeepSpeed (ZeRO-0/2) take the same 20 steps to 1e-5: the
    engine choice (training.engine: auto → torch there) changes speed, not results."""
    torch_run, torch_ckpts = _run(_spec(tmp_path, engine="torch"), tmp_path, "torch", lr=5e-3)
    ds_spec = _spec(tmp_path, engine="deepspeed")
    ds_spec = ds_spec.model_copy(
        update={"resources": ds_spec.resources.model_copy(update={"zero_stage": zero_stage})}
    )
    ds_run, ds_ckpts = _run(ds_spec, tmp_path, f"ds{zero_stage}", lr=5e-3)
    assert len(_history(torch_ckpts[-1])) == 20
    assert _history(torch_ckpts[-1]) == pytest.approx(_history(ds_ckpts[-1]), rel=1e-5, abs=1e-6)
    assert torch_run[-1]["eval_loss"] == pytest.approx(ds_run[-1]["eval_loss"], rel=1e-5)
    engines = {json.loads((c / TRAINER_STATE / "progress.json").read_text())["engine"] for c in ds_ckpts}
    assert engines == {"deepspeed"}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("method", "engine", "zero_stage"),
    [(m, e, 0) for e in ("torch", "deepspeed") for m in _cpu_methods()]  # AdaLoRA's cap; every method at 0
    # SVD inits see the whole weights (the base is loaded unsharded), then ZeRO-3 shards them.
    + [("pissa", "deepspeed", 3), ("milora", "deepspeed", 3)],
)
def test_every_cpu_method_runs_in_the_real_loop_and_reloads(
    method: str, engine: str, zero_stage: int, tmp_path: Path
) -> None:
    """Both engines, the method's hooks, greedy eval and export → load_trained, for every method."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftsweep.search_spaces import load_trained
    from peftsweep.trainables.builtin import builtin_model_dir
    from peftsweep.trainables.data import load_split
    from peftsweep.trainables.metrics import evaluate

    spec = parse_spec(
        {
            "name": "loop",
            "methods": [method],
            "training": {"max_steps": 8, "eval_every": 8, "engine": engine},
            "data": {"max_eval_examples": 16},
            "resources": {"zero_stage": zero_stage},
        },
        base_dir=tmp_path,
    )
    rank = 4 if spec.method(method).ranks else 0
    lr = spec.method(method).lr_max
    saved = tmp_path / "export"

    def record(metrics: dict, adapter: Path | None) -> None:
        reports.append(metrics)
        shutil.copytree(adapter, saved, ignore=shutil.ignore_patterns(TRAINER_STATE))

    reports: list[dict] = []
    run_trial(standalone_trial(spec, method, lr, rank, 0), record)
    (metrics,) = reports
    assert metrics["step"] == 8 and metrics["trainable_params"] > 0 and metrics["adapter_bytes"] > 0
    model = load_trained(AutoModelForCausalLM.from_pretrained(builtin_model_dir()), saved)
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    again = evaluate(model, tokenizer, load_split("builtin:arith-sub", "eval", limit=16))
    assert again["exact_match"] == pytest.approx(metrics["exact_match"], abs=1e-9)
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-3)
