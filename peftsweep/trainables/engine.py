"""The training engine of a trial: plain torch at world size 1, DeepSpeed ZeRO across several workers.

Why two: DeepSpeed is what shards optimizer state and gradients across workers (ZeRO) and offloads them, so it
is the engine of every multi-worker trial and of any trial that asks for ZeRO-3 or offload. At world size 1 on
the other hand it still flattens and all-reduces gradients every step (ZeRO-0) or runs a hook per parameter
(ZeRO-1/2): `bench/throughput.py` measured plain torch at 1.14× ZeRO-0's and 1.18× ZeRO-2's tokens/s (a
step: 1.16× / 1.24× the time), for the same losses (tests/trainables/test_loop.py, to 1e-5 over 20 steps), and
loading its communication op takes a JIT-extension lock that a killed worker can leave behind (issue 22). So
``training.engine: auto`` picks torch there; `training.engine` forces either.

Both engines expose the same small surface the loop uses (``engine(**batch)``, ``module``, ``backward``,
``step``, ``boundary``, ``save_state``/``load_state``), with DeepSpeed's semantics: ``backward`` scales the
loss by 1/accumulation, ``step`` is called after every micro-batch and steps the optimizer, clips the gradient
norm and advances the LR schedule only at an accumulation boundary.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    import torch

    from peftsweep.spec import SweepSpec

EngineName = Literal["torch", "deepspeed"]
_DS_TAG = "state"  # DeepSpeed checkpoint tag inside the resume-state directory
_TORCH_PARAMS = "trainable.safetensors"  # torch engine: the trainable parameters (no pickle)
_TORCH_OPTIM = "optimizer.pt"  # torch engine: optimizer + schedule state, loaded with weights_only=True
_OPS_LOCK = "peftsweep-ops.lock"  # our kernel lock around DeepSpeed's op loading (see `deepspeed_ops_lock`)


def engine_for(spec: SweepSpec) -> EngineName:
    """The engine a trial of ``spec`` trains with (``training.engine``; ``auto`` as the module says)."""
    chosen = spec.training.engine
    if chosen != "auto":
        return chosen
    res = spec.resources
    sharded = res.workers_per_trial > 1 or res.zero_stage == 3 or res.offload_optimizer
    return "deepspeed" if sharded or res.precision != "fp32" else "torch"


class Engine(Protocol):
    """What the training loop needs from an engine."""

    module: Any  # the trained model (the PEFT model), for evaluation, export and SAM's ascent pass
    device: torch.device

    def __call__(self, **batch: Any) -> Any: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def boundary(self) -> bool: ...
    def step(self) -> None: ...
    def train(self) -> None: ...
    def save_state(self, state_dir: Path) -> None: ...
    def load_state(self, state_dir: Path) -> None: ...


def build_engine(
    spec: SweepSpec, model: Any, optimizer: Any, scheduler: Any, world_size: int
) -> tuple[Engine, EngineName]:
    """The spec's engine around ``model`` (its trainable parameters in ``optimizer``)."""
    name = engine_for(spec)
    if name == "torch":
        if world_size > 1:
            raise ValueError(
                f"training.engine 'torch' trains one worker per trial, but resources.workers_per_trial is "
                f"{world_size}; use 'deepspeed' (or 'auto') for multi-worker trials"
            )
        return TorchEngine(
            model, optimizer, scheduler, spec.accumulation_steps, spec.training.max_grad_norm
        ), name
    return DeepSpeedEngine(spec, model, optimizer, scheduler, world_size), name


