"""One trial's training recipe, the same on every executor: setup → train steps → eval points → stop.

Reads top to bottom like a torchtune recipe: `setup` builds the base model, the method's adapter, the data and
the engine (`engine.py`: plain torch at world size 1, DeepSpeed ZeRO across workers); `train` runs optimizer
steps, each a `_step` of micro-batches, with the divergence guard after each; `_eval_point` evaluates, exports
the adapter and the resume state into a checkpoint directory and reports it. Trials never talk to MLflow:
they report metrics and a checkpoint directory through the ``report`` callable their executor gives them
(`executors.py`); the driver records them.

A checkpoint holds the exported adapter at its top level — what MLflow logs — and, under ``trainer_state/``,
what a restarted trial needs to continue the same loss curve: the engine's state of the *trainable*
parameters and optimizer/scheduler (never the frozen base weights), the loop's position in the data, and the
RNG and SL-SAM bandit states.
"""

from __future__ import annotations

import gc
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from peftsweep.spec import SweepSpec
from peftsweep.trainables.model import hub_options, resolve_base_model  # noqa: F401 (re-export)
from peftsweep.trainables.trial_config import TrialConfig
from peftsweep.vocab import DIVERGED, FAILURE_KEY, OOM, STEP, TRAINER_STATE

# report(metrics, checkpoint_dir): every rank passes its own directory (rank 0's holds the adapter), or None
# when there is nothing to checkpoint (a diverged or failed trial).
Reporter = Callable[[dict[str, Any], Path | None], None]


class Heartbeat(Protocol):
    """Progress for a watchdog (`faults.Watchdog`): set-up stages by name, then training steps."""

    def beat(self, stage: str | None = None) -> None: ...
    def training(self) -> None: ...


class _Unwatched:
    """The heartbeat of a trial nobody watches (standalone runs)."""

    def beat(self, stage: str | None = None) -> None:
        pass

    def training(self) -> None:
        pass


