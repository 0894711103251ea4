"""Built-in CPU assets: a char-level tokenizer, generated arithmetic tasks and a tiny pretrained Llama.

Why: a sweep demo must run in minutes on a laptop CPU with no network, yet the learning rate must really
matter. A tiny Llama pretrained on 2-digit *addition* and fine-tuned on a shifted task (*subtraction*) gives
exactly that: the base knows the format and digits, the new skill needs a well-chosen LR (see STACK.md).

The committed assets under ``peftsweep/assets`` are produced by ``scripts/build_assets.py`` from the
functions here; everything is deterministic from the seeds. Heavy imports stay inside functions so that
``peftsweep.trainables.data`` can import the asset paths without pulling in torch.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from peftsweep.trainables.assets import (  # noqa: F401 (re-exported: the asset paths' old home)
    ASSETS_DIR,
    DEFAULT_MODEL,
    DEFAULT_TASK,
    builtin_model_dir,
    builtin_task_dir,
)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # pad first so that id 0 is padding, as embedding code usually assumes
CHARS = list("0123456789") + list("+-=") + [" "]  # digits and operators of the tasks; space for readability
VOCAB = SPECIAL_TOKENS + CHARS

MAX_LENGTH = 32  # longest sequence the tiny model sees: BOS + 6 prompt + 3 answer + EOS = 11, with headroom

PRETRAIN_HELDOUT = 500  # 5 % of the 10,000 additions: enough for a ±1 % exact-match estimate, rest trains
TASK_EVAL_SIZE = 250  # eval rows of arith-sub: ±3 % standard error at 50 % exact match, evaluates in < 1 s


# --------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Char-level WordLevel tokenizer that prepends BOS itself, so it behaves like a hub tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()  # join characters without the spaces WordLevel would insert
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MAX_LENGTH,
    )


# --------------------------------------------------------------------------------------------- tasks


def addition_examples() -> list[dict[str, str]]:
    """All 10,000 zero-padded 2-digit additions ``aa+bb=`` -> ``ccc`` (the pretraining corpus)."""
    return [
        {"prompt": f"{a:02d}+{b:02d}=", "completion": f"{a + b:03d}"} for a in range(100) for b in range(100)
    ]


def subtraction_examples() -> list[dict[str, str]]:
    """All 5,050 2-digit subtractions with a non-negative result ``aa-bb=`` -> ``ccc`` (zero-padded).

    Same shape of prompt and answer as the pretraining additions, but a new operator and a new rule: the
    base must be *adapted*, not just prompted.
    """
    return [
        {"prompt": f"{a:02d}-{b:02d}=", "completion": f"{a - b:03d}"}
        for a in range(100)
        for b in range(a + 1)
    ]


def _split(
    rows: Sequence[dict[str, str]], n_holdout: int, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Shuffle deterministically (Python's own RNG, stable across versions) and cut off ``n_holdout`` rows."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = sorted(order[:n_holdout])
    rest = sorted(order[n_holdout:])
    return [dict(rows[i]) for i in rest], [dict(rows[i]) for i in held]


def pretrain_examples(
    split: Literal["train", "heldout"], seed: int = 0, n_heldout: int = PRETRAIN_HELDOUT
) -> list[dict[str, str]]:
    """Train or held-out part of the addition corpus; the split depends only on ``seed``."""
    train, held = _split(addition_examples(), n_heldout, seed)
    return train if split == "train" else held


def heldout_addition_examples() -> list[dict[str, str]]:
    """The additions held out of pretraining: the base's own skill on unseen rows.

    Why: general held-out data for the forgetting check (``forgetting.task: builtin:arith-add``) — learning to
    subtract should not cost the base its addition.
    """
    return pretrain_examples("heldout")


# name -> all rows of that built-in task: arith-sub is the fine-tuning task, arith-add the forgetting check's
TASK_GENERATORS = {"arith-sub": subtraction_examples, "arith-add": heldout_addition_examples}


def task_examples(
    name: str = DEFAULT_TASK, seed: int = 0, n_eval: int = TASK_EVAL_SIZE
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, eval) rows of a built-in fine-tuning task: disjoint, deterministic from ``seed``."""
    if name not in TASK_GENERATORS:
        raise ValueError(f"unknown built-in task {name!r}; available: {sorted(TASK_GENERATORS)}")
    return _split(TASK_GENERATORS[name](), n_eval, seed)


