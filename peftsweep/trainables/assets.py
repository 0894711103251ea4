"""Where the packaged built-in assets are: the tiny base model and the arithmetic tasks (paths only).

Why a module of its own: everything that resolves ``builtin:NAME`` (model loading, data loading) needs these
paths, while `builtin.py` — which builds the assets — needs the data and evaluation code; keeping the paths
apart keeps the imports one-way.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = "tiny-arith"  # the only built-in base model
DEFAULT_TASK = "arith-sub"  # the built-in fine-tuning task


def builtin_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Directory of a packaged base model, loadable with ``AutoModelForCausalLM.from_pretrained``."""
    path = ASSETS_DIR / "models" / name
    if not (path / "config.json").is_file():
        have = sorted(p.name for p in (ASSETS_DIR / "models").glob("*") if p.is_dir())
        raise FileNotFoundError(
            f"no built-in model {name!r} at {path} (available: {have}); run scripts/build_assets.py"
        )
    return path


def builtin_task_dir(name: str = DEFAULT_TASK) -> Path:
    """Directory of a packaged task holding ``train.jsonl`` and ``eval.jsonl``."""
    path = ASSETS_DIR / "tasks" / name
    if not path.is_dir():
        have = sorted(p.name for p in (ASSETS_DIR / "tasks").glob("*") if p.is_dir())
        raise FileNotFoundError(
            f"no built-in task {name!r} at {path} (available: {have}); run scripts/build_assets.py"
        )
    return path
