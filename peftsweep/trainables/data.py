"""Encoding for causal-LM SFT (response-only labels, padding) and the built-in task's JSONL directories.

Why here: every format (``formats.py``) normalises to prompt/completion rows, and this module turns those into
``input_ids``/``labels`` with the loss on the response only — one encoding for training and evaluation.

It also keeps the simple task layout of the built-in tasks — a directory with ``train.jsonl`` and
``eval.jsonl`` of prompt/completion rows — with pure-Python validation (``check_task_files``, ``load_split``)
used by the asset builder and the tests. ``builtin:NAME`` names a task packaged with peftsweep.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftsweep.vocab import BUILTIN_PREFIX

if TYPE_CHECKING:
    import datasets
    import torch

SPLITS = ("train", "eval")  # the two files every task directory holds
IGNORE_INDEX = -100  # the label value torch's cross-entropy (and HF models) skip


class DataError(ValueError):
    """A task file is missing or malformed; the message names the file and, where it applies, the line."""


def json_reason(exc: ValueError | RecursionError) -> str:
    """Why ``json.loads`` failed, for a message: the decoder's reason and column, or the limit it hit."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).partition(";")[0]  # an integer longer than sys.get_int_max_str_digits(), without the hint


def resolve_task_dir(task: str) -> Path:
    """Absolute directory of a task: ``builtin:NAME`` -> packaged dir, else a local dir with both splits."""
    if task.startswith(BUILTIN_PREFIX):
        from peftsweep.trainables.builtin import builtin_task_dir

        try:
            path = builtin_task_dir(task[len(BUILTIN_PREFIX) :])
        except FileNotFoundError as exc:
            raise DataError(str(exc)) from None
        except (OSError, ValueError) as exc:  # a name too long, a NUL byte
            raise DataError(f"{task!r}: not a usable task name ({exc})") from None
    else:
        try:
            path = Path(task).expanduser().resolve()  # absolute: Ray workers run in another directory
            found = path.is_dir()
        except (OSError, ValueError, RuntimeError) as exc:  # ~unknown-user, a NUL byte, a name too long
            raise DataError(f"{task!r}: not a usable path ({exc})") from None
        if not found:
            raise DataError(
                f"{path}: task directory not found (expected a directory with train.jsonl, eval.jsonl)"
            )
    for split in SPLITS:
        if not (path / f"{split}.jsonl").is_file():
            raise DataError(
                f"{path / f'{split}.jsonl'}: file not found (a task directory needs train.jsonl, eval.jsonl)"
            )
    return path


def _check_file(path: Path, prompt_field: str, completion_field: str) -> int:
    """Validate one JSONL file line by line; return its number of rows. Blank lines are skipped."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 ({exc.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise DataError(f"{where}: invalid JSON ({json_reason(exc)})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for field in (prompt_field, completion_field):
                if field not in obj:
                    raise DataError(f"{where}: field {field!r} missing (keys: {sorted(obj)})")
                value = obj[field]
                if not isinstance(value, str):
                    raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
                if not value.strip():
                    raise DataError(f"{where}: field {field!r} is empty")
            rows += 1
    if rows == 0:
        raise DataError(f"{path}: no rows (need at least one JSON object per split)")
    return rows


def check_task_files(
    task: str, prompt_field: str = "prompt", completion_field: str = "completion"
) -> dict[str, int]:
    """Validate both splits of ``task`` without torch or datasets; return ``{"train": n, "eval": n}``."""
    task_dir = resolve_task_dir(task)
    return {
        split: _check_file(task_dir / f"{split}.jsonl", prompt_field, completion_field) for split in SPLITS
    }


def load_split(
    task: str,
    split: str,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    limit: int | None = None,
) -> datasets.Dataset:
    """One split as a ``datasets.Dataset`` with exactly the columns ``prompt`` and ``completion``."""
    import datasets

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = resolve_task_dir(task) / f"{split}.jsonl"
    _check_file(path, prompt_field, completion_field)  # cheap, and turns pyarrow's errors into named lines
    ds = datasets.load_dataset("json", data_files=str(path), split="train")  # one file -> HF calls it "train"
    ds = ds.select_columns([prompt_field, completion_field])
    renames = {prompt_field: "prompt", completion_field: "completion"}
    renames = {old: new for old, new in renames.items() if old != new}
    if renames:
        ds = ds.rename_columns(renames)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return ds


def _encode(
    tokenizer: Any, prompt: list[int], completion: list[int], max_length: int
) -> dict[str, list[int]]:
    """BOS + prompt + completion + EOS, the loss masked on BOS and prompt; truncated to ``max_length``."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    input_ids = bos + prompt + completion + eos
    labels = [IGNORE_INDEX] * (len(bos) + len(prompt)) + completion + eos
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def tokenize_for_training(ds: datasets.Dataset, tokenizer: Any, max_length: int) -> datasets.Dataset:
    """Columns ``input_ids`` and ``labels`` for response-only SFT.

    Prompt and completion are tokenized separately (no special tokens) so the prompt/response boundary is
    exact. Rows whose completion is truncated away entirely are dropped: they carry no loss, and a batch of
    only such rows would give a NaN loss that looks like divergence.
    """

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        prompts = tokenizer(batch["prompt"], add_special_tokens=False)["input_ids"]
        completions = tokenizer(batch["completion"], add_special_tokens=False)["input_ids"]
        out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        for p, c in zip(prompts, completions, strict=True):
            row = _encode(tokenizer, p, c, max_length)
            out["input_ids"].append(row["input_ids"])
            out["labels"].append(row["labels"])
        return out

    tokenized = ds.map(encode, batched=True, remove_columns=ds.column_names)
    return tokenized.filter(lambda labels: any(t != IGNORE_INDEX for t in labels), input_columns="labels")


def collate(features: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids`` by ``pad_id``, ``attention_mask`` 1/0, ``labels`` -100 in padding."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
