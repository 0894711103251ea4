"""Curvature probe: exact HVPs and eigenvalues on quadratics with a known Hessian, and a deterministic,
side-effect-free probe of a real adapter on the built-in model."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from peftsweep.trainables.curvature import (
    CurvatureResult,
    hessian_vector_product,
    probe_method,
    probe_model,
    top_hessian_eigenvalue,
)

torch.set_num_threads(1)

SHAPES = [(2, 3), (4,), (5, 1)]  # x split across three tensors of different ranks: 15 dimensions
DIM = sum(math.prod(s) for s in SHAPES)
# Spectra with a clear gap (|λ2/λ1| = 0.4), so 20 power iterations reach far below the 1e-3 tolerance.
POSITIVE_TOP = [10.0, -4.0, 3.0, 2.0, 1.0, 0.5] + [0.1] * (DIM - 6)
NEGATIVE_TOP = [-8.0, 3.2, 2.0, -1.0, 0.5] + [0.2] * (DIM - 5)


def _quadratic(
    eigs: list[float], dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor], Callable[[], torch.Tensor]]:
    """(H, params, loss_fn) for 0.5·xᵀHx + bᵀx with H = Q·diag(eigs)·Qᵀ and a random orthogonal Q.

    x starts at a random point: a quadratic's Hessian is the same everywhere.
    """
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen, dtype=torch.float64))
    h = (q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T).to(dtype)
    b = torch.randn(DIM, generator=gen, dtype=dtype)
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in SHAPES]

    def loss_fn() -> torch.Tensor:
        x = torch.cat([p.reshape(-1) for p in params])
        return 0.5 * x @ h @ x + b @ x

    return h, params, loss_fn


def test_hvp_equals_hessian_times_vector() -> None:
    h, params, loss_fn = _quadratic(POSITIVE_TOP)
    gen = torch.Generator().manual_seed(1)
    vec = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    hv = hessian_vector_product(loss_fn, params, vec)
    assert [t.shape for t in hv] == [p.shape for p in params]
    expected = h @ torch.cat([v.reshape(-1) for v in vec])
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in hv]), expected)


def test_hvp_cross_terms_and_unused_parameters() -> None:
    """LoRA at init: loss a·b at b = 0 gives a zero gradient for a, but H = [[0, I], [I, 0]] is not zero."""
    a = torch.randn(3, dtype=torch.float64).requires_grad_()
    b = torch.zeros(3, dtype=torch.float64).requires_grad_()
    unused = torch.ones(2, dtype=torch.float64).requires_grad_()
    va, vb, vu = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0]), torch.ones(2)
    hv = hessian_vector_product(lambda: (a * b).sum(), [a, b, unused], [va, vb, vu])
    for got, want in zip(hv, [vb, va, torch.zeros(2)], strict=True):
        torch.testing.assert_close(got, want.double())


@pytest.mark.parametrize("loss", ["linear", "detached"])
def test_zero_curvature(loss: str) -> None:
    """A linear loss (constant gradient, no graph) or one that never sees the parameter: H = 0, no error."""
    p = torch.ones(4).requires_grad_()
    loss_fn = (lambda: (3 * p).sum()) if loss == "linear" else (lambda: (p.detach() ** 2).sum())
    assert torch.equal(hessian_vector_product(loss_fn, [p], [torch.ones(4)])[0], torch.zeros(4))
    assert top_hessian_eigenvalue(loss_fn, [p]) == (0.0, 1, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("eigs", [POSITIVE_TOP, NEGATIVE_TOP], ids=["positive", "negative"])
def test_power_iteration_finds_eigenvalue_of_largest_magnitude(eigs: list[float], dtype: torch.dtype) -> None:
    _, params, loss_fn = _quadratic(eigs, dtype)
    before = torch.get_rng_state()
    value, iterations, converged = top_hessian_eigenvalue(loss_fn, params)
    assert torch.equal(torch.get_rng_state(), before)  # own generator: the global RNG is untouched
    top = max(eigs, key=abs)
    assert converged and iterations <= 20
    assert abs(value - top) <= 1e-3 * abs(top)
    assert top_hessian_eigenvalue(loss_fn, params) == (value, iterations, converged)  # seeded start


def test_power_iteration_reports_non_convergence() -> None:
    _, params, loss_fn = _quadratic([1.0, -1.0] + [0.5] * (DIM - 2))  # ±1 tie: the Rayleigh quotient wanders
    _, iterations, converged = top_hessian_eigenvalue(loss_fn, params, iters=5, tol=1e-12)
    assert (iterations, converged) == (5, False)
    with pytest.raises(ValueError, match="iters"):
        top_hessian_eigenvalue(loss_fn, params, iters=0)


# --------------------------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def builtin() -> tuple[Path, object, object]:
    from transformers import AutoTokenizer

    from peftsweep.trainables.builtin import builtin_model_dir
    from peftsweep.trainables.data import load_split

    path = builtin_model_dir()
    return path, AutoTokenizer.from_pretrained(path), load_split("builtin:arith-sub", "train")


# A quarter of the benchmark's 256 rows, in two batches (so the per-batch HVP sum is exercised): the test
# checks plumbing, not the value.
PROBE = {"rank": 8, "alpha": 8.0, "samples": 64, "batch_size": 32, "iters": 8}


def test_probe_method_is_deterministic_positive_and_leaves_rng(builtin: tuple, tmp_path: Path) -> None:
    path, tokenizer, rows = builtin
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = probe_method("lora", path, rows, tokenizer, workdir=tmp_path, **PROBE)
    assert torch.equal(torch.get_rng_state(), before)
    second = probe_method("lora", path, rows, tokenizer, workdir=tmp_path, **PROBE)
    assert isinstance(first, CurvatureResult)
    assert (first.top_eigenvalue, first.iterations) == (second.top_eigenvalue, second.iterations)
    assert math.isfinite(first.top_eigenvalue) and first.top_eigenvalue > 0
    assert first.samples == PROBE["samples"] and 1 <= first.iterations <= PROBE["iters"]
    # rank 8 on all linear layers of 2 blocks: (64+64)·8 per attention projection, (64+256)·8 per MLP one
    assert first.trainable_params == 2 * (4 * 128 * 8 + 3 * 320 * 8)
    assert list(tmp_path.iterdir()) == []  # the init scratch dir is cleaned up


def _lora_model(tmp_path: Path, path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from peftsweep.search_spaces import AdapterHParams, get_method

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_method("lora").apply(base, AdapterHParams(rank=4, alpha=4.0, dropout=0.1), tmp_path)
    model.train()
    return model


def test_probe_model_leaves_weights_grads_and_modes(builtin: tuple, tmp_path: Path) -> None:
    from peftsweep.trainables.data import collate, tokenize_for_training

    path, tokenizer, rows = builtin
    model = _lora_model(tmp_path, path)
    model.base_model.model.model.layers[0].eval()  # a mixed mode must come back as it was, not all-train
    modes = {name: m.training for name, m in model.named_modules()}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    features = tokenize_for_training(rows.select(range(16)), tokenizer, 32).to_list()
    batch = collate(features, tokenizer.pad_token_id)

    result = probe_model(model, [batch], iters=3)
    assert math.isfinite(result.top_eigenvalue) and result.samples == len(features)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())

    with pytest.raises(TypeError, match="fp32"):
        probe_model(model.to(torch.bfloat16), [batch])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        probe_model(model, [batch])
