"""What do SAM and SL-SAM cost per step over AdamW on the built-in task? (a benchmark, not a test)

Trains three LoRA copies of the built-in model side by side in one process: AdamW alone, AdamW + full SAM
(`SparseSAM(sparsity=1.0)`) and AdamW + SL-SAM (`SparseSAM` defaults). Steps run in short blocks, one config
after another, the order rotated every round, so drift on a shared machine hits all three alike. All three see
the same batches. Reports the median step time, the peak step memory, their ratios to AdamW and to full SAM,
and SL-SAM's mean perturbed fraction. Writes JSON to bench/results/slsam_overhead.json.

Runs this once in plain torch and once through a DeepSpeed ZeRO-2 engine (the sweep's real path), each
engine's three configs interleaved among themselves.

Memory is the peak of live torch tensor bytes during one step above the level at its start, summed at
operator granularity from the torch profiler's allocation records (measured on separate, profiled steps; the
timing steps are not profiled). Not tracemalloc: it does not see torch's CPU allocator. Not RSS: at this
model size the allocator's caching hides the step's allocations.

    .venv/bin/python bench/slsam_overhead.py [--engines torch zero2] [--rounds 30] [--block 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as one trial gets in a sweep on 2 cores

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from peftsweep.spec import TrainingSpec  # noqa: E402
from peftsweep.trainables.optim import SparseSAM  # noqa: E402

TASK = "builtin:arith-sub"
CONFIGS = {"adamw": None, "sam": 1.0, "sl_sam": 0.2}  # name -> SparseSAM sparsity (None: no SAM)


@dataclass
class Runner:
    """One config's model, optimizer and step; `step(batch)` runs one full training step."""

    name: str
    step: Callable[[dict[str, torch.Tensor]], None]
    sam: SparseSAM | None
    times: list[float] = field(default_factory=list)
    fractions: list[float] = field(default_factory=list)


def _batches(batch_size: int, n: int) -> list[dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    from peftsweep.trainables.builtin import builtin_model_dir
    from peftsweep.trainables.data import collate, load_split, tokenize_for_training

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir("tiny-arith"))
    ds = tokenize_for_training(load_split(TASK, "train"), tokenizer, TrainingSpec().max_length)
    ds = ds.shuffle(seed=0)
    return [
        collate([ds[i * batch_size + j] for j in range(batch_size)], tokenizer.pad_token_id) for i in range(n)
    ]


def _runner(
    name: str, sparsity: float | None, zero_stage: int | None, args: argparse.Namespace, workdir: Path
) -> Runner:
    from transformers import AutoModelForCausalLM

    from peftsweep.search_spaces import AdapterHParams, get_method
    from peftsweep.trainables.builtin import builtin_model_dir

    torch.manual_seed(0)  # identical LoRA init in every config
    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir("tiny-arith"), dtype=torch.float32)
    total_steps = args.warmup + args.rounds * args.block + args.mem_steps
    hparams = AdapterHParams(
        rank=args.rank, alpha=args.rank, target_modules="all-linear", options={}, total_steps=total_steps
    )
    model = get_method("lora").apply(model, hparams, workdir / name)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    max_norm = TrainingSpec().max_grad_norm
    sam = SparseSAM(trainable, sparsity=sparsity) if sparsity is not None else None

    if zero_stage is None:

        def step(batch: dict[str, torch.Tensor]) -> None:
            if sam:
                sam.ascent(model(**batch).loss)
            model(**batch).loss.backward()
            if sam:
                sam.restore()
            torch.nn.utils.clip_grad_norm_(trainable, max_norm)
            opt.step()
            opt.zero_grad()

        return Runner(name, step, sam)

    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": max_norm,
        # DeepSpeed's default 5e8-element reduce bucket (2 GB, allocated every step) would swamp the memory
        # measure; a bucket the size of the adapter holds the same gradients and is the same in every config.
        "zero_optimization": {
            "stage": zero_stage,
            "reduce_bucket_size": sum(p.numel() for p in trainable),
            "allgather_bucket_size": sum(p.numel() for p in trainable),
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)

    def ds_step(batch: dict[str, torch.Tensor]) -> None:
        if sam:
            sam.ascent(engine.module(**batch).loss)  # not engine(...): see SparseSAM.ascent
        engine.backward(engine(**batch).loss)
        if sam:
            sam.restore()
        engine.step()

    return Runner(name, ds_step, sam)


