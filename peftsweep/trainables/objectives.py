"""Gradual fine-tuning objective: a training target annealed from the base model's predictions to the data.

Why (arXiv 2601.22495, carried from flow matching to language models): training straight on one-hot labels
pulls the model away from what it already knows at full strength from step 0. Here the target of every
response token is ``p_t = (1 - tau_t) * p_base + tau_t * onehot(label)``, with ``p_base`` the frozen base
model's next-token distribution and ``tau_t`` rising from ``tau0`` to 1 over the first part of training.
At ``tau = 1`` the objective is the ordinary cross-entropy, so after the anneal the trial trains as usual.

The base distribution comes from the same PEFT model with its adapters disabled (no second model copy), which
is why full fine-tuning and other non-PEFT methods cannot use this objective.

torch is imported inside the functions so that the schedule (plain floats) stays importable without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

from peftsweep.trainables.data import IGNORE_INDEX

if TYPE_CHECKING:
    from torch import Tensor

Schedule = Literal["linear", "cosine"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)


def tau_at(step: int, total_steps: int, *, tau0: float, anneal_fraction: float, schedule: Schedule) -> float:
    """Weight of the data target at optimizer step ``step`` (0-based): ``tau0`` at step 0, 1.0 from step
    ``anneal_fraction * total_steps`` on. ``anneal_fraction == 0`` means no anneal (always 1.0, plain CE).

    "cosine" rises slowly at both ends (half a cosine period), "linear" at a constant rate.
    """
    _check_schedule(tau0, anneal_fraction, schedule)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if anneal_fraction == 0.0:
        return 1.0
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1 to anneal over a fraction of it, got {total_steps}")
    progress = min(1.0, step / (anneal_fraction * total_steps))
    if schedule == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return tau0 + (1.0 - tau0) * progress


@dataclass(frozen=True)
class GradualSchedule:
    """The gradual objective's knobs as one value (validated at construction, so a bad spec fails early)."""

    tau0: float  # data weight at step 0; 0 = pure base-model target, 1 = plain cross-entropy throughout
    anneal_fraction: float  # share of the trial's steps over which tau reaches 1; 0 = no anneal
    schedule: str = "linear"

    def __post_init__(self) -> None:
        _check_schedule(self.tau0, self.anneal_fraction, self.schedule)

    def tau(self, step: int, total_steps: int) -> float:
        """``tau_at`` with this schedule's knobs."""
        return tau_at(
            step,
            total_steps,
            tau0=self.tau0,
            anneal_fraction=self.anneal_fraction,
            schedule=cast(Schedule, self.schedule),  # checked in __post_init__
        )


