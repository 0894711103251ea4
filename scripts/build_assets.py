"""Regenerate the committed built-in assets deterministically (run: ``python scripts/build_assets.py``).

Why a script: the tiny base model and the task files are committed so that users and tests need no network
and no build step; this script is how they were made and how to remake them bit-for-bit (same seeds, one
thread, same library versions).

Writes:
  peftsweep/assets/models/tiny-arith/      Llama model (safetensors) + tokenizer, pretrained on additions
  peftsweep/assets/tasks/arith-sub/        train.jsonl / eval.jsonl of 2-digit subtraction (disjoint)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from peftsweep.trainables import builtin  # noqa: E402


def main() -> None:
    """Build the task files, then pretrain and save the base model; print sizes and held-out accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seed", type=int, default=0, help="model-init and data-order seed (0: the shipped one)"
    )
    parser.add_argument("--skip-model", action="store_true", help="only rewrite the task files (seconds)")
    args = parser.parse_args()

    for name in builtin.TASK_GENERATORS:
        task_dir = builtin.ASSETS_DIR / "tasks" / name
        train, eval_rows = builtin.task_examples(name, seed=args.seed)
        builtin.write_jsonl(train, task_dir / "train.jsonl")
        builtin.write_jsonl(eval_rows, task_dir / "eval.jsonl")
        print(f"task {name}: {len(train)} train + {len(eval_rows)} eval rows -> {task_dir}")

    if args.skip_model:
        return
    model_dir = builtin.ASSETS_DIR / "models" / builtin.DEFAULT_MODEL
    tmp_dir = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    start = time.perf_counter()
    em = builtin.build_base_model(tmp_dir, seed=args.seed)
    for f in tmp_dir.iterdir():
        f.chmod(0o644)  # transformers writes the weights 0600; shipped files must be readable by everyone
    shutil.rmtree(model_dir, ignore_errors=True)  # replace only after a successful build
    tmp_dir.rename(model_dir)
    size = sum(p.stat().st_size for p in model_dir.iterdir())
    print(
        f"model {builtin.DEFAULT_MODEL}: held-out addition exact match {em:.4f} after "
        f"{time.perf_counter() - start:.1f} s, {size / 1024:.0f} KiB -> {model_dir}"
    )


if __name__ == "__main__":
    main()
