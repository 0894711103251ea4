"""The gradual objective is the plain CE at tau=1, the base model's own distribution at tau=0, linear between,
and its base logits really are the frozen base model's, aligned to the labels for every kind of adapter."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftsweep.search_spaces import AdapterHParams, get_method
from peftsweep.trainables.data import IGNORE_INDEX
from peftsweep.trainables.objectives import (
    GradualSchedule,
    base_logits,
    gradual_loss,
    gradual_step_loss,
    tau_at,
)
from tests.search_spaces.tiny_models import tiny_gpt2, tiny_llama

VOCAB = 32  # the tiny models' vocabulary
PROMPT_LEN = 4  # masked prompt positions at the start of every row
ATOL = 1e-5  # fp32 sums over ~20 tokens of 32-way softmaxes: rounding stays well below this

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Position ids are not supported:UserWarning"),
    # Expected: PEFT switches GPT-2's Conv1D layers to fan_in_fan_out=True itself and says so.
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
]


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny matrices on a shared 2-core box: threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch() -> dict[str, torch.Tensor]:
    """Two rows of 10 tokens: a masked prompt, and in row 1 two right-padded (masked, unattended) tokens."""
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, VOCAB, (2, 10), generator=gen)
    labels = input_ids.clone()
    labels[:, :PROMPT_LEN] = IGNORE_INDEX
    labels[1, -2:] = IGNORE_INDEX
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def random_logits(seed: int) -> torch.Tensor:
    return 3 * torch.randn(2, 10, VOCAB, generator=torch.Generator().manual_seed(seed))


def shifted_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def soft_ce_loop(logits: torch.Tensor, labels: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """−Σ softmax(base)·log_softmax(logits), averaged over counted tokens, one position at a time."""
    terms = [
        -(base[b, t].softmax(-1) * logits[b, t].log_softmax(-1)).sum()
        for b in range(labels.shape[0])
        for t in range(labels.shape[1] - 1)
        if labels[b, t + 1] != IGNORE_INDEX
    ]
    return torch.stack(terms).mean()


def lora(tmp_path: Path, perturb: bool, make: Any = tiny_llama) -> Any:
    """A tiny LoRA model; `perturb` makes B nonzero so that the adapter really changes the logits."""
    model = get_method("lora").apply(make(), AdapterHParams(rank=4, alpha=8), tmp_path)
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(2))
    return model


def plain_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# --- the loss on its own ------------------------------------------------------------------------------------


def test_tau_one_is_plain_cross_entropy() -> None:
    batch, logits = make_batch(), random_logits(0)
    got = gradual_loss(logits, batch["labels"], random_logits(1), 1.0)
    torch.testing.assert_close(got, shifted_ce(logits, batch["labels"]), atol=ATOL, rtol=0)


def test_tau_zero_is_soft_target_ce_against_the_base() -> None:
    batch, logits, base = make_batch(), random_logits(0), random_logits(1)
    got = gradual_loss(logits, batch["labels"], base, 0.0)
    torch.testing.assert_close(got, soft_ce_loop(logits, batch["labels"], base), atol=ATOL, rtol=0)


@pytest.mark.parametrize("tau", [0.25, 0.7])
def test_intermediate_tau_interpolates_the_two_losses(tau: float) -> None:
    labels, logits, base = make_batch()["labels"], random_logits(0), random_logits(1)
    ends = [gradual_loss(logits, labels, base, t) for t in (0.0, 1.0)]
    expected = (1 - tau) * ends[0] + tau * ends[1]
    torch.testing.assert_close(gradual_loss(logits, labels, base, tau), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_loss_math_is_fp32(tau: float) -> None:
    """bf16 logits (mixed-precision training): bf16 softmax math would be off by ~1e-2, not 1e-6."""
    labels, logits, base = make_batch()["labels"], random_logits(0).bfloat16(), random_logits(1).bfloat16()
    got = gradual_loss(logits, labels, base, tau)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got, gradual_loss(logits.float(), labels, base.float(), tau), atol=1e-6, rtol=0
    )


def test_loss_rejects_bad_inputs() -> None:
    labels, logits = make_batch()["labels"], random_logits(0)
    with pytest.raises(ValueError, match="tau must be in"):
        gradual_loss(logits, labels, logits, 1.5)
    with pytest.raises(ValueError, match="differ"):
        gradual_loss(logits, labels, logits[:, 1:], 0.5)
    with pytest.raises(ValueError, match="do not match labels"):
        gradual_loss(logits, labels[:, 1:], logits, 0.5)


# --- the schedule -------------------------------------------------------------------------------------------


def test_tau_at_endpoints_midpoints_and_monotone() -> None:
    kw: dict[str, Any] = {"tau0": 0.2, "anneal_fraction": 0.5}  # anneal over the first 100 of 200 steps
    for schedule in ("linear", "cosine"):
        taus = [tau_at(s, 200, schedule=schedule, **kw) for s in range(201)]
        assert taus[0] == pytest.approx(0.2)
        assert taus[100] == taus[150] == taus[200] == 1.0
        assert all(a < b for a, b in zip(taus[:100], taus[1:101], strict=True)), schedule
        assert taus[50] == pytest.approx(0.6)  # half way, both schedules
    assert tau_at(25, 200, schedule="linear", **kw) == pytest.approx(0.2 + 0.8 * 0.25)
    cosine_quarter = 0.2 + 0.8 * (1 - math.cos(math.pi / 4)) / 2  # slower start than linear
    assert tau_at(25, 200, schedule="cosine", **kw) == pytest.approx(cosine_quarter)


def test_tau_at_without_anneal_and_bad_knobs() -> None:
    assert tau_at(0, 100, tau0=0.0, anneal_fraction=0.0, schedule="cosine") == 1.0
    assert tau_at(0, 0, tau0=0.3, anneal_fraction=0.0, schedule="linear") == 1.0
    for bad in ({"tau0": -0.1}, {"anneal_fraction": 1.5}, {"schedule": "step"}):
        kw: dict[str, Any] = {"tau0": 0.2, "anneal_fraction": 0.5, "schedule": "linear", **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            tau_at(3, 100, **kw)
        with pytest.raises(ValueError, match=next(iter(bad))):
            GradualSchedule(**kw)
    assert GradualSchedule(0.2, 0.5, "cosine").tau(25, 200) == tau_at(
        25, 200, tau0=0.2, anneal_fraction=0.5, schedule="cosine"
    )


# --- with a model -------------------------------------------------------------------------------------------


def test_tau_one_step_loss_is_the_models_own_loss(tmp_path: Path) -> None:
    model, batch = lora(tmp_path, perturb=True), make_batch()
    objective, plain = gradual_step_loss(model, batch, 1.0)
    with torch.no_grad():
        out = model(**batch)
    torch.testing.assert_close(objective.detach(), out.loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(plain, out.loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(gradual_loss(out.logits, batch["labels"], out.logits, 1.0), out.loss)


def test_tau_zero_at_init_is_base_entropy_with_no_gradient(tmp_path: Path) -> None:
    """LoRA starts with B = 0, so the model is its base: the base target is already optimal."""
    batch = make_batch()
    base = plain_logits(tiny_llama(), batch)
    entropy = soft_ce_loop(base, batch["labels"], base)
    model = lora(tmp_path, perturb=False)
    model.train()
    adapter = [p for p in model.parameters() if p.requires_grad]

    objective, plain = gradual_step_loss(model, batch, 0.0)
    torch.testing.assert_close(objective.detach(), entropy, atol=ATOL, rtol=0)
    assert plain > entropy + 0.1  # the data's CE is far from the base's entropy: the test can tell them apart
    grads = torch.autograd.grad(objective, adapter)
    assert max(float(g.abs().max()) for g in grads) < 1e-5
    # ... while the plain CE does move the adapter: the zero gradient above is the base target's doing.
    grads = torch.autograd.grad(gradual_step_loss(model, batch, 1.0)[0], adapter)
    assert max(float(g.abs().max()) for g in grads) > 1e-3


def test_step_loss_at_intermediate_tau_mixes_adapter_and_base(tmp_path: Path) -> None:
    model, batch = lora(tmp_path, perturb=True), make_batch()
    adapted, base = plain_logits(model, batch), plain_logits(tiny_llama(), batch)
    objective, plain = gradual_step_loss(model, batch, 0.4)
    expected = 0.6 * soft_ce_loop(adapted, batch["labels"], base) + 0.4 * shifted_ce(adapted, batch["labels"])
    torch.testing.assert_close(objective.detach(), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(plain, shifted_ce(adapted, batch["labels"]), atol=ATOL, rtol=0)


def test_method_penalty_in_loss_is_kept(tmp_path: Path) -> None:
    """AdaLoRA adds an orthogonality penalty to `.loss`; the gradual objective must keep training on it."""
    model = get_method("adalora").apply(
        tiny_llama(), AdapterHParams(rank=4, alpha=8, total_steps=10), tmp_path
    )
    batch = make_batch()
    with torch.no_grad():
        out = model(**batch)
    penalty = out.loss - shifted_ce(out.logits, batch["labels"])
    assert penalty > 1e-3  # there is one to lose
    objective, plain = gradual_step_loss(model, batch, 1.0)
    torch.testing.assert_close(objective.detach(), out.loss, atol=ATOL, rtol=0)
    base = plain_logits(tiny_llama(), batch)
    objective, plain = gradual_step_loss(model, batch, 0.5)
    expected = gradual_loss(out.logits, batch["labels"], base, 0.5) + penalty
    torch.testing.assert_close(objective.detach(), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        plain, out.loss, atol=ATOL, rtol=0
    )  # train_loss as a plain AdaLoRA trial logs it


@pytest.mark.parametrize("training", [True, False])
def test_base_logits_are_the_base_and_leave_the_model_as_it_was(tmp_path: Path, training: bool) -> None:
    model, batch = lora(tmp_path, perturb=True), make_batch()
    model.train(training)
    frozen = model.get_submodule("base_model.model.model.layers.0")
    frozen.train(not training)  # a mixed-mode model: every module's own mode must come back
    adapted = plain_logits(model, batch)
    base = plain_logits(tiny_llama(), batch)
    assert (adapted - base).abs().max() > 0.1  # the adapter matters, so enabled and disabled differ

    grad_modes: list[bool] = []
    hook = model.get_submodule("base_model.model.lm_head").register_forward_hook(
        lambda *_: grad_modes.append(torch.is_grad_enabled())
    )
    got = base_logits(model, batch)
    hook.remove()
    torch.testing.assert_close(got, base, atol=ATOL, rtol=0)
    assert grad_modes == [False]  # no graph kept for the target (frozen weights alone would not show it)
    torch.testing.assert_close(plain_logits(model, batch), adapted)  # adapter enabled again
    assert model.training is training and frozen.training is not training
    assert all(m.training is not training for m in frozen.modules())


def test_base_logits_run_without_dropout(tmp_path: Path) -> None:
    """GPT-2 has dropout 0.1: a train-mode teacher would give a different, noisy target at every call."""
    model, batch = lora(tmp_path, perturb=True, make=tiny_gpt2), make_batch()
    model.train()
    torch.manual_seed(3)
    first, second = base_logits(model, batch), base_logits(model, batch)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    torch.testing.assert_close(first, plain_logits(tiny_gpt2(), batch), atol=ATOL, rtol=0)
    assert model.training


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prompt_learning_logits_are_aligned_to_the_labels(tmp_path: Path, method: str) -> None:
    model = get_method(method).apply(tiny_llama(), AdapterHParams(rank=4, alpha=4), tmp_path)
    batch = make_batch()
    base = base_logits(model, batch)
    assert base.shape == (*batch["labels"].shape, VOCAB)
    torch.testing.assert_close(base, plain_logits(tiny_llama(), batch), atol=ATOL, rtol=0)

    adapted = plain_logits(model, batch)[:, -batch["labels"].shape[1] :]
    assert (adapted - base).abs().max() > 1e-3  # the virtual tokens change the output
    objective, plain = gradual_step_loss(model, batch, 0.3)
    ce = shifted_ce(adapted, batch["labels"])
    expected = 0.7 * soft_ce_loop(adapted, batch["labels"], base) + 0.3 * ce
    torch.testing.assert_close(objective.detach(), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(plain, ce, atol=ATOL, rtol=0)


class LongLogits(nn.Module):
    """A stand-in PEFT model whose disabled forward still returns 3 virtual-token positions first."""

    def __init__(self) -> None:
        super().__init__()
        self.base = tiny_llama()

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        yield

    def forward(self, **kwargs: Any) -> Any:
        out = self.base(**kwargs)
        out.logits = torch.cat([torch.zeros_like(out.logits[:, :3]), out.logits], dim=1)
        return out


def test_base_logits_keep_the_last_label_positions() -> None:
    batch = make_batch()
    torch.testing.assert_close(base_logits(LongLogits(), batch), plain_logits(tiny_llama(), batch))


class FakeEngine(nn.Module):
    """What base_logits sees of a DeepSpeed engine: the PEFT model as `.module`, forward passed through."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, **kwargs: Any) -> Any:
        return self.module(**kwargs)


def test_engine_is_unwrapped(tmp_path: Path) -> None:
    model, batch = lora(tmp_path, perturb=True), make_batch()
    engine = FakeEngine(model)
    torch.testing.assert_close(
        base_logits(engine, batch), plain_logits(tiny_llama(), batch), atol=ATOL, rtol=0
    )
    objective, _ = gradual_step_loss(engine, batch, 0.5)
    torch.testing.assert_close(objective, gradual_step_loss(model, batch, 0.5)[0])


@pytest.mark.parametrize("method", ["none", "fullft"])
def test_non_peft_model_is_a_clear_type_error(tmp_path: Path, method: str) -> None:
    model = tiny_llama()
    if method != "none":
        model = get_method(method).apply(model, AdapterHParams(rank=4, alpha=4), tmp_path)
    with pytest.raises(TypeError, match="disable_adapter.*plain cross-entropy"):
        base_logits(model, make_batch())
    with pytest.raises(TypeError, match="needs a PEFT model"):
        gradual_step_loss(model, make_batch(), 1.0)
