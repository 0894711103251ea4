"""Evaluation of a causal LM on prompt/completion rows: greedy exact match and teacher-forced loss.

Why: the sweep ranks methods by exact match of greedy answers (what a user of the adapter sees) and also
reports the completion loss (smooth, useful to spot divergence and for early stopping). Both must be
deterministic, so two evaluations of the same weights give the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from peftsweep.trainables.data import IGNORE_INDEX, _encode, collate

if TYPE_CHECKING:
    import datasets
    import torch


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: datasets.Dataset | Iterable[Mapping[str, str]],
    batch_size: int = 256,  # the whole built-in eval set in one or two forward passes; memory is tiny
    max_new_tokens: int | None = None,  # None: longest reference + 1, enough to see the EOS after any answer
) -> dict[str, float]:
    """``{"exact_match", "eval_loss"}`` of ``model`` (plain HF or ``peft.PeftModel``) on ``examples``.

    exact_match: greedy generation from BOS + prompt, cut at EOS, stripped, equal to the stripped completion.
    eval_loss: mean cross-entropy per completion(+EOS) token, teacher-forced. The model's train/eval mode is
    restored afterwards.
    """
    import torch

    rows = [(str(r["prompt"]), str(r["completion"])) for r in examples]
    if not rows:
        raise ValueError("evaluate() needs at least one example")
    prompts = tokenizer([p for p, _ in rows], add_special_tokens=False)["input_ids"]
    completions = tokenizer([c for _, c in rows], add_special_tokens=False)["input_ids"]
    if max_new_tokens is None:
        max_new_tokens = max(len(c) for c in completions) + 1
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad_id = _pad_id(tokenizer)
    device = next(model.parameters()).device

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = [bos + p for p in prompts]
            answers = _greedy(model, tokenizer, inputs, batch_size, max_new_tokens, pad_id, device)
            loss_sum, n_tokens = 0.0, 0
            for start in range(0, len(rows), batch_size):
                chunk = zip(
                    prompts[start : start + batch_size], completions[start : start + batch_size], strict=True
                )
                feats = [_encode(tokenizer, p, c, max_length=1 << 30) for p, c in chunk]  # no truncation
                batch = {k: v.to(device) for k, v in collate(feats, pad_id).items()}
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
    finally:
        model.train(was_training)

    hits = sum(a.strip() == c.strip() for a, (_, c) in zip(answers, rows, strict=True))
    return {"exact_match": hits / len(rows), "eval_loss": loss_sum / max(1, n_tokens)}


def _pad_id(tokenizer: Any) -> int:
    """Padding id; tokenizers without a pad token (GPT-2 style) pad with EOS, which the mask hides anyway."""
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0


def _greedy(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    batch_size: int,
    max_new_tokens: int,
    pad_id: int,
    device: torch.device,
) -> list[str]:
    """Decoded greedy continuations (up to EOS) of tokenized prompts, in input order.

    Prompts are sorted by length so that batches need little left padding; ``generate`` takes care of the
    attention mask, position ids and PEFT prompt-learning prefixes.
    """
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(prompts[i])
            input_ids[row, width - n :] = torch.as_tensor(prompts[i], dtype=torch.long)  # left padding
            attention_mask[row, width - n :] = 1
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row, i in enumerate(idx):
            new = generated[row, width:].tolist()
            if tokenizer.eos_token_id in new:
                new = new[: new.index(tokenizer.eos_token_id)]
            out[i] = tokenizer.decode(new, skip_special_tokens=True)
    return out
