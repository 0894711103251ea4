"""Task formats: shipped examples load, splits are seeded and disjoint, bad rows are named by file and row."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peftsweep.trainables.data import DataError
from peftsweep.trainables.formats import (
    COLUMNS,
    FORMAT_ROLES,
    FORMATS,
    carve,
    check_task,
    has_tests,
    load_task,
    normalize_rows,
    parse_task,
)

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "data"
TINY_TEMPLATE = (  # a minimal Jinja chat template: "<role>content" lines, then the assistant cue
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def write(path: Path, rows: list[Any]) -> Path:
    """Rows in the type of ``path``: jsonl (dicts dumped, strings raw), json array, csv (lists), parquet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("\n".join(map(str, rows)))
    return path


def pc_rows(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(n)]


def all_rows(splits: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for ds in splits.values() for row in ds]


# ----------------------------------------------------------------------------------------- shipped examples

INSTRUCTION_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nTranslate the sentence into French.\n\n### Input:\nWhere is the train station?\n\n"
    "### Response:\n"
)
EXAMPLES = [  # file, format, rows in the file, (expected prompt, completion, answers, tests) of one known row
    (
        "classification.csv",
        "classification",
        24,
        ("Exactly as described. Would buy again.\nLabel: ", "positive", ["positive"], ""),
    ),
    (
        "qa.jsonl",
        "qa",
        20,
        (
            "Context: The Amazon River flows through Brazil, Peru and Colombia before emptying into the "
            "Atlantic Ocean.\nQuestion: Into which ocean does the Amazon River empty?\nAnswer: ",
            "the Atlantic Ocean",
            ["the Atlantic Ocean", "Atlantic Ocean", "Atlantic"],
            "",
        ),
    ),
    (
        "instruction.json",
        "instruction",
        16,
        (INSTRUCTION_PROMPT, "Ou est la gare ?", ["Ou est la gare ?"], ""),
    ),
    (
        "chat.jsonl",
        "chat",
        14,
        (
            "system: You are a concise assistant.\nuser: Name a prime number between 20 and 30.\nassistant: ",
            "23",
            ["23"],
            "",
        ),
    ),
    (
        "code.parquet",
        "code",
        12,
        (
            'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n',
            "    return a + b\n",
            ["    return a + b\n"],
            "assert add(2, 3) == 5\nassert add(-1, 1) == 0\nassert add(0, 0) == 0",
        ),
    ),
    (
        "math.jsonl",
        "math",
        20,
        (
            "Question: A garden is 8 meters long and 5 meters wide. What is its area in square meters?\n"
            "Answer: ",
            "The area is 8 * 5 = 40 square meters.\n#### 40",
            ["The area is 8 * 5 = 40 square meters.\n#### 40"],
            "",
        ),
    ),
]


def test_every_format_has_a_shipped_example() -> None:
    assert {fmt for _, fmt, _, _ in EXAMPLES} == set(FORMATS) - {"prompt_completion"}  # that one: builtin


@pytest.mark.parametrize(("name", "fmt", "n_rows", "known"), EXAMPLES, ids=[e[1] for e in EXAMPLES])
def test_shipped_example_loads(
    name: str, fmt: str, n_rows: int, known: tuple[str, str, list[str], str]
) -> None:
    splits = load_task(str(DATA / name), fmt)
    assert list(splits) == ["train", "validation", "test"]
    for ds in splits.values():
        assert ds.column_names == list(COLUMNS)
        assert len(ds) > 0
    counts = check_task(str(DATA / name), fmt)
    assert counts == {s: len(ds) for s, ds in splits.items()}
    assert sum(counts.values()) == n_rows
    prompt, completion, answers, tests = known
    matches = [r for r in all_rows(splits) if r["prompt"] == prompt]
    assert [{k: r[k] for k in COLUMNS if k != "segments"} for r in matches] == [
        {"prompt": prompt, "completion": completion, "answers": answers, "tests": tests}
    ]
    # Only chat rows carry segments: the rendering up to the answer, then the answer (no tokenizer: no EOS).
    assert matches[0]["segments"] == ([prompt, completion] if fmt == "chat" else [])


def test_shipped_code_rows_pass_their_tests() -> None:
    splits = load_task(str(DATA / "code.parquet"), "code")
    assert all(has_tests(ds) for ds in splits.values())
    for row in all_rows(splits):
        exec(
            row["prompt"] + row["completion"] + "\n" + row["tests"], {}
        )  # shipped data, generated and checked


