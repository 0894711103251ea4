"""One trial's training recipe, run by every Ray Train worker: setup → train → evaluate/checkpoint → stop.

Reads top to bottom like a plain PyTorch loop. The engine is DeepSpeed (ZeRO stage from the spec) on GPU and
on CPU alike (gloo), so the code path is the same everywhere. Workers never talk to MLflow: they report
metrics and a checkpoint directory; the driver records them.

A checkpoint (one per eval point) holds the exported adapter at its top level — what MLflow logs — and, under
``trainer_state/``, what a restarted worker needs to continue the same loss curve: DeepSpeed's checkpoint of
the *trainable* parameters and optimizer/scheduler state (never the frozen base weights), the loop's position
in the data, and the RNG and SL-SAM bandit states.
"""

from __future__ import annotations

import gc
import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftsweep.spec import SweepSpec
from peftsweep.trainables.faults import Fault
from peftsweep.vocab import HOST_KEY, NODE_KEY, TRAINER_STATE

# report(metrics, checkpoint_dir): every rank passes its own directory (rank 0's holds the adapter), or None
# when there is nothing to checkpoint (a diverged trial).
Reporter = Callable[[dict[str, Any], Path | None], None]

# A torch JIT-extension build holds its lock file for seconds (DeepSpeed's shm op: ~30 s on first build); one
# this old belongs to a killed process, and torch would wait on it forever.
_STALE_BUILD_LOCK_S = 600.0
_DS_TAG = "state"  # DeepSpeed checkpoint tag inside TRAINER_STATE


def resolve_base_model(name: str) -> str:
    """`builtin:NAME` → the packaged checkpoint dir; anything else goes to `from_pretrained` unchanged."""
    if name.startswith("builtin:"):
        from peftsweep.trainables.builtin import builtin_model_dir

        return str(builtin_model_dir(name.removeprefix("builtin:")))
    return name


def hub_options(spec: SweepSpec) -> dict[str, Any]:
    """Keyword arguments of every ``from_pretrained`` of the base model or its tokenizer."""
    return {"trust_remote_code": spec.trust_remote_code}


