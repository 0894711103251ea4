"""Encoding for causal-LM SFT (response-only labels, padding) and the built-in task's JSONL directories.

Why here: every format (``formats.py``) normalises to prompt/completion rows (chat rows also carry their
rendered segments), and this module turns those into ``input_ids``/``labels`` with the loss on the responses
only — one encoding for training and evaluation.

It also keeps the simple task layout of the built-in tasks — a directory with ``train.jsonl`` and
``eval.jsonl`` of prompt/completion rows — with pure-Python validation (``check_task_files``, ``load_split``)
used by the asset builder and the tests. ``builtin:NAME`` names a task packaged with peftsweep.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
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
        from peftsweep.trainables.assets import builtin_task_dir

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


def token_pieces(tokenizer: Any, rows: Sequence[Mapping[str, Any]]) -> list[list[list[int]]]:
    """Each row as token-id pieces that alternate context and target: ``[context, target, context, ...]``.

    A chat row is its rendered ``segments`` (see ``chat.py``) tokenised with ``add_special_tokens=False``: the
    template already wrote its special tokens, so BOS is put in front only when the tokenizer has one and the
    rendering does not start with it, and each target ends with the template's end-of-turn token. Any other
    row is ``[BOS + prompt, completion + EOS]``. Pieces are tokenised separately, so the context/target
    boundary is exact and a prompt encodes the same at evaluation as in training; one tokenizer call
    covers all rows.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    texts: list[str] = []
    is_chat: list[bool] = []
    for row in rows:
        segments = list(row.get("segments") or [])
        is_chat.append(bool(segments))
        texts += segments or [str(row["prompt"]), str(row["completion"])]
    ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    out = []
    for row, chat in zip(rows, is_chat, strict=True):
        if chat:
            pieces = [list(next(ids)) for _ in row["segments"]]
            if bos and pieces[0][:1] != bos:
                pieces[0] = bos + pieces[0]
        else:
            pieces = [bos + list(next(ids)), list(next(ids)) + eos]
        out.append(pieces)
    return out


def join_pieces(pieces: Sequence[Sequence[int]], max_length: int) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of a row's pieces: loss on targets only, cut at ``max_length``."""
    input_ids: list[int] = []
    labels: list[int] = []
    for k, piece in enumerate(pieces):
        input_ids += piece
        labels += list(piece) if k % 2 else [IGNORE_INDEX] * len(piece)
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def last_turn(pieces: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """(prompt, target) of a row's final answer: everything before its last target, and that target."""
    return [t for piece in pieces[:-1] for t in piece], list(pieces[-1])


def tokenize_for_training(ds: datasets.Dataset, tokenizer: Any, max_length: int) -> datasets.Dataset:
    """Columns ``input_ids`` and ``labels`` for response-only SFT (see :func:`token_pieces`).

    Rows whose targets are truncated away entirely are dropped: they carry no loss, and a batch of only
    such rows would give a NaN loss that looks like divergence.
    """

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        joined = [join_pieces(p, max_length) for p in token_pieces(tokenizer, rows)]
        return {"input_ids": [j["input_ids"] for j in joined], "labels": [j["labels"] for j in joined]}

    tokenized = ds.map(encode, batched=True, remove_columns=ds.column_names)
    return tokenized.filter(lambda labels: any(t != IGNORE_INDEX for t in labels), input_columns="labels")


def pad_id(tokenizer: Any) -> int:
    """Padding id; tokenizers without a pad token (GPT-2, Llama 3) pad with EOS, which the mask hides."""
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0


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
