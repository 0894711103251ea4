"""The built-in tokenizer, task generators and shipped tiny base act like hub assets and leave work to do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from peftsweep.trainables import builtin


@pytest.fixture(scope="module")
def shipped() -> tuple[Any, Any]:
    """The packaged base, loaded through the ordinary Auto* path (as a hub model would be)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin.builtin_model_dir()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_tokenizer_round_trips_through_auto_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = builtin.build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "12+34=046"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    ids = loaded(text)["input_ids"]
    assert ids[0] == loaded.bos_token_id  # BOS is prepended by the post-processor
    assert len(ids) == len(text) + 1  # one token per character
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids[1:]
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert loaded.decode(ids + [loaded.eos_token_id], skip_special_tokens=True) == text
    special = (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id)
    assert special == (0, 1, 2, 3)
    assert loaded("7x")["input_ids"][-1] == loaded.unk_token_id
    assert len(loaded) == len(builtin.VOCAB) < 24


def test_generators_are_deterministic_and_splits_disjoint() -> None:
    train, held = builtin.pretrain_examples("train"), builtin.pretrain_examples("heldout")
    assert train == builtin.pretrain_examples("train")
    assert len(held) == builtin.PRETRAIN_HELDOUT and len(train) + len(held) == 10_000
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert builtin.pretrain_examples("heldout", seed=1) != held

    t1, e1 = builtin.task_examples("arith-sub")
    t2, e2 = builtin.task_examples("arith-sub")
    assert (t1, e1) == (t2, e2)
    assert not {r["prompt"] for r in t1} & {r["prompt"] for r in e1}
    assert {"prompt": "73-05=", "completion": "068"} in t1 + e1
    assert all(int(r["prompt"][:2]) - int(r["prompt"][3:5]) == int(r["completion"]) for r in t1 + e1)
    with pytest.raises(ValueError, match="unknown built-in task"):
        builtin.task_examples("nope")


def test_shipped_task_files_match_the_generator() -> None:
    """The committed JSONL is exactly what scripts/build_assets.py would write now."""
    train, eval_rows = builtin.task_examples("arith-sub")
    task_dir = builtin.builtin_task_dir("arith-sub")
    for name, rows in (("train", train), ("eval", eval_rows)):
        lines = (task_dir / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == rows


def test_unknown_asset_names_raise_with_the_available_ones() -> None:
    with pytest.raises(FileNotFoundError, match="tiny-arith"):
        builtin.builtin_model_dir("nope")
    with pytest.raises(FileNotFoundError, match="arith-sub"):
        builtin.builtin_task_dir("nope")


def test_shipped_base_is_small_and_pretrained(shipped: tuple[Any, Any]) -> None:
    from peftsweep.trainables.metrics import evaluate

    model, tok = shipped
    files = list(builtin.builtin_model_dir().iterdir())
    assert any(f.name == "model.safetensors" for f in files)
    assert sum(f.stat().st_size for f in files) < 20 * 2**20
    assert model.config.tie_word_embeddings is False
    result = evaluate(model, tok, builtin.pretrain_examples("heldout"))
    assert result["exact_match"] >= 0.9
    assert result["eval_loss"] < 0.1


def test_fine_tuning_task_is_not_already_solved(shipped: tuple[Any, Any]) -> None:
    from peftsweep.trainables.data import load_split
    from peftsweep.trainables.metrics import evaluate

    model, tok = shipped
    result = evaluate(model, tok, load_split("builtin:arith-sub", "eval"))
    assert result["exact_match"] < 0.2


def test_build_base_model_is_deterministic_and_loads_with_auto(tmp_path: Path) -> None:
    """A short build (no accuracy target) twice: identical weights, loadable like a hub checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        builtin.build_base_model(d, seed=3, steps=15, warmup_steps=3, min_exact_match=0.0, log_every=0)
    a, b = ((d / "model.safetensors").read_bytes() for d in dirs)
    assert a == b
    model = AutoModelForCausalLM.from_pretrained(dirs[0])
    tok = AutoTokenizer.from_pretrained(dirs[0])
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tok)


def test_build_base_model_refuses_an_untrained_base(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="held-out exact match"):
        builtin.build_base_model(tmp_path, steps=2, warmup_steps=1, log_every=0)
    assert not (tmp_path / "model.safetensors").exists()
