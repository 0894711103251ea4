"""Top Hessian eigenvalue of the loss w.r.t. the adapter parameters at initialisation (a curvature probe).

Why: arXiv 2602.04998 explains why PiSSA wants ~10× and MiLoRA ~3× lower learning rates than LoRA by the
curvature at initialisation: the larger λ_max, the smaller the step that stays stable (≈ 2/λ_max for
gradient descent). peftsweep reports λ_max per method next to the optimal-LR ratios, and can centre a
method's LR range at LoRA's best LR × λ_LoRA/λ_method.

The eigenvalue comes from power iteration on Hessian-vector products (Pearlmutter's double backward), so the
Hessian itself is never formed: one HVP costs about two backward passes over the probe batches.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import Tensor

# Token limit of a probe row: the spec's training.max_length default (paper protocol).
DEFAULT_MAX_LENGTH = 512

Hvp = Callable[[list["Tensor"]], list["Tensor"]]


@dataclass(frozen=True)
class CurvatureResult:
    """One probe: λ_max and what it cost, so a report can show whether the estimate is trustworthy."""

    top_eigenvalue: float  # the Hessian eigenvalue of largest magnitude (may be negative)
    iterations: int  # Hessian-vector products done
    converged: bool  # False: the power iteration hit `iters` with the estimate still moving by ≥ tol
    samples: int  # probe rows that carry loss (rows truncated to no response token are dropped)
    seconds: float  # wall time of the power iteration alone (model building and tokenising excluded)
    trainable_params: int


def hessian_vector_product(
    loss_fn: Callable[[], Tensor], params: Sequence[Tensor], vec: Sequence[Tensor]
) -> list[Tensor]:
    """H·v for the Hessian of ``loss_fn()`` w.r.t. ``params``, by differentiating grad(loss)·v (Pearlmutter).

    Parameters the loss does not reach, or whose gradient is constant (no graph), contribute zeros instead of
    failing: LoRA's A gets no gradient at init (B = 0), yet its A–B Hessian block is not 0.
    Computed in the parameters' dtype; callers wanting a trustworthy estimate use fp32 (see ``probe_model``).
    """
    import torch

    params = list(params)
    if len(vec) != len(params):
        raise ValueError(f"vec has {len(vec)} tensors for {len(params)} parameters")
    for p, v in zip(params, vec, strict=True):
        if p.shape != v.shape:
            raise ValueError(
                f"vec tensor of shape {tuple(v.shape)} for a parameter of shape {tuple(p.shape)}"
            )
    loss = loss_fn()
    if not loss.requires_grad:  # the loss does not depend on params at all
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    terms = [(g * v).sum() for g, v in zip(grads, vec, strict=True) if g is not None]
    dot = torch.stack(terms).sum() if terms else None
    if dot is None or not dot.requires_grad:  # the gradient does not depend on params: H = 0
        return [torch.zeros_like(p) for p in params]
    hv = torch.autograd.grad(dot, params, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv, strict=True)]


def top_hessian_eigenvalue(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    *,
    iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
) -> tuple[float, int, bool]:
    """(eigenvalue of largest magnitude, iterations used, converged) of the Hessian of ``loss_fn()``.

    Power iteration from a seeded random start (own generator: the global RNG is untouched, so a probe never
    shifts a later trial's dropout masks); the estimate is the Rayleigh quotient vᵀHv, converged once it
    changes by less than ``tol`` relative between iterations.
    """
    params = list(params)
    return _power_iteration(
        lambda vec: hessian_vector_product(loss_fn, params, vec), params, iters=iters, tol=tol, seed=seed
    )


def _power_iteration(
    hvp: Hvp, params: Sequence[Tensor], *, iters: int, tol: float, seed: int
) -> tuple[float, int, bool]:
    """Power iteration on any symmetric linear map given as ``hvp``; see ``top_hessian_eigenvalue``."""
    import torch

    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if not params:
        raise ValueError("no parameters to probe")
    gen = torch.Generator().manual_seed(seed)  # CPU generator, then moved: the same start on every device
    vec = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
    vec = _scaled(vec, 1.0 / _norm(vec))
    previous: float | None = None
    for step in range(1, iters + 1):
        hv = hvp(vec)
        eigenvalue = _dot(vec, hv)  # Rayleigh quotient: ‖vec‖ = 1
        norm = _norm(hv)
        if norm == 0.0:  # vec lies in the null space; with a random start that means H = 0
            return 0.0, step, True
        if previous is not None and abs(eigenvalue - previous) < tol * abs(eigenvalue):
            return eigenvalue, step, True
        previous = eigenvalue
        vec = _scaled(hv, 1.0 / norm)
    return eigenvalue, iters, False


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """Inner product over all tensors, accumulated in fp64 so that many small terms do not lose digits."""
    return math.fsum(float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=True))


def _norm(vec: Sequence[Tensor]) -> float:
    return math.sqrt(_dot(vec, vec))


def _scaled(vec: Sequence[Tensor], factor: float) -> list[Tensor]:
    return [v * factor for v in vec]


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout: the Hessian of a fixed function) and back to each module's own mode after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def probe_model(
    model: torch.nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    *,
    iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
) -> CurvatureResult:
    """λ_max of the mean causal-LM loss over ``batches`` w.r.t. the parameters with ``requires_grad``.

    Each batch is a ``model(**batch)`` input with ``labels``; the loss is the mean of the per-batch
    ``.loss``. HVPs are summed batch by batch, so memory is one batch's double-backward graph, not all of
    them. Attention runs on SDPA's math kernel: the fused kernels have no double backward. Weights, ``.grad``
    and each module's train/eval mode are left as they were.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from peftsweep.trainables.data import IGNORE_INDEX

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters with requires_grad: nothing to probe")
    low = sorted({str(p.dtype) for p in params if p.dtype not in (torch.float32, torch.float64)})
    if low:
        raise TypeError(
            f"curvature probe needs fp32 trainable parameters, got {', '.join(low)}: half precision makes "
            "the double backward's small differences meaningless; load the model with dtype=torch.float32"
        )
    if not batches:
        raise ValueError("no batches to probe")
    device = params[0].device
    on_device = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    samples = sum(int((b["labels"] != IGNORE_INDEX).any(dim=-1).sum()) for b in on_device)

    def hvp(vec: list[Tensor]) -> list[Tensor]:
        total = [torch.zeros_like(p) for p in params]
        for batch in on_device:
            part = hessian_vector_product(lambda b=batch: model(**b).loss, params, vec)
            total = [t + h for t, h in zip(total, part, strict=True)]
        return _scaled(total, 1.0 / len(on_device))

    with _eval_mode(model), sdpa_kernel([SDPBackend.MATH]):
        start = time.perf_counter()
        eigenvalue, used, converged = _power_iteration(hvp, params, iters=iters, tol=tol, seed=seed)
        seconds = time.perf_counter() - start
    return CurvatureResult(
        top_eigenvalue=eigenvalue,
        iterations=used,
        converged=converged,
        samples=samples,
        seconds=seconds,
        trainable_params=sum(p.numel() for p in params),
    )


def probe_method(
    method: str,
    base_model_dir: str | Path,
    rows: Sequence[Mapping[str, str]] | Any,
    tokenizer: Any,
    *,
    rank: int,
    alpha: float,
    samples: int = 256,
    batch_size: int = 64,
    iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    workdir: Path,
    options: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> CurvatureResult:
    """λ_max of ``method``'s adapter at initialisation on a fresh fp32 copy of the base.

    The adapter is built exactly as a trial builds it (all-linear, no dropout, the method's default options
    unless ``options`` overrides them). ``rows`` (prompt/completion mappings, or a ``datasets.Dataset``)
    give ``samples`` rows picked at random with ``seed``: task files are often sorted (the built-in task by
    operand), so the first rows would be a biased sample. Deterministic for a fixed seed, and the global
    torch RNG is left as it was. ``workdir`` only hosts a scratch directory for the method's init snapshot.
    """
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    from peftsweep.search_spaces import AdapterHParams, get_method
    from peftsweep.trainables.data import collate, tokenize_for_training

    if samples < 1 or batch_size < 1:
        raise ValueError(f"samples and batch_size must be >= 1, got {samples} and {batch_size}")
    recipe = get_method(method)
    hparams = AdapterHParams(
        rank=rank,
        alpha=alpha,
        dropout=0.0,
        target_modules="all-linear",
        options=recipe.merged_options(options or {}),
        total_steps=1,  # no training follows; AdaLoRA's schedule only needs a positive length
    )

    pool = [
        {"prompt": r["prompt"], "completion": r["completion"], "segments": list(r.get("segments") or [])}
        for r in rows
    ]
    picked = sorted(random.Random(seed).sample(range(len(pool)), min(samples, len(pool))))
    features = tokenize_for_training(
        datasets.Dataset.from_list([pool[i] for i in picked]), tokenizer, max_length
    ).to_list()
    if not features:
        raise ValueError(f"no probe row keeps a response token at max_length {max_length}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = [
        collate(features[i : i + batch_size], pad_id if pad_id is not None else 0)  # padding is masked
        for i in range(0, len(features), batch_size)
    ]

    Path(workdir).mkdir(parents=True, exist_ok=True)
    # A fresh scratch dir per call: a mutating init (PiSSA) leaves a snapshot that a later plain-LoRA build in
    # the same directory would refuse.
    with tempfile.TemporaryDirectory(prefix=f"curvature-{method}-", dir=workdir) as scratch:
        with torch.random.fork_rng(devices=[]):  # seeded init without moving the caller's global RNG
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_pretrained(
                base_model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code
            )
            model = recipe.apply(model, hparams, Path(scratch))
        return probe_model(model, batches, iters=iters, tol=tol, seed=seed)
