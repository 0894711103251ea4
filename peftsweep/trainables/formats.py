"""Task formats: read a task in one of seven formats, validate every row, normalise it to prompt/completion.

Why: a sweep must fail *before* any cluster work on a bad dataset, with a message that names the file and the
row, and every trial must then see exactly the same rows. So a task (a local ``.jsonl``/``.json``/``.csv``/
``.parquet`` file, a directory of split files, ``builtin:NAME`` or ``hf:<id>[:config]``) is read, checked row
by row and turned into rows ``{"prompt", "completion", "answers", "tests", "segments"}``: ``prompt`` is the
rendered template, ``completion`` the training target, ``answers`` the references a metric compares against
(at least ``[completion]``), ``tests`` the assert statements of a code row (``""`` when absent) and
``segments`` a chat row's rendered conversation cut into context and targets (:mod:`chat`; ``[]`` for the
other formats, whose target is the completion).

Local files are parsed with the standard library (``json``, ``csv``) and pyarrow, not with
``datasets.load_dataset``: its CSV reader (pandas) turns cells such as ``NA`` or ``007`` into null or 7, its
JSON reader rejects columns whose type varies per row (a QA ``answers`` that is a string here and a list
there), and neither keeps line numbers for messages. The normalised rows become ``datasets.Dataset`` objects;
hub datasets go through ``datasets.load_dataset`` and :func:`normalize_dataset` (``Dataset.map``). Nothing
here imports torch, and :func:`check_task` does not import ``datasets`` for local tasks, so the CLI check
stays fast.

Where an error points: ``file.jsonl:7`` is the 1-based line; ``file.csv: row 3`` the 1-based CSV record with
the header as row 1 (the line number unless a cell spans lines); ``file.json: index 2`` and
``file.parquet: index 2`` the 0-based position in the array or table. Bytes that are not UTF-8 are named by
line (``file.csv:7``). Blank lines of a JSONL or CSV file hold no row and are skipped (they keep their
numbers), so the row counts :func:`check_task` returns leave them out. :func:`check_task` can refuse rows over
a size (``max_row_bytes``, the spec's ``data.max_row_bytes``): a JSONL line, the cells of a CSV record, or a
JSON or Parquet row written as compact JSON.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from peftsweep.trainables import chat
from peftsweep.trainables.data import DataError, json_reason, resolve_task_dir
from peftsweep.vocab import BUILTIN_PREFIX, FORMAT_ROLES, FORMATS, HF_PREFIX, ChatLoss, DataFormat

if TYPE_CHECKING:
    import datasets

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")  # the file types a task file or split file may have
SPLITS = ("train", "validation", "test")  # the keys of load_task's result, in carving order after train
DEFAULT_SPLIT = (0.8, 0.1, 0.1)  # train/validation/test fractions of a single-file task
DEFAULT_SPLIT_SEED = 0
DEFAULT_CHAT_LOSS: ChatLoss = "all_assistant"  # data.chat_loss's default, for callers without a spec
FRACTION_TOLERANCE = 1e-6  # float sums such as 0.7 + 0.2 + 0.1 == 0.9999999999999999 still count as 1
# File stems a directory may hold per split; "eval" is the original layout (train.jsonl, eval.jsonl).
DIR_SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "eval"), "test": ("test",)}
# Split names of hub datasets, per split; the first present one is used.
HF_SPLIT_NAMES = {
    "train": ("train",),
    "validation": ("validation", "valid", "dev", "eval"),
    "test": ("test",),
}
# Chat message styles, told apart per row by the first message's keys: OpenAI {"role", "content"} and
# ShareGPT {"from", "value"}, whose roles map onto OpenAI's. No "tool" turns: they carry extra fields.
CHAT_STYLES = {
    "OpenAI": ("role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "ShareGPT": ("from", "value", {"system": "system", "human": "user", "gpt": "assistant"}),
}
COLUMNS = ("prompt", "completion", "answers", "tests", "segments")  # every normalised row has exactly these

Format = DataFormat
Row = dict[str, Any]

# Prompt templates, filled with str.format (braces inside the values are safe). Prompts end where the model
# starts writing, so the completion follows directly. prompt_completion and code use the prompt as it is:
# a code prompt is a signature + docstring whose completion is the indented body.
MATH_TEMPLATE = "Question: {question}\nAnswer: "
CLASSIFICATION_TEMPLATE = "{text}\nLabel: "
QA_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer: "
QA_TEMPLATE_NO_CONTEXT = "Question: {question}\nAnswer: "  # context missing, null or blank
# The Stanford Alpaca templates, with and without an input (missing, null or blank).
INSTRUCTION_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
INSTRUCTION_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# Chat is rendered by the tokenizer's chat template, or plain "role: content" lines without one: see chat.py.


# --------------------------------------------------------------------------------------------- task strings


@dataclass(frozen=True)
class TaskSource:
    """Where a task's rows come from, parsed from the ``task`` string."""

    kind: Literal["file", "dir", "hf"]  # builtin:NAME resolves to its packaged directory ("dir")
    path: Path | None = None  # absolute (Ray workers run in another directory); file and dir only
    hf_id: str | None = None
    hf_config: str | None = None

    @property
    def label(self) -> str:
        """How messages name the source."""
        if self.kind == "hf":
            return f"{HF_PREFIX}{self.hf_id}" + (f":{self.hf_config}" if self.hf_config else "")
        return str(self.path)


