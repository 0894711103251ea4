"""Training throughput of one trial, by engine and executor, against a bare PyTorch loop (a benchmark).

The arms train the same model (the built-in tiny-arith + LoRA), batch, LR schedule, gradient clipping and
thread count, on the sweep's prepared data:

  bare       a plain PyTorch loop (torch AdamW, clip_grad_norm_, the same cosine schedule), in this process
  torch      the real loop `run_trial` with training.engine torch (the default at world size 1), no Ray
  zero0      the same loop with the DeepSpeed engine at ZeRO-0, no Ray
  zero2      the same loop with the DeepSpeed engine at ZeRO-2 (the paper's stage), no Ray
  inline     a real Tune trial of the inline executor (`orchestrator.trial.tune_trial`): what a sweep runs
  train      a one-worker Ray Train `TorchTrainer` job (`train_loop_per_worker`, DeepSpeed ZeRO-2)

The torch / zero0 / zero2 arms decide `training.engine: auto` at world size 1 (issue 17); inline / bare is
the acceptance ratio (≥ 0.97).

Tokens/s is the loop's own measure (`tokens_per_s`: non-padding tokens over the summed time of the training
steps, from moving the batch to the device to the optimizer step; data loading and evals excluded); the bare
loop is timed the same way. One eval at the end, so training is not interrupted. The arms run in rounds,
order rotated each round, so load drift on a shared machine hits all alike; the ratio is of medians.
Writes bench/results/throughput.json.

    nice -n 19 .venv/bin/python bench/throughput.py [--rounds 3] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the thread count one trial gets (cpus_per_worker 0.95 → 1)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from grid import RESULTS, grid_spec  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from peftsweep.spec import SweepSpec  # noqa: E402

ARMS = ["bare", "torch", "zero0", "zero2", "inline", "train"]
METHOD, RANK, LR, SEED = "lora", 8, 1e-2, 0  # near LoRA's optimum on the built-in task: a typical trial
TARGET = 0.97  # issue 17: a single-worker trial keeps ≥ 97 % of the bare loop's tokens/s


def bench_spec(steps: int, root: Path) -> SweepSpec:
    """The grid's spec (quickstart, no forgetting data) training ``steps`` steps with one eval, at the end."""
    raw = grid_spec(root=root).model_dump(mode="json")
    raw["training"] |= {"max_steps": steps, "eval_every": steps}
    return SweepSpec.model_validate(raw)


