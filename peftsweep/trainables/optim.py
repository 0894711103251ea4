"""Sharpness-aware minimisation on a bandit-chosen subset of tensors (SL-SAM, arXiv 2602.09395).

SAM (Foret et al. 2021) takes the gradient at w + ρ·g/‖g‖ instead of at w, which steers training towards
flat minima but costs a second forward/backward. SL-SAM perturbs only a few parameter tensors per step, picked
by an EXP3 multi-armed bandit whose reward is the tensor's squared gradient norm, so the ascent gradient is
needed for those tensors only.

`SparseSAM` is only the perturbation half. The base optimizer (AdamW, usually inside a DeepSpeed engine) takes
the real step from the second backward:

    loss = model(**batch).loss          # under DeepSpeed: engine.module(**batch).loss, see `ascent`
    sam.ascent(loss)                    # w ← w + e on the chosen tensors
    engine.backward(engine(**batch).loss)
    sam.restore()                       # w ← w, exactly
    engine.step()

The ascent gradient comes from `torch.autograd.grad` on the chosen tensors, which never writes `.grad` and so
never fires the gradient hooks through which ZeRO-1/2 reduce and partition gradients. ZeRO-3 is not supported:
its parameters hold no data outside the engine's forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# The reward scale is a running max that decays by this factor per step: it forgets a past peak within ~100
# steps (1 / (1 - 0.99)), so the gradients that shrink as training goes on still give rewards of order 1.
REWARD_SCALE_DECAY = 0.99
# Guards ρ·g/‖g‖ against 0/0 when the loss is flat on the chosen tensors (the perturbation is then ~0).
NORM_EPS = 1e-12


class SparseSAM:
    """Perturbation half of (SL-)SAM; the base optimizer (AdamW inside DeepSpeed) does the actual step.

    Bandit (EXP3 with a probability floor, one arm per tensor):
    - p = (1 - K·m)·softmax(log_w) + m, with m = min(min_prob, 1/K): every arm keeps at least m and p sums to
      1. More than 1/min_prob arms make the floor 1/K, i.e. uniform sampling.
    - k = max(1, round(sparsity·K)) arms are drawn without replacement from p by a private `torch.Generator`,
      so the training RNG (dropout, data order) is the same with and without SAM.
    - Reward r_i = ‖g_i‖², divided by a decaying running max of all rewards seen (so r ∈ [0, 1], the range
      EXP3 assumes, whatever the loss scale), importance-weighted by 1/p_i, and added to the chosen arms'
      log-weights times `bandit_lr`. One step moves a log-weight by at most bandit_lr / m (1 at the defaults),
      and the log-weights are shifted to max 0 after each update, so exp() cannot overflow. The inclusion
      probability of a drawn-without-replacement arm is ≈ min(1, k·p_i), not p_i; the constant factor k this
      leaves in the estimate is absorbed by `bandit_lr`.

    The perturbation is undone by copying back the saved weights, not by subtracting e: (w + e) - e is not
    always w in floating point. The copies cost what storing e would (the chosen tensors' size).
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        *,
        rho: float = 0.01,
        sparsity: float = 0.2,
        bandit_lr: float = 1e-3,
        min_prob: float = 1e-3,
        seed: int = 0,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("SparseSAM needs at least one parameter with requires_grad=True")
        if any(hasattr(p, "ds_status") for p in self.params):  # set by DeepSpeed ZeRO-3 partitioning
            raise ValueError(
                "SparseSAM does not support ZeRO-3: partitioned parameters hold no data to perturb"
            )
        if rho <= 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        if not 0 < sparsity <= 1:
            raise ValueError(f"sparsity must be in (0, 1], got {sparsity}")
        if bandit_lr < 0 or min_prob < 0:
            raise ValueError(f"bandit_lr and min_prob must be >= 0, got {bandit_lr} and {min_prob}")
        self.rho, self.sparsity, self.bandit_lr = rho, sparsity, bandit_lr
        self.num_arms = len(self.params)
        self.k = self.num_arms if sparsity >= 1 else max(1, round(sparsity * self.num_arms))
        self.min_prob = min(min_prob, 1.0 / self.num_arms)
        self._sizes = [p.numel() for p in self.params]
        self._total = sum(self._sizes)
        # Bandit state lives on the CPU in float64: K numbers, and the generator must be a CPU one anyway.
        self._log_w = torch.zeros(self.num_arms, dtype=torch.float64)
        self._reward_scale = 0.0
        self._generator = torch.Generator().manual_seed(seed)
        self._step = 0
        self._saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self._last_chosen: tuple[int, ...] = ()

    # ------------------------------------------------------------------------------------------ the step
    def ascent(self, loss: torch.Tensor) -> None:
        """Move the chosen tensors to w + ρ·g/‖g‖ (‖g‖ over the chosen set) and update the bandit.

        `loss` must still have its graph; it is consumed. Under DeepSpeed compute it with
        `engine.module(...)`, not `engine(...)`: the engine hooks its forward outputs and would start its own
        backward bookkeeping (and at ZeRO-0 raise) when `autograd.grad` runs through them. A loss that is
        itself such an output (the `.loss` of a Hugging Face model called through the engine) is rejected; one
        computed from such an output cannot be detected here.
        """
        if self._saved:
            raise RuntimeError(
                "ascent() called twice without restore(): the unperturbed weights would be lost"
            )
        if _has_deepspeed_hook(loss):
            raise ValueError(
                "ascent() got a loss from a DeepSpeed engine's forward; compute it with engine.module(...)"
            )
        chosen = self._choose()
        params = [self.params[i] for i in chosen]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        sq_norms = torch.stack([g.detach().float().pow(2).sum() for g in grads])
        scale = self.rho / (sq_norms.sum().sqrt() + NORM_EPS)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                self._saved.append((p, p.detach().clone()))
                p.add_(g * scale.to(g.dtype))
        self._last_chosen = tuple(chosen)
        self._step += 1
        if self.k < self.num_arms:
            self._update_bandit(chosen, sq_norms.detach().cpu().double())

    def restore(self) -> None:
        """Put back the weights saved by `ascent` (bit for bit); a no-op when nothing is perturbed."""
        with torch.no_grad():
            for p, saved in self._saved:
                p.copy_(saved)
        self._saved = []

    # -------------------------------------------------------------------------------------------- bandit
    @property
    def probabilities(self) -> torch.Tensor:
        """The sampling distribution over tensors for the next `ascent` (a copy)."""
        soft = torch.softmax(self._log_w, dim=0)
        return (1.0 - self.num_arms * self.min_prob) * soft + self.min_prob

    def _choose(self) -> list[int]:
        if self.k >= self.num_arms:  # plain SAM: no draw, so the generator state stays untouched
            return list(range(self.num_arms))
        drawn = torch.multinomial(self.probabilities, self.k, replacement=False, generator=self._generator)
        return sorted(drawn.tolist())

    def _update_bandit(self, chosen: list[int], rewards: torch.Tensor) -> None:
        self._reward_scale = max(float(rewards.max()), REWARD_SCALE_DECAY * self._reward_scale)
        if self._reward_scale <= 0:  # all gradients zero: nothing learned this step
            return
        idx = torch.tensor(chosen)
        estimate = rewards / self._reward_scale / self.probabilities[idx]  # importance-weighted, in [0, 1/m]
        self._log_w[idx] += self.bandit_lr * estimate
        self._log_w -= self._log_w.max()

    # ------------------------------------------------------------------------------------------ statistics
    @property
    def last_chosen(self) -> tuple[int, ...]:
        """Indices (into the trainable params given) of the tensors perturbed at the last `ascent`."""
        return self._last_chosen

    @property
    def last_perturbed_fraction(self) -> float:
        """Fraction of trainable *elements* perturbed at the last `ascent` (0 before the first)."""
        return sum(self._sizes[i] for i in self._last_chosen) / self._total

    @property
    def step_count(self) -> int:
        """Number of `ascent` calls so far, including those before a `load_state_dict`."""
        return self._step

    # ---------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything that decides future choices: resuming from it draws the same tensors."""
        return {
            "num_arms": self.num_arms,
            "log_weights": self._log_w.clone(),
            "reward_scale": self._reward_scale,
            "rng_state": self._generator.get_state(),
            "step": self._step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output; the parameter list must have the same number of tensors."""
        if state["num_arms"] != self.num_arms:
            raise ValueError(f"state has {state['num_arms']} arms, this optimizer has {self.num_arms}")
        self._log_w = state["log_weights"].detach().to(torch.float64).clone()
        self._reward_scale = float(state["reward_scale"])
        self._generator.set_state(state["rng_state"].clone())
        self._step = int(state["step"])


def _has_deepspeed_hook(t: torch.Tensor) -> bool:
    """Whether a DeepSpeed engine's forward hooked this tensor (output hooks, as DeepSpeed 0.19 does)."""
    hooks = getattr(t, "_backward_hooks", None) or {}
    return any(getattr(h, "__module__", "").startswith("deepspeed") for h in hooks.values())
