"""SparseSAM (SL-SAM): finds the flat minimum AdamW misses, restores exactly, keeps its bandit honest, resumes
reproducibly, and runs under DeepSpeed ZeRO 0-2 with the same result as plain torch."""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import pytest
import torch

from peftsweep.trainables.optim import SparseSAM

# Toy landscape: loss = -log(N_sharp + N_flat) over 10 tensors of 2 elements, one unnormalised Gaussian
# bump of curvature 100 at the origin and one of curvature 1 at distance 3. The Hessian trace is ≈ 20·100 in
# the sharp minimum and ≈ 20·1 in the flat one. Non-separable on purpose: perturbing a few tensors moves the
# whole point out of the sharp well, as in a real network.
N_TENSORS, TENSOR_DIM = 10, 2
DIM = N_TENSORS * TENSOR_DIM
SHARP, FLAT, DISTANCE = 100.0, 1.0, 3.0
SHARP_MIN = torch.zeros(DIM, dtype=torch.float64)
FLAT_MIN = torch.full((DIM,), DISTANCE / math.sqrt(DIM), dtype=torch.float64)
TOY_LR, TOY_STEPS = 0.02, 200  # AdamW moves ≈ lr per step per coordinate: 200 steps cover the 0.67 per coord
TOY_RHO = 0.5  # toy scale: must exceed the sharp well's width 1/√100 = 0.1 by a margin (0.3 is the edge)


def _toy_loss(theta: torch.Tensor) -> torch.Tensor:
    sharp = -0.5 * SHARP * (theta - SHARP_MIN).pow(2).sum()
    flat = -0.5 * FLAT * (theta - FLAT_MIN).pow(2).sum()
    return -torch.logaddexp(sharp, flat)


def _train_toy(seed: int, sam_kwargs: dict[str, float] | None) -> torch.Tensor:
    """AdamW (optionally with SparseSAM) from a start just off the sharp minimum, towards the flat one."""
    gen = torch.Generator().manual_seed(seed)
    start = (
        SHARP_MIN
        + 0.04 * (FLAT_MIN - SHARP_MIN)
        + 0.03 * torch.randn(DIM, generator=gen, dtype=torch.float64)
    )
    params = [torch.nn.Parameter(t.clone()) for t in start.split(TENSOR_DIM)]
    opt = torch.optim.AdamW(params, lr=TOY_LR, weight_decay=0.0)
    sam = SparseSAM(params, seed=seed, **sam_kwargs) if sam_kwargs is not None else None
    for _ in range(TOY_STEPS):
        if sam:
            sam.ascent(_toy_loss(torch.cat(params)))
        _toy_loss(torch.cat(params)).backward()
        if sam:
            sam.restore()
        opt.step()
        opt.zero_grad()
    return torch.cat([p.detach() for p in params])


def _hessian_trace(theta: torch.Tensor) -> float:
    return torch.autograd.functional.hessian(_toy_loss, theta).diagonal().sum().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slsam_ends_in_the_flat_minimum_where_adamw_ends_in_the_sharp_one(seed: int) -> None:
    adamw = _hessian_trace(_train_toy(seed, None))
    slsam = _hessian_trace(_train_toy(seed, {"rho": TOY_RHO}))  # sparsity 0.2: 2 of 10 tensors per step
    assert adamw > 0.5 * DIM * SHARP, "AdamW should settle in the sharp minimum"
    assert slsam < 2 * DIM * FLAT, "SL-SAM should settle in the flat minimum"


# ---------------------------------------------------------------------------------------- mechanics


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 1),
    )


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen)


