"""Task metrics: hand-computed values, so a scorer change that moves a number is caught."""

from __future__ import annotations

import time

import pytest

from peftsweep.trainables.task_metrics import (
    ALWAYS,
    FORMAT_METRICS,
    LOWER_IS_BETTER,
    accuracy,
    extract_final_number,
    macro_f1,
    metric_names,
    normalize_answer,
    number_match,
    pass_at_k,
    score,
    squad_exact_match,
    token_f1,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48/2 = 24 clips.\n#### 1,234", "1234"),
        ("The answer is -3.50.", "-3.5"),
        ("no number here", None),
        ("12 before the marker, #### none after it", None),
        ("first #### 5 then #### 7 apples", "7"),
        ("It costs $1,000.00 in total", "1000"),
        ("It costs -$3 now", "-3"),
        ("growth of 50% overall", "50"),
        ("agent 007", "7"),
        ("zero: 0", "0"),
        ("minus zero -0.0", "0"),
        ("a gain of +4.0", "4"),
        ("half is .5", "0.5"),
        ("10-3 = 7, so 10-3", "3"),  # a minus between values is an operator, not a sign
        ("the value (-2)", "-2"),
    ],
)
def test_extract_final_number(text: str, expected: str | None) -> None:
    assert extract_final_number(text) == expected


def test_number_match_is_numeric_equivalence() -> None:
    assert number_match("so the total is 3.50 dollars", "#### 3.5")
    assert number_match("#### 4.0", "4")
    assert number_match("1,234", "#### 1234")
    assert not number_match("#### 5", "#### -5")
    assert not number_match("I don't know", "#### 0")


def test_normalize_answer_and_squad_exact_match() -> None:
    assert normalize_answer("  The Eiffel-Tower, in  PARIS! ") == "eiffeltower in paris"
    assert squad_exact_match("the Paris.", ["London", "paris"])
    assert not squad_exact_match("Paris, France", ["paris"])
    with pytest.raises(ValueError):
        squad_exact_match("x", [])


def test_token_f1_by_hand() -> None:
    # pred {cat, sat, on, mat} vs ref {cat, sat}: P = 2/4, R = 2/2 -> F1 = 2/3 (articles dropped).
    assert token_f1("the cat sat on the mat", ["a cat sat"]) == pytest.approx(2 / 3)
    # Max over references: second ref {cat, sat, on, mat, today}: P = 4/4, R = 4/5 -> 8/9.
    assert token_f1("the cat sat on the mat", ["a dog", "cat sat on mat today"]) == pytest.approx(8 / 9)
    # Repeated tokens count with multiplicity: pred [a1, a1, b] vs ref [a1]: P = 1/3, R = 1 -> 0.5.
    assert token_f1("a1 a1 b", ["a1"]) == pytest.approx(0.5)
    assert token_f1("nothing shared", ["other words"]) == 0.0
    assert token_f1("the", ["a"]) == 1.0  # both empty after normalisation


def test_accuracy_and_macro_f1_by_hand() -> None:
    golds = ["pos", "pos", "neg", "neg", "neu", "neu"]
    preds = [" pos", "neg", "neg ", "neg", "pos", "banana"]
    assert accuracy(preds, golds) == pytest.approx(3 / 6)
    # pos: tp 1, fp 1 (row 4), fn 1 (row 1) -> 2/4; neg: tp 2, fp 1, fn 0 -> 4/5;
    # neu: tp 0, fn 2 -> 0 ("banana" is outside the label set: a miss, not a new class).
    assert macro_f1(preds, golds) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert macro_f1(golds, golds) == 1.0
    with pytest.raises(ValueError):
        accuracy(["a"], ["a", "b"])


def test_pass_at_k() -> None:
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(7, 7, 4) == 1.0
    # 1 - C(3, 2)/C(5, 2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # Stable where the closed form's binomials would be astronomically large.
    assert 0.0 < pass_at_k(10_000, 1, 1) == pytest.approx(1e-4)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_registry() -> None:
    assert set(FORMAT_METRICS) == {
        "prompt_completion",
        "math",
        "classification",
        "qa",
        "instruction",
        "chat",
        "code",
    }
    assert metric_names("code") == ("pass_at_k", "exact_match", "eval_loss")
    for free_text in ("qa", "instruction", "chat"):  # token F1 first (the default), exact match kept
        assert metric_names(free_text) == ("token_f1", "exact_match", "eval_loss")
    assert ALWAYS == ("eval_loss",)
    assert {"eval_loss", "forgetting"} <= LOWER_IS_BETTER and "exact_match" not in LOWER_IS_BETTER
    assert all("@" not in m for ms in FORMAT_METRICS.values() for m in ms)
    with pytest.raises(ValueError, match="unknown data format"):
        metric_names("images")


def test_score_text_formats() -> None:
    rows = [
        {"prompt": "Q1", "completion": "The Louvre", "answers": ["Louvre museum"]},
        {"prompt": "Q2", "completion": "#### 12"},
    ]
    preds = [["louvre museum", "ignored"], ["it is 12"]]
    qa = score("qa", preds, rows)
    assert set(qa) == {"exact_match", "token_f1"}
    assert qa["exact_match"] == 0.5  # row 0 matches the alternative reference, row 1 does not
    # Row 1: [it, is, 12] vs [12] ("####" is punctuation): P = 1/3, R = 1 -> 0.5.
    assert qa["token_f1"] == pytest.approx((1.0 + 0.5) / 2)
    pc = score("prompt_completion", preds, rows)
    assert pc["exact_match"] == 0.0  # strict equality: no case/article folding for this format
    assert pc["number_match"] == 0.5
    cls = score("classification", [["a"], ["b"]], [{"prompt": "", "completion": "a"}] * 2)
    assert cls == {"accuracy": 0.5, "macro_f1": pytest.approx(2 / 3)}
    with pytest.raises(ValueError):
        score("qa", [[]], rows[:1])


_ADD_PROMPT = "def add(a, b):\n"
_ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def test_score_code_survives_hostile_samples() -> None:
    rows = [{"prompt": _ADD_PROMPT, "completion": "    return a + b\n", "tests": _ADD_TESTS}]
    samples = [
        "    return a + b\n",
        "    while True:\n        pass\n",
        "    import socket\n    socket.socket().connect(('127.0.0.1', 9))\n    return a + b\n",
    ]
    # 5 s, the default: a sandboxed interpreter's start on a loaded 2-core CI runner took over 1 s (the
    # correct sample then timed out: CI10 of stop 26).
    timeout = 5.0
    start = time.monotonic()
    out = score("code", [samples], rows, k=1, timeout_s=timeout)
    assert time.monotonic() - start < timeout + 10.0  # the loop is bounded by the timeout, not by the test
    assert out["pass_at_k"] == pytest.approx(1 / 3)
    assert out["exact_match"] == 1.0  # the first sample equals the reference
    assert score("code", [samples], rows, k=3, timeout_s=timeout)["pass_at_k"] == 1.0


def test_score_code_validates_before_running() -> None:
    rows = [{"prompt": _ADD_PROMPT, "completion": "", "tests": _ADD_TESTS}, {"prompt": "", "completion": ""}]
    with pytest.raises(ValueError, match="row 1"):
        score("code", [["    return 0\n"], ["x"]], rows)
    with pytest.raises(ValueError, match="k=2"):
        score("code", [["    return 0\n"]], rows[:1], k=2)
