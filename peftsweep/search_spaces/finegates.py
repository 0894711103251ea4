"""FineGates (arXiv 2602.09169, official code jsvir/FineGates): learn which rows/columns of each frozen
linear layer to drop, then export a smaller dense model.

Follows the official `GatesVector` / `SparseLayer`: every targeted projection (all linear layers, not the LM
head) gets a row (output) and a column (input) gate vector; logits init N(1, 0.1); mu = tanh(logit);
gate = clamp(mu + 0.5 + noise, 0, 1) with noise ~ N(0, 0.1) in training and none in eval (hard sigmoid
with slope 1). Per-layer sparsity loss as in the official code: keep probability Φ((mu + 0.5) / 0.5), and
|mean keep − (1 − target_sparsity)| averaged over the row and column vectors; `extra_loss` is λ × its mean
over layers. Base weights stay frozen; gates and biases train. Unlike the official code (uniform init),
missing biases are created ZERO (as in BitFit) so the step-0 output is unchanged.

Step 0: mu + 0.5 = tanh(~1) + 0.5 ≈ 1.26 > 1, so every eval gate is exactly 1 (a gate is < 1 only if its
logit drew below atanh(0.5) ≈ 0.549, 4.5 σ under the mean, p ≈ 3e-6 per gate) and the eval output equals
the base model's. In training ~0.5 % of gates dip slightly below 1 through the noise.

Export (what is physically removed): closed gates (eval gate == 0) of the MLP intermediate dimension —
rows of gate_proj/up_proj together with columns of down_proj (Llama family), rows of c_fc with columns
of mlp.c_proj (GPT-2) — since act(0) == 0 such a channel contributes nothing. The config holds one
intermediate size for all layers, so every layer keeps max-over-layers channels (layers that closed more
keep a few all-zero channels as padding). All other gates (attention rows/cols, the hidden/residual
dimension) are only FOLDED into the weights: closed ones become zero rows/columns, open ones scale them;
nothing there is removed, so attention gives no speed-up. Biases are kept (gated by the row gate).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftsweep.search_spaces._registry import AdapterHParams, Method, register
from peftsweep.search_spaces.bitfit import add_zero_biases, out_features, target_linears

if TYPE_CHECKING:
    import torch
    from torch import nn

# Gate logits must travel O(1) (1 → below atanh(-0.5) ≈ -0.55 to close) within a short trial and Adam moves
# ≈ lr per step, so the range reaches higher than LoRA's; below 1e-4 nothing closes in a sweep-length run.
LR_RANGE = (1e-4, 1e-1)
LOGIT_INIT_MEAN = 1.0  # official GatesVector init: N(1, 0.1), i.e. every gate starts open
LOGIT_INIT_STD = 0.1  # official GatesVector init
NOISE_STD = 0.1  # official GatesVector.noise_std: the training-time noise on mu
KEEP_PROB_STD = 0.5  # official sparsity_loss uses σ = 0.5 (not the noise σ) in the keep probability
MANIFEST_FILE = "finegates.json"
# Activations with act(0) == 0: only then does a closed gate/up row make its MLP channel exactly zero.
ZERO_AT_ZERO_ACTS = {"silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu"}


def _gate(logits: torch.Tensor, training: bool) -> torch.Tensor:
    """The official hard-sigmoid gate clamp(tanh(logit) + 0.5 [+ noise], 0, 1)."""
    import torch

    mu = torch.tanh(logits)
    if training:
        mu = mu + torch.randn_like(mu) * NOISE_STD
    return torch.clamp(mu + 0.5, 0.0, 1.0)


def eval_gates(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(row gates [out], column gates [in]) of one gated layer, deterministic (eval mode), no grad."""
    import torch

    with torch.no_grad():
        return _gate(layer.finegates.rows, False).float(), _gate(layer.finegates.cols, False).float()


