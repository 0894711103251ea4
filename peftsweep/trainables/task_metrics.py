"""Task metrics scored from generated strings: numbers (GSM8K), SQuAD EM/F1, labels, pass@k.

Why: the sweep optimises one named metric per data format, so the names are a registry the spec validates
against, and every scorer is pure Python over strings (generation lives in ``metrics.py``) so it is cheap,
deterministic and testable without a model. Code is the exception: it is executed, in :mod:`sandbox`.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal, InvalidOperation
from typing import Any

from peftsweep.trainables.sandbox import run_python
from peftsweep.vocab import ALWAYS, FORMAT_METRICS, LOWER_IS_BETTER, metric_names  # noqa: F401 (re-export)

# Free-form answers are judged modulo case/punctuation/articles; exact formats (numbers, code) are not.
_SQUAD_EM_FORMATS = frozenset({"qa", "instruction", "chat"})
_CODE_WORKERS = 2  # each sample is its own interpreter process; 2 keeps a 2-core node responsive

# An optional sign (only when it cannot be a binary minus after a value, as in "10-3"), an optional "$",
# then digits with optional thousands commas and decimals.
_NUMBER = re.compile(
    r"(?:(?<![\w.)\]])(?P<sign>[-+\u2212])\s*)?\$?\s*"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)


def _format_metrics(fmt: str) -> tuple[str, ...]:
    return metric_names(fmt)[: -len(ALWAYS)]


def _canonical_number(sign: str, num: str) -> str | None:
    try:
        value = Decimal(num.replace(",", ""))
    except InvalidOperation:
        return None
    if sign in ("-", "\u2212"):
        value = -value
    if value == value.to_integral_value():
        return str(int(value))  # "007" -> "7", "4.0" -> "4", "-0" -> "0"
    return format(value.normalize(), "f")  # "3.50" -> "3.5", never exponent notation


def extract_final_number(text: str) -> str | None:
    """The answer number of a GSM8K-style text in canonical form, or None if there is none.

    After the last ``####`` if present (GSM8K's answer marker), else the last number in the text. Canonical
    form drops thousands commas, ``$``, ``+``, leading zeros and trailing decimal zeros, so equal values give
    equal strings.
    """
    if "####" in text:
        match = _NUMBER.search(text.rsplit("####", 1)[1])
    else:
        matches = list(_NUMBER.finditer(text))
        match = matches[-1] if matches else None
    if match is None:
        return None
    return _canonical_number(match["sign"] or "", match["num"])


def number_match(prediction: str, reference: str) -> bool:
    """Whether both texts carry the same final number (False if the prediction has none)."""
    pred = extract_final_number(prediction)
    return pred is not None and pred == extract_final_number(reference)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _check_references(references: Sequence[str]) -> None:
    if isinstance(references, str) or not references:
        raise ValueError("references must be a non-empty list of strings")


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)  # SQuAD v2: empty vs empty is a match
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD token F1 of ``prediction`` against its best-matching reference."""
    _check_references(references)
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(ref).split()) for ref in references)


def squad_exact_match(prediction: str, references: Sequence[str]) -> bool:
    """Whether ``prediction`` equals some reference after SQuAD normalisation."""
    _check_references(references)
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(ref) for ref in references)


def _labels(predictions: Sequence[str], labels: Sequence[str]) -> tuple[list[str], list[str]]:
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"need as many predictions as labels (>0), got {len(predictions)} and {len(labels)}")
    return [p.strip() for p in predictions], [g.strip() for g in labels]