def deepspeed_config(spec: SweepSpec, world_size: int = 1) -> dict[str, Any]:
    """The DeepSpeed engine config from the spec (batch sizes, accumulation, ZeRO stage, precision)."""
    tr, res = spec.training, spec.resources
    return {
        "train_micro_batch_size_per_gpu": tr.batch_size,
        "gradient_accumulation_steps": spec.accumulation_steps,
        "train_batch_size": tr.batch_size * spec.accumulation_steps * world_size,
        "gradient_clipping": tr.max_grad_norm,
        "zero_optimization": {"stage": res.zero_stage},
        "bf16": {"enabled": res.precision == "bf16"},
        "fp16": {"enabled": res.precision == "fp16"},
        # ZeRO wraps our torch AdamW (DeepSpeed's fused optimizers need a JIT build per machine).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


@dataclass
class Progress:
    """Where the loop is; saved with every checkpoint so that a restarted worker continues from there."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_done: int = 0  # micro-batches of `epoch` already consumed
    first_loss: float | None = None  # the divergence guard's reference
    general_loss_base: float | None = None  # forgetting check: the general loss before fine-tuning
    resumed_from_step: int = 0  # 0: never resumed
    # train loss per optimizer step (continuation checks)
    history: list[float] = field(default_factory=list)


def run_trial(
    spec: SweepSpec,
    method: str,
    lr: float,
    rank: int,
    seed: int,
    report: Reporter,
    *,
    data_dir: Path | None = None,
    resume_from: Path | None = None,
    fault: Fault | None = None,
    heartbeat: Callable[[], None] | None = None,
) -> None:
    """Fine-tune one adapter, evaluating and checkpointing every `eval_every` steps.

    ``data_dir``: the sweep's prepared (tokenized) data; None prepares it here (standalone use).
    ``resume_from``: a checkpoint directory reported earlier by this trial; training continues from it.
    ``fault``: an injected in-step fault (NaN loss, out of memory) for reliability drills (`faults`).
    ``heartbeat``: called at each setup stage, optimizer step and report (the hang watchdog's input).
    Needs an initialised torch.distributed process group (Ray Train provides one; see `init_standalone`).
    """
    from peftsweep.trainables.prepared import prepare_data

    data_dir = data_dir or prepare_data(spec)
    # Scratch space for the method's initial-adapter snapshot (PiSSA/MiLoRA export); removed at the end.
    with tempfile.TemporaryDirectory(prefix="peftsweep-trial-") as scratch, _free_accelerator_memory():
        _train(spec, method, lr, rank, seed, report, Path(scratch), data_dir, resume_from, fault, heartbeat)


@contextmanager
def _free_accelerator_memory() -> Iterator[None]:
    """Release the trial's GPU memory when it ends, however it ends (early stop, divergence, error)."""
    try:
        yield
    finally:
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _train(
    spec: SweepSpec,
    method: str,
    lr: float,
    rank: int,
    seed: int,
    report: Reporter,
    workdir: Path,
    data_dir: Path,
    resume_from: Path | None,
    fault: Fault | None = None,
    heartbeat: Callable[[], None] | None = None,
) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler
    from transformers.utils import logging as hf_logging

    from peftsweep import search_spaces
    from peftsweep.trainables.data import collate
    from peftsweep.trainables.metrics import completion_loss
    from peftsweep.trainables.objectives import GradualSchedule, gradual_step_loss
    from peftsweep.trainables.optim import SparseSAM
    from peftsweep.trainables.prepared import load_prepared

    tr, mspec = spec.training, spec.method(method)
    world, rank_id = dist.get_world_size(), dist.get_rank()
    beat = heartbeat or (lambda: None)  # the hang watchdog's input: every setup stage, step and report
    beat()

    # --- setup: base model, adapter, data -------------------------------------------------------------
    # One thread per reserved CPU: concurrent trials oversubscribe a small machine badly otherwise.
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    torch.manual_seed(seed)
    hf_logging.disable_progress_bar()  # per-trial weight-loading bars only clutter worker logs
    base_path = resolve_base_model(spec.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_path, **hub_options(spec))
    # fp32 master weights; DeepSpeed casts to bf16/fp16 when the spec asks for it. The full base is loaded
    # (never zero.Init), so SVD inits (PiSSA, MiLoRA) see whole weights before ZeRO-3 shards them.
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, **hub_options(spec))
    hparams = search_spaces.AdapterHParams(
        rank=rank,
        alpha=rank * mspec.alpha_over_rank,
        dropout=mspec.dropout,
        target_modules=mspec.target_modules,
        options=mspec.options,
        total_steps=tr.max_steps,
    )
    recipe = search_spaces.get_method(method)
    beat()
    model = recipe.apply(model, hparams, workdir)
    beat()

    data = load_prepared(data_dir)
    sampler = DistributedSampler(data.train, num_replicas=world, rank=rank_id, shuffle=True, seed=seed)
    loader = DataLoader(
        data.train,
        batch_size=tr.batch_size,
        sampler=sampler,
        collate_fn=lambda feats: collate(feats, tokenizer.pad_token_id),
        drop_last=True,
        # Its own generator: creating an epoch's iterator must not advance the global RNG, or a resumed
        # trial's dropout masks would differ from the uninterrupted run's.
        generator=torch.Generator().manual_seed(seed),
    )
    if len(loader) == 0:
        raise ValueError(
            f"{len(data.train)} training rows per {world} worker(s) cannot fill one batch of "
            f"{tr.batch_size}: lower training.batch_size"
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
    _clear_stale_build_locks()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(spec, world)
    )
    beat()
    device = engine.device
    sam = None
    if tr.optimizer != "adamw":
        knobs = spec.training.sam
        sam = SparseSAM(
            trainable,
            rho=knobs.rho,
            sparsity=1.0 if tr.optimizer == "sam" else knobs.sparsity,
            bandit_lr=knobs.bandit_lr,
            min_prob=knobs.min_prob,
            seed=seed,
        )
    gradual = GradualSchedule(**tr.gradual.model_dump()) if tr.objective == "gradual" else None

    progress = Progress()
    if resume_from is not None:
        progress = _load_state(engine, sam, resume_from, rank_id)
    if data.general is not None and progress.general_loss_base is None:
        progress.general_loss_base = completion_loss(engine.module, tokenizer, data.general)

    def losses(batch: dict[str, Any], step: int, forward: Any) -> tuple[Any, Any, Any]:
        """(objective to minimise, plain task cross-entropy, divergence guard's value) of a micro-batch.

        ``forward`` is the engine, or its bare module for SAM's ascent pass: a loss from the engine's
        forward would start DeepSpeed's backward bookkeeping under ``autograd.grad``.
        """
        if gradual is not None:
            target_loss, task = gradual_step_loss(forward, batch, gradual.tau(step, tr.max_steps))
        else:
            target_loss = task = forward(**batch).loss
        extra = recipe.extra_loss(engine.module) if recipe.extra_loss else 0.0
        # The guard watches the data loss plus any penalty, not the gradual target: that target moves from the
        # base model's distribution to the data's, so its loss legitimately grows during training.
        return target_loss + extra, task, task + extra

    # --- train ------------------------------------------------------------------------------------------
    step, epoch = progress.step, progress.epoch
    window: list[float] = []
    stats = _fresh_stats()
    accum = torch.zeros(3, dtype=torch.float64)  # task loss, objective, guarded objective over a step
    beat()
    engine.train()
    while step < tr.max_steps:
        sampler.set_epoch(epoch)
        skip = progress.batches_done if epoch == progress.epoch else 0
        for index, batch in enumerate(loader):
            if index < skip:
                continue  # consumed before the checkpoint this trial resumed from
            tick = time.perf_counter()
            stats["tokens"] += int(batch["attention_mask"].sum())
            batch = {k: v.to(device) for k, v in batch.items()}
            try:
                _inject(fault, step + 1)
                objective, task, guarded = losses(batch, step, engine if sam is None else engine.module)
                if fault is not None and fault.kind == "nan" and step + 1 >= fault.step:
                    fault.fire()
                    objective, task, guarded = (t * float("nan") for t in (objective, task, guarded))
                if sam is not None:
                    # SAM's two passes: ascend on a (bandit-chosen) subset of tensors, take the gradient there
                    sam.ascent(objective)
                    stats["perturbed"] += sam.last_perturbed_fraction
                    engine.backward(losses(batch, step, engine)[0])
                    sam.restore()
                else:
                    engine.backward(objective)
            except torch.OutOfMemoryError as exc:
                if world > 1:
                    # The other ranks wait in a collective this rank will never join: fail the group.
                    raise
                # Deterministic for this (method, rank, batch): a restart would only hit it again. A failed
                # trial with the worst score, so neither Ray Train nor the sampler retries this config.
                report(_failed_metrics(step, f"out of memory at step {step + 1}: {exc}", spec), None)
                return
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary and recipe.after_backward:
                recipe.after_backward(engine.module, step + 1)
            engine.step()
            stats["micro"] += 1
            stats["seconds"] += time.perf_counter() - tick
            accum += torch.stack([t.detach().double().cpu() for t in (task, objective, guarded)])
            if not boundary:
                continue
            step += 1
            beat()

            # Divergence guard; every worker must agree, because every worker must report the same number of
            # times. train_loss is the task loss alone, comparable across methods and objectives.
            totals = accum / spec.accumulation_steps
            dist.all_reduce(totals)
            task_loss, objective_loss, guard = (totals / world).tolist()
            accum.zero_()
            progress.first_loss = guard if progress.first_loss is None else progress.first_loss
            progress.history.append(task_loss)
            window.append(task_loss)
            if (
                not math.isfinite(objective_loss)
                or not math.isfinite(guard)
                or guard > tr.divergence_factor * progress.first_loss
            ):
                report(_diverged_metrics(step, objective_loss, spec), None)
                return

            if step % tr.eval_every == 0 or step == tr.max_steps:
                progress.step, progress.epoch, progress.batches_done = step, epoch, index + 1
                metrics = _evaluate(spec, engine, tokenizer, data, progress, final=step == tr.max_steps)
                metrics |= {
                    "step": step,
                    "train_loss": sum(window) / len(window),
                    "lr": scheduler.get_last_lr()[0],
                    "diverged": 0.0,
                    "trainable_params": trainable_params,
                    "resumed_from_step": progress.resumed_from_step,  # 0 unless a worker was restarted
                }
                metrics |= _throughput(stats, world, device)
                if sam is not None:
                    metrics["perturbed_fraction"] = stats["perturbed"] / max(1, stats["micro"])
                if gradual is not None:
                    metrics["tau"] = gradual.tau(step, tr.max_steps)
                window, stats = [], _fresh_stats()
                with tempfile.TemporaryDirectory(prefix="peftsweep-ckpt-") as ckpt:
                    metrics["adapter_bytes"] = _export(engine, spec, method, Path(ckpt), workdir, rank_id)
                    _save_state(engine, sam, progress, Path(ckpt), rank_id)
                    report(metrics, Path(ckpt))
                engine.train()
            if step >= tr.max_steps:
                break
        epoch += 1


def _evaluate(
    spec: SweepSpec, engine: Any, tokenizer: Any, data: Any, progress: Progress, final: bool
) -> dict[str, float]:
    """Task metrics on the validation split; the forgetting check; test-split metrics at the last step."""
    from peftsweep.trainables.metrics import completion_loss, evaluate

    options = spec.evaluation.model_dump()
    metrics = evaluate(engine.module, tokenizer, data.validation, spec.data.format, **options)
    if final and data.test is not None:
        test = evaluate(engine.module, tokenizer, data.test, spec.data.format, **options)
        metrics |= {f"test_{name}": value for name, value in test.items()}
    if data.general is not None:
        general = completion_loss(engine.module, tokenizer, data.general)
        forgetting = general - float(progress.general_loss_base or 0.0)
        metrics |= {"general_loss": general, "forgetting": forgetting}
        cap = spec.forgetting.max_increase if spec.forgetting else None
        violated = cap is not None and forgetting > cap
        metrics["forgetting_violated"] = float(violated)
        if violated:  # a constraint, not a trade-off: the sampler and ASHA must never prefer this trial
            metrics[spec.search.metric] = _worst(spec)
    return metrics


def _fresh_stats() -> dict[str, float]:
    """Counters since the last eval point: SL-SAM's perturbed fraction, micro-batches, tokens, step time."""
    return {"perturbed": 0.0, "micro": 0, "tokens": 0, "seconds": 0.0}


def _throughput(stats: dict[str, float], world: int, device: Any) -> dict[str, float]:
    """Tokens/s of the training steps since the last eval (all workers), and peak accelerator memory."""
    import torch

    out = {"tokens_per_s": stats["tokens"] * world / max(stats["seconds"], 1e-9)}
    if device.type == "cuda":
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _worst(spec: SweepSpec) -> float:
    return 0.0 if spec.search.direction == "max" else float("inf")


def _clear_stale_build_locks() -> None:
    """Remove torch JIT-extension build locks left by killed processes (before DeepSpeed loads its ops).

    DeepSpeed loads its shm op through torch's JIT loader on every initialize; the loader takes a lock file,
    and a worker SIGKILLed inside that window (a watchdog kill, a lost node) leaves it behind: every later
    trial on the machine would then wait for it forever.
    """
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now = time.time()
    for lock in root.glob("*/*/lock"):
        with suppress(FileNotFoundError):  # another worker may clear it first
            if now - lock.stat().st_mtime > _STALE_BUILD_LOCK_S:
                lock.unlink()


def _inject(fault: Fault | None, step: int) -> None:
    """An injected out-of-memory error at the fault's step (reliability drills)."""
    if fault is not None and fault.kind == "oom" and step == fault.step:
        import torch

        fault.fire()
        raise torch.OutOfMemoryError(f"injected fault: CUDA out of memory at step {step}")


def _failed_metrics(step: int, reason: str, spec: SweepSpec) -> dict[str, Any]:
    """A trial that cannot go on (out of memory): the worst score, and the reason for the driver to record."""
    metrics: dict[str, Any] = {"eval_loss": float("inf"), "step": step, "diverged": 0.0, "oom": 1.0}
    metrics[spec.search.metric] = _worst(spec)
    metrics["failure"] = reason
    return metrics


def _diverged_metrics(step: int, loss: float, spec: SweepSpec) -> dict[str, float]:
    # The worst possible score, so neither the sampler nor ASHA ever prefers a diverged LR.
    metrics = {"eval_loss": float("inf"), "step": step, "diverged": 1.0}
    metrics[spec.search.metric] = _worst(spec)
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


def _save_state(engine: Any, sam: Any, progress: Progress, ckpt: Path, rank_id: int) -> None:
    """Resume state under ``ckpt/trainer_state``: every rank writes its own shard (Ray merges the dirs)."""
    import torch

    state_dir = ckpt / TRAINER_STATE
    # Trainable parameters only: the frozen base is rebuilt from the base model and the method's init.
    engine.save_checkpoint(str(state_dir), tag=_DS_TAG, exclude_frozen_parameters=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(
        {"rng": rng, "sam": sam.state_dict() if sam is not None else None},
        state_dir / f"rank{rank_id}.pt",
    )
    if rank_id == 0:
        (state_dir / "progress.json").write_text(json.dumps(asdict(progress)))


def _load_state(engine: Any, sam: Any, ckpt: Path, rank_id: int) -> Progress:
    """Restore what `_save_state` wrote; the next step is the one after the checkpoint's."""
    import torch

    state_dir = ckpt / TRAINER_STATE
    if not (state_dir / "progress.json").is_file():
        raise FileNotFoundError(f"{ckpt}: no {TRAINER_STATE}/progress.json; not a peftsweep checkpoint")
    load_path, _ = engine.load_checkpoint(
        str(state_dir),
        tag=_DS_TAG,
        load_module_strict=False,  # the checkpoint holds only the trainable parameters
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise RuntimeError(f"{state_dir}: DeepSpeed could not load checkpoint tag {_DS_TAG!r}")
    extra = torch.load(state_dir / f"rank{rank_id}.pt", weights_only=True)  # tensors and numbers only
    torch.set_rng_state(extra["rng"]["cpu"])
    if "cuda" in extra["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng"]["cuda"])
    if sam is not None and extra["sam"] is not None:
        sam.load_state_dict(extra["sam"])
    progress = Progress(**json.loads((state_dir / "progress.json").read_text()))
    progress.resumed_from_step = progress.step
    return progress


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: rebuild the spec, resume from Ray's latest checkpoint, report through Ray."""
    import ray.train
    import torch

    spec = SweepSpec.model_validate(config["spec"])
    if torch.cuda.is_available():
        import ray.train.torch

        # DeepSpeed picks its device from LOCAL_RANK; make it the GPU Ray assigned to this worker.
        os.environ["LOCAL_RANK"] = str(ray.train.torch.get_device().index or 0)

    from peftsweep.trainables.faults import Watchdog, after_report

    checkpoint = ray.train.get_checkpoint()  # set when Ray restarted the worker group after a failure
    # Reliability drills (trainables.faults) fire once per trial: a restart shows the recovery.
    fault = Fault(**config["fault"]) if config.get("fault") else None
    fault = fault if fault is not None and fault.armed() else None

    # Where this worker runs, shown on the trial's MLflow run (rank 0's report is the one Tune sees).
    where = {NODE_KEY: ray.get_runtime_context().get_node_id(), HOST_KEY: socket.gethostname()}
    with Watchdog(spec.resources.hang_timeout_s) as watchdog:

        def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
            ray.train.report(
                metrics | where,
                checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None,
            )
            watchdog.beat()
            after_report(fault, int(metrics.get("step", -1)))

        data_dir = Path(config["data_dir"]) if config.get("data_dir") else None
        args = (spec, config["method"], config["lr"], config["rank"], config["seed"], report)
        if checkpoint is None:
            run_trial(*args, data_dir=data_dir, fault=fault, heartbeat=watchdog.beat)
            return
        with checkpoint.as_directory() as ckpt:
            run_trial(*args, data_dir=data_dir, resume_from=Path(ckpt), heartbeat=watchdog.beat)


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