def _peak_step_bytes(runner: Runner, batch: dict[str, torch.Tensor]) -> int:
    """Peak live tensor bytes above the step's start, from the profiler's per-operator allocation records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step(batch)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage  # self: a parent op does not count its children's bytes again
        peak = max(peak, live)
    return peak


ENGINES = {
    "torch": None,
    "zero0": 0,
    "zero1": 1,
    "zero2": 2,
}  # name -> DeepSpeed ZeRO stage (None: no engine)


def _measure(
    engine: str, args: argparse.Namespace, batches: list[dict[str, torch.Tensor]], scratch: Path
) -> dict[str, Any]:
    """Time and profile the three configs on one engine, interleaved; one JSON-ready record."""
    zero_stage = ENGINES[engine]
    runners = [_runner(name, sp, zero_stage, args, scratch / engine) for name, sp in CONFIGS.items()]
    n = len(batches)
    for runner in runners:
        for i in range(args.warmup):
            runner.step(batches[i % n])
    step_no = args.warmup
    for rnd in range(args.rounds):
        shift = rnd % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            for i in range(args.block):
                batch = batches[(step_no + i) % n]
                t0 = time.perf_counter()
                runner.step(batch)
                runner.times.append(time.perf_counter() - t0)
                if runner.sam:
                    runner.fractions.append(runner.sam.last_perturbed_fraction)
        step_no += args.block
    memory: dict[str, list[int]] = {r.name: [] for r in runners}
    for i in range(args.mem_steps):
        for runner in runners:
            memory[runner.name].append(_peak_step_bytes(runner, batches[(step_no + i) % n]))

    med_time = {r.name: statistics.median(r.times) for r in runners}
    med_mem = {name: statistics.median(v) for name, v in memory.items()}
    configs = {
        r.name: {
            "step_ms_median": 1e3 * med_time[r.name],
            "step_ms_all": [round(1e3 * t, 3) for t in r.times],
            "peak_step_kib_median": med_mem[r.name] / 1024,
            "peak_step_bytes_all": memory[r.name],
            "time_vs_adamw": med_time[r.name] / med_time["adamw"],
            "time_vs_sam": med_time[r.name] / med_time["sam"],
            "memory_vs_adamw": med_mem[r.name] / med_mem["adamw"],
            "memory_vs_sam": med_mem[r.name] / med_mem["sam"],
            "mean_perturbed_fraction": statistics.mean(r.fractions) if r.fractions else 0.0,
        }
        for r in runners
    }
    sl_sam = next(r.sam for r in runners if r.name == "sl_sam")
    assert sl_sam is not None
    label = "plain torch" if zero_stage is None else f"DeepSpeed ZeRO-{zero_stage}"
    return {
        "engine": label,
        "sl_sam_tensors": {"total": sl_sam.num_arms, "perturbed_per_step": sl_sam.k},
        "sam_defaults": {"rho": sl_sam.rho, "bandit_lr": sl_sam.bandit_lr, "min_prob": sl_sam.min_prob},
        "configs": configs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=["torch", "zero2"])
    parser.add_argument("--rounds", type=int, default=30)  # blocks per config; the order rotates each round
    parser.add_argument("--block", type=int, default=5)  # consecutive timed steps per config per round
    parser.add_argument("--warmup", type=int, default=3)  # untimed steps first: AdamW state, allocator
    parser.add_argument("--mem-steps", type=int, default=5)  # profiled steps per config; the median is kept
    parser.add_argument("--batch", type=int, default=TrainingSpec().batch_size)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)  # near the built-in task's best LoRA LRs
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "slsam_overhead.json")
    args = parser.parse_args()

    torch.set_num_threads(1)
    if any(ENGINES[e] is not None for e in args.engines):
        from peftsweep.trainables.engine import init_standalone

        init_standalone()
    console = Console(width=160)
    n_batches = 8  # cycled; enough that steps do not all see one batch
    batches = _batches(args.batch, n_batches)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slsam-bench-") as scratch:
        runs = [_measure(engine, args, batches, Path(scratch)) for engine in args.engines]
    wall = time.perf_counter() - t_start

    table = Table(
        title=f"per-step cost on {TASK}, LoRA r={args.rank} (all-linear), batch {args.batch}, 1 thread, "
        f"{args.rounds}×{args.block} interleaved steps per config; medians"
    )
    for col in (
        "engine",
        "config",
        "step ms",
        "× AdamW",
        "× SAM",
        "peak KiB",
        "× AdamW",
        "× SAM",
        "perturbed",
    ):
        table.add_column(col, justify="left" if col in ("engine", "config") else "right")
    for run in runs:
        for name, row in run["configs"].items():
            table.add_row(
                run["engine"],
                name,
                f"{row['step_ms_median']:.1f}",
                f"{row['time_vs_adamw']:.2f}",
                f"{row['time_vs_sam']:.2f}",
                f"{row['peak_step_kib_median']:.0f}",
                f"{row['memory_vs_adamw']:.3f}",
                f"{row['memory_vs_sam']:.3f}",
                f"{row['mean_perturbed_fraction']:.3f}",
            )
    console.print(table)
    tensors = runs[0]["sl_sam_tensors"]
    console.print(
        f"perturbed = fraction of trainable elements; SL-SAM perturbs {tensors['perturbed_per_step']} of "
        f"{tensors['total']} LoRA tensors per step. wall {wall:.0f} s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "task": TASK,
                "rank": args.rank,
                "batch": args.batch,
                "lr": args.lr,
                "rounds": args.rounds,
                "block": args.block,
                "warmup": args.warmup,
                "mem_steps": args.mem_steps,
                "memory_measure": "peak live torch tensor bytes above the step start (torch profiler)",
                "wall_s": wall,
                "runs": runs,
            },
            indent=2,
        )
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