def _gate_input(layer: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x = args[0]
    return (x * _gate(layer.finegates.cols, layer.training).to(x.dtype), *args[1:])


def _gate_output(layer: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
    # The bias is inside `out`, so it is gated too, exactly as the official SparseLayer.forward.
    return out * _gate(layer.finegates.rows, layer.training).to(out.dtype)


def gated_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs carrying FineGates gates."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "finegates")]


def _apply(model: nn.Module, hparams: AdapterHParams, workdir: Path) -> nn.Module:
    import torch
    from torch import nn

    options = METHOD.merged_options(hparams.options)
    if not 0.0 <= options["target_sparsity"] < 1.0:
        raise ValueError(f"finegates target_sparsity must be in [0, 1), got {options['target_sparsity']}")
    targets = target_linears(model, hparams.target_modules)
    added = add_zero_biases(model, [n for n, _ in targets])
    model.requires_grad_(False)
    for _, layer in targets:
        w = layer.weight
        d_out = out_features(layer)
        d_in = w.shape[1] if isinstance(layer, nn.Linear) else w.shape[0]  # Conv1D weight is [in, out]
        gates = nn.Module()  # a plain holder: its parameters show up as <layer>.finegates.rows / .cols
        gates.rows = nn.Parameter(torch.empty(d_out, dtype=torch.float32, device=w.device))
        gates.cols = nn.Parameter(torch.empty(d_in, dtype=torch.float32, device=w.device))
        for p in (gates.rows, gates.cols):
            nn.init.normal_(p, LOGIT_INIT_MEAN, LOGIT_INIT_STD)
        layer.finegates = gates
        layer.bias.requires_grad_(True)
        layer.register_forward_pre_hook(_gate_input)
        layer.register_forward_hook(_gate_output)
    model._peftsweep_finegates = {
        "targets": [n for n, _ in targets],
        "added_biases": added,
        "target_sparsity": float(options["target_sparsity"]),
        "lambda_sparsity": float(options["lambda_sparsity"]),
    }
    return model


def keep_probability(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-gate keep probabilities Φ((tanh(logit) + 0.5) / 0.5) of (rows, cols), as the official loss."""
    import torch

    def prob(logits: torch.Tensor) -> torch.Tensor:
        return 0.5 - 0.5 * torch.erf((-0.5 - torch.tanh(logits)) / (KEEP_PROB_STD * math.sqrt(2)))

    return prob(layer.finegates.rows), prob(layer.finegates.cols)


def sparsity_loss(model: nn.Module) -> torch.Tensor:
    """λ × mean over layers of mean(|mean keep(rows) − keep target|, |mean keep(cols) − keep target|)."""
    import torch

    info = model._peftsweep_finegates
    keep_target = 1.0 - info["target_sparsity"]
    per_layer = []
    for _, layer in gated_layers(model):
        rows, cols = keep_probability(layer)
        per_layer.append(((torch.stack((rows.mean(), cols.mean())) - keep_target).abs()).mean())
    return info["lambda_sparsity"] * torch.stack(per_layer).mean()


def _mlp_blocks(model: nn.Module, targets: set[str]) -> list[tuple[list[str], str]]:
    """([producers whose rows are the intermediate dim], consumer whose columns are) for every MLP block
    whose projections are all gated: Llama family (gate_proj, up_proj → down_proj), GPT-2 (c_fc → c_proj)."""
    blocks = []
    for name, module in model.named_modules():
        for producers, consumer in ((("gate_proj", "up_proj"), "down_proj"), (("c_fc",), "c_proj")):
            names = [f"{name}.{p}" for p in producers] + [f"{name}.{consumer}"]
            if all(hasattr(module, p) for p in (*producers, consumer)) and set(names) <= targets:
                blocks.append((names[:-1], names[-1]))
    return blocks


def _intermediate_attr(config: Any) -> str | None:
    """The config field holding the MLP width, or None when this architecture is only folded, not pruned."""
    act = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    if act not in ZERO_AT_ZERO_ACTS:
        return None
    if isinstance(getattr(config, "intermediate_size", None), int):
        return "intermediate_size"
    if config.model_type == "gpt2":
        return "n_inner"
    return None


def pruned_model(model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """A new, smaller dense model equal to `model` in eval mode (see the module docstring for what is
    removed), plus a summary; `model` itself is not changed."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    info = model._peftsweep_finegates
    layers = dict(gated_layers(model))
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if ".finegates." not in k}
    gates = {name: eval_gates(layer) for name, layer in layers.items()}
    for name, layer in layers.items():  # fold: W' = diag(rows) W diag(cols), b' = rows * b
        rows, cols = gates[name]
        w = state[f"{name}.weight"]
        scale = (
            rows[:, None] * cols[None, :] if isinstance(layer, nn.Linear) else cols[:, None] * rows[None, :]
        )
        state[f"{name}.weight"] = (w.float() * scale).to(w.dtype)
        state[f"{name}.bias"] = (state[f"{name}.bias"].float() * rows).to(w.dtype)

    config = copy.deepcopy(model.config)
    attr = _intermediate_attr(config)
    blocks = _mlp_blocks(model, set(layers)) if attr else []
    summary: dict[str, Any] = {"pruned_mlp_blocks": len(blocks), "intermediate_attr": attr}
    if blocks:
        alive_masks = []
        for producers, consumer in blocks:
            alive = gates[consumer][1] > 0
            for p in producers:
                alive &= gates[p][0] > 0
            alive_masks.append(alive)
        width = alive_masks[0].numel()
        keep_n = max(1, max(int(m.sum()) for m in alive_masks))
        summary |= {"intermediate_before": width, "intermediate_after": keep_n}
        summary["alive_per_layer"] = [int(m.sum()) for m in alive_masks]
        for (producers, consumer), alive in zip(blocks, alive_masks, strict=True):
            # Open channels first, then closed (all-zero) ones as padding up to the common width, in order.
            order = torch.cat((alive.nonzero().flatten(), (~alive).nonzero().flatten()))
            keep = order[:keep_n].sort().values
            for p in producers:  # rows = intermediate channels
                linear = isinstance(layers[p], nn.Linear)
                state[f"{p}.weight"] = (
                    state[f"{p}.weight"].index_select(0 if linear else 1, keep).contiguous()
                )
                state[f"{p}.bias"] = state[f"{p}.bias"][keep].contiguous()
            linear = isinstance(layers[consumer], nn.Linear)
            cw = state[f"{consumer}.weight"]
            state[f"{consumer}.weight"] = cw.index_select(1 if linear else 0, keep).contiguous()
        setattr(config, attr, keep_n)

    # Biases created by FineGates must exist in the saved architecture: Llama-family configs have flags.
    if info["added_biases"]:
        for flag in ("attention_bias", "mlp_bias"):
            if hasattr(config, flag):
                setattr(config, flag, True)
    dtype = next(model.parameters()).dtype
    pruned = AutoModelForCausalLM.from_config(config, dtype=dtype)
    expected = pruned.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(
            f"{config.model_type} cannot hold the biases FineGates added ({unexpected[:3]}...); "
            "target layers that already have biases"
        )
    for key in set(expected) - set(state):  # e.g. o_proj bias forced on by attention_bias: zero = no bias
        if key.endswith(".bias"):
            state[key] = torch.zeros_like(expected[key])
    pruned.load_state_dict(state, strict=True)
    pruned.eval()
    summary |= {
        "params_before": _n_params(model, skip_gates=True),
        "params_after": _n_params(pruned),
        "closed_gates": sum(int((r == 0).sum() + (c == 0).sum()) for r, c in gates.values()),
        "total_gates": sum(r.numel() + c.numel() for r, c in gates.values()),
    }
    summary["params_removed_pct"] = 100.0 * (1 - summary["params_after"] / summary["params_before"])
    return pruned, summary


def _n_params(model: nn.Module, skip_gates: bool = False) -> int:
    """Distinct parameters (tied embeddings once), optionally leaving out the gate logits."""
    seen = {id(p): p for n, p in model.named_parameters() if not (skip_gates and ".finegates." in n)}
    return sum(p.numel() for p in seen.values())


def _export(model: nn.Module, out_dir: Path, workdir: Path) -> None:
    """The pruned dense model as a `from_pretrained` dir plus finegates.json; `model` is left untouched."""
    pruned, summary = pruned_model(model)
    pruned.save_pretrained(str(out_dir), safe_serialization=True)
    info = model._peftsweep_finegates
    manifest = {**summary, "target_sparsity": info["target_sparsity"], "targets": info["targets"]}
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))