def test_code_parquet_script_is_reproducible(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_code_parquet", DATA / "make_code_parquet.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import pyarrow.parquet as pq

    assert pq.read_table(DATA / "code.parquet").to_pylist() == module.ROWS


# --------------------------------------------------------------------------------------------- splitting


def test_seeded_split_is_deterministic_disjoint_and_sized(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", pc_rows(40))
    a = load_task(str(path), split=(0.7, 0.2, 0.1), split_seed=3)
    b = load_task(str(path), split=(0.7, 0.2, 0.1), split_seed=3)
    assert {s: len(ds) for s, ds in a.items()} == {"train": 28, "validation": 8, "test": 4}
    assert {s: ds["prompt"][:] for s, ds in a.items()} == {s: ds["prompt"][:] for s, ds in b.items()}
    prompts = [r["prompt"] for r in all_rows(a)]
    assert sorted(prompts) == sorted(f"p{i}" for i in range(40))  # disjoint and complete
    c = load_task(str(path), split=(0.7, 0.2, 0.1), split_seed=4)
    assert set(c["train"]["prompt"]) != set(a["train"]["prompt"])
    assert set(c["validation"]["prompt"]) != set(a["validation"]["prompt"])


def test_carve_rounds_half_up_and_keeps_a_row_per_nonzero_split() -> None:
    sizes = {s: len(i) for s, i in carve(10, {"train": 0.75, "validation": 0.25}, 0, "x").items()}
    assert sizes == {"validation": 3, "train": 7}  # 2.5 rounds up
    sizes = {s: len(i) for s, i in carve(5, {"train": 0.9, "validation": 0.05, "test": 0.05}, 0, "x").items()}
    assert sizes == {"validation": 1, "test": 1, "train": 3}  # 0.25 rows -> at least one each
    sizes = {s: len(i) for s, i in carve(4, {"train": 0.2, "validation": 0.4, "test": 0.4}, 0, "x").items()}
    assert sizes["train"] == 1 and sum(sizes.values()) == 4  # train keeps a row, test gives one back
    with pytest.raises(DataError, match=r"x: 2 row\(s\) are too few for a non-empty test split"):
        carve(2, {"train": 0.8, "validation": 0.1, "test": 0.1}, 0, "x")


def test_zero_fraction_gives_an_empty_split_with_the_columns(tmp_path: Path) -> None:
    splits = load_task(str(write(tmp_path / "t.jsonl", pc_rows(10))), split=(0.9, 0.1, 0.0))
    assert [len(ds) for ds in splits.values()] == [9, 1, 0]
    assert splits["test"].column_names == list(COLUMNS)


@pytest.mark.parametrize(
    ("split", "match"),
    [
        ((0.8, 0.1, 0.2), "sum to 1.1, not 1"),
        ((0.0, 0.5, 0.5), "train fraction must be > 0"),
        ((1.2, -0.1, -0.1), r"must lie in \[0, 1\]"),
        ((0.5, 0.5), "expected three fractions"),
    ],
)
def test_bad_fractions_are_refused(tmp_path: Path, split: tuple[float, ...], match: str) -> None:
    path = write(tmp_path / "t.jsonl", pc_rows(10))
    with pytest.raises(DataError, match=match):
        check_task(str(path), split=split)


def test_directory_uses_its_split_files_and_carves_only_a_missing_validation(tmp_path: Path) -> None:
    write(tmp_path / "train.jsonl", pc_rows(18))
    write(tmp_path / "validation.csv", [["prompt", "completion"], ["v0", "w0"], ["v1", "w1"]])
    splits = load_task(str(tmp_path), split=(0.8, 0.1, 0.1), split_seed=0)
    assert splits["validation"]["prompt"][:] == ["v0", "v1"]  # the file, in its order
    assert len(splits["test"]) == 0 and len(splits["train"]) == 18  # no test file: no test split
    (tmp_path / "validation.csv").unlink()
    splits = load_task(str(tmp_path), split=(0.8, 0.1, 0.1), split_seed=0)
    assert len(splits["validation"]) == 2  # 18 * 0.1 / (0.8 + 0.1) = 2, carved out of train
    assert len(splits["train"]) == 16 and len(splits["test"]) == 0
    assert not set(splits["validation"]["prompt"]) & set(splits["train"]["prompt"])


def test_directory_split_file_errors(tmp_path: Path) -> None:
    write(tmp_path / "a" / "train.jsonl", pc_rows(4))
    write(tmp_path / "a" / "train.csv", [["prompt", "completion"], ["p", "c"]])
    with pytest.raises(DataError, match=r"several files for split 'train': \['train.jsonl', 'train.csv'\]"):
        check_task(str(tmp_path / "a"))
    write(tmp_path / "b" / "test.jsonl", pc_rows(4))
    with pytest.raises(DataError, match="no train file"):
        check_task(str(tmp_path / "b"))


def test_builtin_task_keeps_working() -> None:
    from peftsweep.trainables.builtin import builtin_task_dir

    counts = check_task("builtin:arith-sub", "prompt_completion", split=(0.9, 0.1, 0.0))
    assert counts == {"train": 4800, "validation": 250, "test": 0}  # train.jsonl and eval.jsonl, as they are
    splits = load_task("builtin:arith-sub", "prompt_completion")
    first_eval = json.loads((builtin_task_dir("arith-sub") / "eval.jsonl").read_text().splitlines()[0])
    assert splits["validation"][0] == {
        **first_eval,
        "answers": [first_eval["completion"]],
        "tests": "",
        "segments": [],
    }
    assert (len(splits["train"]), len(splits["test"])) == (4800, 0)  # a directory's files are its split


# --------------------------------------------------------------------------------------------- bad inputs

BAD_CASES = [  # id, format, file name, rows, where the error must point, what it must say
    (
        "qa-jsonl-missing",
        "qa",
        "d.jsonl",
        [{"question": "q", "answers": ["a"]}, "", {"context": "c", "answers": ["a"]}, {"answers": 3}],
        ":3: ",
        "field 'question' missing (keys: ['answers', 'context'])",
    ),
    (
        "qa-bad-answers",
        "qa",
        "d.jsonl",
        [{"question": "q", "answers": {"answer_start": [0]}}],
        ":1: ",
        "is an object without 'text'",
    ),
    (
        "classification-csv-empty-label",
        "classification",
        "d.csv",
        [["text", "label"], ["good", "pos"], ["bad", "neg"], ["meh", ""], ["x", ""]],
        ": row 4: ",
        "field 'label' is empty",
    ),
    (
        "classification-csv-cells",
        "classification",
        "d.csv",
        [["text", "label"], ["good", "pos", "extra"]],
        ": row 2: ",
        "3 cells, but the header has 2 columns",
    ),
    (
        "classification-float-label",
        "classification",
        "d.jsonl",
        [{"text": "t", "label": 1}, {"text": "t", "label": 0.5}],
        ":2: ",
        "must be a string, int or bool, got float",
    ),
    (
        "instruction-json-type",
        "instruction",
        "d.json",
        [
            {"instruction": "i", "output": "o"},
            {"instruction": "i", "input": "", "output": "o"},
            {"instruction": "i", "output": 7},
        ],
        ": index 2: ",
        "field 'output' must be a string, got int",
    ),
    (
        "code-parquet-empty",
        "code",
        "d.parquet",
        [
            {"prompt": "def f():\n", "completion": "    return 1\n"},
            {"prompt": "def g():\n", "completion": "  \n"},
        ],
        ": index 1: ",
        "field 'completion' is empty",
    ),
    (
        "chat-last-user",
        "chat",
        "d.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                    {"role": "user", "content": "?"},
                ]
            }
        ],
        ":1: ",
        "last message of 'messages' must be the assistant's (role 'assistant', ShareGPT 'gpt')",
    ),
    (
        "chat-unknown-role",
        "chat",
        "d.jsonl",
        [
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"messages": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}]},
        ],
        ":2: messages[0]: ",
        "unknown OpenAI role 'bot' in 'role' (expected one of ['system', 'user', 'assistant'])",
    ),
    (
        "chat-sharegpt-unknown-role",
        "chat",
        "d.jsonl",
        [
            {"messages": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
            {"messages": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]},
        ],
        ":2: messages[1]: ",
        "unknown ShareGPT role 'robot' in 'from' (expected one of ['system', 'human', 'gpt'])",
    ),
    (
        "chat-mixed-styles",
        "chat",
        "d.json",
        [{"messages": [{"from": "human", "value": "a"}, {"role": "assistant", "content": "b"}]}],
        ": index 0: messages[1]: ",
        "'from' missing in a ShareGPT-style turn (keys: ['content', 'role'])",
    ),
    (
        "chat-too-short",
        "chat",
        "d.jsonl",
        [{"messages": [{"role": "assistant", "content": "b"}]}],
        ":1: ",
        "got 1 message(s)",
    ),
    (
        "math-null",
        "math",
        "d.jsonl",
        [{"question": "q", "answer": None}],
        ":1: ",
        "field 'answer' is null",
    ),
    (
        "prompt-completion-invalid-json",
        "prompt_completion",
        "d.jsonl",
        [{"prompt": "p", "completion": "c"}, '{"prompt": "p",'],
        ":2: ",
        "invalid JSON",
    ),
    (
        "csv-missing-column",
        "math",
        "d.csv",
        [["question", "solution"], ["q", "a"]],
        ": row 1 (header): ",
        "column 'answer' missing (columns: ['question', 'solution'])",
    ),
    (
        "parquet-missing-column",
        "code",
        "d.parquet",
        [{"prompt": "def f():\n"}],
        ": schema: ",
        "column 'completion' missing",
    ),
]


