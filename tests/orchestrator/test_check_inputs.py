"""Before any cluster work: method × architecture and hardware mismatches are spec errors naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from transformers import GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from peftsweep.cli import app


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(vocab_size=32, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def _validate(tmp_path: Path, **spec: object) -> tuple[int, str]:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "t", **spec}))
    result = CliRunner().invoke(app, ["validate", str(path)])
    return result.exit_code, result.output


def test_conv1d_incapable_methods_are_rejected_on_gpt2(gpt2_dir: Path, tmp_path: Path) -> None:
    code, out = _validate(tmp_path, base_model=str(gpt2_dir), methods=["lora", "olora", "loha"])
    assert code == 2
    assert "methods.1: olora does not support gpt2 models" in out
    assert "methods.2: loha does not support gpt2 models" in out
    assert "methods.0" not in out  # LoRA handles Conv1D


def test_the_same_methods_pass_on_the_llama_base(tmp_path: Path) -> None:
    code, out = _validate(tmp_path, methods=["lora", "olora", "loha"])
    assert code == 0, out


def test_cuda_only_and_zero_stage_limits_name_the_method(tmp_path: Path) -> None:
    code, out = _validate(tmp_path, methods=["lora", "qlora"])
    assert code == 2 and "methods.1: qlora needs a CUDA GPU" in out
    code, out = _validate(tmp_path, methods=["adalora"], resources={"zero_stage": 2})
    assert code == 2 and "methods.0: adalora works up to ZeRO stage 0" in out


def test_rank_above_the_hidden_size_is_refused_only_where_it_must_be_low_rank(tmp_path: Path) -> None:
    """The built-in base is 64 wide: LoRA at rank 128 is refused, VeRA (a random projection's rank) is not."""
    code, out = _validate(tmp_path, methods=[{"name": "vera", "ranks": [128]}])
    assert code == 0, out
    code, out = _validate(tmp_path, methods=[{"name": "lora", "ranks": [128]}])
    assert code == 2 and "rank 128 exceeds the base model's hidden size 64" in out
