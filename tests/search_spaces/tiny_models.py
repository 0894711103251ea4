"""Tiny random-init models shared by the method tests: a Llama (nn.Linear) and a GPT-2 (Conv1D)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel


def tiny_llama() -> PreTrainedModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,  # rectangular MLP weights, so a transposed factor would be a shape error
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: k/v projections are 64 → 32
        max_position_embeddings=64,
        initializer_range=0.1,  # not 0.02: logits are then O(1), so 1e-4 tolerances mean something
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> PreTrainedModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=32,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,  # GPT-2's 50256 is outside the tiny vocabulary
        eos_token_id=1,
        initializer_range=0.1,  # as in tiny_llama
    )
    return GPT2LMHeadModel(config).eval()


MODELS: dict[str, Callable[[], PreTrainedModel]] = {"llama": tiny_llama, "gpt2": tiny_gpt2}