def write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One JSON object per line, the format ``data.check_task_files`` accepts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------- asset paths


# --------------------------------------------------------------------------------------------- base model


def build_config(tokenizer: PreTrainedTokenizerFast) -> Any:
    """LlamaConfig of the tiny base: ~134k parameters, so a PEFT trial takes seconds on one CPU thread."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,  # small width that learns 2-digit addition fast and still has room for rank 8-16
        intermediate_size=256,  # the usual 4x hidden
        num_hidden_layers=2,  # enough depth for carry propagation; more only slows CPU trials
        num_attention_heads=4,  # head_dim 16
        num_key_value_heads=4,  # plain multi-head attention: no GQA on a model this small
        max_position_embeddings=MAX_LENGTH,  # sequences are 11 tokens; RoPE needs no more
        tie_word_embeddings=False,  # separate lm_head, like most modern bases, so "all-linear" targets differ
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_base_model(
    out_dir: str | Path,
    seed: int = 0,
    steps: int = 1500,  # ~19 epochs of the 9,500 additions at batch 128: reaches ~100 % held-out in ~30 s
    batch_size: int = 128,  # the measured setting of STACK.md; larger batches only slow a 1-thread CPU step
    lr: float = 3e-3,  # high but stable for a 134k-param model with AdamW and warmup
    warmup_steps: int = 100,  # avoid early blow-ups of the freshly initialised attention
    min_exact_match: float = 0.95,  # the base must really know addition, or "adapting" it means nothing
    num_threads: int = 1,  # one thread makes the float results (and thus the committed weights) reproducible
    log_every: int = 250,  # a few progress lines for the ~30 s build
) -> float:
    """Pretrain the tiny Llama on additions (loss on the answer only), save model + tokenizer to ``out_dir``.

    Returns the held-out exact match; raises ``RuntimeError`` below ``min_exact_match`` so that a bad base is
    never written silently.
    """
    import torch
    from datasets import Dataset
    from transformers import GenerationConfig, LlamaForCausalLM

    from peftsweep.trainables.data import collate, tokenize_for_training
    from peftsweep.trainables.metrics import evaluate

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        model = LlamaForCausalLM(build_config(tokenizer))
        train_rows = pretrain_examples("train")
        held_rows = pretrain_examples("heldout")
        features = tokenize_for_training(Dataset.from_list(train_rows), tokenizer, MAX_LENGTH).to_list()

        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)  # no decay: data is the universe
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(warmup_steps, steps))
        gen = torch.Generator().manual_seed(seed)
        model.train()
        order: list[int] = []
        for step in range(1, steps + 1):
            if len(order) < batch_size:
                order += torch.randperm(len(features), generator=gen).tolist()
            idx, order = order[:batch_size], order[batch_size:]
            batch = collate([features[i] for i in idx], tokenizer.pad_token_id)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if log_every and step % log_every == 0:
                print(f"pretrain step {step}/{steps} loss {loss.item():.4f}", flush=True)

        em = evaluate(model, tokenizer, held_rows)["exact_match"]
        if em < min_exact_match:
            raise RuntimeError(
                f"tiny base reached only {em:.3f} held-out exact match (< {min_exact_match}); raise steps"
            )
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            do_sample=False,  # exact-match tasks are scored greedily
        )
        model.save_pretrained(out)  # safetensors by default
        tokenizer.save_pretrained(out)
        return em
    finally:
        torch.set_num_threads(prev_threads)


def _warmup_cosine(warmup_steps: int, total_steps: int) -> Any:
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def load_builtin(name: str = DEFAULT_MODEL) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load a packaged base the way any hub model is loaded: ``Auto*.from_pretrained`` on its directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin_model_dir(name)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