def _load(base_model: nn.Module, out_dir: Path) -> nn.Module:
    """The export is a complete (smaller) model, so `base_model` is ignored except for its dtype."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=base_model.dtype)


def prune_report(
    model_before: nn.Module, model_after: nn.Module, input_ids: torch.Tensor, runs: int = 20
) -> dict[str, float]:
    """Parameters removed (%) and the pruned model's forward speed-up over `model_before` on one fixed
    batch: median of `runs` timed forwards each, alternated so both see the same machine load."""
    import torch

    times: dict[str, list[float]] = {"before": [], "after": []}
    models = {"before": model_before.eval(), "after": model_after.eval()}
    with torch.inference_mode():
        for m in models.values():  # warm-up: first calls allocate
            m(input_ids=input_ids)
        for _ in range(runs):
            for key, m in models.items():
                t0 = time.perf_counter()
                m(input_ids=input_ids)
                times[key].append(time.perf_counter() - t0)
    before, after = (statistics.median(times[k]) for k in ("before", "after"))
    n_before = _n_params(model_before, skip_gates=True)
    return {
        "params_before": n_before,
        "params_after": _n_params(model_after),
        "params_removed_pct": 100.0 * (1 - _n_params(model_after) / n_before),
        "forward_ms_before": 1e3 * before,
        "forward_ms_after": 1e3 * after,
        "speedup": before / after,
    }


METHOD = register(
    Method(
        name="finegates",
        summary="FineGates: stochastic row/column gates on frozen linears + biases; exports a pruned model",
        lr_range=LR_RANGE,
        ranks=(),  # no rank: gates and biases are sized by the architecture
        options={
            "target_sparsity": 0.35,  # fraction of gates to close; 0.35 is the brief's/paper-scale default
            "lambda_sparsity": 50.0,  # sparsity-loss weight; large because the loss is a mean |Δ| ≤ 1
        },
        apply=_apply,
        uses_rank=False,
        export=_export,
        load=_load,
        separable=False,  # the trained weights are the model's own: no adapter to switch off
        extra_loss=sparsity_loss,
        max_zero_stage=2,  # gate logits live on a never-called holder module, which ZeRO-3 would not gather
    )
)
