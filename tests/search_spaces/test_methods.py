"""Conformance tests every registered method must pass, on tiny random-init Llama and GPT-2 (Conv1D) models.

Adding a method = one module in peftsweep/search_spaces/ + one row in METHODS below.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from peftsweep import search_spaces
from peftsweep.search_spaces import AdapterHParams, export_adapter, get_method

REPO = Path(__file__).resolve().parents[2]

# One row per method: (name, whether its init mutates the base weights, so needs snapshot + conversion).
METHODS = [
    ("lora", False),
    ("dora", False),
    ("pissa", True),
    ("milora", True),
]

pytestmark = [
    # Expected: PEFT switches GPT-2's Conv1D layers to fan_in_fan_out=True itself and says so.
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
    # peft 0.21.2 still calls a transformers 5.x API that is deprecated; not ours to fix.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


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
RANK = 8
ATOL = 1e-4


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices: on a busy 2-core box multi-threaded MKL SVDs ran 10-70x slower than single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(1))


def build(method: str, model: str, workdir: Path, **options: object) -> tuple[PeftModel, PreTrainedModel]:
    """The adapted model (alpha = 2r so the scaling is not 1) and an untouched copy of its base."""
    hparams = AdapterHParams(rank=RANK, alpha=2 * RANK, options=options)
    return get_method(method).apply(MODELS[model](), hparams, workdir), MODELS[model]()


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def train(model: PeftModel, tokens: torch.Tensor, steps: int, lr: float) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


methods = pytest.mark.parametrize(("method", "mutates"), METHODS)
models = pytest.mark.parametrize("model", list(MODELS))


def test_table_covers_every_registered_method() -> None:
    assert sorted(name for name, _ in METHODS) == search_spaces.method_names()


@methods
@models
def test_apply_trains_only_adapter_params(method: str, mutates: bool, model: str, tmp_path: Path) -> None:
    peft_model, _ = build(method, model, tmp_path)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable
    assert all(".lora_" in n for n in trainable), trainable
    assert not any("lm_head" in n for n in trainable)  # all-linear leaves the output layer alone
    # DDP/DeepSpeed broadcast parameters at start-up and reject non-contiguous ones (SVD inits on Conv1D).
    assert all(p.is_contiguous() for p in peft_model.parameters())
    assert (tmp_path / "initial").is_dir() == mutates
    if mutates:  # else PEFT's conversion would decompose the residual base a second time on export
        snapshot = json.loads((tmp_path / "initial" / "adapter_config.json").read_text())
        assert snapshot["init_lora_weights"] is True


@methods
@models
def test_step0_logits_match_base(
    method: str, mutates: bool, model: str, tmp_path: Path, tokens: torch.Tensor
) -> None:
    peft_model, base = build(method, model, tmp_path)
    expected = logits(base, tokens)
    torch.testing.assert_close(logits(peft_model, tokens), expected, atol=ATOL, rtol=0)
    with peft_model.disable_adapter():
        residual_gap = (logits(peft_model, tokens) - expected).abs().max().item()
    # Mutating inits must really have moved the base weights, else the check above proves nothing for them.
    assert (residual_gap > 0.1) == mutates, residual_gap


@methods
@models
def test_one_adamw_step_changes_only_trainable_params(
    method: str, mutates: bool, model: str, tmp_path: Path, tokens: torch.Tensor
) -> None:
    peft_model, _ = build(method, model, tmp_path)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    train(peft_model, tokens, steps=1, lr=1e-3)
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert changed, "the step changed nothing"
    assert changed <= trainable, sorted(changed - trainable)


@methods
@models
def test_export_reloads_on_a_fresh_base(
    method: str, mutates: bool, model: str, tmp_path: Path, tokens: torch.Tensor
) -> None:
    workdir, out_dir = tmp_path / "work", tmp_path / "adapter"
    workdir.mkdir()
    peft_model, base = build(method, model, workdir)
    base_logits = logits(base, tokens)
    train(peft_model, tokens, steps=5, lr=1e-2)  # a largish LR so the adapter really moves
    trained = logits(peft_model, tokens)
    assert (trained - base_logits).abs().max() > 0.5
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]

    peft_model.train()  # a mid-training checkpoint: the export must leave the model as it found it
    export_adapter(peft_model, out_dir, workdir)
    assert all(m.training for m in peft_model.modules())
    assert [n for n, p in peft_model.named_parameters() if p.requires_grad] == trainable
    assert list(peft_model.peft_config) == ["default"]
    assert peft_model.peft_config["default"].r == RANK  # the rank-2r config is written for the export only
    peft_model.eval()
    torch.testing.assert_close(logits(peft_model, tokens), trained, atol=0, rtol=0)

    assert (out_dir / "adapter_model.safetensors").is_file()
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["r"] == (2 * RANK if mutates else RANK)  # mutated inits become a rank-2r plain LoRA delta
    assert config["init_lora_weights"] is True
    reloaded = PeftModel.from_pretrained(base, out_dir).eval()
    torch.testing.assert_close(logits(reloaded, tokens), trained, atol=ATOL, rtol=0)


# Which end of the base weight's spectrum each SVD init takes, and how exactly (randomized SVD: roughly).
SPECTRUM_CASES = [
    ("pissa", {"niter": None}, "largest", 1e-4),
    ("pissa", {}, "largest", 0.1),  # default niter=4 on a flat random spectrum: within ~5 %
    ("milora", {}, "smallest", 1e-4),
]


@pytest.mark.parametrize(("method", "options", "end", "rtol"), SPECTRUM_CASES)
@models
def test_svd_init_takes_the_right_singular_values(
    method: str, options: dict[str, object], end: str, rtol: float, model: str, tmp_path: Path
) -> None:
    base = MODELS[model]()
    base_modules = dict(base.named_modules())
    # Snapshot the weights first: apply mutates the base in place.
    originals = {
        n: m.weight.detach().clone() for n, m in base_modules.items() if n.endswith(("q_proj", "c_fc"))
    }
    peft_model = get_method(method).apply(
        base, AdapterHParams(rank=RANK, alpha=2 * RANK, options=options), tmp_path
    )
    layers = dict(peft_model.base_model.model.named_modules())
    assert originals
    for name, weight in originals.items():
        layer = layers[name]
        s = torch.linalg.svdvals(weight)
        expected = s[:RANK] if end == "largest" else s[-RANK:]
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        got = torch.linalg.svdvals(delta.detach())[:RANK]
        torch.testing.assert_close(got, expected, rtol=rtol, atol=0)
        if rtol < 1e-3:  # exact SVD: the residual keeps exactly the other singular values
            rest = s[RANK:] if end == "largest" else s[:-RANK]
            residual = torch.linalg.svdvals(layer.get_base_layer().weight.detach())[: rest.numel()]
            torch.testing.assert_close(residual, rest, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "init"), [({}, "pissa_niter_4"), ({"niter": None}, "pissa"), ({"niter": 0}, "pissa_niter_0")]
)
def test_pissa_niter_selects_the_svd(options: dict[str, object], init: str, tmp_path: Path) -> None:
    peft_model, _ = build("pissa", "llama", tmp_path, **options)
    assert peft_model.peft_config["default"].init_lora_weights == init


def test_unknown_method_lists_known_names() -> None:
    with pytest.raises(KeyError) as excinfo:
        get_method("lorra")
    for name in search_spaces.method_names():
        assert name in str(excinfo.value)


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        search_spaces.register(get_method("lora"))


@pytest.mark.parametrize(("method", "options"), [("lora", {"niter": 4}), ("pissa", {"niter": -1})])
def test_bad_options_are_refused(method: str, options: dict[str, object], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="niter"):
        build(method, "llama", tmp_path, **options)


def test_plain_method_refuses_a_stale_snapshot(tmp_path: Path) -> None:
    (tmp_path / "initial").mkdir()
    with pytest.raises(FileExistsError):
        build("lora", "llama", tmp_path)


def test_registry_import_does_not_import_torch() -> None:
    code = (
        "import peftsweep.search_spaces as s, sys; assert s.method_names(); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
