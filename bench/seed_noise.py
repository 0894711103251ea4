"""Would a training setting with less seed noise make the search's verdict reachable? (a benchmark)

The search replay (`search_sim.py`) is limited by seed noise at the top of each method's curve: 0.16-0.25
exact match at the quickstart's settings, as large as the gap between neighbouring grid LRs. This runs the
real per-worker loop (`run_trial`, as `grid.py` does) at a few LRs around one method's peak, with more seeds,
under the quickstart's training settings and under variants (``--warmup``), and prints the mean ± std over
seeds per LR. Small on purpose: ~3-5 s a run on one core.

    cd bench && nice -n 19 ../.venv/bin/python seed_noise.py [--method lora --rank 8 --warmup 0.03 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

from grid import CURVE_KEYS, HERE, METRIC, RESULTS, grid_spec  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from peftsweep.spec import SweepSpec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.00433, 0.00811, 0.0152], help="grid LRs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--warmup", nargs="+", type=float, default=[0.03, 0.1], help="warmup_ratio values")
    parser.add_argument("--out", type=Path, default=RESULTS / "seed_noise.json")
    parser.add_argument("--root", type=Path, default=HERE.parent / "peftsweep-runs" / "bench-grid")
    args = parser.parse_args()
    console = Console(width=160)

    import torch

    from peftsweep.trainables.loop import init_standalone, run_trial
    from peftsweep.trainables.prepared import prepare_data

    torch.set_num_threads(1)
    init_standalone()
    base = grid_spec(root=args.root)
    data_dir = prepare_data(base)
    value = CURVE_KEYS.index(METRIC)
    runs: list[dict[str, Any]] = []
    for warmup in args.warmup:
        raw = base.model_dump(mode="json")
        raw["training"]["warmup_ratio"] = warmup
        spec = SweepSpec.model_validate(raw)
        for lr in args.lrs:
            for seed in args.seeds:
                reports: list[dict[str, Any]] = []
                t0 = time.perf_counter()
                run_trial(
                    spec,
                    args.method,
                    lr,
                    args.rank,
                    seed,
                    lambda m, _d, o=reports: o.append(m),
                    data_dir=data_dir,
                )
                curve = [[round(float(m.get(k, 0.0)), 5) for k in CURVE_KEYS] for m in reports]
                runs.append({"warmup": warmup, "lr": lr, "seed": seed, "curve": curve,
                             "seconds": round(time.perf_counter() - t0, 2)})  # fmt: skip
                console.print(f"warmup {warmup:g} lr {lr:g} seed {seed}: {METRIC} {curve[-1][value]:.3f}")

    table = Table(title=f"{args.method} r{args.rank}: final {METRIC}, mean ± std over seeds {args.seeds}")
    table.add_column("warmup_ratio")
    for lr in args.lrs:
        table.add_column(f"{lr:g}")
    table.add_column("pooled std")
    summary = {}
    for warmup in args.warmup:
        cells, variances = [], []
        for lr in args.lrs:
            vs = [r["curve"][-1][value] for r in runs if r["warmup"] == warmup and r["lr"] == lr]
            mean, std = statistics.fmean(vs), statistics.stdev(vs)
            variances.append(std**2)
            cells.append(f"{mean:.3f} ± {std:.3f}")
            summary[f"{warmup:g}/{lr:g}"] = {"mean": mean, "std": std, "values": vs}
        pooled = statistics.fmean(variances) ** 0.5
        summary[f"{warmup:g}/pooled_std"] = pooled
        table.add_row(f"{warmup:g}", *cells, f"{pooled:.3f}")
    console.print(table)
    args.out.write_text(
        json.dumps({"method": args.method, "rank": args.rank, "summary": summary, "runs": runs})
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
