"""The ground-truth grid of the built-in task: every (method, rank, LR, seed), every eval point (a benchmark).

The search-efficiency benchmark (`bench/search_efficiency.py`) replays search strategies against this table,
so the table must hold whole learning curves, not just final scores. Each run is the real per-worker loop
(`peftsweep.trainables.loop.run_trial`, no Ray; the engine is the loop's default, and the torch and
DeepSpeed engines train the same losses to 1e-5: tests/trainables/test_loop.py) with the quickstart's
training settings except `eval_every` (denser, so ASHA has rungs to replay) and no forgetting data (not
part of the metric).

Resumable: every finished run is appended to `bench/results/grid.jsonl` (one JSON line per run), and runs
already there are skipped, so a cut-off session continues where it stopped. That file is the table.

    nice -n 19 .venv/bin/python bench/grid.py [--lr-min 1e-4 --lr-max 1e-1 --n-lrs 12] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per run: the other one is left to the machine

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from peftsweep.spec import SweepSpec, load_spec  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
QUICKSTART = HERE.parent / "examples" / "quickstart.yaml"
EVAL_EVERY = 25  # 6 eval points over the quickstart's 150 steps: rungs for ASHA replay
METRIC = "exact_match"
TOP_FRACTION = 0.5  # configs scoring ≥ half the optimum form "the top of the curve" (seed noise)
CURVE_KEYS = ("step", "exact_match", "eval_loss", "train_loss", "diverged")


def log_grid(lr_min: float, lr_max: float, n: int) -> list[float]:
    """`n` LRs log-spaced from lr_min to lr_max inclusive, to 3 significant digits (stable keys)."""
    ratio = math.log10(lr_max / lr_min) / (n - 1)
    return [float(f"{lr_min * 10 ** (i * ratio):.3g}") for i in range(n)]


def grid_spec(eval_every: int = EVAL_EVERY, root: Path | None = None) -> SweepSpec:
    """The quickstart spec with denser evals and no forgetting data; `root` holds the prepared data cache."""
    spec = load_spec(QUICKSTART)
    raw = spec.model_dump(mode="json")
    raw["training"]["eval_every"] = eval_every
    raw["forgetting"] = None
    if root is not None:
        raw["tracking"]["root"] = str(root)
    return SweepSpec.model_validate(raw)


def run_key(run: dict[str, Any]) -> tuple[str, int, float, int]:
    return run["method"], int(run["rank"]), float(run["lr"]), int(run["seed"])


def load_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_metric(run: dict[str, Any]) -> float:
    """The run's metric at its last report (a diverged run reports the worst value there)."""
    return float(run["curve"][-1][CURVE_KEYS.index(METRIC)])


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: mean final metric per (rank, lr) over seeds, the optimum, and the seed noise.

    Seed noise = the pooled (RMS) standard deviation across seeds of the configs at the top of the curve
    (mean ≥ TOP_FRACTION × the optimum): the typical spread of one good config's score, which bounds what
    any search can resolve. Dead configs (0 everywhere) are left out; they would make the noise look tiny.
    """
    by_cfg: dict[tuple[str, int, float], list[float]] = {}
    for run in runs:
        by_cfg.setdefault((run["method"], int(run["rank"]), float(run["lr"])), []).append(final_metric(run))
    out: dict[str, Any] = {}
    for method in sorted({m for m, _, _ in by_cfg}):
        cfgs = {(r, lr): v for (m, r, lr), v in by_cfg.items() if m == method}
        means = {cfg: statistics.mean(v) for cfg, v in cfgs.items()}
        best = max(means, key=means.__getitem__)
        top = [
            statistics.variance(v)
            for c, v in cfgs.items()
            if len(v) > 1 and means[c] >= TOP_FRACTION * means[best]
        ]
        out[method] = {
            "best_rank": best[0],
            "best_lr": best[1],
            "best_mean": means[best],
            "best_std": statistics.stdev(cfgs[best]) if len(cfgs[best]) > 1 else None,
            "seed_noise": math.sqrt(statistics.mean(top)) if top else None,
            "top_configs": len(top),
            "means": {f"{r}/{lr:g}": means[(r, lr)] for r, lr in sorted(means)},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["lora", "pissa", "milora", "dora"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lr-min", type=float, default=1e-4, help="quickstart range (see bench/README.md)")
    parser.add_argument("--lr-max", type=float, default=1e-1)
    parser.add_argument("--n-lrs", type=int, default=12, help="the paper's 12-point density")
    parser.add_argument("--eval-every", type=int, default=EVAL_EVERY)
    parser.add_argument("--out", type=Path, default=RESULTS / "grid.jsonl")
    parser.add_argument(
        "--root", type=Path, default=HERE.parent / "peftsweep-runs" / "bench-grid", help="data cache"
    )
    parser.add_argument(
        "--summary-only", action="store_true", help="print the table from --out, train nothing"
    )
    args = parser.parse_args()

    console = Console(width=180)
    lrs = log_grid(args.lr_min, args.lr_max, args.n_lrs)
    done = {run_key(r) for r in load_runs(args.out)}
    if not args.summary_only:
        import torch

        from peftsweep.trainables.loop import run_trial
        from peftsweep.trainables.prepared import prepare_data
        from peftsweep.trainables.trial_config import standalone_trial

        torch.set_num_threads(1)
        spec = grid_spec(args.eval_every, args.root)
        data_dir = prepare_data(spec)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # Seeds outermost: a cut-off grid still covers every config once before any gets a second seed.
        todo = [
            (m, r, lr, s)
            for s in args.seeds
            for m in args.methods
            for r in args.ranks
            for lr in lrs
            if (m, r, lr, s) not in done
        ]
        console.print(f"{len(done)} runs done, {len(todo)} to go")
        for i, (method, rank, lr, seed) in enumerate(todo, 1):
            reports: list[dict[str, Any]] = []
            t0 = time.perf_counter()
            run_trial(
                standalone_trial(spec, method, lr, rank, seed, data_dir), lambda m, _d, o=reports: o.append(m)
            )
            run = {
                "method": method,
                "rank": rank,
                "lr": lr,
                "seed": seed,
                "seconds": round(time.perf_counter() - t0, 2),
                "curve": [[round(float(m.get(k, 0.0)), 5) for k in CURVE_KEYS] for m in reports],
            }
            with args.out.open("a") as fh:
                fh.write(json.dumps(run) + "\n")
            console.print(
                f"[{i}/{len(todo)}] {method:>6} r={rank} lr={lr:.3g} seed={seed}: "
                f"{METRIC} {final_metric(run):.3f} ({run['seconds']:.1f} s)"
            )

    runs = [r for r in load_runs(args.out) if float(r["lr"]) in lrs]
    summary = summarise(runs)
    table = Table(title=f"{METRIC} after the last step, mean over seeds (grid: {len(runs)} runs)")
    table.add_column("method")
    table.add_column("rank")
    for lr in lrs:
        table.add_column(f"{lr:.2g}", justify="right")
    for method, s in summary.items():
        for rank in args.ranks:
            table.add_row(
                method, str(rank), *[f"{s['means'].get(f'{rank}/{lr:g}', math.nan):.2f}" for lr in lrs]
            )
    console.print(table)
    best = Table(title="optimum per method (mean over seeds); seed noise: pooled std across seeds at the top")
    for col in ("method", "best rank", "best lr", METRIC, "std at best", "seed noise"):
        best.add_column(col, justify="right")
    for method, s in summary.items():
        best.add_row(
            method,
            str(s["best_rank"]),
            f"{s['best_lr']:.3g}",
            f"{s['best_mean']:.3f}",
            f"{s['best_std'] or math.nan:.3f}",
            f"{s['seed_noise'] or math.nan:.3f}",
        )
    console.print(best)
    summary_path = args.out.with_name(f"{args.out.stem}_summary.json")
    summary_path.write_text(
        json.dumps(
            {
                "lrs": lrs,
                "ranks": args.ranks,
                "seeds": args.seeds,
                "eval_every": args.eval_every,
                "metric": METRIC,
                "runs": len(runs),
                "run_seconds_total": round(sum(r["seconds"] for r in runs), 1),
                "summary": summary,
            },
            indent=1,
        )
    )
    console.print(f"table: {args.out}; summary: {summary_path}")


if __name__ == "__main__":
    main()