@dataclass
class Progress:
    """Where the loop is; saved with every checkpoint so that a restarted trial continues from there."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_done: int = 0  # micro-batches of `epoch` already consumed
    first_loss: float | None = None  # the divergence guard's reference
    general_loss_base: float | None = None  # forgetting check: the general loss before fine-tuning
    resumed_from_step: int = 0  # 0: never resumed
    # train loss per optimizer step (continuation checks)
    history: list[float] = field(default_factory=list)


@dataclass
class Recipe:
    """Everything `setup` built for one trial; the training functions below read and advance it."""

    trial: TrialConfig
    world: int
    rank_id: int
    tokenizer: Any
    method: Any  # the search_spaces.Method
    engine: Any  # engine.Engine
    engine_name: str
    data: Any  # prepared.PreparedData
    sampler: Any
    loader: Any
    scheduler: Any
    sam: Any  # optim.SparseSAM or None
    gradual: Any  # objectives.GradualSchedule or None
    workdir: Path  # scratch: the method's initial-adapter snapshot (PiSSA/MiLoRA export)
    trainable_params: int
    progress: Progress = field(default_factory=Progress)
    stats: dict[str, float] = field(default_factory=lambda: _fresh_stats())
    window: list[float] = field(default_factory=list)  # train losses since the last eval point
    accum: Any = None  # (task loss, objective, guarded) summed over the micro-batches of the current step
    setup_s: float = 0.0  # seconds from the trial's start to its first training step (model, adapter, data)
    phase: str = "set-up"  # where the trial is (named when it runs out of memory) ...
    at_step: int = 0  # ... and the optimizer step it belongs to (0: set-up)

    @property
    def spec(self) -> SweepSpec:
        return self.trial.spec


class OutOfMemory(RuntimeError):
    """The trial ran out of accelerator (or host) memory: deterministic for its config, so never retried.
    ``reason`` names the phase and step; ``step``: the optimizer steps done before it."""

    def __init__(self, reason: str, step: int) -> None:
        super().__init__(reason)
        self.reason, self.step = reason, step


def run_trial(
    trial: TrialConfig,
    report: Reporter,
    *,
    resume_from: Path | None = None,
    heartbeat: Heartbeat | None = None,
) -> None:
    """Fine-tune one adapter, evaluating and checkpointing every `eval_every` steps.

    ``resume_from``: a checkpoint directory reported earlier by this trial; training continues from it.
    ``heartbeat``: called at each set-up stage (with its name), optimizer step and report (the watchdog's
    input). At world size 1 an out-of-memory error anywhere — set-up, a step, an eval point, the export —
    reports the trial failed with its reason (worst score) and returns; with several workers it raises
    `OutOfMemory` for the executor to settle (the other ranks wait in a collective this one will not join).
    """
    import torch

    watch = heartbeat or _Unwatched()
    recipe: Recipe | None = None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peftsweep-trial-") as scratch, _free_accelerator_memory():
        try:
            recipe = setup(trial, Path(scratch), watch)
            if resume_from is not None:
                watch.beat("loading the resume state")
                recipe.progress = _load_state(recipe, resume_from)
            recipe.setup_s = time.perf_counter() - started
            train(recipe, report, watch)
        except torch.OutOfMemoryError as exc:
            step = recipe.progress.step if recipe is not None else 0
            reason = _oom_reason(recipe, exc)
            if _world_size() > 1:
                raise OutOfMemory(reason, step) from exc
            # Deterministic for this (method, rank, batch): a restart would only hit it again. A failed
            # trial with the worst score, so neither a retry nor the sampler repeats this config.
            report(failed_metrics(trial.spec, reason, step=step), None)


def _oom_reason(recipe: Recipe | None, exc: BaseException) -> str:
    """ "out of memory in <phase> at step <n>: <the error's first line>" (no step during set-up)."""
    where = recipe.phase if recipe is not None else "set-up"
    at = f" at step {recipe.at_step}" if recipe is not None and recipe.at_step else ""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"out of memory in {where}{at}: {first}"


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


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


# --- setup ---


def setup(trial: TrialConfig, workdir: Path, watch: Heartbeat) -> Recipe:
    """Base model + the method's adapter, the data loader, optimizer, schedule and engine, SAM/gradual."""
    import torch

    from peftsweep import search_spaces
    from peftsweep.trainables.model import enable_gradient_checkpointing, load_base_model, load_tokenizer
    from peftsweep.trainables.objectives import GradualSchedule

    spec, mspec = trial.spec, trial.spec.method(trial.method)
    world, rank_id = _world_size(), _rank()
    # One thread per reserved CPU: concurrent trials oversubscribe a small machine badly otherwise.
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    torch.manual_seed(trial.seed)
    watch.beat("loading the tokenizer")
    tokenizer = load_tokenizer(spec)
    watch.beat("loading the base model")
    model = load_base_model(spec, trial.method)  # in the training precision, as the method asks
    hparams = search_spaces.AdapterHParams(
        rank=trial.rank,
        alpha=trial.rank * mspec.alpha_over_rank,
        dropout=mspec.dropout,
        target_modules=mspec.target_modules,
        options=mspec.options,
        total_steps=spec.training.max_steps,
    )
    method = search_spaces.get_method(trial.method)
    watch.beat(f"applying {trial.method}")
    model = method.apply(model, hparams, workdir)
    if spec.training.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    watch.beat("loading the prepared data")
    data, sampler, loader = _data(trial, tokenizer, world, rank_id)
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)  # before ZeRO-3 partitions them to 0 elements
    optimizer, scheduler = _optimizer(spec, trainable, trial.lr)
    watch.beat("building the engine")
    from peftsweep.trainables.engine import build_engine

    engine, engine_name = build_engine(spec, model, optimizer, scheduler, world)
    recipe = Recipe(
        trial=trial,
        world=world,
        rank_id=rank_id,
        tokenizer=tokenizer,
        method=method,
        engine=engine,
        engine_name=engine_name,
        data=data,
        sampler=sampler,
        loader=loader,
        scheduler=scheduler,
        sam=_sam(spec, trainable, trial.seed),
        gradual=GradualSchedule(**spec.training.gradual.model_dump())
        if spec.training.objective == "gradual"
        else None,
        workdir=workdir,
        trainable_params=trainable_params,
    )
    return recipe