class TorchEngine:
    """Plain PyTorch: AdamW (or whatever optimizer is passed), gradient accumulation, clipping, schedule."""

    def __init__(
        self, model: Any, optimizer: Any, scheduler: Any, accumulation: int, max_grad_norm: float
    ) -> None:
        import torch

        self.module = model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.accumulation, self.max_grad_norm = accumulation, max_grad_norm
        self.device = next(model.parameters()).device if torch.cuda.is_available() else torch.device("cpu")
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        self._micro = 0  # micro-batches since the last optimizer step

    def __call__(self, **batch: Any) -> Any:
        return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()
        self._micro += 1

    def boundary(self) -> bool:
        """Whether the micro-batch just backpropagated completes an optimizer step."""
        return self._micro >= self.accumulation

    def step(self) -> None:
        import torch

        if not self.boundary():
            return
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0

    def train(self) -> None:
        self.module.train()

    def save_state(self, state_dir: Path) -> None:
        """Trainable parameters (safetensors) and optimizer + schedule state (tensors and numbers only)."""
        import torch
        from safetensors.torch import save_file

        state_dir.mkdir(parents=True, exist_ok=True)
        trainable = {
            n: p.detach().cpu().contiguous() for n, p in self.module.named_parameters() if p.requires_grad
        }
        save_file(trainable, str(state_dir / _TORCH_PARAMS))
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            state_dir / _TORCH_OPTIM,
        )

    def load_state(self, state_dir: Path) -> None:
        import torch
        from safetensors.torch import load_file

        params = load_file(str(state_dir / _TORCH_PARAMS))
        missing = [n for n, p in self.module.named_parameters() if p.requires_grad and n not in params]
        if missing:
            raise ValueError(f"{state_dir}: the resume state lacks trainable parameters {missing[:3]}")
        with torch.no_grad():
            for name, param in self.module.named_parameters():
                if name in params:
                    param.copy_(params[name])
        state = torch.load(state_dir / _TORCH_OPTIM, weights_only=True)  # tensors and numbers, no pickle
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def deepspeed_config(spec: SweepSpec, world_size: int = 1) -> dict[str, Any]:
    """The DeepSpeed engine config from the spec (batch sizes, accumulation, ZeRO stage, precision)."""
    tr, res = spec.training, spec.resources
    zero: dict[str, Any] = {"stage": res.zero_stage}
    if res.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": tr.batch_size,
        "gradient_accumulation_steps": spec.accumulation_steps,
        "train_batch_size": tr.batch_size * spec.accumulation_steps * world_size,
        "gradient_clipping": tr.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": res.precision == "bf16"},
        "fp16": {"enabled": res.precision == "fp16"},
        # ZeRO wraps our torch AdamW (DeepSpeed's fused optimizers need a JIT build per machine).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


class DeepSpeedEngine:
    """A `deepspeed.initialize` engine behind the same surface as `TorchEngine`."""

    def __init__(self, spec: SweepSpec, model: Any, optimizer: Any, scheduler: Any, world_size: int) -> None:
        import deepspeed

        init_standalone()  # a no-op inside Ray Train, whose workers already share a process group
        load_deepspeed_ops()
        self._engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(spec, world_size),
        )
        self.module = self._engine.module
        self.device = self._engine.device

    def __call__(self, **batch: Any) -> Any:
        return self._engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self._engine.backward(loss)

    def boundary(self) -> bool:
        return bool(self._engine.is_gradient_accumulation_boundary())

    def step(self) -> None:
        self._engine.step()

    def train(self) -> None:
        self._engine.train()

    def gathered(self) -> Any:
        """A context in which ZeRO-3's sharded trainable weights are whole on every rank (export)."""
        import deepspeed

        params = [p for p in self.module.parameters() if p.requires_grad]
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def save_state(self, state_dir: Path) -> None:
        # Trainable parameters only: the frozen base is rebuilt from the base model and the method's init.
        self._engine.save_checkpoint(str(state_dir), tag=_DS_TAG, exclude_frozen_parameters=True)

    def load_state(self, state_dir: Path) -> None:
        """DeepSpeed's own loader, forced weights-only (see `weights_only_loads`): the resume state lies under
        the shared ``tracking.root``, and DeepSpeed unpickles it with ``torch.load(weights_only=False)``."""
        with weights_only_loads(deepspeed_checkpoint_globals()):
            load_path, _ = self._engine.load_checkpoint(
                str(state_dir),
                tag=_DS_TAG,
                load_module_strict=False,  # the checkpoint holds only the trainable parameters
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
        if load_path is None:
            raise RuntimeError(f"{state_dir}: DeepSpeed could not load checkpoint tag {_DS_TAG!r}")


_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch.load reads it at every call


def deepspeed_checkpoint_globals() -> list[Any]:
    """The non-torch classes a DeepSpeed ZeRO checkpoint of ours pickles (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on checkpoints written by `save_state` at ZeRO
    0-3, fp32 and bf16, AdamW and SL-SAM): plain data holders without ``__setstate__`` or ``__reduce__``, so
    unpickling them runs no code. `DynamicLossScaler` is fp16's (GPU) counterpart of `LossScaler`."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextmanager
def weights_only_loads(allowed: list[Any]) -> Iterator[None]:
    """Every ``torch.load`` inside — a third party's too, whatever ``weights_only`` it passes — uses torch's
    restricted unpickler, which accepts tensors, containers, numbers and the ``allowed`` classes and refuses
    any other global (a planted ``__reduce__`` raises ``UnpicklingError`` instead of running).

    Why not trust the files: they lie under the shared ``tracking.root``, and whoever can write there would
    otherwise run code in every worker that resumes. Why not an HMAC over them: its key would have to reach
    restarted Ray Train workers and a resumed driver without ever sitting under ``tracking.root``; refusing
    code in the format needs no secret. (One process runs one trial, so the process-wide variable is ours
    while the block runs; a concurrent ``torch.load`` elsewhere would only be stricter.)
    """
    import torch

    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        if previous is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


def load_deepspeed_ops() -> None:
    """Load the JIT op DeepSpeed's communication backend loads at `deepspeed.initialize` (its shared-memory
    all-reduce), inside `deepspeed_ops_lock`, once per process.

    Only the load is locked: `initialize` itself meets the other ranks (the op's shared-memory set-up), so a
    lock held across it would deadlock them. DeepSpeed caches a loaded op per process (``OpBuilder.
    _loaded_ops``), so its own call inside `initialize` then returns this one without touching torch's lock.
    """
    from deepspeed.comm.torch import build_shm_op

    with deepspeed_ops_lock():
        build_shm_op()


def init_standalone() -> None:
    """A one-process gloo group for DeepSpeed outside Ray Train (standalone trials, benchmarks, tests).

    An in-memory store: no port to collide with another process doing the same.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)  # DeepSpeed reads these
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def extensions_root() -> Path:
    """The directory that holds one build directory per JIT op, as torch's ``_get_build_directory`` names it
    (``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions/py311_cpu``-style)."""
    import sys

    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