def _adapter_model(spec: SweepSpec, base: str) -> Any:
    """The base model with the benchmark's adapter applied, built as the loop builds it."""
    import torch
    from transformers import AutoModelForCausalLM

    from peftsweep import search_spaces

    tr, mspec = spec.training, spec.method(METHOD)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    hparams = search_spaces.AdapterHParams(
        rank=RANK, alpha=RANK * mspec.alpha_over_rank, dropout=mspec.dropout,
        target_modules=mspec.target_modules, options=mspec.options, total_steps=tr.max_steps,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as workdir:
        return search_spaces.get_method(METHOD).apply(model, hparams, Path(workdir))


def bare(spec: SweepSpec, data_dir: Path) -> float:
    """Tokens/s of a plain PyTorch loop with the trial's model, batch, schedule, clipping and threads."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, get_scheduler

    from peftsweep.trainables.data import collate
    from peftsweep.trainables.model import resolve_base_model
    from peftsweep.trainables.prepared import load_prepared

    tr = spec.training
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))  # as the loop does
    torch.manual_seed(SEED)
    base = resolve_base_model(spec.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = _adapter_model(spec, base)
    data = load_prepared(data_dir)
    loader = DataLoader(
        data.train,
        batch_size=tr.batch_size,
        shuffle=True,
        collate_fn=lambda feats: collate(feats, tokenizer.pad_token_id),
        drop_last=True,
        generator=torch.Generator().manual_seed(SEED),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=tr.weight_decay)
    scheduler = get_scheduler(
        tr.schedule, optimizer, num_warmup_steps=math.ceil(tr.warmup_ratio * tr.max_steps),
        num_training_steps=tr.max_steps,
    )  # fmt: skip
    model.train()
    step, tokens, seconds = 0, 0, 0.0
    while step < tr.max_steps:
        for batch in loader:
            tick = time.perf_counter()
            tokens += int(batch["attention_mask"].sum())
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, tr.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - tick
            step += 1
            if step >= tr.max_steps:
                break
    return tokens / seconds


def _with(spec: SweepSpec, engine: str, zero_stage: int) -> SweepSpec:
    raw = spec.model_dump(mode="json")
    raw["training"]["engine"] = engine
    raw["resources"]["zero_stage"] = zero_stage
    return SweepSpec.model_validate(raw)


def loop(spec: SweepSpec, data_dir: Path) -> float:
    """Tokens/s of the real loop in this process, no Ray."""
    from peftsweep.trainables.loop import run_trial
    from peftsweep.trainables.trial_config import standalone_trial

    reports: list[dict[str, Any]] = []
    run_trial(standalone_trial(spec, METHOD, LR, RANK, SEED, data_dir), lambda m, _d: reports.append(m))
    return float(reports[-1]["tokens_per_s"])


def inline(spec: SweepSpec, data_dir: Path) -> float:
    """Tokens/s inside a real Tune trial of the inline executor, built as a sweep builds it."""
    from ray import tune

    from peftsweep.orchestrator.trial import TrialPlan, trainable

    config = TrialPlan(spec, METHOD, data_dir).config(f"tp{time.time_ns()}", LR, RANK)
    grid = tune.Tuner(
        trainable(spec),
        param_space=config,
        run_config=tune.RunConfig(storage_path=str(spec.tracking.ray_storage / "tune"), verbose=0),
    ).fit()
    return float(grid[0].metrics["tokens_per_s"])


def ray_train(spec: SweepSpec, data_dir: Path) -> float:
    """Tokens/s of the loop as a one-worker Ray Train job (DeepSpeed ZeRO-2), as the train executor runs."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from peftsweep.trainables.executors import train_loop_per_worker
    from peftsweep.trainables.trial_config import TRIAL_KEY, standalone_trial

    trial = standalone_trial(_with(spec, "deepspeed", 2), METHOD, LR, RANK, SEED, data_dir)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={TRIAL_KEY: trial},
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, resources_per_worker={"CPU": spec.resources.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=f"throughput-{time.time_ns()}", storage_path=str(spec.tracking.ray_storage / "train")
        ),
    )
    return float(trainer.fit().metrics["tokens_per_s"])