@pytest.mark.parametrize(
    ("fmt", "name", "rows", "where", "what"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_bad_row_is_named_by_file_and_row(
    tmp_path: Path, fmt: str, name: str, rows: list[Any], where: str, what: str
) -> None:
    path = write(tmp_path / name, rows)
    with pytest.raises(DataError) as info:
        check_task(str(path), fmt, split=(1.0, 0.0, 0.0))
    assert str(info.value).startswith(f"{path}{where}"), str(info.value)
    assert what in str(info.value)


def test_unknown_format_and_extension(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", pc_rows(4))
    with pytest.raises(DataError, match="unknown format 'sql'; choose one of"):
        check_task(str(path), "sql")
    txt = write(tmp_path / "t.txt", ["hello"])
    with pytest.raises(DataError, match=r"t.txt: unsupported file type '.txt'"):
        check_task(str(txt))
    with pytest.raises(DataError, match="task not found"):
        check_task(str(tmp_path / "nope.jsonl"))


def test_fields_rename_columns_and_report_missing_ones(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [{"q": "Who?", "ctx": "Ada wrote it.", "a": "Ada"}] * 3)
    fields = {"question": "q", "context": "ctx", "answers": "a"}
    rows = all_rows(load_task(str(path), "qa", fields, split=(1.0, 0.0, 0.0)))
    assert rows[0] == {
        "prompt": "Context: Ada wrote it.\nQuestion: Who?\nAnswer: ",
        "completion": "Ada",
        "answers": ["Ada"],
        "tests": "",
        "segments": [],
    }
    with pytest.raises(DataError, match=rf"{path}:1: field 'query' \(role 'question'\) missing"):
        check_task(str(path), "qa", {"question": "query", "answers": "a"})
    with pytest.raises(DataError, match=r"column 'contxt' \(fields.context\) is in no row"):
        check_task(str(path), "qa", {"question": "q", "answers": "a", "context": "contxt"})
    with pytest.raises(DataError, match=r"format 'qa' has no role \['label'\]"):
        check_task(str(path), "qa", {"label": "a"})


def test_qa_without_context_and_string_answers() -> None:
    rows = normalize_rows([{"question": "2+2?", "answers": "4"}], "qa", None, "mem")
    assert rows == [
        {
            "prompt": "Question: 2+2?\nAnswer: ",
            "completion": "4",
            "answers": ["4"],
            "tests": "",
            "segments": [],
        }
    ]


def test_first_bad_row_stops_validation() -> None:
    rows = [{"text": "a", "label": "x"}, {"text": "", "label": "y"}, {"label": "z"}]
    with pytest.raises(DataError, match=r"^mem: index 1: field 'text' is empty$"):
        normalize_rows(rows, "classification", None, "mem")


def test_labels_and_test_lists_are_stringified() -> None:
    rows = normalize_rows(
        [{"text": "t", "label": 1}, {"text": "t", "label": True}], "classification", None, "m"
    )
    assert [r["completion"] for r in rows] == ["1", "True"]
    code = normalize_rows(
        [
            {
                "prompt": "def f():\n",
                "completion": "    return 1\n",
                "tests": ["assert f() == 1", "assert f()"],
            }
        ],
        "code",
        None,
        "m",
    )
    assert code[0]["tests"] == "assert f() == 1\nassert f()"
    assert has_tests(code)
    assert not has_tests(
        normalize_rows([{"prompt": "def f():\n", "completion": "  pass"}], "code", None, "m")
    )
    assert not has_tests([])


def test_every_format_declares_its_roles() -> None:
    for fmt in FORMATS:
        required = [role for role, spec in FORMAT_ROLES[fmt].items() if spec.required]
        assert required, fmt
        with pytest.raises(DataError, match="missing"):
            normalize_rows([{"unrelated": "x"}], fmt, None, "m")


# --------------------------------------------------------------------------------------------- chat

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
]
TWO_TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao"},
]


@pytest.fixture(scope="module")
def chat_tokenizer() -> Any:
    from peftsweep.trainables.builtin import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = TINY_TEMPLATE
    return tokenizer


def chat_row(messages: list[dict[str, str]], tokenizer: Any = None, chat_loss: Any = "all_assistant") -> Any:
    return normalize_rows([{"messages": messages}], "chat", None, "mem", tokenizer, chat_loss)[0]


def test_chat_plain_rendering_without_template() -> None:
    from peftsweep.trainables.builtin import build_tokenizer

    row = chat_row(CONVERSATION)  # no tokenizer (the CLI check): the lines, no special tokens
    assert row["prompt"] == "system: Be brief.\nuser: Hi\nassistant: "
    assert row["segments"] == [row["prompt"], "Hello"] and row["completion"] == "Hello"
    # A tokenizer without a template: the same lines, each assistant turn ended by the tokenizer's EOS.
    row = chat_row(TWO_TURNS, build_tokenizer())
    assert row["segments"] == ["user: Hi\nassistant: ", "Hello</s>", "user: Bye\nassistant: ", "Ciao</s>"]
    assert row["prompt"] == "user: Hi\nassistant: Hello</s>user: Bye\nassistant: "


def test_chat_uses_the_tokenizer_template(tmp_path: Path, chat_tokenizer: Any) -> None:
    path = write(tmp_path / "c.jsonl", [{"messages": CONVERSATION}] * 2)
    splits = load_task(str(path), "chat", split=(1.0, 0.0, 0.0), tokenizer=chat_tokenizer)
    assert splits["train"][0] == {
        "prompt": "<system>Be brief.\n<user>Hi\n<assistant>",  # the template's generation prompt
        "completion": "Hello",  # the reference: no end-of-turn
        "answers": ["Hello"],
        "tests": "",
        "segments": ["<system>Be brief.\n<user>Hi\n<assistant>", "Hello\n"],  # the target: with it
    }


def test_chat_trains_every_assistant_turn_or_only_the_last(chat_tokenizer: Any) -> None:
    every = chat_row(TWO_TURNS, chat_tokenizer)
    assert every["segments"] == ["<user>Hi\n<assistant>", "Hello\n", "<user>Bye\n<assistant>", "Ciao\n"]
    last = chat_row(TWO_TURNS, chat_tokenizer, "last_assistant")
    assert last["segments"] == ["<user>Hi\n<assistant>Hello\n<user>Bye\n<assistant>", "Ciao\n"]
    for row in (every, last):  # the same conversation, the same last answer to generate
        assert "".join(row["segments"]) == chat_tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
        assert (row["prompt"], row["completion"]) == (last["segments"][0], "Ciao")


def test_sharegpt_and_openai_rows_are_told_apart_per_row(tmp_path: Path) -> None:
    sharegpt = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"},
    ]
    path = write(tmp_path / "c.jsonl", [{"conversations": sharegpt}, {"conversations": CONVERSATION}])
    rows = all_rows(load_task(str(path), "chat", {"messages": "conversations"}, split=(1.0, 0.0, 0.0)))
    assert rows[0] == rows[1] == chat_row(CONVERSATION)
    # A hub dataset's Arrow structs carry every key of the column, the absent ones as None.
    arrow_style = [{"from": t["from"], "value": t["value"], "role": None, "content": None} for t in sharegpt]
    assert chat_row(arrow_style) == chat_row(CONVERSATION)
    with pytest.raises(DataError, match=rf"{path}:1: field 'messages' missing"):
        check_task(str(path), "chat")  # the column is named through fields


