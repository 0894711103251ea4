"""Does curvature at initialisation explain each method's best learning rate? (a benchmark, not a test)

Probes λ_max, the top Hessian eigenvalue of the task loss w.r.t. the adapter at initialisation
(`peftsweep.trainables.curvature.probe_method`), for each method on the built-in model and task, and sets the
ratio λ_method/λ_LoRA next to the optimal-LR ratio best_LR_LoRA/best_LR_method from
bench/results/lr_sensitivity.json (when that file has the method). If curvature sets the stable step, the two
ratios agree. Writes JSON to bench/results/curvature_probe.json.

    .venv/bin/python bench/curvature_probe.py [--methods lora pissa] [--seeds 0 1] [--iters 50]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one probe per core, as a trial in a sweep on 2 cores

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from peftsweep.trainables.builtin import DEFAULT_TASK, builtin_model_dir  # noqa: E402
from peftsweep.trainables.curvature import probe_method  # noqa: E402
from peftsweep.trainables.data import load_split  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["lora", "pissa", "milora", "dora", "rslora"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=8.0)  # alpha = r, the paper protocol
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    # 50, not the probe's default 20: MiLoRA's top eigenvalues are clustered and need ~30-40 iterations.
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--lr-results", type=Path, default=RESULTS / "lr_sensitivity.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "curvature_probe.json")
    args = parser.parse_args()

    import datasets
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings(
        "ignore", category=FutureWarning
    )  # transformers' deprecation noise per model load
    if "lora" not in args.methods:
        parser.error("--methods must include lora: every ratio is taken against it")

    model_dir = builtin_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = load_split(f"builtin:{DEFAULT_TASK}", "train")
    lr_summary = json.loads(args.lr_results.read_text())["summary"] if args.lr_results.is_file() else {}

    console = Console(width=160)
    runs = []
    with tempfile.TemporaryDirectory(prefix="curvature-bench-") as workdir:
        for method in args.methods:
            for seed in args.seeds:
                t0 = time.perf_counter()
                result = probe_method(
                    method,
                    model_dir,
                    rows,
                    tokenizer,
                    rank=args.rank,
                    alpha=args.alpha,
                    samples=args.samples,
                    batch_size=args.batch_size,
                    iters=args.iters,
                    seed=seed,
                    workdir=Path(workdir),
                )
                runs.append(
                    {
                        "method": method,
                        "seed": seed,
                        "top_eigenvalue": result.top_eigenvalue,
                        "iterations": result.iterations,
                        "converged": result.converged,
                        "samples": result.samples,
                        "probe_seconds": result.seconds,
                        "total_seconds": time.perf_counter() - t0,
                        "trainable_params": result.trainable_params,
                    }
                )
                console.print(
                    f"{method:>7} seed={seed}: λ_max {result.top_eigenvalue:9.3f}, {result.iterations} iters "
                    f"({'converged' if result.converged else 'NOT converged'}), {result.seconds:.1f} s"
                )

    def mine(method: str) -> list[dict]:
        return [r for r in runs if r["method"] == method]

    lam_lora = statistics.mean(r["top_eigenvalue"] for r in mine("lora"))
    best_lora = lr_summary.get("lora", {}).get("best_lr")
    summary = {}
    for method in args.methods:
        lam = statistics.mean(r["top_eigenvalue"] for r in mine(method))
        best = lr_summary.get(method, {}).get("best_lr")
        summary[method] = {
            "top_eigenvalue_mean": lam,
            "top_eigenvalues": [r["top_eigenvalue"] for r in mine(method)],
            "iterations": [r["iterations"] for r in mine(method)],
            "all_converged": all(r["converged"] for r in mine(method)),
            "probe_seconds_mean": statistics.mean(r["probe_seconds"] for r in mine(method)),
            "curvature_ratio_to_lora": lam / lam_lora,  # λ_method / λ_LoRA
            "best_lr": best,
            # how many times lower an LR the method wanted than LoRA: best_LR_LoRA / best_LR_method
            "lr_ratio_to_lora": best_lora / best if best and best_lora else None,
            # the prior peftsweep would centre the method's LR range at: best_LR_LoRA × λ_LoRA / λ_method
            "curvature_predicted_lr": best_lora * lam_lora / lam if best_lora else None,
        }

    table = Table(
        title=f"λ_max at init on {DEFAULT_TASK} (rank {args.rank}, alpha {args.alpha:g}, {args.samples} "
        f"train rows, mean of seeds {args.seeds}) vs best LR from {args.lr_results.name}"
    )
    for name in ("method", "λ_max", "iters", "probe s", "λ/λ_LoRA", "best lr", "LR_LoRA/LR", "predicted lr"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for method, s in summary.items():
        table.add_row(
            method,
            _fmt(s["top_eigenvalue_mean"], ".2f"),
            "/".join(map(str, s["iterations"])) + ("" if s["all_converged"] else " (!)"),
            _fmt(s["probe_seconds_mean"], ".1f"),
            _fmt(s["curvature_ratio_to_lora"], ".2f"),
            _fmt(s["best_lr"], ".0e"),
            _fmt(s["lr_ratio_to_lora"], ".2f"),
            _fmt(s["curvature_predicted_lr"], ".1e"),
        )
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "task": DEFAULT_TASK,
                "rank": args.rank,
                "alpha": args.alpha,
                "samples": args.samples,
                "batch_size": args.batch_size,
                "iters": args.iters,
                "seeds": args.seeds,
                "lr_results": str(args.lr_results.name) if lr_summary else None,
                "lr_grid": json.loads(args.lr_results.read_text())["grid"] if lr_summary else None,
                "summary": summary,
                "runs": runs,
            },
            indent=2,
        )
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