def _data(trial: TrialConfig, tokenizer: Any, world: int, rank_id: int) -> tuple[Any, Any, Any]:
    """The prepared data (cached per process) and this rank's shuffled, seeded loader over its train rows."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from peftsweep.trainables.data import collate, pad_id
    from peftsweep.trainables.prepared import load_prepared

    tr = trial.spec.training
    data = load_prepared(trial.data_dir)
    sampler = DistributedSampler(data.train, num_replicas=world, rank=rank_id, shuffle=True, seed=trial.seed)
    loader = DataLoader(
        data.train,
        batch_size=tr.batch_size,
        sampler=sampler,
        collate_fn=lambda feats: collate(feats, pad_id(tokenizer)),
        drop_last=True,
        # Its own generator: creating an epoch's iterator must not advance the global RNG, or a resumed
        # trial's dropout masks would differ from the uninterrupted run's.
        generator=torch.Generator().manual_seed(trial.seed),
    )
    if len(loader) == 0:
        raise ValueError(
            f"{len(data.train)} training rows per {world} worker(s) cannot fill one batch of "
            f"{tr.batch_size}: lower training.batch_size"
        )
    return data, sampler, loader


def _optimizer(spec: SweepSpec, params: list[Any], lr: float) -> tuple[Any, Any]:
    """AdamW (paper protocol) and the warmup + decay schedule over ``max_steps`` optimizer steps."""
    import torch
    from transformers import get_scheduler

    tr = spec.training
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=tr.weight_decay)
    scheduler = get_scheduler(
        "constant_with_warmup" if tr.schedule == "constant" else tr.schedule,
        optimizer,
        num_warmup_steps=math.ceil(tr.warmup_ratio * tr.max_steps),
        num_training_steps=tr.max_steps,
    )
    return optimizer, scheduler


def _sam(spec: SweepSpec, params: list[Any], seed: int) -> Any:
    """SL-SAM's (or SAM's) perturbation half, or None for plain AdamW."""
    tr = spec.training
    if tr.optimizer == "adamw":
        return None
    from peftsweep.trainables.optim import SparseSAM

    return SparseSAM(
        params,
        rho=tr.sam.rho,
        sparsity=1.0 if tr.optimizer == "sam" else tr.sam.sparsity,
        bandit_lr=tr.sam.bandit_lr,
        min_prob=tr.sam.min_prob,
        seed=seed,
    )


# --- train ---


def train(recipe: Recipe, report: Reporter, watch: Heartbeat) -> None:
    """Optimizer steps until ``max_steps``, an eval point every ``eval_every``; stop early on divergence."""
    from peftsweep.trainables.metrics import completion_loss

    spec, progress = recipe.spec, recipe.progress
    if recipe.data.general is not None and progress.general_loss_base is None:
        watch.beat("measuring the base model's general loss")
        progress.general_loss_base = completion_loss(
            recipe.engine.module, recipe.tokenizer, recipe.data.general
        )
    watch.training()
    recipe.engine.train()
    for epoch, index, batch in _batches(recipe):
        losses = _micro_step(recipe, batch)
        if losses is None:
            continue  # inside an accumulation
        progress.step += 1
        watch.beat()
        task_loss, objective_loss, guard = losses
        if _diverged(recipe, objective_loss, guard):
            report(diverged_metrics(spec, progress.step, objective_loss), None)
            return
        progress.epoch, progress.batches_done = epoch, index + 1
        if progress.step % spec.training.eval_every == 0 or progress.step == spec.training.max_steps:
            _eval_point(recipe, report)
            watch.beat()
        if progress.step >= spec.training.max_steps:
            return


def _batches(recipe: Recipe) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(epoch, index in epoch, batch) from where the progress says, epoch after epoch; resumes mid-epoch."""
    progress = recipe.progress
    epoch, skip = progress.epoch, progress.batches_done
    while True:
        recipe.sampler.set_epoch(epoch)
        for index, batch in enumerate(recipe.loader):
            if index < skip:
                continue  # consumed before the checkpoint this trial resumed from
            yield epoch, index, batch
        epoch, skip = epoch + 1, 0
        progress.epoch, progress.batches_done = epoch, 0