def gradual_loss(
    logits: Tensor, labels: Tensor, base_logits: Tensor, tau: float, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Mean over counted tokens of ``CE(p_tau, softmax(logits))``, ``p_tau = (1-tau)·p_base + tau·onehot``.

    Shapes: ``logits``/``base_logits`` [B, T, V], ``labels`` [B, T]. The causal shift happens here, as in HF
    models (position t predicts label t+1); ``ignore_index`` labels (prompt, padding) count for nothing. The
    math is fp32 whatever the input dtype, and only counted positions are normalised, so a long prompt costs
    no [B, T, V] softmax. ``tau = 1`` is exactly ``F.cross_entropy`` (NaN when nothing is counted, like it).
    ``base_logits`` is a constant target: no gradient flows into it.
    """
    _check_tau(tau)
    if logits.shape != base_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and base_logits {tuple(base_logits.shape)} differ")
    nll, soft = _token_losses(logits, labels, None if tau == 1.0 else base_logits, ignore_index)
    if soft is None:
        return nll.mean()  # skips the soft term: identical to plain cross-entropy, not just close
    # The loss is linear in the target, so mixing the per-token losses equals the loss of the mixed target.
    return (tau * nll + (1.0 - tau) * soft).mean()


def _token_losses(
    logits: Tensor, labels: Tensor, base_logits: Tensor | None, ignore_index: int
) -> tuple[Tensor, Tensor | None]:
    """Per counted token: (CE against the label, CE against softmax(base_logits) or None), shifted, fp32."""
    import torch.nn.functional as F

    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)} in [B, T]")
    targets = labels[:, 1:]
    counted = targets != ignore_index
    log_probs = F.log_softmax(logits[:, :-1][counted].float(), dim=-1)  # [N, V]
    nll = -log_probs.gather(-1, targets[counted].unsqueeze(-1)).squeeze(-1)
    if base_logits is None:
        return nll, None
    base_probs = F.softmax(base_logits.detach()[:, :-1][counted].float(), dim=-1)
    return nll, -(base_probs * log_probs).sum(dim=-1)


def base_logits(model: Any, batch: Mapping[str, Tensor]) -> Tensor:
    """Logits of the frozen base model on ``batch``: the same PEFT model with its adapters disabled.

    Runs under ``torch.no_grad`` and in eval mode, so dropout does not add noise to the target; every module's
    train/eval mode is restored afterwards. A DeepSpeed engine is unwrapped (``.module``). Prompt-learning
    models return logits for their virtual tokens too: the logits are cut to the last ``labels.shape[1]``
    positions (``input_ids`` when there are no labels), the convention of ``metrics.evaluate``.
    """
    import torch

    inner = _peft_model(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}  # the loss is ours; the base needs none
    length = (batch["labels"] if "labels" in batch else batch["input_ids"]).shape[1]
    modes = [(module, module.training) for module in inner.modules()]
    try:
        inner.eval()
        with torch.no_grad(), inner.disable_adapter():
            logits = inner(**inputs).logits
    finally:
        for module, training in modes:
            module.training = training
    return logits[:, -length:]


def gradual_step_loss(model: Any, batch: Mapping[str, Tensor], tau: float) -> tuple[Tensor, Tensor]:
    """``(objective, plain_ce)`` for one training batch (with ``labels``) of a PEFT model or its engine.

    objective: ``gradual_loss`` of the adapted model's logits against the base model's (``base_logits``), plus
    whatever the model itself adds to its ``.loss`` beyond the cross-entropy (AdaLoRA's orthogonality
    penalty), so a method trains with its own regulariser under this objective too. At ``tau = 1`` it is the
    model's ``.loss`` itself and the base forward is skipped (the anneal's tail costs nothing extra).
    plain_ce: the model's ``.loss``, detached: what a trial without the gradual objective trains on and logs
    as train_loss, so train_loss stays comparable across trials.
    """
    _check_tau(tau)
    _peft_model(model)  # fail on the first step whatever tau is: the spec should not have allowed this method
    out = model(**batch)  # through the engine, if any: DeepSpeed's own forward bookkeeping must run
    labels = batch["labels"]
    logits = out.logits[:, -labels.shape[1] :]  # prompt-learning virtual tokens first; see base_logits
    target = None if tau == 1.0 else base_logits(model, batch)
    nll, soft = _token_losses(logits, labels, target, IGNORE_INDEX)
    model_loss = out.loss if getattr(out, "loss", None) is not None else nll.mean()
    if soft is None:
        return model_loss, model_loss.detach()
    penalty = model_loss - nll.mean()  # ~0 (rounding) unless the method adds a term to .loss
    return (tau * nll + (1.0 - tau) * soft).mean() + penalty, model_loss.detach()


def _peft_model(model: Any) -> Any:
    """The PEFT model inside ``model`` (a DeepSpeed engine or the model itself); TypeError if none."""
    inner = getattr(model, "module", model)
    if not hasattr(inner, "disable_adapter"):
        raise TypeError(
            "the gradual objective needs a PEFT model (peft.PeftModel) whose adapters can be disabled to get "
            f"the base model's predictions; got {type(inner).__name__}, which has no `disable_adapter`. "
            "Full fine-tuning and the non-PEFT methods (e.g. fullft, bitfit, finegates) have no frozen base "
            "inside them: train them with the plain cross-entropy objective (no gradual schedule)."
        )
    return inner


def _check_tau(tau: float) -> None:
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")


def _check_schedule(tau0: float, anneal_fraction: float, schedule: str) -> None:
    if not 0.0 <= tau0 <= 1.0:
        raise ValueError(f"tau0 must be in [0, 1], got {tau0}")
    if not 0.0 <= anneal_fraction <= 1.0:
        raise ValueError(f"anneal_fraction must be in [0, 1], got {anneal_fraction}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