# Mistral v0.3's habit in a few lines: the system message goes into the *last* user turn, so a turn renders
# differently once a later user turn follows it.
SYSTEM_IN_LAST_USER = (
    "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m.role == 'user' %}"
    "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m.role == 'user' %}[INST] "
    "{% if loop.index0 == ns.last and messages[0].role == 'system' %}{{ messages[0].content }} {% endif %}"
    "{{ m.content }}[/INST]{% elif m.role == 'assistant' %}{{ m.content }}</s>{% endif %}{% endfor %}"
)


def test_a_template_that_rewrites_earlier_turns_needs_last_assistant(tmp_path: Path) -> None:
    from peftsweep.trainables.builtin import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = SYSTEM_IN_LAST_USER
    path = write(tmp_path / "c.jsonl", [{"messages": [CONVERSATION[0], *TWO_TURNS]}])
    with pytest.raises(DataError, match=rf"{path}:1: .* messages\[2\] .* set data.chat_loss: last_assistant"):
        load_task(str(path), "chat", split=(1.0, 0.0, 0.0), tokenizer=tokenizer)
    row = load_task(str(path), "chat", split=(1.0, 0.0, 0.0), tokenizer=tokenizer, chat_loss="last_assistant")
    assert row["train"][0]["segments"] == ["[INST] Hi[/INST]Hello</s>[INST] Be brief. Bye[/INST]", "Ciao</s>"]