@contextmanager
def deepspeed_ops_lock(
    timeout_s: float = 600.0, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold our kernel lock while DeepSpeed loads its JIT ops, and break torch's build lock when stale.

    Why: torch's JIT loader takes a lock *file* (``FileBaton``: created with O_EXCL, deleted when done) on
    every load, even of an op built long ago, and a loader that finds it waits with no limit. A worker
    SIGKILLed inside that window (the hang watchdog, the OOM killer, a lost node, a fault drill) leaves the
    file behind and every later DeepSpeed trial on the machine hangs. Every peftsweep process loads ops only
    inside this ``flock`` on a file beside torch's, and the kernel releases an flock when its holder dies.
    So whoever holds it knows that no live peftsweep loader is inside torch's window: a torch lock file
    present then was left by a dead process, and is removed. (A non-peftsweep process building an op in the
    same directory at that very moment would build it a second time, which torch's loader tolerates.)

    ``timeout_s`` bounds the wait for a live holder (a first build takes ~30 s): no trial waits forever.
    """
    root = extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(root / _OPS_LOCK, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"waited {timeout_s:.0f} s for another process loading DeepSpeed's ops "
                        f"({root / _OPS_LOCK}); it is alive but not finishing"
                    ) from None
                if on_wait is not None:
                    on_wait("waiting for another process to finish loading DeepSpeed's ops")
                time.sleep(0.2)
        try:
            for stale in clear_build_locks(root):
                print(f"peftsweep: removed a build lock left by a dead process: {stale}", flush=True)
            _write_holder(handle)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def clear_build_locks(root: Path) -> list[Path]:
    """Remove torch's extension build locks under ``root`` (call only while holding `deepspeed_ops_lock`)."""
    removed = []
    for lock in root.glob("*/lock"):
        with suppress(FileNotFoundError):  # deleted meanwhile by a non-peftsweep loader finishing
            lock.unlink()
            removed.append(lock)
    return removed


def _write_holder(handle: Any) -> None:
    """Who holds the lock, for a human looking at a stuck machine (the kernel lock is what counts)."""
    import socket

    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    handle.flush()