def parse_task(task: str) -> TaskSource:
    """``hf:<id>[:config]``, ``builtin:NAME``, or a local file/directory (which must exist)."""
    if task.startswith(HF_PREFIX):
        hf_id, _, config = task[len(HF_PREFIX) :].partition(":")  # hub ids never contain ':'
        if not hf_id.strip() or (_ and not config.strip()):
            raise DataError(f"{task!r}: expected hf:<dataset id>[:<config>], e.g. hf:openai/gsm8k:main")
        return TaskSource("hf", hf_id=hf_id.strip(), hf_config=config.strip() or None)
    if task.startswith(BUILTIN_PREFIX):
        return TaskSource("dir", path=resolve_task_dir(task))
    try:
        path = Path(task).expanduser().resolve()
        is_dir, is_file = path.is_dir(), path.is_file()
    except (OSError, ValueError, RuntimeError) as exc:  # ~unknown-user, a NUL byte, a name too long
        raise DataError(f"{task!r}: not a usable path ({exc})") from None
    if is_dir:
        return TaskSource("dir", path=path)
    if not is_file:
        raise DataError(f"{path}: task not found (expected a file {'/'.join(EXTENSIONS)} or a directory)")
    _extension(path)
    return TaskSource("file", path=path)


def _extension(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; use one of {list(EXTENSIONS)}"
        )
    return suffix


# --------------------------------------------------------------------------------------------- fields


def resolve_fields(fmt: str, fields: Mapping[str, str] | None = None) -> dict[str, str]:
    """Role -> column name of ``fmt``: the defaults of FORMAT_ROLES overridden by ``fields``."""
    if fmt not in FORMAT_ROLES:
        raise DataError(f"unknown format {fmt!r}; choose one of {list(FORMATS)}")
    roles = FORMAT_ROLES[fmt]
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(roles))
    if unknown:
        raise DataError(f"fields: format {fmt!r} has no role {unknown}; its roles are {list(roles)}")
    for role, column in fields.items():
        if not isinstance(column, str) or not column:
            raise DataError(f"fields.{role}: expected a non-empty column name, got {column!r}")
    return {role: fields.get(role, spec.column) for role, spec in roles.items()}


def _name(role: str, column: str) -> str:
    """How a message names a field: its column, and the role too where ``fields`` renamed it."""
    return repr(column) if role == column else f"{column!r} (role {role!r})"


def _get(row: Mapping[str, Any], role: str, column: str, required: bool, where: str) -> Any:
    """The raw value, or None for an optional field that is missing or null."""
    if column not in row:
        if required:
            raise DataError(f"{where}: field {_name(role, column)} missing (keys: {sorted(map(str, row))})")
        return None
    value = row[column]
    if value is None and required:
        raise DataError(f"{where}: field {_name(role, column)} is null")
    return value


def _text(value: Any, role: str, column: str, where: str, required: bool = True) -> str:
    """A string field; a required one must not be blank. Values are kept verbatim (code needs its spaces)."""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {_name(role, column)} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: field {_name(role, column)} is empty")
    return _unicode(value, f"field {_name(role, column)}", where)


