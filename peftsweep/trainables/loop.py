"""One trial's training recipe, run by every Ray Train worker: setup → train → evaluate/report → stop.

Reads top to bottom like a plain PyTorch loop. The engine is DeepSpeed (ZeRO stage from the spec) on GPU and
on CPU alike (gloo), so the code path is the same everywhere. Workers never talk to MLflow: they report
metrics and an adapter-only checkpoint; the driver records them.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from peftsweep.spec import SweepSpec

# report(metrics, adapter_dir): adapter_dir is a directory holding the exported adapter (rank 0) or None.
Reporter = Callable[[dict[str, float], Path | None], None]


def resolve_base_model(name: str) -> str:
    """`builtin:NAME` → the packaged checkpoint dir; anything else goes to `from_pretrained` unchanged."""
    if name.startswith("builtin:"):
        from peftsweep.trainables.builtin import builtin_model_dir

        return str(builtin_model_dir(name.removeprefix("builtin:")))
    return name


def deepspeed_config(spec: SweepSpec) -> dict[str, Any]:
    """The DeepSpeed engine config derived from the spec (micro-batch per worker, ZeRO stage, precision)."""
    tr, res = spec.training, spec.resources
    return {
        "train_micro_batch_size_per_gpu": tr.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": tr.max_grad_norm,
        "zero_optimization": {"stage": res.zero_stage},
        "bf16": {"enabled": res.precision == "bf16"},
        "fp16": {"enabled": res.precision == "fp16"},
        # ZeRO wraps our torch AdamW (DeepSpeed's fused optimizers need a JIT build per machine).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def run_trial(spec: SweepSpec, method: str, lr: float, rank: int, seed: int, report: Reporter) -> None:
    """Fine-tune one adapter and report metrics + adapter at every eval point.

    Needs an initialised torch.distributed process group (Ray Train provides one; see `init_standalone`).
    """
    # Scratch space for the method's initial-adapter snapshot (PiSSA/MiLoRA export); removed at the end.
    with tempfile.TemporaryDirectory(prefix="peftsweep-trial-") as scratch:
        _train(spec, method, lr, rank, seed, report, Path(scratch))


def _train(
    spec: SweepSpec, method: str, lr: float, rank: int, seed: int, report: Reporter, workdir: Path
) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler
    from transformers.utils import logging as hf_logging

    from peftsweep import search_spaces
    from peftsweep.trainables.data import collate, load_split, tokenize_for_training
    from peftsweep.trainables.metrics import evaluate

    tr, data, mspec = spec.training, spec.data, spec.method(method)
    world, rank_id = dist.get_world_size(), dist.get_rank()

    # --- setup: base model, adapter, data -------------------------------------------------------------
    # One thread per reserved CPU: concurrent trials oversubscribe a small machine badly otherwise.
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    torch.manual_seed(seed)
    hf_logging.disable_progress_bar()  # per-trial weight-loading bars only clutter worker logs
    base_path = resolve_base_model(spec.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    hparams = search_spaces.AdapterHParams(
        rank=rank,
        alpha=rank * mspec.alpha_over_rank,
        dropout=mspec.dropout,
        target_modules=mspec.target_modules,
        options=mspec.options,
        total_steps=tr.max_steps,
    )
    recipe = search_spaces.get_method(method)
    model = recipe.apply(model, hparams, workdir)

    train_ds = tokenize_for_training(
        load_split(data.task, "train", data.prompt_field, data.completion_field), tokenizer, tr.max_length
    )
    eval_ds = load_split(data.task, "eval", data.prompt_field, data.completion_field, data.max_eval_examples)
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank_id, shuffle=True, seed=seed)
    loader = DataLoader(
        train_ds.with_format(columns=["input_ids", "labels"]),
        batch_size=tr.batch_size,
        sampler=sampler,
        collate_fn=lambda feats: collate(feats, tokenizer.pad_token_id),
        drop_last=True,
    )

    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=tr.weight_decay)
    scheduler_name = "constant_with_warmup" if tr.schedule == "constant" else tr.schedule
    scheduler = get_scheduler(
        scheduler_name,
        optimizer,
        num_warmup_steps=math.ceil(tr.warmup_ratio * tr.max_steps),
        num_training_steps=tr.max_steps,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(spec)
    )
    device = engine.device

    # --- train ------------------------------------------------------------------------------------------
    step, epoch, first_loss, window = 0, 0, None, []
    engine.train()
    while step < tr.max_steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = engine(**batch).loss
            total = loss + recipe.extra_loss(engine.module) if recipe.extra_loss else loss
            engine.backward(total)
            step += 1
            if recipe.after_backward:
                recipe.after_backward(engine.module, step)
            engine.step()

            # Divergence guard on the whole objective; every worker must agree, because every worker must
            # report the same number of times. train_loss is the task loss alone, comparable across methods.
            losses = torch.stack([loss.detach().float(), total.detach().float()])
            dist.all_reduce(losses)
            task_loss, objective = (losses / world).tolist()
            first_loss = objective if first_loss is None else first_loss
            window.append(task_loss)
            if not math.isfinite(objective) or objective > tr.divergence_factor * first_loss:
                report(_diverged_metrics(step, objective, spec), None)
                return

            if step % tr.eval_every == 0 or step == tr.max_steps:
                metrics = evaluate(engine.module, tokenizer, eval_ds)
                metrics |= {
                    "step": step,
                    "train_loss": sum(window) / len(window),
                    "lr": scheduler.get_last_lr()[0],
                }
                metrics |= {"diverged": 0.0, "trainable_params": trainable_params}
                window = []
                with tempfile.TemporaryDirectory(prefix="peftsweep-ckpt-") as ckpt:
                    metrics["adapter_bytes"] = _export(engine, spec, method, Path(ckpt), workdir, rank_id)
                    report(metrics, Path(ckpt) if rank_id == 0 else None)
                engine.train()
            if step >= tr.max_steps:
                break
        epoch += 1


def _diverged_metrics(step: int, loss: float, spec: SweepSpec) -> dict[str, float]:
    # The worst possible score, so neither the sampler nor ASHA ever prefers a diverged LR.
    worst = 0.0 if spec.search.direction == "max" else float("inf")
    metrics = {"exact_match": 0.0, "eval_loss": float("inf"), "step": step, "diverged": 1.0}
    metrics[spec.search.metric] = worst
    metrics["train_loss"] = loss if math.isfinite(loss) else float("inf")
    return metrics


def _export(engine: Any, spec: SweepSpec, method: str, out_dir: Path, workdir: Path, rank_id: int) -> int:
    """Rank 0 writes the adapter and returns its size in bytes (0 elsewhere); under ZeRO-3 every rank first
    gathers the sharded trainable weights."""
    import deepspeed

    from peftsweep import search_spaces

    gather = (
        deepspeed.zero.GatheredParameters(
            [p for p in engine.module.parameters() if p.requires_grad], modifier_rank=None
        )
        if spec.resources.zero_stage == 3
        else nullcontext()
    )
    with gather:
        if rank_id == 0:
            return search_spaces.export_trained(method, engine.module, out_dir, workdir)["adapter_bytes"]
    return 0


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: rebuild the spec and report through `ray.train.report`."""
    import ray.train

    spec = SweepSpec.model_validate(config["spec"])

    def report(metrics: dict[str, float], adapter_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(adapter_dir)) if adapter_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    run_trial(spec, config["method"], config["lr"], config["rank"], config["seed"], report)


def init_standalone() -> None:
    """A one-process gloo group, for running `run_trial` without Ray (benchmarks, tests).

    An in-memory store: no port to collide with another process doing the same.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)  # DeepSpeed reads these
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
