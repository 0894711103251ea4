"""Bad data files end in a DataError (SpecError through check_inputs) that names the file and the row.

Missing fields and columns, empty rows and strings, bytes that are not UTF-8, text that is not Unicode, huge
rows, JSON that is not a list or is nested too deeply, empty files. Policies pinned here:

- Blank lines of a JSONL or CSV file are skipped (they hold no row and keep their numbers); the returned row
  counts leave them out.
- A row over ``data.max_row_bytes`` (default 1 MiB, see DataSpec) is an error naming the row and the limit;
  a bigger limit accepts it. Below the limit, CSV cells are not capped by the csv module's own 128 KiB.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from peftsweep.orchestrator.sweep import check_inputs
from peftsweep.spec import DataSpec, SpecError, parse_spec
from peftsweep.trainables.data import DataError, check_task_files
from peftsweep.trainables.formats import check_task, load_task
from tests.trainables.test_data import GOOD, write_task
from tests.trainables.test_formats import pc_rows, write

LIMIT = DataSpec().max_row_bytes  # the spec's default row-size limit
HUGE = "x" * (5 * 2**20)  # a 5 MiB value: far over the default limit
WHOLE = (1.0, 0.0, 0.0)  # no carving: the file's rows stay in train
OVER = f"bytes, over the limit of {LIMIT:,} bytes (data.max_row_bytes); fix the row or raise the limit"


def _error(path: Path, fmt: str = "prompt_completion", max_row_bytes: int | None = LIMIT) -> str:
    with pytest.raises(DataError) as info:
        check_task(str(path), fmt, split=WHOLE, max_row_bytes=max_row_bytes)
    return str(info.value)


def _raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _line(row: dict[str, Any]) -> bytes:
    return json.dumps(row).encode() + b"\n"


# ------------------------------------------------------------------------------------ each kind of bad row

CASES = [  # id, file name, content (rows for `write`, or raw bytes), format, where it points, what it says
    (
        "missing-field",
        "d.jsonl",
        [*pc_rows(1), {"prompt": "p"}],
        "prompt_completion",
        ":2: ",
        "'completion' missing",
    ),
    ("null-field", "d.jsonl", [{"question": "q", "answer": None}], "math", ":1: ", "field 'answer' is null"),
    ("empty-object", "d.jsonl", [*pc_rows(2), {}], "prompt_completion", ":3: ", "missing (keys: [])"),
    ("empty-string", "d.jsonl", [{"prompt": "", "completion": "c"}], "prompt_completion", ":1: ", "is empty"),
    (
        "blank-string",
        "d.json",
        [*pc_rows(2), {"prompt": "p", "completion": " \n"}],
        "prompt_completion",
        ": index 2: ",
        "field 'completion' is empty",
    ),
    (
        "csv-empty-cell",
        "d.csv",
        [["text", "label"], ["good", "pos"], [], ["", "neg"]],
        "classification",
        ": row 4: ",
        "field 'text' is empty",
    ),  # the blank line keeps its number
    (
        "csv-missing-column",
        "d.csv",
        [["prompt", "answer"], ["p", "c"]],
        "prompt_completion",
        ": row 1 (header): ",
        "column 'completion' missing (columns: ['prompt', 'answer'])",
    ),
    (
        "csv-short-row",
        "d.csv",
        [["prompt", "completion"], ["p"]],
        "prompt_completion",
        ": row 2: ",
        "1 cells, but the header has 2 columns",
    ),
    (
        "parquet-missing-column",
        "d.parquet",
        [{"prompt": "p"}],
        "prompt_completion",
        ": schema: ",
        "column 'completion' missing",
    ),
    (
        "jsonl-not-utf8",
        "d.jsonl",
        b'{"prompt": "p", "completion": "c"}\n{"prompt": "caf\xe9", "completion": "c"}\n',
        "prompt_completion",
        ":2: ",
        "not UTF-8 (invalid continuation byte)",
    ),
    (
        "json-not-utf8",
        "d.json",
        b'[{"prompt": "p", "completion": "c"},\n\n {"prompt": "\xff", "completion": "c"}]',
        "prompt_completion",
        ":3: ",
        "not UTF-8 (invalid start byte)",
    ),
    # Past the first 8 KiB: csv decodes in chunks, which used to put the blame on an earlier row.
    (
        "csv-not-utf8-late",
        "d.csv",
        b"prompt,completion\n" + b"p,c\n" * 5000 + b"\xff,c\n",
        "prompt_completion",
        ":5002: ",
        "not UTF-8 (invalid start byte)",
    ),
    (
        "utf16",
        "d.jsonl",
        '{"prompt": "p", "completion": "c"}\n'.encode("utf-16"),
        "prompt_completion",
        ":1: ",
        "not UTF-8",
    ),
    (
        "lone-surrogate",
        "d.jsonl",
        [*pc_rows(1), '{"prompt": "\\ud800", "completion": "c"}'],
        "prompt_completion",
        ":2: ",
        "field 'prompt' is not valid Unicode (unpaired surrogate '\\ud800' at character 0)",
    ),
    (
        "chat-lone-surrogate",
        "d.jsonl",
        [{"messages": [{"role": "user", "content": "hi \udfff"}, {"role": "assistant", "content": "yo"}]}],
        "chat",
        ":1: messages[0]: ",
        "'content' is not valid Unicode",
    ),
    (
        "jsonl-nested-too-deeply",
        "d.jsonl",
        [*pc_rows(1), "[" * 100_000 + "]" * 100_000],
        "prompt_completion",
        ":2: ",
        "invalid JSON (nested too deeply)",
    ),
    (
        "json-nested-too-deeply",
        "d.json",
        b"[" * 100_000 + b"]" * 100_000,
        "prompt_completion",
        "",
        ": invalid JSON (nested too deeply)",
    ),
    (
        "integer-too-long",
        "d.jsonl",
        b'{"prompt": "p", "completion": "c", "id": ' + b"9" * 5000 + b"}\n",
        "prompt_completion",
        ":1: ",
        "invalid JSON (Exceeds the limit (4300 digits) for integer string conversion",
    ),
    (
        "json-object-not-list",
        "d.json",
        {"prompt": "p", "completion": "c"},
        "prompt_completion",
        "",
        ": expected a JSON array of objects (or JSON Lines), got dict",
    ),
    (
        "json-string-not-list",
        "d.json",
        b'"prompt"',
        "prompt_completion",
        "",
        ": expected a JSON array of objects (or JSON Lines), got str",
    ),
    (
        "json-array-of-arrays",
        "d.json",
        [["p", "c"]],
        "prompt_completion",
        ": index 0: ",
        "expected a JSON object, got list",
    ),
    ("empty-jsonl", "d.jsonl", b"", "prompt_completion", "", ": no rows"),
    ("blank-jsonl", "d.jsonl", b"\n  \n\n", "prompt_completion", "", ": no rows"),
    ("empty-json", "d.json", b"", "prompt_completion", "", ": empty file (expected a JSON array of objects)"),
    ("empty-json-array", "d.json", b"[]", "prompt_completion", "", ": no rows"),
    ("empty-csv", "d.csv", b"", "prompt_completion", "", ": empty file (a CSV task needs a header row)"),
    ("header-only-csv", "d.csv", b"prompt,completion\n", "prompt_completion", "", ": no rows"),
    ("empty-parquet", "d.parquet", b"", "prompt_completion", "", ": cannot read as parquet"),
    (
        "huge-jsonl-row",
        "d.jsonl",
        [*pc_rows(1), {"prompt": HUGE, "completion": "c"}],
        "prompt_completion",
        ":2: ",
        OVER,
    ),
    (
        "huge-csv-row",
        "d.csv",
        [["prompt", "completion"], ["p", "c"], [HUGE, "c"]],
        "prompt_completion",
        ": row 3: ",
        OVER,
    ),
    (
        "huge-csv-header",
        "d.csv",
        [[HUGE, "completion"], ["p", "c"]],
        "prompt_completion",
        ": row 1 (header): ",
        OVER,
    ),
    (
        "huge-json-row",
        "d.json",
        [*pc_rows(1), {"prompt": HUGE, "completion": "c"}],
        "prompt_completion",
        ": index 1: ",
        OVER,
    ),
    (
        "huge-parquet-row",
        "d.parquet",
        [*pc_rows(1), {"prompt": HUGE, "completion": "c"}],
        "prompt_completion",
        ": index 1: ",
        OVER,
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "fmt", "where", "what"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_file_is_named_by_file_and_row(
    tmp_path: Path, name: str, content: list[Any] | dict[str, Any] | bytes, fmt: str, where: str, what: str
) -> None:
    path = _raw(tmp_path / name, content) if isinstance(content, bytes) else write(tmp_path / name, content)
    message = _error(path, fmt)
    assert message.startswith(f"{path}{where}"), message
    assert what in message, message
    assert "Traceback" not in message


# ----------------------------------------------------------------------------------------- policies


def test_blank_lines_are_skipped_and_left_out_of_the_counts(tmp_path: Path) -> None:
    jsonl = write(tmp_path / "d.jsonl", [pc_rows(1)[0], "", "   ", *pc_rows(2), "\r"])
    assert check_task(str(jsonl), split=WHOLE) == {"train": 3, "validation": 0, "test": 0}
    csv_path = _raw(tmp_path / "d.csv", b"prompt,completion\n\np,c\n\n\nq,d\n")
    assert check_task(str(csv_path), split=WHOLE) == {"train": 2, "validation": 0, "test": 0}
    blank_then_bad = _raw(tmp_path / "e.jsonl", b"\n\n" + _line({"prompt": "p"}))
    assert _error(blank_then_bad).startswith(f"{blank_then_bad}:3: ")  # blank lines keep their numbers


def test_the_row_limit_is_a_spec_field_and_rows_under_it_load(tmp_path: Path) -> None:
    """A raised limit accepts the 5 MiB row; a 200 KiB CSV cell (over csv's own 128 KiB) checks and loads."""
    path = write(tmp_path / "d.jsonl", [*pc_rows(1), {"prompt": HUGE, "completion": "c"}])
    assert check_task(str(path), split=WHOLE, max_row_bytes=2 * len(HUGE))["train"] == 2
    wide = "y" * (200 * 2**10)
    csv_path = write(tmp_path / "d.csv", [["prompt", "completion"], ["p", "c"], [wide, "c"]])
    assert check_task(str(csv_path), split=WHOLE, max_row_bytes=LIMIT)["train"] == 2
    assert load_task(str(csv_path), split=WHOLE)["train"]["prompt"][1] == wide  # the trial's reader agrees


def test_the_default_limit_sits_well_above_any_training_length() -> None:
    from peftsweep.spec import TrainingSpec

    assert 1000 * TrainingSpec().max_length <= LIMIT  # a row this long is a broken export, not an example


def test_builtin_layout_checker_survives_deep_json_and_long_integers(tmp_path: Path) -> None:
    task = write_task(tmp_path / "t", [GOOD, "[" * 100_000 + "]" * 100_000])
    with pytest.raises(DataError, match=r"train\.jsonl:2: invalid JSON \(nested too deeply\)"):
        check_task_files(str(task))
    task = write_task(tmp_path / "u", [GOOD], ['{"prompt": "p", "completion": ' + "1" * 5000 + "}"])
    with pytest.raises(DataError, match=r"eval\.jsonl:1: invalid JSON \(Exceeds the limit"):
        check_task_files(str(task))


def test_a_directory_with_an_empty_split_file_names_that_file(tmp_path: Path) -> None:
    root = tmp_path / "task"
    write(root / "train.jsonl", pc_rows(4))
    _raw(root / "validation.jsonl", b"")
    message = _error(root)
    assert message.startswith(f"{root / 'validation.jsonl'}: no rows"), message


# ------------------------------------------------------------------------------------ through check_inputs


def _check(tmp_path: Path, **sections: Any) -> str:
    spec = parse_spec({"name": "t", "methods": ["lora"], **sections}, base_dir=tmp_path)
    with pytest.raises(SpecError) as info:
        check_inputs(spec)
    return str(info.value)


def test_check_inputs_names_the_section_the_file_and_the_row(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.jsonl", [*pc_rows(3), {"prompt": "p", "completion": ""}])
    message = _check(tmp_path, data={"task": str(bad)})
    assert message.startswith(f"data.task: {bad}:4: field 'completion' is empty"), message
    message = _check(tmp_path, forgetting={"task": str(bad)})
    assert message.startswith(f"forgetting.task: {bad}:4: "), message


def test_check_inputs_applies_the_spec_row_limit_to_all_data(tmp_path: Path) -> None:
    row = {"prompt": HUGE, "completion": "c"}
    huge = write(tmp_path / "huge.jsonl", [*pc_rows(9), row])
    message = _check(tmp_path, data={"task": str(huge)})
    assert message.startswith(f"data.task: {huge}:10: row is {len(json.dumps(row)):,} {OVER}"), message
    message = _check(tmp_path, forgetting={"task": str(huge)})
    assert message.startswith(f"forgetting.task: {huge}:10: row is"), message
    spec = parse_spec(
        {"name": "t", "methods": ["lora"], "data": {"task": str(huge), "max_row_bytes": 2 * len(HUGE)}}
    )
    assert check_inputs(spec)["data"] == {"train": 8, "validation": 1, "test": 1}


def test_check_inputs_refuses_a_split_without_validation_rows(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", pc_rows(10))
    message = _check(tmp_path, data={"task": str(path), "split": [1.0, 0.0, 0.0]})
    assert message.startswith(f"data.split: the validation split of {path} is empty"), message