def _unicode(value: str, what: str, where: str) -> str:
    """``value`` if it is valid Unicode text. A JSON escape such as ``\\ud800`` decodes to a lone surrogate,
    which passes as a str but fails in Arrow and the tokenizer, i.e. only inside a trial."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(
            f"{where}: {what} is not valid Unicode (unpaired surrogate {value[exc.start]!r} at character "
            f"{exc.start})"
        ) from None
    return value


def _label(value: Any, role: str, column: str, where: str) -> str:
    if isinstance(value, int):  # bool is an int too: True -> "True", 1 -> "1"
        return str(value)
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {_name(role, column)} must be a string, int or bool, got {type(value).__name__}"
        )
    return _text(value, role, column, where)


def _answers(value: Any, role: str, column: str, where: str) -> list[str]:
    """A string, a list of strings (or of {"text": ...}), or SQuAD's {"text": [...], ...}; none blank."""
    if isinstance(value, Mapping):
        if "text" not in value:
            raise DataError(f"{where}: field {_name(role, column)} is an object without 'text' (SQuAD style)")
        value = value["text"]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise DataError(
            f"{where}: field {_name(role, column)} must be a string, a list of strings or "
            f'{{"text": [...]}}, got {type(value).__name__}'
        )
    if not value:
        raise DataError(f"{where}: field {_name(role, column)} has no answer")
    out = []
    for i, item in enumerate(value):
        text = item.get("text") if isinstance(item, Mapping) else item
        out.append(_text(text, role, f"{column}[{i}]", where))
    return out