def _losses(recipe: Recipe, batch: dict[str, Any], forward: Any) -> tuple[Any, Any, Any]:
    """(objective to minimise, plain task cross-entropy, divergence guard's value) of a micro-batch.

    ``forward`` is the engine, or its bare module for SAM's ascent pass: a loss from DeepSpeed's forward would
    start its backward bookkeeping under ``autograd.grad``. The guard watches the data loss plus any penalty,
    not the gradual target: that target moves from the base model's distribution to the data's, so its loss
    legitimately grows during training.
    """
    from peftsweep.trainables.objectives import gradual_step_loss

    step, max_steps = recipe.progress.step, recipe.spec.training.max_steps
    if recipe.gradual is not None:
        target_loss, task = gradual_step_loss(forward, batch, recipe.gradual.tau(step, max_steps))
    else:
        target_loss = task = forward(**batch).loss
    extra = recipe.method.extra_loss(recipe.engine.module) if recipe.method.extra_loss else 0.0
    return target_loss + extra, task, task + extra


def _micro_step(recipe: Recipe, batch: dict[str, Any]) -> tuple[float, float, float] | None:
    """Forward/backward of one micro-batch (SAM's two passes if asked) and the engine's step; at an
    accumulation boundary, the step's mean (task loss, objective, guarded value) over workers, else None."""
    import torch

    engine, fault = recipe.engine, recipe.trial.fault
    step = recipe.progress.step + 1
    recipe.phase, recipe.at_step = "the forward/backward pass", step
    tick = time.perf_counter()
    recipe.stats["tokens"] += int(batch["attention_mask"].sum())
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    _inject_oom(recipe, "forward")
    forward = engine if recipe.sam is None else engine.module
    objective, task, guarded = _losses(recipe, batch, forward)
    if fault is not None and fault.kind == "nan" and step >= fault.step:
        fault.fire()
        objective, task, guarded = (t * float("nan") for t in (objective, task, guarded))
    if recipe.sam is not None:
        # SAM's two passes: ascend on a (bandit-chosen) subset of tensors, take the gradient there
        recipe.sam.ascent(objective)
        recipe.stats["perturbed"] += recipe.sam.last_perturbed_fraction
        engine.backward(_losses(recipe, batch, engine)[0])
        recipe.sam.restore()
    else:
        engine.backward(objective)
    boundary = engine.boundary()
    if boundary and recipe.method.after_backward:
        recipe.method.after_backward(engine.module, step)
    if boundary:  # the optimizer steps (its state is allocated at the first one)
        recipe.phase = "the optimizer step"
        _inject_oom(recipe, "optimizer")
    engine.step()
    recipe.stats["micro"] += 1
    recipe.stats["seconds"] += time.perf_counter() - tick
    values = torch.stack([t.detach().double().cpu() for t in (task, objective, guarded)])
    recipe.accum = values if recipe.accum is None else recipe.accum + values
    if not boundary:
        return None
    totals, recipe.accum = recipe.accum / recipe.spec.accumulation_steps, None
    if recipe.world > 1:
        import torch.distributed as dist

        dist.all_reduce(totals)  # every worker must agree on divergence: all report the same number of times
        totals = totals / recipe.world
    task_loss, objective_loss, guard = totals.tolist()
    recipe.progress.history.append(task_loss)
    recipe.window.append(task_loss)
    return task_loss, objective_loss, guard


def _diverged(recipe: Recipe, objective_loss: float, guard: float) -> bool:
    """NaN/inf, or a guarded loss above ``divergence_factor`` × the first step's."""
    progress = recipe.progress
    progress.first_loss = guard if progress.first_loss is None else progress.first_loss
    factor = recipe.spec.training.divergence_factor
    return (
        not math.isfinite(objective_loss) or not math.isfinite(guard) or guard > factor * progress.first_loss
    )


# --- eval points ---


