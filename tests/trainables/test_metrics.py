"""eval_loss means the same thing for every method: plain completion cross-entropy, no method penalties."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftsweep.search_spaces import AdapterHParams, get_method
from peftsweep.trainables.builtin import builtin_model_dir
from peftsweep.trainables.data import load_split
from peftsweep.trainables.metrics import evaluate


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["adalora", "prompt_tuning"])
def test_eval_loss_ignores_method_penalties_and_virtual_tokens(method: str, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    rows = load_split("builtin:arith-sub", "eval", limit=16)
    base = evaluate(AutoModelForCausalLM.from_pretrained(builtin_model_dir()), tokenizer, rows)
    model = get_method(method).apply(
        AutoModelForCausalLM.from_pretrained(builtin_model_dir()),
        AdapterHParams(rank=4, alpha=4, total_steps=10),
        tmp_path,
    )
    got = evaluate(model, tokenizer, rows)
    if method == "adalora":
        # AdaLoRA leaves step-0 outputs unchanged, but PEFT adds an orthogonality penalty to `.loss`.
        assert got["eval_loss"] == pytest.approx(base["eval_loss"], rel=1e-5)
    else:
        # Virtual tokens change the output, but the loss must still be a per-token CE of the same size.
        assert 0.5 * base["eval_loss"] < got["eval_loss"] < 2 * base["eval_loss"]