def _mse(model: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    x, y = _data()
    return (model(x) - y).pow(2).mean()


def _snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def test_restore_brings_the_weights_back_bit_for_bit() -> None:
    model = _mlp()
    params = list(model.parameters())
    before = _snapshot(params)
    sam = SparseSAM(params, rho=0.3, sparsity=0.5)
    sam.ascent(_mse(model))
    moved = [i for i, (p, b) in enumerate(zip(params, before, strict=True)) if not torch.equal(p, b)]
    assert moved == list(sam.last_chosen)  # exactly the chosen tensors move
    assert all(p.grad is None for p in params)  # the ascent gradient never lands in .grad
    sam.restore()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_perturbed_fraction_matches_sparsity_and_the_chosen_sizes() -> None:
    # 10 tensors of different sizes, so the element fraction differs from the tensor fraction.
    params = [torch.nn.Parameter(torch.randn(n)) for n in (1, 2, 3, 5, 8, 13, 21, 34, 55, 89)]
    total = sum(p.numel() for p in params)
    sam = SparseSAM(params, rho=0.1)  # sparsity 0.2 → 2 of 10 tensors
    for _ in range(20):
        sam.ascent(sum((p**2).sum() for p in params))
        assert len(sam.last_chosen) == 2
        assert sam.last_perturbed_fraction == sum(params[i].numel() for i in sam.last_chosen) / total
        sam.restore()

    full = SparseSAM(params, rho=0.1, sparsity=1.0)
    full.ascent(sum((p**2).sum() for p in params))
    assert full.last_chosen == tuple(range(10)) and full.last_perturbed_fraction == 1.0
    full.restore()
    assert SparseSAM([torch.nn.Parameter(torch.ones(1)) for _ in range(28)]).k == 6  # round(0.2 · 28)


def test_parameters_without_grad_are_ignored() -> None:
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    trainable = torch.nn.Parameter(torch.ones(3))
    sam = SparseSAM([frozen, trainable], sparsity=1.0)
    assert sam.params == [trainable]


def test_probability_floor_holds_when_one_tensor_dominates() -> None:
    params = [torch.nn.Parameter(torch.ones(4)) for _ in range(5)]
    min_prob = 0.01
    # A fast bandit, so 300 steps are enough to concentrate: the floor must still hold for the others.
    sam = SparseSAM(params, rho=1e-3, sparsity=0.4, bandit_lr=0.5, min_prob=min_prob)
    for _ in range(300):
        sam.ascent(1e6 * (params[0] ** 2).sum() + sum((p**2).sum() for p in params[1:]))
        sam.restore()
        probs = sam.probabilities
        assert torch.isfinite(probs).all()
        assert probs.min().item() >= min_prob - 1e-12
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert probs.argmax().item() == 0
    assert probs[0].item() == pytest.approx(1 - 4 * min_prob, abs=1e-3)  # everything above the floor


def test_resuming_from_state_dict_reproduces_the_choices() -> None:
    params = [
        torch.nn.Parameter(torch.randn(3, generator=torch.Generator().manual_seed(i))) for i in range(10)
    ]

    def loss() -> torch.Tensor:
        return sum((i + 1) * (p**2).sum() for i, p in enumerate(params))

    def run(sam: SparseSAM, steps: int) -> list[tuple[int, ...]]:
        chosen = []
        for _ in range(steps):
            sam.ascent(loss())
            sam.restore()
            chosen.append(sam.last_chosen)
        return chosen

    a = SparseSAM(params, bandit_lr=0.1)
    run(a, 5)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # as a checkpoint would
    buf.seek(0)
    b = SparseSAM(params, bandit_lr=0.1, seed=123)
    b.load_state_dict(torch.load(buf))
    assert b.step_count == 5
    fresh = SparseSAM(params, bandit_lr=0.1, seed=123)
    assert run(a, 10) == run(b, 10)
    assert torch.equal(a.probabilities, b.probabilities)
    assert run(fresh, 10) != run(b, 10)  # the state, not the luck of the draw, decided


def test_training_rng_is_untouched_and_ascent_needs_restore() -> None:
    model = _mlp()
    sam = SparseSAM(list(model.parameters()), rho=0.05)
    rng = torch.get_rng_state()
    sam.ascent(_mse(model))
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(RuntimeError, match="restore"):
        sam.ascent(_mse(model))
    sam.restore()
    sam.restore()  # idempotent


def test_plain_torch_training_with_slsam_reduces_the_loss() -> None:
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sam = SparseSAM(list(model.parameters()), rho=0.05)
    first = _mse(model).item()
    for _ in range(50):
        sam.ascent(_mse(model))
        _mse(model).backward()
        sam.restore()
        opt.step()
        opt.zero_grad()
    assert _mse(model).item() < 0.5 * first


# ---------------------------------------------------------------------------------------- DeepSpeed


def _reference(chosen_per_step: list[tuple[int, ...]], rho: float) -> torch.Tensor:
    """Textbook SAM in plain torch (ascent gradient through .grad, then zeroed), perturbing the given tensors:
    an oracle that shares no code with `SparseSAM.ascent`."""
    model = _mlp()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    for chosen in chosen_per_step:
        _mse(model).backward()
        grads = [params[i].grad.clone() for i in chosen]
        opt.zero_grad()
        scale = rho / torch.sqrt(sum((g**2).sum() for g in grads))
        saved = [params[i].detach().clone() for i in chosen]
        with torch.no_grad():
            for i, g in zip(chosen, grads, strict=True):
                params[i].add_(scale * g)
        _mse(model).backward()
        with torch.no_grad():
            for i, w in zip(chosen, saved, strict=True):
                params[i].copy_(w)
        opt.step()
        opt.zero_grad()
    return torch.cat([p.detach().flatten() for p in params])


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_zero_step_equals_plain_torch(stage: int) -> None:
    """ascent(module loss) + engine.backward + restore + engine.step under ZeRO-`stage` matches plain torch:
    the ascent gradient neither leaks into ZeRO's reduced gradients nor trips its hooks."""
    deepspeed = pytest.importorskip("deepspeed")
    from peftsweep.trainables.engine import init_standalone

    init_standalone()
    model = _mlp()
    config = {
        "train_micro_batch_size_per_gpu": 32,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # the reference does not clip
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    sam = SparseSAM(list(engine.module.parameters()), rho=0.05, sparsity=0.4)
    with pytest.raises(ValueError, match="engine.module"):
        sam.ascent(
            engine(_data()[0])
        )  # an engine-forward output would start DeepSpeed's backward bookkeeping
    chosen = []
    for _ in range(3):
        sam.ascent(_mse(engine.module))
        engine.backward(_mse(engine))
        sam.restore()
        engine.step()
        chosen.append(sam.last_chosen)
    got = torch.cat([p.detach().flatten() for p in engine.module.parameters()])
    torch.testing.assert_close(got, _reference(chosen, rho=0.05), rtol=0, atol=1e-6)