def phases(spec: SweepSpec, data_dir: Path, steps: int) -> dict[str, dict[str, float]]:
    """Where a step's time goes: median ms of forward, backward and optimizer step, for the bare loop and
    for DeepSpeed engines built as the loop builds them (the spec's ZeRO stage, and stage 0)."""
    import deepspeed
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from peftsweep.trainables.data import collate
    from peftsweep.trainables.engine import deepspeed_config, init_standalone
    from peftsweep.trainables.model import resolve_base_model
    from peftsweep.trainables.prepared import load_prepared

    init_standalone()
    tr = spec.training
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    base = resolve_base_model(spec.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = load_prepared(data_dir)
    loader = DataLoader(
        data.train, batch_size=tr.batch_size, collate_fn=lambda f: collate(f, tokenizer.pad_token_id),
        drop_last=True,
    )  # fmt: skip
    batches = [b for _, b in zip(range(steps), loader, strict=False)]
    out: dict[str, dict[str, float]] = {}
    for name in ("bare", f"zero{spec.resources.zero_stage}", "zero0"):
        torch.manual_seed(SEED)
        model = _adapter_model(spec, base)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR)
        engine = None
        if name != "bare":
            raw = spec.model_dump(mode="json")
            raw["resources"]["zero_stage"] = int(name.removeprefix("zero"))
            config = deepspeed_config(SweepSpec.model_validate(raw))
            engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        times: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}
        for batch in batches:
            t0 = time.perf_counter()
            loss = (engine or model)(**batch).loss
            t1 = time.perf_counter()
            if engine is not None:
                engine.backward(loss)
            else:
                loss.backward()
            t2 = time.perf_counter()
            if engine is not None:
                engine.step()
            else:
                torch.nn.utils.clip_grad_norm_(params, tr.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                times[key].append(dt * 1e3)
        out[name] = {k: statistics.median(v) for k, v in times.items()}
        out[name]["total"] = sum(out[name].values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="each arm once per round, order rotated")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per measurement")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "peftsweep-runs" / "bench-throughput",
    )
    parser.add_argument("--phase-steps", type=int, default=200, help="steps per engine in the phase profile")
    parser.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    parser.add_argument("--phases-only", action="store_true", help="keep --out's tokens/s, redo the profile")
    args = parser.parse_args()
    console = Console(width=160)

    from peftsweep import cluster
    from peftsweep.trainables.prepared import prepare_data

    spec = bench_spec(args.steps, args.root.resolve())
    data_dir = prepare_data(spec)
    samples: dict[str, list[float]] = {arm: [] for arm in ARMS}
    if args.phases_only:
        samples, args.rounds = json.loads(args.out.read_text())["samples"], 0
    started = False if args.phases_only else cluster.connect()  # embedded Ray with its dashboard, as `run`
    arms = {
        "bare": bare,
        "torch": lambda s, d: loop(_with(s, "torch", 2), d),
        "zero0": lambda s, d: loop(_with(s, "deepspeed", 0), d),
        "zero2": lambda s, d: loop(_with(s, "deepspeed", 2), d),
        "inline": inline,
        "train": ray_train,
    }
    try:
        for rnd in range(args.rounds):
            for arm in ARMS[rnd % len(ARMS) :] + ARMS[: rnd % len(ARMS)]:
                samples[arm].append(arms[arm](spec, data_dir))
                console.print(f"round {rnd} {arm:>9}: {samples[arm][-1]:,.0f} tokens/s")
        profile = phases(spec, data_dir, args.phase_steps)
    finally:
        if started:
            cluster.disconnect()

    med = {arm: statistics.median(v) for arm, v in samples.items()}
    table = Table(title=f"training tokens/s, {METHOD} r={RANK}, batch {spec.training.batch_size}, 1 thread")
    for col in ("arm", "median tokens/s", "samples", "vs bare", "vs torch engine"):
        table.add_column(col, justify="right")
    for arm in ARMS:
        table.add_row(
            arm, f"{med[arm]:,.0f}", " ".join(f"{v:,.0f}" for v in samples[arm]),
            f"{med[arm] / med['bare']:.3f}", f"{med[arm] / med['torch']:.3f}",
        )  # fmt: skip
    console.print(table)
    prof = Table(title="where a step's time goes (median ms per phase, same batches)")
    for col in ("engine", "forward", "backward", "step", "total", "vs bare"):
        prof.add_column(col, justify="right")
    for name, p in profile.items():
        prof.add_row(name, *[f"{p[k]:.2f}" for k in ("forward", "backward", "step", "total")],
                     f"{p['total'] / profile['bare']['total']:.3f}")  # fmt: skip
    console.print(prof)
    ratio = med["inline"] / med["bare"]
    console.print(
        f"inline / bare = {ratio:.3f} (target ≥ {TARGET}: {'met' if ratio >= TARGET else 'missed'})"
    )
    args.out.write_text(
        json.dumps(
            {
                "method": METHOD,
                "rank": RANK,
                "batch_size": spec.training.batch_size,
                "steps": args.steps,
                "threads": max(1, int(spec.resources.cpus_per_worker)),
                "zero_stage": spec.resources.zero_stage,
                "samples": samples,
                "median": med,
                "inline_over_bare": ratio,
                "torch_over_bare": med["torch"] / med["bare"],
                "zero0_over_torch": med["zero0"] / med["torch"],
                "zero2_over_torch": med["zero2"] / med["torch"],
                "train_over_bare": med["train"] / med["bare"],
                "target": TARGET,
                "phases_ms": profile,
            },
            indent=1,
        )
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
