"""Chat rows as the field formats them, with the real chat templates of Llama 3 and Qwen2.5 (ChatML).

The tokenizers are fixtures (``tests/fixtures/tokenizers/``): the released templates and special tokens over a
tiny word-level vocabulary, so ids are small and pinned here. What is checked: the rendered two-turn example's
exact token ids and loss mask (both answers trained by default, only the last with ``last_assistant``), the
template's own BOS kept once, each target ending with the template's end-of-turn token, and evaluation
generating from the template's generation prompt, stopping at the end-of-turn token and scoring without it.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from peftsweep.trainables.data import IGNORE_INDEX, join_pieces, last_turn, token_pieces
from peftsweep.trainables.formats import load_task, normalize_rows
from tests.conftest import EXAMPLES

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizers"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao!"},
]
# family -> (token ids of the whole rendered conversation, loss mask of every-assistant training, the trained
# tokens). Llama 3: <|begin_of_text|>=0 <|start_header_id|>=2 <|end_header_id|>=3 <|eot_id|>=4, "\n\n"=6.
# Qwen2.5: <|im_start|>=1 <|im_end|>=2, "\n"=4; its target also holds the "\n" the template writes after
# <|im_end|>, as the template ends every turn with it.
EXPECTED = {
    "llama3": (
        [0, 2, 183, 3, 6, 32, 7, 93, 15, 4, 2, 198, 3, 6, 46, 4, 2, 83, 3, 6, 45, 8, 4]
        + [2, 198, 3, 6, 33, 4, 2, 83, 3, 6, 36, 8, 4],
        "000000000000000000001110000000000111",
        ["Hello", "!", "<|eot_id|>", "Ciao", "!", "<|eot_id|>"],
    ),
    "qwen2.5": (
        [1, 186, 4, 31, 5, 94, 13, 2, 4, 1, 201, 4, 46, 2, 4, 1, 84, 4, 45, 6, 2, 4]
        + [1, 201, 4, 32, 2, 4, 1, 84, 4, 35, 6, 2, 4],
        "00000000000000000011110000000001111",
        ["Hello", "!", "<|im_end|>", "\n", "Ciao", "!", "<|im_end|>", "\n"],
    ),
}
FAMILIES = sorted(EXPECTED)


def load_tokenizer(family: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURES / family)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> tuple[str, Any]:
    return request.param, load_tokenizer(request.param)


def encode(tokenizer: Any, chat_loss: Any = "all_assistant") -> dict[str, list[int]]:
    row = normalize_rows([{"messages": CONVERSATION}], "chat", None, "mem", tokenizer, chat_loss)[0]
    return join_pieces(token_pieces(tokenizer, [row])[0], max_length=1 << 30)


def mask(labels: list[int]) -> str:
    return "".join("0" if label == IGNORE_INDEX else "1" for label in labels)


def test_two_turns_pin_ids_and_every_answer_is_trained(family: tuple[str, Any]) -> None:
    name, tokenizer = family
    ids, loss_mask, trained = EXPECTED[name]
    row = encode(tokenizer)
    assert row["input_ids"] == ids
    assert mask(row["labels"]) == loss_mask
    assert [t for t, m in zip(row["input_ids"], row["labels"], strict=True) if m != IGNORE_INDEX] == [
        t for t, m in zip(ids, loss_mask, strict=True) if m == "1"
    ]  # a trained label is the token itself
    assert (
        tokenizer.convert_ids_to_tokens([t for t, m in zip(ids, loss_mask, strict=True) if m == "1"])
        == trained
    )
    # The same ids transformers gives for the conversation: the field's own encoding, nothing added.
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]


def test_last_assistant_trains_only_the_final_answer(family: tuple[str, Any]) -> None:
    name, tokenizer = family
    ids, loss_mask, trained = EXPECTED[name]
    row = encode(tokenizer, "last_assistant")
    assert row["input_ids"] == ids  # the same text; only the mask differs
    first_answer_end = loss_mask.index("0", loss_mask.index("1"))
    assert mask(row["labels"]) == "0" * first_answer_end + loss_mask[first_answer_end:]
    assert (
        tokenizer.convert_ids_to_tokens([t for t in row["labels"] if t != IGNORE_INDEX])
        == trained[len(trained) // 2 :]
    )


def test_bos_is_never_doubled() -> None:
    llama = load_tokenizer("llama3")
    ids = encode(llama)["input_ids"]
    assert ids[0] == llama.bos_token_id and ids.count(llama.bos_token_id) == 1
    # The old encoding's mistake, so this test can fail: the template writes BOS and the tokenizer adds one.
    rendered = llama.apply_chat_template(CONVERSATION, tokenize=False)
    assert llama(rendered)["input_ids"][:2] == [llama.bos_token_id] * 2
    qwen = load_tokenizer("qwen2.5")  # no BOS at all: nothing is put in front of the template's text
    assert qwen.bos_token_id is None and encode(qwen)["input_ids"][0] == qwen.convert_tokens_to_ids(
        "<|im_start|>"
    )


def test_eval_prompt_is_the_templates_generation_prompt(family: tuple[str, Any]) -> None:
    _, tokenizer = family
    row = normalize_rows([{"messages": CONVERSATION}], "chat", None, "mem", tokenizer)[0]
    prompt, target = last_turn(token_pieces(tokenizer, [row])[0])
    library = tokenizer.apply_chat_template(CONVERSATION[:-1], add_generation_prompt=True, tokenize=True)
    assert prompt == library["input_ids"]  # what a user of the model sends it
    assert tokenizer.decode(target) == row["segments"][-1]  # "Ciao!" and the end-of-turn text
    assert row["completion"] == "Ciao!"  # the reference has no end-of-turn token


class Scripted:
    """A stand-in model: uniform logits, and ``generate`` appends a fixed continuation to every prompt."""

    def __init__(self, vocab: int, continuation: list[int]) -> None:
        import torch

        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.continuation, self.training = vocab, continuation, False
        self.calls: list[dict[str, Any]] = []

    def parameters(self) -> Any:
        return iter([self.weight])

    def train(self, mode: bool = True) -> None:
        self.training = mode

    def eval(self) -> None:
        self.training = False

    def __call__(self, input_ids: Any, attention_mask: Any) -> Any:
        import torch

        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))

    def generate(self, input_ids: Any, attention_mask: Any, **kwargs: Any) -> Any:
        import torch

        self.calls.append({"prompts": input_ids[attention_mask.bool()].tolist(), **kwargs})
        tail = torch.tensor(self.continuation).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


@pytest.mark.parametrize(("name", "turn_end"), [("llama3", "<|eot_id|>"), ("qwen2.5", "<|im_end|>")])
def test_evaluation_stops_at_the_end_of_turn_and_scores_without_it(name: str, turn_end: str) -> None:
    from peftsweep.trainables.metrics import evaluate

    tokenizer = load_tokenizer(name)
    answer = tokenizer("Ciao!", add_special_tokens=False)["input_ids"]
    junk = tokenizer("Hi", add_special_tokens=False)["input_ids"]  # what a model says after its turn ends
    model = Scripted(len(tokenizer), answer + tokenizer.convert_tokens_to_ids([turn_end]) + junk)
    rows = normalize_rows([{"messages": CONVERSATION}], "chat", None, "mem", tokenizer)
    metrics = evaluate(model, tokenizer, rows, "chat")
    assert metrics["token_f1"] == metrics["exact_match"] == 1.0  # "Ciao!" against "Ciao!", junk cut off
    call = model.calls[0]
    library = tokenizer.apply_chat_template(CONVERSATION[:-1], add_generation_prompt=True, tokenize=True)
    assert call["prompts"] == library["input_ids"]
    assert tokenizer.convert_tokens_to_ids(turn_end) in call["eos_token_id"]
    # Llama 3's EOS is <|end_of_text|>, not its end-of-turn: generation stops at both.
    assert (tokenizer.eos_token_id in call["eos_token_id"]) and len(call["eos_token_id"]) == (
        2 if name == "llama3" else 1
    )
    assert metrics["eval_loss"] == pytest.approx(math.log(len(tokenizer)))  # uniform logits on the target


def test_plain_rendering_keeps_one_bos_and_ends_every_answer_with_eos() -> None:
    """The built-in tiny model has no template: role lines, BOS once, EOS after each assistant turn."""
    from peftsweep.trainables.builtin import build_tokenizer

    tokenizer = build_tokenizer()
    messages = [
        {"role": "user", "content": "1+1="},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2="},
        {"role": "assistant", "content": "4"},
    ]
    row = normalize_rows([{"messages": messages}], "chat", None, "mem", tokenizer)[0]
    encoded = join_pieces(token_pieces(tokenizer, [row])[0], max_length=1 << 30)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.convert_ids_to_tokens(trained) == ["2", "</s>", "4", "</s>"]


@pytest.mark.parametrize("name", FAMILIES)
def test_the_shipped_chat_example_renders_with_real_templates(name: str) -> None:
    tokenizer = load_tokenizer(name)
    splits = load_task(str(EXAMPLES / "data" / "chat.jsonl"), "chat", tokenizer=tokenizer)
    rows = [row for ds in splits.values() for row in ds]
    assert len(rows) == 14
    unk = tokenizer.convert_tokens_to_ids("<unk>")
    for row in rows:
        ids = [t for piece in token_pieces(tokenizer, [row])[0] for t in piece]
        assert unk not in ids  # the fixture's vocabulary covers the example
        assert ids.count(tokenizer.bos_token_id) == (0 if tokenizer.bos_token_id is None else 1)
    multi_turn = [row for row in rows if len(row["segments"]) > 2]
    assert multi_turn, "chat.jsonl has a multi-turn row; both of its answers are targets"


def test_fixture_tokenizers_are_what_the_script_builds(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tokenizers", FIXTURES / "make_tokenizers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in FAMILIES:
        assert module.build(name, tmp_path).read_text() == (FIXTURES / name / "tokenizer.json").read_text()


def test_the_chat_example_prepares_and_evaluates_through_a_real_template(tmp_path: Path) -> None:
    """examples/chat.yaml's data section on a tiny random Llama with the Qwen2.5 (ChatML) template fixture.

    The example's own base model is a hub download; this stand-in has the same template and special tokens.
    The sweep's prepared data trains both answers of the two-turn row, and the prepared validation rows
    evaluate to the chat metrics (token F1 the search metric).
    """
    import shutil

    import torch
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftsweep.spec import parse_spec
    from peftsweep.trainables.metrics import evaluate
    from peftsweep.trainables.prepared import load_prepared, prepare_data

    base = tmp_path / "base"
    shutil.copytree(FIXTURES / "qwen2.5", base)
    tokenizer = load_tokenizer("qwen2.5")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(base)
    example = yaml.safe_load((EXAMPLES / "chat.yaml").read_text())
    data_section = {**example["data"], "task": str(EXAMPLES / "data" / "chat.jsonl")}
    spec = parse_spec(
        {"name": "chat-example", "base_model": str(base), "methods": ["lora"], "data": data_section},
        base_dir=tmp_path,
    )
    assert spec.search.metric == "token_f1"
    data = load_prepared(prepare_data(spec))
    spans = [  # targets per row: each starts where an ignored label is followed by a trained one
        sum(1 for a, b in zip([IGNORE_INDEX, *labels], labels, strict=False) if a == IGNORE_INDEX != b)
        for labels in data.train["labels"]
    ]
    assert max(spans) == 2 and min(spans) == 1  # the two-turn row (in train at split_seed 0): both answers
    metrics = evaluate(model, tokenizer, data.validation, "chat", max_new_tokens=8)
    assert set(metrics) == {"token_f1", "exact_match", "eval_loss"}
    assert 0.0 <= metrics["token_f1"] <= 1.0 and metrics["eval_loss"] > 0
