"""The sweep's data, tokenized once and cached on disk; every trial of every method loads the same files.

Why: tokenising in each trial repeats identical work N×methods times and lets trials see different data if a
file changes mid-sweep. The driver prepares the data before any trial starts (bad rows fail there, naming the
file and row); trials only ``load_from_disk``. The cache key covers everything that changes the result — the
source files' bytes, the data/forgetting sections of the spec, the tokenizer's vocabulary and template, the
truncation length — so a changed file or spec gets a new directory and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftsweep.spec import DataSpec, SweepSpec
from peftsweep.vocab import ChatLoss

if TYPE_CHECKING:
    import datasets

CACHE_VERSION = 2  # bump when the prepared layout or the encoding changes, so stale caches are not reused
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")  # files that can hold task rows
_DONE = "DONE"  # written last: a directory without it is an interrupted preparation, redone


@dataclass(frozen=True)
class PreparedData:
    """What a trial trains and evaluates on."""

    train: datasets.Dataset  # columns input_ids, labels (loss on the response tokens only)
    validation: datasets.Dataset  # rows prompt/completion/answers/tests, capped at data.max_eval_examples
    test: datasets.Dataset | None  # held-out rows for the final eval point; None when the split is empty
    general: datasets.Dataset | None  # the forgetting check's general rows; None without `forgetting`


def prepare_data(spec: SweepSpec) -> Path:
    """Load, split and tokenize the spec's data under ``<root>/cache/``; return the directory (cached)."""
    import datasets
    from transformers import AutoTokenizer

    from peftsweep.trainables.data import DataError, tokenize_for_training
    from peftsweep.trainables.formats import load_task
    from peftsweep.trainables.model import hub_options, resolve_base_model

    datasets.disable_progress_bars()  # the CLI shows its own status line; per-split bars are noise
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(spec.base_model), **hub_options(spec))
    out = spec.tracking.root / "cache" / f"data-{_fingerprint(spec, tokenizer)}"
    if (out / _DONE).is_file():
        return out

    splits = _load(spec.data, tokenizer, load_task, chat_loss=spec.data.chat_loss)
    if len(splits["validation"]) == 0:
        raise DataError(
            f"{spec.data.task}: the validation split is empty; give data.split a validation share"
        )
    validation = splits["validation"].select(
        range(min(spec.data.max_eval_examples, len(splits["validation"])))
    )
    parts: dict[str, Any] = {
        "train": tokenize_for_training(splits["train"], tokenizer, spec.training.max_length),
        "validation": validation,
    }
    if len(splits["test"]):
        parts["test"] = splits["test"].select(range(min(spec.data.max_eval_examples, len(splits["test"]))))
    if len(parts["train"]) == 0:
        raise DataError(f"{spec.data.task}: no training row keeps a response token at max_length")
    if spec.forgetting is not None:
        # The forgetting check measures each row's last answer only, so only that turn is cut out.
        general = _load(spec.forgetting, tokenizer, load_task, chat_loss="last_assistant", whole=True)
        rows = datasets.concatenate_datasets([d for d in general.values() if len(d)])
        parts["general"] = rows.select(range(min(spec.forgetting.max_examples, len(rows))))

    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a concurrent or killed preparation never leaves a half cache.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tmp-") as tmp:
        for name, ds in parts.items():
            ds.save_to_disk(str(Path(tmp) / name))
        (Path(tmp) / _DONE).write_text(json.dumps({k: len(v) for k, v in parts.items()}))
        if not (out / _DONE).is_file():
            shutil.rmtree(out, ignore_errors=True)
            Path(tmp).rename(out)
            Path(tmp).mkdir()  # TemporaryDirectory removes it again on exit
    return out


def load_prepared(path: Path) -> PreparedData:
    """The datasets `prepare_data` wrote (memory-mapped Arrow files: cheap for every worker), loaded once per
    process: a warm trial actor runs many trials on the same prepared directory (its name is the content's
    fingerprint, so the same path always holds the same data)."""
    return _load_prepared(str(Path(path).resolve()))


@lru_cache(maxsize=2)
def _load_prepared(location: str) -> PreparedData:
    import datasets

    path = Path(location)
    if not (path / _DONE).is_file():
        raise FileNotFoundError(f"{path}: not a prepared data directory (no {_DONE} marker)")

    def part(name: str) -> datasets.Dataset | None:
        return datasets.load_from_disk(str(path / name)) if (path / name).is_dir() else None

    train = part("train")
    validation = part("validation")
    assert train is not None and validation is not None  # prepare_data always writes both
    return PreparedData(
        train=train.with_format(columns=["input_ids", "labels"]),
        validation=validation,
        test=part("test"),
        general=part("general"),
    )


def _load(
    source: Any, tokenizer: Any, load_task: Any, chat_loss: ChatLoss, whole: bool = False
) -> dict[str, datasets.Dataset]:
    split = (1.0, 0.0, 0.0) if whole else source.split
    seed = getattr(source, "split_seed", 0)
    return load_task(source.task, source.format, dict(source.fields), split, seed, tokenizer, chat_loss)


def _fingerprint(spec: SweepSpec, tokenizer: Any) -> str:
    """Hash of everything the prepared data depends on (see the module docstring)."""
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}".encode())
    sections = {
        "data": spec.data.model_dump(mode="json"),
        "forgetting": spec.forgetting.model_dump(mode="json") if spec.forgetting else None,
        "max_length": spec.training.max_length,
    }
    h.update(json.dumps(sections, sort_keys=True).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token]).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    for source in [spec.data] + ([spec.forgetting] if spec.forgetting else []):
        for f in _source_files(source):
            h.update(str(f).encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def _source_files(source: DataSpec | Any) -> list[Path]:
    """The local files a task string reads (none for hub ids: the hub cache versions those)."""
    from peftsweep.trainables.data import BUILTIN_PREFIX, resolve_task_dir

    task: str = source.task
    if task.startswith("hf:"):
        return []
    path = resolve_task_dir(task) if task.startswith(BUILTIN_PREFIX) else Path(task).expanduser().resolve()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _DATA_SUFFIXES)
    return []