def accuracy(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Fraction of predictions equal to their label, both stripped."""
    preds, golds = _labels(predictions, labels)
    return sum(p == g for p, g in zip(preds, golds, strict=True)) / len(golds)


def macro_f1(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Unweighted mean F1 over the labels present in ``labels``.

    A prediction outside that label set is a miss for its row's label and a false positive for no class, so
    it lowers recall without inventing a class that would dilute the mean.
    """
    preds, golds = _labels(predictions, labels)
    scores = []
    for label in sorted(set(golds)):
        tp = sum(p == label and g == label for p, g in zip(preds, golds, strict=True))
        fp = sum(p == label and g != label for p, g in zip(preds, golds, strict=True))
        fn = sum(p != label and g == label for p, g in zip(preds, golds, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn))  # > 0 denominator: the label occurs in golds
    return sum(scores) / len(scores)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``c`` passing out of ``n`` samples: 1 - C(n-c, k)/C(n, k) (Chen et al. 2021).

    Computed as a running product, which avoids the huge binomials of the closed form.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset contains a passing sample
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def _references(row: Mapping[str, Any]) -> list[str]:
    return [str(row["completion"]), *(str(a) for a in row.get("answers") or ())]


def _code_pass_counts(
    predictions: Sequence[Sequence[str]],
    rows: Sequence[Mapping[str, Any]],
    timeout_s: float,
    memory_mb: int,
) -> list[int]:
    programs: list[tuple[int, str]] = []
    for i, (samples, row) in enumerate(zip(predictions, rows, strict=True)):
        tests = row.get("tests")
        if not isinstance(tests, str) or not tests.strip():
            raise ValueError(f"code row {i} has no 'tests' to run")
        # HumanEval layout: the prompt holds the signature, the sample the body, the tests the asserts.
        programs.extend((i, str(row["prompt"]) + s + "\n\n" + tests) for s in samples)
    counts = [0] * len(rows)
    with ThreadPoolExecutor(max_workers=_CODE_WORKERS) as pool:
        results = pool.map(
            lambda prog: run_python(prog[1], timeout_s=timeout_s, memory_mb=memory_mb), programs
        )
        for (i, _), result in zip(programs, results, strict=True):
            counts[i] += result.passed
    return counts


def score(
    fmt: str,
    predictions: Sequence[Sequence[str]],
    rows: Sequence[Mapping[str, Any]],
    *,
    k: int = 1,
    timeout_s: float = 5.0,
    memory_mb: int = 512,  # address-space cap of one generated program (sandbox default)
) -> dict[str, float]:
    """Every task metric of ``fmt`` (not eval_loss), averaged over rows.

    ``predictions[i]`` holds the n >= 1 generations for ``rows[i]``; all metrics but pass_at_k use the first.
    Rows carry ``prompt`` and ``completion`` (the reference), optionally ``answers`` (more references) and,
    for code, ``tests``. Code samples run in the sandbox, so a hanging or hostile sample costs at most
    ``timeout_s`` and scores as a failure instead of breaking the evaluation.
    """
    names = _format_metrics(fmt)
    if len(predictions) != len(rows) or not rows:
        raise ValueError(
            f"need one prediction list per row (>0 rows), got {len(predictions)} and {len(rows)}"
        )
    for i, samples in enumerate(predictions):
        if isinstance(samples, str) or not samples:
            raise ValueError(f"predictions[{i}] must be a non-empty list of generations")
        if "pass_at_k" in names and k > len(samples):
            raise ValueError(f"pass_at_k with k={k} needs >= k samples, row {i} has {len(samples)}")
    firsts = [str(samples[0]) for samples in predictions]
    refs = [str(row["completion"]) for row in rows]

    out: dict[str, float] = {}
    for name in names:
        if name == "exact_match":
            if fmt in _SQUAD_EM_FORMATS:
                hits = [squad_exact_match(p, _references(r)) for p, r in zip(firsts, rows, strict=True)]
            else:
                hits = [p.strip() == g.strip() for p, g in zip(firsts, refs, strict=True)]
            out[name] = sum(hits) / len(hits)
        elif name == "number_match":
            out[name] = sum(number_match(p, g) for p, g in zip(firsts, refs, strict=True)) / len(refs)
        elif name == "token_f1":
            out[name] = sum(token_f1(p, _references(r)) for p, r in zip(firsts, rows, strict=True)) / len(
                rows
            )
        elif name == "accuracy":
            out[name] = accuracy(firsts, refs)
        elif name == "macro_f1":
            out[name] = macro_f1(firsts, refs)
        elif name == "pass_at_k":
            counts = _code_pass_counts(predictions, rows, timeout_s, memory_mb)
            per_row = [pass_at_k(len(s), c, k) for s, c in zip(predictions, counts, strict=True)]
            out[name] = sum(per_row) / len(per_row)
        else:  # a name added to FORMAT_METRICS without a scorer
            raise AssertionError(f"no scorer for metric {name!r}")
    return out