def _messages(value: Any, role: str, column: str, where: str) -> list[dict[str, str]]:
    """Chat turns as ``[{"role", "content"}, ...]``, the assistant's last; a JSON string (CSV) is decoded.

    A row's turns are OpenAI-style or ShareGPT-style, as its first turn's keys say (:data:`CHAT_STYLES`).
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise DataError(
                f"{where}: field {_name(role, column)} is a string but not JSON ({json_reason(exc)})"
            ) from None
    if not isinstance(value, list | tuple):
        raise DataError(
            f"{where}: field {_name(role, column)} must be a list of messages, got {type(value).__name__}"
        )
    if len(value) < 2:  # at least one prompt turn, then the assistant's answer
        raise DataError(
            f"{where}: field {_name(role, column)} needs prompt message(s) then an assistant message, "
            f"got {len(value)} message(s)"
        )
    # Hub datasets (Arrow structs) hold the union of keys per turn, absent ones as None: look at values.
    first = value[0] if isinstance(value[0], Mapping) else {}
    style = "ShareGPT" if first.get("from") is not None and first.get("role") is None else "OpenAI"
    out = [_message(msg, style, f"{where}: {column}[{i}]") for i, msg in enumerate(value)]
    if out[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message of {_name(role, column)} must be the assistant's (role 'assistant', "
            f"ShareGPT 'gpt'): it is the completion; got {out[-1]['role']!r}"
        )
    if not out[-1]["content"].strip():
        raise DataError(f"{where}: the final assistant message of {_name(role, column)} is empty")
    return out


def _message(msg: Any, style: str, at: str) -> dict[str, str]:
    """One turn of a ``style`` row as ``{"role", "content"}`` with the OpenAI role name."""
    role_key, content_key, roles = CHAT_STYLES[style]
    if not isinstance(msg, Mapping):
        raise DataError(
            f"{at}: expected an object with {role_key!r} and {content_key!r}, got {type(msg).__name__}"
        )
    for key in (role_key, content_key):
        if msg.get(key) is None:
            raise DataError(f"{at}: {key!r} missing in a {style}-style turn (keys: {sorted(map(str, msg))})")
    if msg[role_key] not in roles:
        raise DataError(
            f"{at}: unknown {style} role {msg[role_key]!r} in {role_key!r} (expected one of {list(roles)})"
        )
    if not isinstance(msg[content_key], str):
        raise DataError(f"{at}: {content_key!r} must be a string, got {type(msg[content_key]).__name__}")
    return {"role": roles[msg[role_key]], "content": _unicode(msg[content_key], repr(content_key), at)}


# --------------------------------------------------------------------------------------------- normalising


def _row(
    prompt: str,
    completion: str,
    answers: list[str] | None = None,
    tests: str = "",
    segments: list[str] | None = None,
) -> Row:
    return {
        "prompt": prompt,
        "completion": completion,
        "answers": answers or [completion],
        "tests": tests,
        "segments": segments or [],
    }


def _chat_row(messages: list[dict[str, str]], tokenizer: Any | None, chat_loss: ChatLoss, where: str) -> Row:
    """A conversation as its rendered segments; the prompt is everything before the last target."""
    try:
        pieces = chat.segments(messages, tokenizer, chat_loss)
    except chat.TemplateMismatch as exc:
        raise DataError(f"{where}: {exc}") from None
    except Exception as exc:  # a Jinja template may reject a conversation (e.g. a system turn)
        raise DataError(f"{where}: the tokenizer's chat template failed: {exc}") from exc
    return _row("".join(pieces[:-1]), messages[-1]["content"], segments=pieces)


def _normalizer(
    fmt: str, columns: Mapping[str, str], tokenizer: Any | None, chat_loss: ChatLoss
) -> Callable[[Mapping, str], Row]:
    """A function (raw row, where) -> normalised row for one format, raising DataError on a bad row."""
    roles = FORMAT_ROLES[fmt]

    def get(row: Mapping[str, Any], role: str, where: str) -> Any:
        return _get(row, role, columns[role], roles[role].required, where)

    def text(row: Mapping[str, Any], role: str, where: str) -> str:
        value = get(row, role, where)
        if value is None:  # optional and absent
            return ""
        return _text(value, role, columns[role], where, required=roles[role].required)

    def normalize(row: Mapping[str, Any], where: str) -> Row:
        if fmt == "prompt_completion":
            return _row(text(row, "prompt", where), text(row, "completion", where))
        if fmt == "math":
            question = text(row, "question", where)
            return _row(MATH_TEMPLATE.format(question=question), text(row, "answer", where))
        if fmt == "classification":
            body = text(row, "text", where)
            label = _label(get(row, "label", where), "label", columns["label"], where)
            return _row(CLASSIFICATION_TEMPLATE.format(text=body), label)
        if fmt == "qa":
            question = text(row, "question", where)
            context = text(row, "context", where)
            answers = _answers(get(row, "answers", where), "answers", columns["answers"], where)
            template = QA_TEMPLATE if context.strip() else QA_TEMPLATE_NO_CONTEXT
            return _row(template.format(context=context, question=question), answers[0], answers)
        if fmt == "instruction":
            instruction, extra = text(row, "instruction", where), text(row, "input", where)
            template = INSTRUCTION_TEMPLATE if extra.strip() else INSTRUCTION_TEMPLATE_NO_INPUT
            return _row(template.format(instruction=instruction, input=extra), text(row, "output", where))
        if fmt == "chat":
            messages = _messages(get(row, "messages", where), "messages", columns["messages"], where)
            return _chat_row(messages, tokenizer, chat_loss, where)
        if fmt == "code":
            tests = get(row, "tests", where)
            if isinstance(tests, list | tuple):  # MBPP style: one assert per item
                tests = "\n".join(
                    _text(t, "tests", f"{columns['tests']}[{i}]", where) for i, t in enumerate(tests)
                )
            elif tests is not None:
                tests = _text(tests, "tests", columns["tests"], where, required=False)
            return _row(text(row, "prompt", where), text(row, "completion", where), tests=tests or "")
        raise AssertionError(f"format {fmt!r} has roles but no normaliser")  # FORMAT_ROLES and this disagree

    return normalize


def _normalize_located(
    located: Iterable[tuple[str, Mapping[str, Any]]],
    fmt: str,
    fields: Mapping[str, str] | None,
    source: str,
    tokenizer: Any | None,
    chat_loss: ChatLoss,
) -> list[Row]:
    """Normalise ``(where, row)`` pairs, stopping at the first bad row.

    An optional column that ``fields`` names explicitly must occur in some row: a typo in it would otherwise
    silently drop e.g. every QA context.
    """
    columns = resolve_fields(fmt, fields)
    normalize = _normalizer(fmt, columns, tokenizer, chat_loss)
    explicit = {role: columns[role] for role in (fields or {}) if not FORMAT_ROLES[fmt][role].required}
    seen: set[str] = set()
    rows = []
    for where, raw in located:
        rows.append(normalize(raw, where))
        seen.update(col for col in explicit.values() if col in raw)
    for role, column in explicit.items():
        if rows and column not in seen:
            raise DataError(f"{source}: column {column!r} (fields.{role}) is in no row")
    return rows


def normalize_rows(
    rows: Iterable[Mapping[str, Any]],
    fmt: str,
    fields: Mapping[str, str] | None,
    source: str,
    tokenizer: Any | None = None,
    chat_loss: ChatLoss = DEFAULT_CHAT_LOSS,
) -> list[Row]:
    """Rows of ``fmt`` as :data:`COLUMNS`; errors say ``source: index i``."""
    located = ((f"{source}: index {i}", row) for i, row in enumerate(rows))
    return _normalize_located(located, fmt, fields, source, tokenizer, chat_loss)


def normalize_dataset(
    ds: datasets.Dataset,
    fmt: str,
    fields: Mapping[str, str] | None,
    source: str,
    tokenizer: Any | None = None,
    chat_loss: ChatLoss = DEFAULT_CHAT_LOSS,
) -> datasets.Dataset:
    """:func:`normalize_rows` as a ``Dataset.map``, for datasets too big to hold as Python rows (the hub)."""
    columns = resolve_fields(fmt, fields)
    needed = {
        role: col
        for role, col in columns.items()
        if FORMAT_ROLES[fmt][role].required or role in (fields or {})
    }
    for role, col in needed.items():
        if col not in ds.column_names:
            raise DataError(f"{source}: column {_name(role, col)} missing (columns: {ds.column_names})")
    normalize = _normalizer(fmt, columns, tokenizer, chat_loss)
    return ds.map(
        lambda row, i: normalize(row, f"{source}: index {i}"),
        with_indices=True,
        remove_columns=ds.column_names,
        features=_features(),
        desc=f"normalising {source}",
    )


def has_tests(rows: Iterable[Mapping[str, Any]]) -> bool:
    """Whether every row has non-blank ``tests`` (and there is a row): the pass@k metric needs them."""
    seen = False
    for row in rows:
        seen = True
        if not str(row.get("tests") or "").strip():
            return False
    return seen


# --------------------------------------------------------------------------------------------- reading


@dataclass
class _Records:
    """Raw rows of one file with where each one is, and the file's columns where it has a header/schema."""

    rows: list[tuple[str, dict[str, Any]]]
    columns: list[str] | None = None
    header: str = ""  # how messages name the header/schema


