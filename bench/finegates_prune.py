"""How much does FineGates prune, and how much faster is the pruned model? (a benchmark, not a test)

Trains FineGates briefly on the built-in task with the real per-worker loop (`run_trial`, no Ray),
loads the exported pruned model through `load_trained`, and times it against the untouched base model on one
fixed batch (median of alternated forwards). Writes JSON to bench/results/finegates_prune.json.

    .venv/bin/python bench/finegates_prune.py [--steps 150] [--lr 3e-2] [--target-sparsity 0.35]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as one trial gets in a sweep on 2 cores

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from peftsweep.spec import TrainingSpec, parse_spec  # noqa: E402
from peftsweep.trainables.loop import run_trial  # noqa: E402
from peftsweep.trainables.model import resolve_base_model  # noqa: E402
from peftsweep.trainables.trial_config import standalone_trial  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=TrainingSpec().max_steps)
    # Gate logits must move by ~1.5 to close; 3e-2 gets there within the default 150 steps.
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--target-sparsity", type=float, default=0.35)  # the method's default
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32)  # timing batch: the training batch size
    parser.add_argument("--seq", type=int, default=64)  # timing sequence length: longer than the prompts
    parser.add_argument("--runs", type=int, default=30)  # timed forwards per model; the median is reported
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "finegates_prune.json"
    )
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from peftsweep.search_spaces import load_trained
    from peftsweep.search_spaces.finegates import MANIFEST_FILE, prune_report

    torch.set_num_threads(1)
    spec = parse_spec(
        {
            "name": "finegates-prune",
            "methods": [{"name": "finegates", "options": {"target_sparsity": args.target_sparsity}}],
            "training": {"max_steps": args.steps, "eval_every": args.steps},
            "resources": {"zero_stage": 2},
        }
    )
    base_path = resolve_base_model(spec.base_model)
    result: dict = {}

    def report(metrics: dict, adapter_dir: Path | None) -> None:
        # The export dir is temporary: load the pruned model before returning.
        result["metrics"] = dict(metrics)
        if adapter_dir is not None:
            base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
            result["pruned"] = load_trained(base, adapter_dir)
            result["manifest"] = json.loads((adapter_dir / MANIFEST_FILE).read_text())

    t0 = time.perf_counter()
    run_trial(standalone_trial(spec, "finegates", args.lr, 0, args.seed), report)
    train_s = time.perf_counter() - t0

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    numbers = prune_report(base, result["pruned"], ids, runs=args.runs)
    manifest, metrics = result["manifest"], result["metrics"]
    row = {
        "steps": args.steps,
        "lr": args.lr,
        "target_sparsity": args.target_sparsity,
        "train_seconds": train_s,
        "exact_match": metrics.get("exact_match"),
        "eval_loss": metrics.get("eval_loss"),
        "closed_gates_pct": 100.0 * manifest["closed_gates"] / manifest["total_gates"],
        "intermediate_before": manifest.get("intermediate_before"),
        "intermediate_after": manifest.get("intermediate_after"),
        "alive_per_layer": manifest.get("alive_per_layer"),
        "timing_batch": [args.batch, args.seq],
        "threads": 1,
        **numbers,
    }

    table = Table(title=f"FineGates pruning on the built-in task ({args.steps} steps, lr {args.lr:g})")
    for key in ("metric", "value"):
        table.add_column(key)
    for key, value in row.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console(width=120).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