def test_chat_template_failure_names_the_row(tmp_path: Path) -> None:
    from peftsweep.trainables.builtin import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system turns') }}"
        "{% endif %}{{ m.content }}{% endfor %}"
    )
    path = write(tmp_path / "c.jsonl", [{"messages": CONVERSATION[1:]}, {"messages": CONVERSATION}])
    with pytest.raises(DataError, match=rf"{path}:2: the tokenizer's chat template failed: no system turns"):
        load_task(str(path), "chat", split=(1.0, 0.0, 0.0), tokenizer=tokenizer)


def test_chat_messages_as_json_string_in_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", [["messages"], [json.dumps(CONVERSATION)], ["not json"]])
    with pytest.raises(DataError, match=rf"{path}: row 3: field 'messages' is a string but not JSON"):
        check_task(str(path), "chat", split=(1.0, 0.0, 0.0))


# --------------------------------------------------------------------------------------------- hub


def test_hf_task_string_is_parsed() -> None:
    source = parse_task("hf:openai/gsm8k:main")
    assert (source.kind, source.hf_id, source.hf_config, source.label) == (
        "hf",
        "openai/gsm8k",
        "main",
        "hf:openai/gsm8k:main",
    )
    assert parse_task("hf:squad").hf_config is None
    for bad in ("hf:", "hf:squad:"):
        with pytest.raises(DataError, match="expected hf:<dataset id>"):
            parse_task(bad)


