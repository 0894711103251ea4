"""Chat rows rendered the way the model is used: the tokenizer's chat template cut into context and targets.

Why: a chat model is prompted through its template (``apply_chat_template``), so an adapter must learn that
format — the template's own BOS, headers and end-of-turn token — not a second BOS in front of it or an EOS the
model never emits after an answer. This module renders a conversation with transformers' chat templating and
cuts the text into *segments* that alternate context and target: ``[context, target, context, target, ...]``.
A target is an assistant turn as the template writes it, from where the generation prompt ends to where the
template's next turn would begin, so it ends with the template's end-of-turn text (``<|eot_id|>``,
``<|im_end|>\\n``, ``</s>``, ``<end_of_turn>\\n``). Real templates (Llama 3, Mistral, Qwen, Gemma) have no
``{% generation %}`` markers, so ``return_assistant_tokens_mask`` cannot find the turns; instead each
assistant turn is located by rendering the conversation up to it (with the generation prompt) and through it
— the prefix rendering axolotl and TRL rely on too. A template that rewrites earlier turns once later ones
follow (Mistral v0.3 moves the system message into the last user turn, Qwen3 drops old reasoning) cannot
have those turns cut out in place; that is an error that points to ``data.chat_loss: last_assistant``.

A tokenizer without a template gets the plain rendering: one ``role: content`` line per turn, each assistant
turn ended by the EOS token instead of a newline (the end-of-turn the model stops at), and ``assistant: `` as
the generation prompt. Nothing here imports transformers, so the CLI check renders chat rows in pure Python.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from peftsweep.vocab import ChatLoss

Message = Mapping[str, str]
Render = Callable[[Sequence[Message], bool], str]  # (messages, add_generation_prompt) -> text

PLAIN_LINE = "{role}: {content}"  # a turn of the plain rendering; ended by "\n", or EOS for the assistant
PLAIN_GENERATION_PROMPT = "assistant: "
_PROBE = "peftsweep-end-of-turn-probe"  # an answer no template rewrites, to see what follows an answer


class TemplateMismatch(ValueError):
    """The chat template renders a turn differently once later turns follow, so it cannot be cut in place."""


def renderer(tokenizer: Any | None) -> Render:
    """How ``tokenizer`` renders a conversation: its chat template if it has one, else the plain lines."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):

        def template(messages: Sequence[Message], generation_prompt: bool) -> str:
            turns = [{"role": m["role"], "content": m["content"]} for m in messages]
            return tokenizer.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=generation_prompt
            )

        return template
    eos = (getattr(tokenizer, "eos_token", None) or "") if tokenizer is not None else ""

    def plain(messages: Sequence[Message], generation_prompt: bool) -> str:
        lines = (PLAIN_LINE.format(**m) + (eos if m["role"] == "assistant" else "\n") for m in messages)
        return "".join(lines) + (PLAIN_GENERATION_PROMPT if generation_prompt else "")

    return plain


def segments(messages: Sequence[Message], tokenizer: Any | None, chat_loss: ChatLoss) -> list[str]:
    """The rendered conversation as ``[context, target, ...]``; their concatenation is the whole rendering.

    Targets are the assistant turns ``chat_loss`` trains (all, or the last), each as the template writes it
    after its generation prompt, end-of-turn included. An assistant turn that opens the conversation has no
    prompt to answer and stays context. The last message must be the assistant's (formats checks that).
    """
    render = renderer(tokenizer)
    full = render(messages, False)
    last = len(messages) - 1
    if chat_loss == "last_assistant":
        trained = [last]
    else:
        trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > 0]
    out, pos = [], 0
    for i in trained:
        start = render(messages[:i], True)
        end = full if i == last else render(messages[: i + 1], False)
        if not (full.startswith(end) and end.startswith(start) and len(end) > len(start) >= pos):
            raise TemplateMismatch(
                f"the chat template renders the assistant turn messages[{i}] differently once later turns "
                "follow it (it rewrites earlier turns), so that turn cannot be trained in place; set "
                "data.chat_loss: last_assistant to train only the final answer"
            )
        out += [full[pos : len(start)], full[len(start) : len(end)]]
        pos = len(end)
    return out


def end_of_turn(tokenizer: Any | None) -> str:
    """What the template writes after an assistant's content (``<|eot_id|>``, ``<|im_end|>\\n``, EOS)."""
    render = renderer(tokenizer)
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    target = render(probe, False)[len(render(probe[:1], True)) :]
    return target[target.rfind(_PROBE) + len(_PROBE) :] if _PROBE in target else ""


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The token that ends an assistant turn: the first special (added) token the template writes after an
    answer, e.g. ``<|eot_id|>`` where EOS is ``<|end_of_text|>``; None when the template writes none.

    Generation stops there. Only an added token counts: a template whose turns end in a plain newline must
    not cut multi-line answers at their first line.
    """
    ids = tokenizer(end_of_turn(tokenizer), add_special_tokens=False)["input_ids"]
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return next((i for i in ids if i in added), None)
