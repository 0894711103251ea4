"""Evaluation of a causal LM on prompt/completion rows: generated answers scored by task metrics, plus loss.

Why: the sweep ranks methods by a task metric of generated answers (what a user of the adapter sees:
exact match, final number, accuracy/F1, pass@k) and also reports the completion loss (smooth, useful to spot
divergence and for early stopping). Greedy evaluation is deterministic, so two evaluations of the same
weights give the same numbers. The scoring itself lives in ``task_metrics`` (pure Python).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from peftsweep.trainables.data import IGNORE_INDEX, collate, join_pieces, last_turn, pad_id, token_pieces

if TYPE_CHECKING:
    import datasets

    from peftsweep.spec import SweepSpec


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: datasets.Dataset | Iterable[Mapping[str, Any]],
    fmt: str = "prompt_completion",
    *,
    batch_size: int = 256,  # the whole built-in eval set in one or two forward passes; memory is tiny
    max_new_tokens: int | None = None,  # None: the longest target, enough to see its EOS or end-of-turn
    samples: int = 1,  # generations per prompt; 1 = greedy
    temperature: float = 0.8,  # only with samples > 1
    pass_k: int = 1,
    code_timeout_s: float = 5.0,
    code_memory_mb: int = 512,
) -> dict[str, float]:
    """The format's task metrics (``task_metrics.FORMAT_METRICS``) plus ``eval_loss`` on ``examples``.

    Each row's last answer is generated from its prompt encoded as in training (``data.token_pieces``: BOS +
    prompt, or a chat row's rendering up to the generation prompt), batched, greedy unless ``samples`` > 1,
    cut at EOS (or the chat template's end-of-turn token), and scored by ``task_metrics.score`` against the
    reference without that token (code runs in the sandbox). eval_loss: mean cross-entropy per target token
    (the answer and its EOS or end-of-turn), teacher-forced. The model (plain HF or ``peft.PeftModel``)
    keeps its train/eval mode.
    """
    from peftsweep.trainables.task_metrics import score

    rows = [dict(r) for r in examples]
    if not rows:
        raise ValueError("evaluate() needs at least one example")
    prompts, targets = _last_turns(tokenizer, rows)
    if max_new_tokens is None:
        max_new_tokens = max(len(t) for t in targets)
    stop = _stop_ids(tokenizer, chat=any(r.get("segments") for r in rows))
    with _eval_mode(model):
        answers = _generate(model, tokenizer, prompts, stop, batch_size, max_new_tokens, samples, temperature)
        loss = _completion_loss(model, tokenizer, prompts, targets, batch_size)
    metrics = score(fmt, answers, rows, k=pass_k, timeout_s=code_timeout_s, memory_mb=code_memory_mb)
    return {**metrics, "eval_loss": loss}


def complete(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int = 64
) -> list[str]:
    """Greedy completions of plain prompts, encoded and cut as evaluation does (BOS + prompt, up to EOS):
    what a loaded champion answers (the registry's pyfunc models)."""
    ids, _ = _last_turns(tokenizer, [{"prompt": p, "completion": ""} for p in prompts])
    with _eval_mode(model):
        out = _generate(
            model, tokenizer, ids, _stop_ids(tokenizer, False), batch_size, max_new_tokens, 1, 1.0
        )
    return [answers[0] for answers in out]


def _last_turns(tokenizer: Any, rows: list[dict[str, Any]]) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and target token ids of every row's last answer, encoded exactly as training encodes them."""
    turns = [last_turn(pieces) for pieces in token_pieces(tokenizer, rows)]
    return [p for p, _ in turns], [t for _, t in turns]


def _stop_ids(tokenizer: Any, chat: bool) -> list[int]:
    """Token ids that end an answer: EOS, and for chat rows the template's end-of-turn token as well (Llama 3
    ends a turn with ``<|eot_id|>`` while its EOS is ``<|end_of_text|>``)."""
    from peftsweep.trainables.chat import end_of_turn_id

    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    turn_end = end_of_turn_id(tokenizer) if chat else None
    return stop + ([turn_end] if turn_end is not None and turn_end not in stop else [])


def completion_loss(
    model: Any, tokenizer: Any, examples: Iterable[Mapping[str, Any]], batch_size: int = 256
) -> float:
    """Mean teacher-forced cross-entropy per target token of each row's last answer: the forgetting check's
    general loss."""
    rows = [dict(r) for r in examples]
    if not rows:
        raise ValueError("completion_loss() needs at least one example")
    prompts, targets = _last_turns(tokenizer, rows)
    with _eval_mode(model):
        return _completion_loss(model, tokenizer, prompts, targets, batch_size)


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Eval mode and no autograd inside; the caller's train/eval mode is restored afterwards."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _completion_loss(
    model: Any, tokenizer: Any, prompts: list[list[int]], answers: list[list[int]], batch_size: int
) -> float:
    import torch

    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    loss_sum, n_tokens = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        chunk = zip(prompts[start : start + batch_size], answers[start : start + batch_size], strict=True)
        feats = [join_pieces([p, t], max_length=1 << 30) for p, t in chunk]  # no truncation
        batch = {k: v.to(device) for k, v in collate(feats, pad).items()}
        labels = batch.pop("labels")
        # Cross-entropy from the logits, not `model(..., labels).loss`: some methods add their own
        # penalty to it (AdaLoRA's orthogonality term), and eval_loss must mean the same for all.
        # Prompt methods prepend virtual tokens, so keep the last positions, aligned with the labels.
        logits = model(**batch).logits[:, -labels.shape[1] :].float()
        targets = labels[:, 1:]  # position t predicts token t+1
        loss_sum += float(
            torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        )
        n_tokens += int((targets != IGNORE_INDEX).sum())
    return loss_sum / max(1, n_tokens)


def _generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    stop: list[int],
    batch_size: int,
    max_new_tokens: int,
    samples: int,
    temperature: float,
) -> list[list[str]]:
    """Decoded continuations (up to the first ``stop`` token) of tokenized prompts, ``samples`` per prompt, in
    input order.

    Prompts are sorted by length so that batches need little left padding; ``generate`` takes care of the
    attention mask, position ids and PEFT prompt-learning prefixes. One sample is greedy decoding.
    """
    import torch

    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature} if samples > 1 else {"do_sample": False}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[str]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(prompts[i])
            input_ids[row, width - n :] = torch.as_tensor(prompts[i], dtype=torch.long)  # left padding
            attention_mask[row, width - n :] = 1
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            num_beams=1,
            num_return_sequences=samples,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=stop or None,
            **sampling,
        )
        for j, seq in enumerate(generated):  # row-major: samples of one prompt are adjacent
            new = seq[width:].tolist()
            end = next((k for k, t in enumerate(new) if t in stop), len(new))
            out[idx[j // samples]].append(tokenizer.decode(new[:end], skip_special_tokens=True))
    return out


def evaluate_adapter(spec: SweepSpec, data_dir: str, adapter_dir: str) -> dict[str, float]:
    """Task metrics of a saved adapter on the sweep's held-out data: the test split, else validation.

    Why: the champion gate compares a new adapter with the registered champion on the same rows, evaluated
    the same way, not on numbers two sweeps reported. Runs where it is called (a Ray task in a sweep).
    """
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftsweep.search_spaces import load_trained
    from peftsweep.trainables.model import hub_options, resolve_base_model
    from peftsweep.trainables.prepared import load_prepared

    torch.manual_seed(spec.training.seed)  # sampled evaluation (samples > 1) repeats exactly
    base_path = resolve_base_model(spec.base_model)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, **hub_options(spec))
    model = load_trained(base, adapter_dir)
    if torch.cuda.is_available():
        model = model.to("cuda")
    data = load_prepared(Path(data_dir))
    rows = data.test if data.test is not None else data.validation
    tokenizer = AutoTokenizer.from_pretrained(base_path, **hub_options(spec))
    return evaluate(model, tokenizer, rows, spec.data.format, **spec.evaluation.model_dump())
