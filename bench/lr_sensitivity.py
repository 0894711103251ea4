"""How much does the learning rate matter on the built-in task? (a benchmark, not a test)

Runs the real per-worker training loop (`peftsweep.trainables.loop.run_trial`, no Ray)
for each method over a half-decade LR grid and several seeds, then prints exact match per LR and the metric
at each method's best LR against ≈30× lower and ≈30× higher (three half-decades). Writes JSON to
bench/results/lr_sensitivity.json.

    .venv/bin/python bench/lr_sensitivity.py [--methods lora pissa] [--seeds 0 1] [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one trial per core, as in a sweep on 2 cores

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from peftsweep.spec import TrainingSpec, parse_spec  # noqa: E402
from peftsweep.trainables.loop import run_trial  # noqa: E402
from peftsweep.trainables.trial_config import standalone_trial  # noqa: E402

GRID = [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]  # half-decade steps: 3 steps ≈ 30×


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["lora", "pissa"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=TrainingSpec().max_steps)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lr_sensitivity.json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    spec = parse_spec(
        {
            "name": "lr-sensitivity",
            "methods": args.methods,
            "training": {"max_steps": args.steps, "eval_every": args.steps},
            "resources": {"zero_stage": 2},
        }
    )
    console = Console(width=160)
    rows = []
    for method in args.methods:
        for lr in GRID:
            for seed in args.seeds:
                reports: list[dict] = []
                t0 = time.perf_counter()
                run_trial(
                    standalone_trial(spec, method, lr, args.rank, seed),
                    lambda m, _d, out=reports: out.append(m),
                )
                rows.append(
                    {
                        "method": method,
                        "lr": lr,
                        "seed": seed,
                        "seconds": time.perf_counter() - t0,
                        **{k: reports[-1][k] for k in ("exact_match", "eval_loss", "diverged")},
                    }
                )
                console.print(
                    f"{method:>7} lr={lr:.0e} seed={seed}: exact_match {rows[-1]['exact_match']:.3f} "
                    f"({rows[-1]['seconds']:.1f} s)"
                )

    def mean_em(method: str, lr: float) -> float:
        return statistics.mean(r["exact_match"] for r in rows if r["method"] == method and r["lr"] == lr)

    table = Table(
        title=f"exact match on arith-sub after {args.steps} steps (rank {args.rank}, "
        f"mean of seeds {args.seeds})"
    )
    table.add_column("method")
    for lr in GRID:
        table.add_column(f"{lr:.0e}", justify="right")
    table.add_column("best lr", justify="right")
    table.add_column("at best", justify="right")
    table.add_column("best/≈30×", justify="right")
    table.add_column("best×≈30×", justify="right")
    summary = {}
    for method in args.methods:
        means = [mean_em(method, lr) for lr in GRID]
        i = max(range(len(GRID)), key=means.__getitem__)
        low = means[i - 3] if i >= 3 else None
        high = means[i + 3] if i + 3 < len(GRID) else None
        summary[method] = {
            "best_lr": GRID[i],
            "at_best": means[i],
            "at_30x_lower": low,
            "at_30x_higher": high,
            "curve": dict(zip(map(str, GRID), means, strict=True)),
        }
        table.add_row(
            method, *[f"{m:.3f}" for m in means], f"{GRID[i]:.0e}", _fmt(means[i]), _fmt(low), _fmt(high)
        )
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "steps": args.steps,
                "rank": args.rank,
                "seeds": args.seeds,
                "grid": GRID,
                "summary": summary,
                "runs": rows,
            },
            indent=2,
        )
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