def _check_size(where: str, size: int, limit: int | None) -> None:
    """Refuse a row of more than ``limit`` bytes (None: no limit), naming the row and the limit."""
    if limit is not None and size > limit:
        raise DataError(
            f"{where}: row is {size:,} bytes, over the limit of {limit:,} bytes (data.max_row_bytes); "
            "fix the row or raise the limit"
        )


def _json_bytes(row: Any) -> int:
    """A parsed row's size as compact UTF-8 JSON (what the row-size limit measures for JSON and Parquet)."""
    text = json.dumps(row, ensure_ascii=False, separators=(",", ":"), default=str)
    return len(text.encode("utf-8", "surrogatepass"))


def _decode(path: Path) -> str:
    """The whole file as text (UTF-8, an optional BOM dropped); bytes that are not UTF-8 are named by line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({exc.reason})") from None


@contextmanager
def _csv_fields_unbounded() -> Iterator[None]:
    """Lift the csv module's 128 KiB cell limit while reading: rows are held to ``max_row_bytes`` instead,
    so a file that passes :func:`check_task` also loads (:func:`load_task` has no limit)."""
    previous = csv.field_size_limit(sys.maxsize)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _read_jsonl(path: Path, max_row_bytes: int | None = None) -> _Records:
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            _check_size(where, len(raw.rstrip(b"\r\n")), max_row_bytes)  # before parsing a huge line
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):  # editors on Windows write one
                raw = raw[len(codecs.BOM_UTF8) :]
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
            rows.append((where, obj))
    return _Records(rows)


def _read_json(path: Path, max_row_bytes: int | None = None) -> _Records:
    """A JSON array of objects; a ``.json`` file holding JSON Lines (many hub exports do) is read as such."""
    text = _decode(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a second top-level value: JSON Lines
            return _read_jsonl(path, max_row_bytes)
        if not text.strip():
            raise DataError(f"{path}: empty file (expected a JSON array of objects)") from None
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({json_reason(exc)})") from None
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{path}: invalid JSON ({json_reason(exc)})") from None
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON array of objects (or JSON Lines), got {type(data).__name__}"
        )
    rows = []
    for i, obj in enumerate(data):
        where = f"{path}: index {i}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if max_row_bytes is not None:
            _check_size(where, _json_bytes(obj), max_row_bytes)
        rows.append((where, obj))
    return _Records(rows)


def _read_csv(path: Path, max_row_bytes: int | None = None) -> _Records:
    """Every cell a string, nothing coerced; row N is the N-th record with the header as row 1."""
    rows = []
    header: list[str] | None = None
    n = 0
    text = _decode(path)  # whole: a decoding error inside csv's buffered reads would name the wrong row
    try:
        with _csv_fields_unbounded():
            for n, cells in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
                if not cells:  # a blank line: no row, but it keeps its number
                    continue
                where = f"{path}: row {n}" + (" (header)" if header is None else "")
                if max_row_bytes is not None:
                    _check_size(where, sum(len(c.encode("utf-8")) for c in cells), max_row_bytes)
                if header is None:
                    header = cells
                    duplicates = sorted({c for c in cells if cells.count(c) > 1})
                    if duplicates:
                        raise DataError(f"{where}: duplicate column(s) {duplicates}")
                    continue
                if len(cells) != len(header):
                    raise DataError(f"{where}: {len(cells)} cells, but the header has {len(header)} columns")
                rows.append((where, dict(zip(header, cells, strict=True))))
    except csv.Error as exc:
        raise DataError(f"{path}: row {n + 1}: invalid CSV ({exc})") from None
    if header is None:
        raise DataError(f"{path}: empty file (a CSV task needs a header row)")
    return _Records(rows, header, f"{path}: row 1 (header)")


def _read_parquet(path: Path, max_row_bytes: int | None = None) -> _Records:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read as parquet ({exc})") from None
    rows = [(f"{path}: index {i}", row) for i, row in enumerate(table.to_pylist())]
    if max_row_bytes is not None:
        for where, row in rows:
            _check_size(where, _json_bytes(row), max_row_bytes)
    return _Records(rows, table.column_names, f"{path}: schema")


# Each reader takes the file and the row-size limit in bytes (None: no limit).
READERS: dict[str, Callable[[Path, int | None], _Records]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def read_file(
    path: Path,
    fmt: str,
    fields: Mapping[str, str] | None,
    tokenizer: Any | None = None,
    max_row_bytes: int | None = None,
    chat_loss: ChatLoss = DEFAULT_CHAT_LOSS,
) -> list[Row]:
    """All rows of one local file, validated and normalised; a file with no row is an error.

    ``max_row_bytes``: refuse a bigger row (the module docstring says how rows are measured); None: no limit.
    """
    columns = resolve_fields(fmt, fields)
    suffix = _extension(path)
    try:
        if max_row_bytes is not None and suffix != ".parquet" and path.stat().st_size <= max_row_bytes:
            max_row_bytes = None  # no row of a file this small can be bigger (parquet is compressed)
        records = READERS[suffix](path, max_row_bytes)
    except OSError as exc:  # unreadable: no permission, removed meanwhile
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if records.columns is not None:  # a header or schema: a missing column is the file's fault, say so once
        for role, column in columns.items():
            if (FORMAT_ROLES[fmt][role].required or role in (fields or {})) and column not in records.columns:
                raise DataError(
                    f"{records.header}: column {_name(role, column)} missing (columns: {records.columns})"
                )
    rows = _normalize_located(records.rows, fmt, fields, str(path), tokenizer, chat_loss)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


# --------------------------------------------------------------------------------------------- splitting


def check_fractions(split: Sequence[float]) -> tuple[float, float, float]:
    """(train, validation, test) fractions: three numbers in [0, 1] summing to 1, train > 0."""
    try:
        fractions = tuple(float(f) for f in split)
    except (TypeError, ValueError):
        raise DataError(f"split: expected three numbers (train, validation, test), got {split!r}") from None
    if len(fractions) != len(SPLITS):
        raise DataError(f"split: expected three fractions (train, validation, test), got {list(fractions)}")
    if any(not math.isfinite(f) or not 0 <= f <= 1 for f in fractions):
        raise DataError(f"split: every fraction must lie in [0, 1], got {list(fractions)}")
    if abs(sum(fractions) - 1) > FRACTION_TOLERANCE:
        raise DataError(f"split: fractions {list(fractions)} sum to {sum(fractions):g}, not 1")
    if fractions[0] <= 0:
        raise DataError(f"split: the train fraction must be > 0, got {list(fractions)}")
    return fractions[0], fractions[1], fractions[2]


def carve(n: int, fractions: Mapping[str, float], seed: int, source: str) -> dict[str, list[int]]:
    """Row indices per split, a seeded shuffle of ``range(n)`` cut into consecutive pieces.

    ``fractions`` holds "train" and the splits to carve; they are re-normalised to sum to 1 (a directory with
    a test file carves only validation, at validation / (train + validation)). Each carved split gets
    ``floor(n * fraction + 0.5)`` rows (round half up), at least one when its fraction is > 0, and train keeps
    the rest, at least one row; a split that cannot get its row is an error, not silently empty. Indices keep
    the shuffled order, so any prefix of a split (e.g. ``max_eval_examples``) is a random sample. Python's
    ``random.Random`` is stable across versions, so the same seed gives the same split everywhere.
    """
    total = sum(fractions.values())
    carved = [s for s in SPLITS if s != "train" and s in fractions]
    sizes = {s: math.floor(n * fractions[s] / total + 0.5) for s in carved}
    excess = sum(sizes.values()) - (n - 1)  # train must keep a row; take back from test first
    for s in reversed(carved):
        take = max(0, min(excess, sizes[s]))
        sizes[s] -= take
        excess -= take
    for s in carved:
        if fractions[s] > 0 and sizes[s] == 0 and n - sum(sizes.values()) > 1:
            sizes[s] = 1
    for s in carved:
        if fractions[s] > 0 and sizes[s] == 0:
            raise DataError(
                f"{source}: {n} row(s) are too few for a non-empty {s} split besides train; "
                f"add rows, provide a {s} file, or set its split fraction to 0"
            )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    out, start = {}, 0
    for s in carved:
        out[s] = order[start : start + sizes[s]]
        start += sizes[s]
    out["train"] = order[start:]
    return out


def _split_files(directory: Path) -> dict[str, Path]:
    """The split files of a task directory: train required, validation (or eval) and test optional."""
    found = {}
    for split, stems in DIR_SPLIT_STEMS.items():
        paths = [directory / f"{stem}{ext}" for stem in stems for ext in EXTENSIONS]
        paths = [p for p in paths if p.is_file()]
        if len(paths) > 1:
            raise DataError(f"{directory}: several files for split {split!r}: {[p.name for p in paths]}")
        if paths:
            found[split] = paths[0]
    if "train" not in found:
        raise DataError(
            f"{directory}: no train file (expected train{{{','.join(EXTENSIONS)}}}, "
            "optionally validation (or eval) and test with the same extensions)"
        )
    return found


def _local_splits(
    source: TaskSource,
    fmt: str,
    fields: Mapping[str, str] | None,
    fractions: tuple[float, float, float],
    seed: int,
    tokenizer: Any | None,
    max_row_bytes: int | None = None,
    chat_loss: ChatLoss = DEFAULT_CHAT_LOSS,
) -> dict[str, list[Row]]:
    """Normalised rows per split of a file or directory task; every file is validated before any split."""
    assert source.path is not None  # file and dir sources always carry one
    by_name = dict(zip(SPLITS, fractions, strict=True))
    files = {"train": source.path} if source.kind == "file" else _split_files(source.path)
    rows = {
        split: read_file(path, fmt, fields, tokenizer, max_row_bytes, chat_loss)
        for split, path in files.items()
    }
    # A directory's files are the user's split: only a missing validation file is carved out of train (the
    # search needs one); without a test file there is no test split, and train keeps every row.
    missing = [s for s in SPLITS if s not in files and (source.kind == "file" or s == "validation")]
    if missing:
        pool = rows["train"]
        cut = carve(len(pool), {s: by_name[s] for s in ("train", *missing)}, seed, str(files["train"]))
        rows.update({s: [pool[i] for i in idx] for s, idx in cut.items()})
    return {s: rows.get(s, []) for s in SPLITS}


def _hf_splits(
    source: TaskSource,
    fmt: str,
    fields: Mapping[str, str] | None,
    fractions: tuple[float, float, float],
    seed: int,
    tokenizer: Any | None,
    chat_loss: ChatLoss = DEFAULT_CHAT_LOSS,
) -> dict[str, datasets.Dataset]:
    """A hub dataset via ``datasets.load_dataset(id, config)`` (needs network or the local HF cache).

    Hub split names train / validation (valid, dev, eval) / test are used where present; missing ones are
    carved out of train like a directory's. Any loading failure (offline, unknown id or config, gated) becomes
    a DataError naming the dataset.
    """
    import datasets

    resolve_fields(fmt, fields)  # a bad format or fields mapping is reported before any download
    try:
        loaded = datasets.load_dataset(source.hf_id, source.hf_config)
    except Exception as exc:  # ConnectionError offline, DatasetNotFoundError, ValueError for a bad config...
        raise DataError(
            f"{source.label}: cannot load the dataset from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}); check the id and config, the network, or the local HF cache"
        ) from exc
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"{source.label}: expected a dataset with splits, got {type(loaded).__name__}")
    names = {split: next((n for n in HF_SPLIT_NAMES[split] if n in loaded), None) for split in SPLITS}
    if names["train"] is None:
        raise DataError(f"{source.label}: no train split (splits: {list(loaded)})")
    out = {
        split: normalize_dataset(loaded[name], fmt, fields, f"{source.label}[{name}]", tokenizer, chat_loss)
        for split, name in names.items()
        if name is not None
    }
    if len(out["train"]) == 0:
        raise DataError(f"{source.label}[{names['train']}]: no rows")
    missing = [s for s in SPLITS if s not in out]
    if missing:
        by_name = dict(zip(SPLITS, fractions, strict=True))
        pool = out["train"]
        cut = carve(len(pool), {s: by_name[s] for s in ("train", *missing)}, seed, source.label)
        out.update({s: pool.select(idx) for s, idx in cut.items()})
    return {s: out[s] for s in SPLITS}


# --------------------------------------------------------------------------------------------- public API


def _features() -> datasets.Features:
    import datasets

    string = datasets.Value("string")
    return datasets.Features(
        {
            "prompt": string,
            "completion": string,
            "answers": datasets.List(string),
            "tests": string,
            "segments": datasets.List(string),
        }
    )


def _to_dataset(rows: list[Row]) -> datasets.Dataset:
    import datasets

    return datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in COLUMNS}, features=_features())


def load_task(
    task: str,
    fmt: str = "prompt_completion",
    fields: Mapping[str, str] | None = None,
    split: Sequence[float] = DEFAULT_SPLIT,
    split_seed: int = DEFAULT_SPLIT_SEED,
    tokenizer: Any | None = None,
    chat_loss: ChatLoss = DEFAULT_CHAT_LOSS,
) -> dict[str, datasets.Dataset]:
    """``{"train", "validation", "test"}`` datasets with exactly the columns :data:`COLUMNS`.

    A single file is split by ``split`` fractions with ``split_seed``; a directory (``builtin:NAME`` too) uses
    its split files and carves only the missing ones out of train (see :func:`carve`). ``tokenizer`` and
    ``chat_loss`` only matter for ``chat``: its chat template renders the rows, and ``chat_loss`` picks the
    assistant turns that are targets.
    """
    fractions = check_fractions(split)
    resolve_fields(fmt, fields)  # a bad format or fields mapping is reported before the files are read
    source = parse_task(task)
    if source.kind == "hf":
        return _hf_splits(source, fmt, fields, fractions, split_seed, tokenizer, chat_loss)
    rows = _local_splits(source, fmt, fields, fractions, split_seed, tokenizer, chat_loss=chat_loss)
    return {s: _to_dataset(r) for s, r in rows.items()}


def check_task(
    task: str,
    fmt: str = "prompt_completion",
    fields: Mapping[str, str] | None = None,
    split: Sequence[float] = DEFAULT_SPLIT,
    split_seed: int = DEFAULT_SPLIT_SEED,
    max_row_bytes: int | None = None,
) -> dict[str, int]:
    """Validate every row and the split of a task, without torch; return the rows per split.

    For the CLI before any Ray work: local tasks need neither ``datasets`` nor a tokenizer (chat is checked
    structurally; a chat template is only applied in the trial). An ``hf:`` task is downloaded to do this.
    ``max_row_bytes`` refuses bigger rows of local files (None: no limit; the spec sets data.max_row_bytes).
    """
    fractions = check_fractions(split)
    resolve_fields(fmt, fields)  # a bad format or fields mapping is reported before the files are read
    source = parse_task(task)
    if source.kind == "hf":
        return {s: len(ds) for s, ds in _hf_splits(source, fmt, fields, fractions, split_seed, None).items()}
    rows = _local_splits(source, fmt, fields, fractions, split_seed, None, max_row_bytes)
    return {s: len(r) for s, r in rows.items()}
