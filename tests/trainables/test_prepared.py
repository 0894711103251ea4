"""The sweep's data is tokenized once, cached by content, and reloaded by every trial."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from peftsweep.spec import SweepSpec, parse_spec
from peftsweep.trainables.data import IGNORE_INDEX, DataError
from peftsweep.trainables.prepared import load_prepared, prepare_data
from tests.conftest import EXAMPLES


def _spec(tmp_path: Path, data: dict, **extra: object) -> SweepSpec:
    return parse_spec({"name": "prep", "methods": ["lora"], "data": data, **extra}, base_dir=tmp_path)


def test_builtin_task_is_prepared_once_and_reused(tmp_path: Path) -> None:
    spec = _spec(tmp_path, {"max_eval_examples": 20})
    first = prepare_data(spec)
    stamp = (first / "DONE").stat().st_mtime_ns
    assert prepare_data(spec) == first and (first / "DONE").stat().st_mtime_ns == stamp  # cache hit
    data = load_prepared(first)
    assert len(data.train) == 4800 and len(data.validation) == 20  # eval.jsonl is the validation split
    row = data.train[0]
    assert set(row) == {"input_ids", "labels"} and IGNORE_INDEX in row["labels"]  # loss on the answer only
    assert data.general is None


def test_a_changed_file_or_spec_gets_a_new_cache(tmp_path: Path) -> None:
    task = tmp_path / "qa.jsonl"
    shutil.copy(EXAMPLES / "data" / "qa.jsonl", task)
    spec = _spec(tmp_path, {"task": str(task), "format": "qa"})
    before = prepare_data(spec)
    with task.open("a") as f:
        f.write('{"question": "What is new?", "context": "Nothing is new.", "answers": ["Nothing"]}\n')
    after = prepare_data(spec)
    assert after != before
    reseeded = prepare_data(_spec(tmp_path, {"task": str(task), "format": "qa", "split_seed": 1}))
    assert reseeded not in (before, after)
    data = load_prepared(after)
    assert data.test is not None and len(data.train) + len(data.validation) + len(data.test) > 0
    assert set(data.validation.column_names) >= {"prompt", "completion", "answers"}


def test_forgetting_data_is_prepared_whole(tmp_path: Path) -> None:
    spec = _spec(tmp_path, {}, forgetting={"task": "builtin:arith-add", "max_examples": 300})
    data = load_prepared(prepare_data(spec))
    assert data.general is not None and len(data.general) == 300  # capped; drawn from both of its files
    assert data.general[0]["prompt"].count("+") == 1


def test_a_bad_row_names_file_and_row(tmp_path: Path) -> None:
    task = tmp_path / "math.jsonl"
    task.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?"}\n')
    with pytest.raises(DataError, match=r"math\.jsonl:2: .*'answer'"):
        prepare_data(_spec(tmp_path, {"task": str(task), "format": "math"}))
