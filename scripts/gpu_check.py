"""The GPU check's trials (run by scripts/gpu_check.sh): a 2-worker ZeRO-2 LoRA trial and a ZeRO-3 PiSSA trial
(gradient checkpointing on) on a random-init ~0.5B Llama-shaped base built from a config (no hub), each
printed as tokens/s, MFU and peak GPU memory.

Why random init: throughput and memory depend on the shapes, not on the weights, and nothing needs to be
downloaded. The data is random digit strings of ~500 characters (the built-in character tokenizer: one
token each), so every step sees full-length sequences and tokens/s means something.

MFU counts model FLOPs per token (the frozen base gets no weight gradients): 2N forward + 2N backward over
the base's N matmul weights, 6 per trainable weight's share (2 forward, 4 backward), and attention's
4·T·d per layer forward (QKᵀ and AV, the usual non-causal count) × 3 for forward + backward. Gradient
checkpointing's recomputed forward is not counted (it is hardware work, not model work). Peak: the GPU's
dense bf16 TFLOPS from `PEAK_BF16_TFLOPS`, or ``GPU_PEAK_TFLOPS`` in the environment.

``--dry-run`` runs the same code on CPU with a tiny config and 2 steps (fp32, gloo): it checks the script, it
measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Dense bf16 tensor-core peak per GPU (vendor datasheets, SXM where both exist); first match in the name wins.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0)]
PROMPT_CHARS, COMPLETION_CHARS = 480, 16  # + BOS + EOS: 498 tokens a row, under max_length 512
ROWS = 512  # enough for 30 steps of batch 8 on each of 2 workers


def base_config(tokenizer: Any, dry: bool) -> Any:
    """Llama-shaped, ~0.52B parameters (24 × (4·1024² + 3·1024·5632)); tiny for the dry run."""
    from transformers import LlamaConfig

    hidden, intermediate, layers, heads = (64, 128, 2, 4) if dry else (1024, 5632, 24, 16)
    size = {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers}
    size["num_attention_heads"] = heads
    return LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=size["num_attention_heads"],
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **size,
    )


def build_base(out: Path, dry: bool) -> tuple[Any, int]:
    """A random-init base + the built-in tokenizer, saved for `from_pretrained`: (config, parameters)."""
    import torch
    from transformers import LlamaForCausalLM

    from peftsweep.trainables.builtin import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 1024
    config = base_config(tokenizer, dry)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)  # stored bf16, as hub bases are
    tokenizer.save_pretrained(out)
    return config, sum(p.numel() for p in model.parameters())


def write_task(out: Path, dry: bool) -> None:
    """train.jsonl / eval.jsonl of random digit strings (prompt → completion)."""
    rng = random.Random(0)
    prompt, completion = (48, 8) if dry else (PROMPT_CHARS, COMPLETION_CHARS)

    def digits(k: int) -> str:
        return "".join(rng.choices("0123456789", k=k))

    def rows(n: int) -> str:
        lines = (json.dumps({"prompt": digits(prompt), "completion": digits(completion)}) for _ in range(n))
        return "".join(f"{row}\n" for row in lines)

    out.mkdir(parents=True)
    (out / "train.jsonl").write_text(rows(ROWS))
    (out / "eval.jsonl").write_text(rows(16))


def spec_for(
    root: Path, name: str, method: str, *, workers: int, zero_stage: int, gc: bool, dry: bool
) -> Any:
    from peftsweep.spec import parse_spec

    return parse_spec(
        {
            "name": name,
            "base_model": str(root / "base"),
            "data": {"task": str(root / "task"), "max_eval_examples": 8},
            "methods": [{"name": method, "ranks": [16]}],
            "training": {
                "max_steps": 2 if dry else 30,
                "eval_every": 1 if dry else 10,  # the last report's tokens/s: steps 21-30, warm
                "batch_size": 2 if dry else 8,
                "max_length": 512,
                "gradient_checkpointing": gc,
                "engine": "deepspeed",
            },
            "resources": {
                "workers_per_trial": workers,
                "gpus_per_worker": 0 if dry else 1,
                "cpus_per_worker": 1,
                "precision": "fp32" if dry else "bf16",
                "zero_stage": zero_stage,
            },
            "tracking": {"root": str(root / name)},
        },
        base_dir=root,
    )


def run_one_worker(spec: Any, method: str, lr: float) -> dict[str, Any]:
    from peftsweep.trainables.loop import run_trial
    from peftsweep.trainables.trial_config import standalone_trial

    reports: list[dict[str, Any]] = []
    run_trial(standalone_trial(spec, method, lr, 16, 0), lambda metrics, _ckpt: reports.append(metrics))
    return reports[-1]


def run_two_workers(spec: Any, method: str, lr: float, dry: bool) -> dict[str, Any]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from peftsweep.trainables.executors import train_loop_per_worker
    from peftsweep.trainables.trial_config import TRIAL_KEY, standalone_trial

    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={TRIAL_KEY: standalone_trial(spec, method, lr, 16, 0)},
            scaling_config=ray.train.ScalingConfig(
                num_workers=2, use_gpu=not dry, resources_per_worker={"CPU": 1}
            ),
            run_config=ray.train.RunConfig(name="two-workers", storage_path=str(spec.tracking.root / "ray")),
        )
        return dict(trainer.fit().metrics)
    finally:
        ray.shutdown()


def model_flops_per_token(config: Any, trainable: int, seq: int) -> float:
    """See the module docstring: 4 per frozen matmul weight, 6 per trainable one, attention × 3."""
    d, layers = config.hidden_size, config.num_hidden_layers
    kv = d * config.num_key_value_heads // config.num_attention_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * config.intermediate_size  # q, o, k, v, gate, up, down
    matmul = layers * per_layer + d * config.vocab_size  # + lm_head
    return 4 * matmul + 2 * trainable + 3 * layers * 4 * seq * d


def peak_flops() -> float | None:
    import torch

    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def line(label: str, metrics: dict[str, Any], config: Any, seq: int, gpus: int) -> str:
    tokens_per_s = float(metrics["tokens_per_s"])
    peak, shown = peak_flops(), "n/a (no known peak: set GPU_PEAK_TFLOPS)"
    if peak:
        flops = tokens_per_s * model_flops_per_token(config, int(metrics["trainable_params"]), seq)
        shown = f"{100 * flops / (peak * gpus):.1f} %"
    memory = metrics.get("peak_memory_mb")
    memory_shown = f"{memory / 1024:.1f} GiB/GPU" if memory else "n/a (CPU)"
    return f"{label:<34} {tokens_per_s:>10,.0f} tok/s   MFU {shown:<12} peak memory {memory_shown}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny config, 2 steps: checks the script")
    args = parser.parse_args()
    import torch

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; run it on a GPU machine (or --dry-run)", file=sys.stderr)
        return 2
    gpus = 0 if dry else torch.cuda.device_count()
    device = "CPU (dry run)" if dry else f"{gpus} × {torch.cuda.get_device_name()}"
    print(f"gpu_check: {device}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="peftsweep-gpu-check-"))
    try:
        config, n_params = build_base(root / "base", dry)
        write_task(root / "task", dry)
        seq = 1 + (48 + 8 if dry else PROMPT_CHARS + COMPLETION_CHARS) + 1  # BOS + prompt + completion + EOS
        print(
            f"base: random-init Llama, {config.num_hidden_layers} layers × {config.hidden_size}, "
            f"{n_params / 1e6:,.1f}M parameters; rows of {seq} tokens",
            flush=True,
        )
        results = []
        spec = spec_for(root, "pissa-zero3", "pissa", workers=1, zero_stage=3, gc=True, dry=dry)
        metrics = run_one_worker(spec, "pissa", 2e-4)
        results.append(line("pissa, ZeRO-3, 1 worker, grad ckpt", metrics, config, seq, 1))
        print(results[-1], flush=True)
        if dry or gpus >= 2:
            spec = spec_for(root, "lora-zero2", "lora", workers=2, zero_stage=2, gc=False, dry=dry)
            metrics = run_two_workers(spec, "lora", 1e-3, dry)
            results.append(line("lora, ZeRO-2, 2 workers", metrics, config, seq, 2))
        else:
            why = f"needs 2 GPUs (NCCL puts one rank on each), found {gpus}"
            results.append(f"{'lora, ZeRO-2, 2 workers':<34} SKIPPED: {why}")
        print(results[-1], flush=True)
        print("gpu_check: summary\n  " + "\n  ".join(results))
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
