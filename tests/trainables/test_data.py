"""Task validation names file and line; loading, tokenizing, collating and evaluating serve training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peftsweep.trainables.data import (
    DataError,
    check_task_files,
    collate,
    load_split,
    resolve_task_dir,
    tokenize_for_training,
)

GOOD = {"prompt": "12-05=", "completion": "007"}


def write_task(root: Path, train: list[Any] | str, eval_rows: list[Any] | str | None = None) -> Path:
    """A task dir; a list is written as JSONL (dicts dumped, strings written raw), a str as the whole file."""
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("eval", [GOOD] if eval_rows is None else eval_rows)):
        text = (
            rows
            if isinstance(rows, str)
            else "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
        )
        (root / f"{name}.jsonl").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from peftsweep.trainables.builtin import build_tokenizer

    return build_tokenizer()


# --------------------------------------------------------------------------------------------- validation


def test_builtin_task_checks_and_resolves() -> None:
    assert check_task_files("builtin:arith-sub") == {"train": 4800, "eval": 250}
    assert resolve_task_dir("builtin:arith-sub").is_absolute()
    with pytest.raises(DataError, match="arith-sub"):
        resolve_task_dir("builtin:nope")


def test_local_dir_with_blank_lines_and_extra_fields(tmp_path: Path) -> None:
    task = write_task(tmp_path / "t", [GOOD, "", {**GOOD, "extra": 1}, "   "])
    assert check_task_files(str(task)) == {"train": 2, "eval": 1}


@pytest.mark.parametrize(
    ("train", "where", "message"),
    [
        ([GOOD, "{not json"], "train.jsonl:2:", "invalid JSON"),
        ([GOOD, GOOD, {"prompt": "1+1="}], "train.jsonl:3:", "field 'completion' missing"),
        ([{"prompt": "", "completion": "2"}], "train.jsonl:1:", "field 'prompt' is empty"),
        ([GOOD, {"prompt": "1+1=", "completion": "  "}], "train.jsonl:2:", "field 'completion' is empty"),
        ([{"prompt": "1+1=", "completion": 2}], "train.jsonl:1:", "must be a string"),
        ([GOOD, "[1, 2]"], "train.jsonl:2:", "expected a JSON object"),
        ("", "train.jsonl:", "no rows"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, train: Any, where: str, message: str) -> None:
    task = write_task(tmp_path / "t", train)
    with pytest.raises(DataError) as err:
        check_task_files(str(task))
    assert f"{task / where}" in str(err.value)
    assert message in str(err.value)


def test_bad_eval_row_names_the_eval_file(tmp_path: Path) -> None:
    task = write_task(tmp_path / "t", [GOOD], [GOOD, GOOD, GOOD, {"completion": "1"}])
    with pytest.raises(DataError, match=r"eval\.jsonl:4: field 'prompt' missing"):
        check_task_files(str(task))


def test_missing_files_and_dirs(tmp_path: Path) -> None:
    task = write_task(tmp_path / "t", [GOOD])
    (task / "eval.jsonl").unlink()
    with pytest.raises(DataError, match=r"t/eval\.jsonl: file not found"):
        check_task_files(str(task))
    with pytest.raises(DataError, match="task directory not found"):
        check_task_files(str(tmp_path / "missing"))


def test_custom_field_names(tmp_path: Path) -> None:
    rows = [{"q": f"{i}+1=", "a": str(i + 1), "prompt": "ignored"} for i in range(5)]
    task = write_task(tmp_path / "t", rows, rows[:2])
    assert check_task_files(str(task), prompt_field="q", completion_field="a") == {"train": 5, "eval": 2}
    with pytest.raises(DataError, match="train.jsonl:1: field 'completion' missing"):
        check_task_files(str(task), prompt_field="q")
    ds = load_split(str(task), "train", prompt_field="q", completion_field="a", limit=3)
    assert ds.column_names == ["prompt", "completion"]
    assert ds[2] == {"prompt": "2+1=", "completion": "3"}


def test_check_task_files_imports_neither_torch_nor_datasets() -> None:
    """It runs on the driver before any cluster work: it must stay pure Python and fast."""
    code = (
        "import sys; from peftsweep.trainables.data import check_task_files; "
        "check_task_files('builtin:arith-sub'); "
        "heavy = {'torch', 'datasets', 'transformers'} & set(sys.modules); assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# --------------------------------------------------------------------------------------------- tensors


def test_load_split_columns_and_limit() -> None:
    ds = load_split("builtin:arith-sub", "eval", limit=7)
    assert ds.column_names == ["prompt", "completion"] and len(ds) == 7
    assert len(load_split("builtin:arith-sub", "train")) == 4800
    with pytest.raises(ValueError, match="split"):
        load_split("builtin:arith-sub", "test")


def test_tokenize_masks_bos_and_prompt(tokenizer: Any) -> None:
    from datasets import Dataset

    ds = Dataset.from_list([GOOD, {"prompt": "1-1=", "completion": "0"}])
    tok = tokenize_for_training(ds, tokenizer, max_length=32)
    assert tok.column_names == ["input_ids", "labels"]
    row = tok[0]
    prompt = tokenizer(GOOD["prompt"], add_special_tokens=False)["input_ids"]
    answer = tokenizer(GOOD["completion"], add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == [tokenizer.bos_token_id, *prompt, *answer, tokenizer.eos_token_id]
    assert row["labels"] == [-100] * (1 + len(prompt)) + answer + [tokenizer.eos_token_id]
    assert len(tok[1]["input_ids"]) == 1 + 4 + 1 + 1


def test_tokenize_truncates_and_drops_rows_without_targets(tokenizer: Any) -> None:
    from datasets import Dataset

    ds = Dataset.from_list([GOOD, {"prompt": "1-1=", "completion": "0"}])
    tok = tokenize_for_training(ds, tokenizer, max_length=7)  # GOOD: BOS + 6 prompt tokens, no target left
    assert len(tok) == 1
    assert len(tok[0]["input_ids"]) == len(tok[0]["labels"]) == 7
    assert tok[0]["labels"][-2:] == [tokenizer.convert_tokens_to_ids("0"), tokenizer.eos_token_id]


def test_collate_right_pads(tokenizer: Any) -> None:
    feats = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}]
    batch = collate(feats, pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert str(batch["input_ids"].dtype) == "torch.int64"


# --------------------------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def base() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftsweep.trainables.builtin import builtin_model_dir

    return AutoModelForCausalLM.from_pretrained(builtin_model_dir()), AutoTokenizer.from_pretrained(
        builtin_model_dir()
    )


def test_evaluate_scores_generated_answers_against_references(base: tuple[Any, Any]) -> None:
    """The base answers additions perfectly: 1.0 on true references, 0.0 once every reference is wrong."""
    from peftsweep.trainables.builtin import pretrain_examples
    from peftsweep.trainables.metrics import evaluate

    model, tok = base
    rows = pretrain_examples("heldout")[:100]
    wrong = [{"prompt": r["prompt"], "completion": f"{(int(r['completion']) + 1) % 1000:03d}"} for r in rows]
    model.train()
    right = evaluate(model, tok, rows, batch_size=32)  # several batches
    assert model.training  # the caller's mode is restored
    assert right == evaluate(model, tok, rows, batch_size=32)  # deterministic
    again = evaluate(model, tok, rows)  # one batch: same answers, loss equal up to float summation order
    assert again["exact_match"] == right["exact_match"]
    assert again["eval_loss"] == pytest.approx(right["eval_loss"], rel=1e-4)
    assert right["exact_match"] == 1.0
    short = [{"prompt": "1+1=", "completion": "never"}] * 5  # shorter prompts force left padding in the batch
    assert evaluate(model, tok, rows + short)["exact_match"] == len(rows) / (len(rows) + len(short))
    off = evaluate(model, tok, wrong)
    assert off["exact_match"] == 0.0
    assert off["eval_loss"] > right["eval_loss"] + 1.0


def test_evaluate_sees_a_short_lora_run_learn_subtraction(base: tuple[Any, Any]) -> None:
    """An honest end-to-end check: a 200-step LoRA run (the measured good LR) lifts exact match off zero."""
    import torch

    _, tok = base
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: 1 thread is as fast, and suffers far less on a busy 2-core box
    try:
        _short_lora_run(tok)
    finally:
        torch.set_num_threads(threads)


def _short_lora_run(tok: Any) -> None:
    """Train LoRA for 200 steps at lr 1e-2 on arith-sub and check that evaluate() sees the gain."""
    import math

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peftsweep.trainables.builtin import builtin_model_dir
    from peftsweep.trainables.metrics import evaluate

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir())
    config = LoraConfig(
        r=8, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    eval_rows = load_split("builtin:arith-sub", "eval")
    before = evaluate(model, tok, eval_rows)

    feats = tokenize_for_training(load_split("builtin:arith-sub", "train"), tok, max_length=32).to_list()
    steps, batch, warmup = 200, 32, 6
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(feats), (batch,), generator=gen).tolist()
        model(**collate([feats[i] for i in idx], tok.pad_token_id)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as the trial loop does
        opt.step()
        sched.step()
        opt.zero_grad()
    after = evaluate(model, tok, eval_rows)
    assert model.training
    assert before["exact_match"] < 0.05
    assert after["exact_match"] > 0.25, after
    assert after["eval_loss"] < before["eval_loss"] / 2
