"""The non-PEFT methods (full fine-tuning, BitFit, FineGates) on tiny random Llama and GPT-2 (Conv1D) models.

Their results are not PEFT adapters: each has its own export and loader, reached through load_trained.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from peftsweep.search_spaces import AdapterHParams, export_trained, get_method, load_trained
from peftsweep.search_spaces.finegates import gated_layers, keep_probability, pruned_model, sparsity_loss
from tests.search_spaces.tiny_models import MODELS, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


METHODS = ["fullft", "bitfit", "finegates"]
ATOL = 1e-5
# FineGates at step 0: every eval gate is exactly 1 unless a logit drew 4.5 σ low (p ≈ 3e-6 per gate), so
# the outputs match the base up to float rounding; its pruned export folds gates into weights (reordered
# float products), hence a slightly looser bound than the bit-exact methods.
FINEGATES_ATOL = 1e-4

models = pytest.mark.parametrize("model", sorted(MODELS))
methods = pytest.mark.parametrize("method", METHODS)


def _inputs() -> torch.Tensor:
    return torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))


def _apply(method: str, base: PreTrainedModel, tmp_path: Path, **options: object) -> torch.nn.Module:
    hparams = AdapterHParams(rank=0, alpha=0.0, options=options)
    return get_method(method).apply(base, hparams, tmp_path)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=_inputs()).logits


def _train_steps(model: torch.nn.Module, method: str, steps: int = 1) -> None:
    torch.manual_seed(2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        ids = _inputs()
        loss = model(input_ids=ids, labels=ids).loss
        extra = get_method(method).extra_loss
        (loss + extra(model) if extra else loss).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@models
@methods
def test_apply_trains_only_the_methods_params(method: str, model: str, tmp_path: Path) -> None:
    adapted = _apply(method, MODELS[model](), tmp_path)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    if method == "fullft":
        assert trainable == {n for n, _ in adapted.named_parameters()}
        return
    head = adapted.get_output_embeddings()
    linears = [n for n, m in adapted.named_modules() if m.__class__.__name__ in ("Linear", "Conv1D")]
    linears = [n for n in linears if adapted.get_submodule(n) is not head]
    expected = {f"{n}.bias" for n in linears}
    if method == "finegates":
        expected |= {f"{n}.finegates.{v}" for n in linears for v in ("rows", "cols")}
    assert trainable == expected
    assert get_method(method).uses_rank is False


@models
@methods
def test_step0_logits_match_base(method: str, model: str, tmp_path: Path) -> None:
    reference = _logits(MODELS[model]())
    adapted = _apply(method, MODELS[model](), tmp_path)
    atol = FINEGATES_ATOL if method == "finegates" else 0.0  # zero biases and unit gates change nothing
    torch.testing.assert_close(_logits(adapted), reference, atol=atol, rtol=0)


@models
@methods
def test_one_step_changes_only_trainable_params(method: str, model: str, tmp_path: Path) -> None:
    adapted = _apply(method, MODELS[model](), tmp_path)
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    _train_steps(adapted, method)
    for name, param in adapted.named_parameters():
        changed = not torch.equal(param, before[name])
        if not param.requires_grad:
            assert not changed, name
    assert any(not torch.equal(p, before[n]) for n, p in adapted.named_parameters() if p.requires_grad)


@models
@methods
def test_export_reloads_on_a_fresh_base(method: str, model: str, tmp_path: Path) -> None:
    adapted = _apply(method, MODELS[model](), tmp_path / "work")
    _train_steps(adapted, method, steps=3)
    if method == "finegates":  # close some gates so the export really prunes something
        with torch.no_grad():
            for name, layer in gated_layers(adapted):
                layer.finegates.rows[::3] = -3.0
                if name.endswith(("down_proj", "mlp.c_proj", "o_proj", "attn.c_proj")):
                    layer.finegates.cols[1::4] = -3.0
    expected = _logits(adapted)
    state = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    out = tmp_path / "out"
    meta = export_trained(method, adapted, out, tmp_path / "work")
    assert meta["method"] == method
    # Export must not touch the model: training continues after each eval point.
    assert all(torch.equal(p, state[n]) for n, p in adapted.named_parameters())
    loaded = load_trained(MODELS[model](), out)
    atol = FINEGATES_ATOL if method == "finegates" else ATOL
    torch.testing.assert_close(_logits(loaded), expected, atol=atol, rtol=0)
    if method == "finegates":
        before = sum(p.numel() for n, p in adapted.named_parameters() if ".finegates." not in n)
        assert sum(p.numel() for p in loaded.parameters()) < before


def test_finegates_prunes_mlp_to_common_width(tmp_path: Path) -> None:
    adapted = _apply("finegates", tiny_llama(), tmp_path)
    with torch.no_grad():
        adapted.get_submodule("model.layers.0.mlp.up_proj").finegates.rows[:40] = -3.0
        adapted.get_submodule("model.layers.1.mlp.down_proj").finegates.cols[:64] = -3.0
    pruned, summary = pruned_model(adapted)
    assert summary["alive_per_layer"] == [88, 64]
    assert pruned.config.intermediate_size == 88  # max over layers; layer 1 keeps 24 zero channels
    torch.testing.assert_close(_logits(pruned), _logits(adapted), atol=FINEGATES_ATOL, rtol=0)


def test_finegates_sparsity_loss_lowers_keep_probability(tmp_path: Path) -> None:
    adapted = _apply("finegates", tiny_llama(), tmp_path, target_sparsity=0.5, lambda_sparsity=1.0)

    def mean_keep() -> float:
        with torch.no_grad():
            probs = [torch.cat(keep_probability(layer)) for _, layer in gated_layers(adapted)]
            return torch.cat(probs).mean().item()

    start = mean_keep()
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(20):
        sparsity_loss(adapted).backward()
        opt.step()
        opt.zero_grad()
    assert start > 0.99  # gates start open
    assert 0.5 < mean_keep() < start - 0.05  # pulled toward the keep target 1 − 0.5


def test_finegates_rejects_bad_target(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="target_sparsity"):
        _apply("finegates", tiny_llama(), tmp_path, target_sparsity=1.0)