def _eval_point(recipe: Recipe, report: Reporter) -> None:
    """Evaluate, export the adapter and the resume state into a checkpoint directory, report both."""
    spec, progress = recipe.spec, recipe.progress
    final = progress.step == spec.training.max_steps
    recipe.phase, recipe.at_step = "the eval point", progress.step
    _inject_oom(recipe, "eval")
    metrics = _evaluate(recipe, final)
    metrics |= {
        STEP: progress.step,
        "train_loss": sum(recipe.window) / len(recipe.window),
        "lr": recipe.scheduler.get_last_lr()[0],
        DIVERGED: 0.0,
        "trainable_params": recipe.trainable_params,
        "resumed_from_step": progress.resumed_from_step,  # 0 unless the trial was restarted
        "setup_s": recipe.setup_s,
    }
    metrics |= _throughput(recipe)
    if recipe.sam is not None:
        metrics["perturbed_fraction"] = recipe.stats["perturbed"] / max(1, recipe.stats["micro"])
    if recipe.gradual is not None:
        metrics["tau"] = recipe.gradual.tau(progress.step, spec.training.max_steps)
    recipe.window, recipe.stats = [], _fresh_stats()
    with tempfile.TemporaryDirectory(prefix="peftsweep-ckpt-") as ckpt:
        recipe.phase = "the adapter export"
        _inject_oom(recipe, "export")
        metrics["adapter_bytes"] = _export(recipe, Path(ckpt))
        _save_state(recipe, Path(ckpt))
        report(metrics, Path(ckpt))
    recipe.engine.train()


def _evaluate(recipe: Recipe, final: bool) -> dict[str, float]:
    """Task metrics on the validation split; the forgetting check; test-split metrics at the last step."""
    from peftsweep.trainables.metrics import completion_loss, evaluate

    spec, data, model = recipe.spec, recipe.data, recipe.engine.module
    options = spec.evaluation.model_dump()
    metrics = evaluate(model, recipe.tokenizer, data.validation, spec.data.format, **options)
    if final and data.test is not None:
        test = evaluate(model, recipe.tokenizer, data.test, spec.data.format, **options)
        metrics |= {f"test_{name}": value for name, value in test.items()}
    if data.general is not None:
        general = completion_loss(model, recipe.tokenizer, data.general)
        forgetting = general - float(recipe.progress.general_loss_base or 0.0)
        metrics |= {"general_loss": general, "forgetting": forgetting}
        cap = spec.forgetting.max_increase if spec.forgetting else None
        violated = cap is not None and forgetting > cap
        metrics["forgetting_violated"] = float(violated)
        if violated:  # a constraint, not a trade-off: the sampler and ASHA must never prefer this trial
            metrics[spec.search.metric] = worst(spec)
    return metrics


def _fresh_stats() -> dict[str, float]:
    """Counters since the last eval point: SL-SAM's perturbed fraction, micro-batches, tokens, step time."""
    return {"perturbed": 0.0, "micro": 0, "tokens": 0, "seconds": 0.0}


def _throughput(recipe: Recipe) -> dict[str, float]:
    """Tokens/s of the training steps since the last eval (all workers), and peak accelerator memory."""
    import torch

    stats, device = recipe.stats, recipe.engine.device
    out = {"tokens_per_s": stats["tokens"] * recipe.world / max(stats["seconds"], 1e-9)}
    if device.type == "cuda":
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _export(recipe: Recipe, out_dir: Path) -> int:
    """Rank 0 writes the adapter and returns its size in bytes (0 elsewhere); under ZeRO-3 every rank first
    gathers the sharded trainable weights."""
    from peftsweep import search_spaces

    engine = recipe.engine
    gather = (
        engine.gathered() if recipe.spec.resources.zero_stage == 3 and hasattr(engine, "gathered") else None
    )
    with gather or nullcontext():
        if recipe.rank_id == 0:
            meta = search_spaces.export_trained(recipe.trial.method, engine.module, out_dir, recipe.workdir)
            _name_the_base(out_dir, recipe.spec.base_model_name or recipe.spec.base_model)
            return int(meta["adapter_bytes"])
    return 0