def test_hf_offline_is_a_clear_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="hf:peftsweep-tests/no-such-dataset:main: cannot load the dataset"):
        check_task("hf:peftsweep-tests/no-such-dataset:main", "math")


def test_hf_path_normalises_and_carves(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub code path on a stand-in for ``datasets.load_dataset`` (no network here)."""
    import datasets

    calls = []

    def fake_load(hf_id: str, config: str | None) -> datasets.DatasetDict:
        calls.append((hf_id, config))
        q = [f"q{i}" for i in range(10)]
        return datasets.DatasetDict(
            train=datasets.Dataset.from_dict({"question": q, "answer": [f"#### {i}" for i in range(10)]}),
            test=datasets.Dataset.from_dict({"question": ["t"], "answer": ["#### 1"]}),
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    splits = load_task("hf:x/gsm:main", "math", split=(0.8, 0.2, 0.0))
    assert calls == [("x/gsm", "main")]
    assert {s: len(ds) for s, ds in splits.items()} == {"train": 8, "validation": 2, "test": 1}
    assert splits["test"][0] == {
        "prompt": "Question: t\nAnswer: ",
        "completion": "#### 1",
        "answers": ["#### 1"],
        "tests": "",
        "segments": [],
    }
    assert splits["train"].column_names == list(COLUMNS)

    def bad_load(hf_id: str, config: str | None) -> datasets.DatasetDict:
        return datasets.DatasetDict(
            train=datasets.Dataset.from_dict({"question": ["a", ""], "answer": ["1", "2"]})
        )

    monkeypatch.setattr(datasets, "load_dataset", bad_load)
    with pytest.raises(DataError, match=r"hf:x/gsm\[train\]: index 1: field 'question' is empty"):
        check_task("hf:x/gsm", "math")


# --------------------------------------------------------------------------------------------- light imports


def test_check_task_needs_neither_torch_nor_datasets() -> None:
    code = (
        "import sys\n"
        "from peftsweep.trainables.formats import check_task\n"
        f"check_task({str(DATA / 'code.parquet')!r}, 'code')\n"
        f"check_task({str(DATA / 'chat.jsonl')!r}, 'chat')\n"
        "print(sorted(m for m in ('torch', 'datasets', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
