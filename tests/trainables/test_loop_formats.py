"""Every data format through the real loop: prepare → DeepSpeed training → generation → the format's metrics.

The base is a tiny random Llama with an ASCII character tokenizer (the built-in model only knows digits), so
the scores are near zero; what is checked is that each format's rows train and its metrics come out sane —
including code, whose generated programs run in the sandbox.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest

from peftsweep.spec import parse_spec
from peftsweep.trainables.loop import init_standalone, run_trial
from peftsweep.trainables.task_metrics import FORMAT_METRICS
from tests.conftest import EXAMPLES


@pytest.fixture(scope="module")
def ascii_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama + char tokenizer covering printable ASCII, loadable by `from_pretrained`."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(string.printable) - set("\x0b\x0c\r")))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,  # code prompts are a few hundred characters
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    out = tmp_path_factory.mktemp("ascii-base")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


FILES = {
    "classification": "classification.csv",
    "qa": "qa.jsonl",
    "instruction": "instruction.json",
    "chat": "chat.jsonl",
    "code": "code.parquet",
    "math": "math.jsonl",
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fmt", sorted(FILES))
def test_each_format_trains_and_reports_its_metrics(fmt: str, ascii_base: Path, tmp_path: Path) -> None:
    init_standalone()
    spec = parse_spec(
        {
            "name": f"fmt-{fmt}",
            "base_model": str(ascii_base),
            "methods": ["lora"],
            "data": {"task": str(EXAMPLES / "data" / FILES[fmt]), "format": fmt, "max_eval_examples": 3},
            "training": {"max_steps": 2, "eval_every": 2, "batch_size": 4, "max_length": 512},
            # A short cap on generation: a random model never stops by itself.
            "evaluation": {"max_new_tokens": 24, "code_timeout_s": 2.0},
        },
        base_dir=tmp_path,
    )
    reports: list[dict] = []
    run_trial(spec, "lora", 1e-3, 4, 0, lambda metrics, _ckpt: reports.append(metrics))
    (last,) = reports
    for name in FORMAT_METRICS[fmt]:
        assert 0.0 <= last[name] <= 1.0, name
        assert 0.0 <= last[f"test_{name}"] <= 1.0, name  # single files get an 80/10/10 split
    assert last["eval_loss"] > 0 and last[spec.search.metric] == last[FORMAT_METRICS[fmt][0]]