def _name_the_base(out_dir: Path, name: str) -> None:
    """Write the base model into ``adapter_config.json`` as the spec names it (hub id, builtin:NAME, the path
    as written), not as this machine's absolute path, so the adapter loads on another machine."""
    config = out_dir / "adapter_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["base_model_name_or_path"] = name
        config.write_text(json.dumps(data, indent=2, sort_keys=True))


def _save_state(recipe: Recipe, ckpt: Path) -> None:
    """Resume state under ``ckpt/trainer_state``: every rank writes its own shard (the executor merges the
    ranks' directories into one checkpoint)."""
    import torch

    state_dir = ckpt / TRAINER_STATE
    recipe.engine.save_state(state_dir)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    sam = recipe.sam.state_dict() if recipe.sam is not None else None
    torch.save({"rng": rng, "sam": sam}, state_dir / f"rank{recipe.rank_id}.pt")
    if recipe.rank_id == 0:
        state = asdict(recipe.progress) | {"engine": recipe.engine_name}
        (state_dir / "progress.json").write_text(json.dumps(state))


def _load_state(recipe: Recipe, ckpt: Path) -> Progress:
    """Restore what `_save_state` wrote; the next step is the one after the checkpoint's."""
    import torch

    state_dir = ckpt / TRAINER_STATE
    if not (state_dir / "progress.json").is_file():
        raise FileNotFoundError(f"{ckpt}: no {TRAINER_STATE}/progress.json; not a peftsweep checkpoint")
    saved = json.loads((state_dir / "progress.json").read_text())
    engine_name = saved.pop("engine", "deepspeed")
    if engine_name != recipe.engine_name:
        raise ValueError(
            f"{ckpt}: the resume state was written by the {engine_name} engine, this trial trains with "
            f"{recipe.engine_name} (training.engine changed since?)"
        )
    recipe.engine.load_state(state_dir)
    extra = torch.load(state_dir / f"rank{recipe.rank_id}.pt", weights_only=True)  # tensors and numbers only
    torch.set_rng_state(extra["rng"]["cpu"])
    if "cuda" in extra["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng"]["cuda"])
    if recipe.sam is not None and extra["sam"] is not None:
        recipe.sam.load_state_dict(extra["sam"])
    progress = Progress(**saved)
    progress.resumed_from_step = progress.step
    return progress


# --- outcomes the driver reads ---


def worst(spec: SweepSpec) -> float:
    """The worst value of the search metric: what a trial that must never win reports."""
    return 0.0 if spec.search.direction == "max" else float("inf")


def failed_metrics(spec: SweepSpec, reason: str, step: int = 0) -> dict[str, Any]:
    """A trial that cannot go on (out of memory): the worst score, and the reason for the driver to record."""
    metrics: dict[str, Any] = {"eval_loss": float("inf"), STEP: step, DIVERGED: 0.0, OOM: 1.0}
    metrics[spec.search.metric] = worst(spec)
    metrics[FAILURE_KEY] = reason
    return metrics


def diverged_metrics(spec: SweepSpec, step: int, loss: float) -> dict[str, float]:
    """The worst possible score, so neither the sampler nor early stopping ever prefers a diverged LR."""
    metrics = {"eval_loss": float("inf"), STEP: step, DIVERGED: 1.0}
    metrics[spec.search.metric] = worst(spec)
    metrics["train_loss"] = loss if math.isfinite(loss) else float("inf")
    return metrics


def _inject_oom(recipe: Recipe, phase: str) -> None:
    """An injected out-of-memory error in the fault's phase (`faults.Fault`), at its step or the first eval
    point after it, on its rank or every rank (reliability drills)."""
    fault = recipe.trial.fault
    if fault is None or fault.kind != "oom" or fault.phase != phase or recipe.at_step < fault.step:
        return
    if fault.rank is not None and fault.rank != recipe.rank_id:
        return
    import torch

    fault.fire()
    raise torch.OutOfMemoryError(
        f"injected fault: CUDA out of memory in {phase} at step {recipe.at_step} on rank {recipe.rank_id}"
    )
