"""scripts/gpu_check.sh cannot run without CUDA; here: it parses, refuses clearly without CUDA, and its
Python part builds the promised ~0.5B Llama-shaped base and counts its FLOPs. (`--dry-run` runs its trials on
CPU in ~2 minutes: too slow for the suite.)"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _module() -> object:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_says_so_and_fails() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "gpu_check: no CUDA device" in done.stderr and "--dry-run" in done.stderr


def test_its_base_is_half_a_billion_parameters_and_its_flops_add_up() -> None:
    from transformers import LlamaForCausalLM

    from peftsweep.trainables.builtin import build_tokenizer

    gpu_check = _module()
    config = gpu_check.base_config(build_tokenizer(), dry=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    assert 0.45e9 < params < 0.6e9
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    per_token = gpu_check.model_flops_per_token(config, trainable=0, seq=512)
    attention = 3 * config.num_hidden_layers * 4 * 512 * config.hidden_size
    assert per_token == 4 * matmul + attention
