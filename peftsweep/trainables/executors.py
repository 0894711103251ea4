"""The trial side of the two executors: how the one training loop (`loop.run_trial`) reports and resumes.

- inline (`run_inline`): the loop runs inside the Tune trial itself, a function trainable on a warm, reused
  actor (``reuse_actors``): imports, the tokenizer and the prepared data are paid once per concurrency slot.
  It reports with ``ray.tune.report`` and resumes from ``ray.tune.get_checkpoint()``.
- train (`train_loop_per_worker`): the loop runs in every worker of a Ray Train ``TorchTrainer`` job (the
  orchestrator builds it), reports with ``ray.train.report`` and resumes from ``ray.train.get_checkpoint()``.

Both wrap the loop the same way: a watchdog, the trial's reliability drill (if any), and the Ray node and
host attached to every report.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from peftsweep.trainables.faults import TRAIN_SETTLE_S, Watchdog, after_report
from peftsweep.trainables.loop import OutOfMemory, failed_metrics, run_trial
from peftsweep.trainables.trial_config import TRIAL_KEY, TrialConfig
from peftsweep.vocab import HOST_KEY, NODE_KEY, STEP

_OOM_MARKER = "out-of-memory.json"  # a multi-worker trial's OOM verdict, read by its restarted workers


# How long Tune, reusing this actor for the next trial, waits for the previous trial's loop to end (Ray's
# default is 2 s). A trial Tune stops (early stopping) ends at its next optimizer step (`_EndWhenAsked`), and
# a step of a big model can take longer than 2 s; Tune fails the next trial if the wait runs out.
REUSE_WAIT_S = "300"


def run_inline(trial: TrialConfig) -> None:
    """The loop inside the Tune trial: report through Tune, resume from Tune's checkpoint of this trial."""
    import ray.tune
    from ray.train._internal.session import get_session

    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", REUSE_WAIT_S)  # read here, at the next reset
    checkpoint = ray.tune.get_checkpoint()  # set when Tune restarted this trial after a failure
    session = get_session()

    def send(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        ckpt = ray.tune.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None
        ray.tune.report(metrics, checkpoint=ckpt)

    asked = (lambda: session.stop_event.is_set()) if session is not None else (lambda: False)
    _run_watched(trial, send, checkpoint, settle_s=0.0, asked_to_end=asked)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: the `TrialConfig` as the driver built it, Ray Train's checkpoint to resume."""
    import ray.train
    import torch

    trial: TrialConfig = config[TRIAL_KEY]
    if torch.cuda.is_available():
        import ray.train.torch

        # DeepSpeed picks its device from LOCAL_RANK; make it the GPU Ray assigned to this worker.
        os.environ["LOCAL_RANK"] = str(ray.train.torch.get_device().index or 0)

    def send(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    marker = trial.run_dir / _OOM_MARKER
    if marker.is_file():  # an earlier attempt ran out of memory: every rank reports that once, no training
        verdict = json.loads(marker.read_text())
        send(failed_metrics(trial.spec, verdict["reason"], step=verdict.get("step", 0)) | _where(), None)
        return
    try:
        _run_watched(trial, send, ray.train.get_checkpoint(), settle_s=TRAIN_SETTLE_S)
    except OutOfMemory as exc:
        # The other ranks wait in a collective this one will never join, so the group must fail; the marker
        # turns the restart into a failed trial instead of a second attempt at the same config.
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"reason": exc.reason, "step": exc.step}))
        raise


Send = Callable[[dict[str, Any], Path | None], None]  # the executor's report: metrics + checkpoint dir


class _EndWhenAsked:
    """The watchdog's heartbeat, which also ends the loop (``SystemExit(0)``, Tune's own way to end a trial
    thread) at the first beat after Tune asked this trial to end.

    Why: Tune stops an inline trial (early stopping) by setting its session's stop event, which the loop
    would only see at its next report, an eval interval later. Meanwhile the reused actor cannot take the
    next trial, and once Tune's reuse wait runs out it fails that trial.
    """

    def __init__(self, watchdog: Watchdog, asked_to_end: Callable[[], bool]) -> None:
        self.watchdog, self.asked_to_end = watchdog, asked_to_end

    def beat(self, stage: str | None = None) -> None:
        self.watchdog.beat(stage)
        if self.asked_to_end():
            raise SystemExit(0)

    def training(self) -> None:
        self.watchdog.training()


def _run_watched(
    trial: TrialConfig,
    send: Send,
    checkpoint: Any,
    settle_s: float,
    asked_to_end: Callable[[], bool] = lambda: False,
) -> None:
    """`run_trial` under a watchdog, with the drill armed once per trial and where it ran on every report."""
    res = trial.spec.resources
    # Reliability drills (trainables.faults) fire once per trial: a restart shows the recovery.
    fault = trial.fault if trial.fault is not None and trial.fault.armed() else None
    trial = replace(trial, fault=fault)
    where = _where()
    with Watchdog(res.hang_timeout_s, res.setup_timeout_s) as watchdog:

        def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
            send(metrics | where, ckpt_dir)
            watchdog.beat()
            after_report(fault, int(metrics.get(STEP, -1)), settle_s)

        heartbeat = _EndWhenAsked(watchdog, asked_to_end)
        if checkpoint is None:
            run_trial(trial, report, heartbeat=heartbeat)
            return
        with checkpoint.as_directory() as ckpt:
            run_trial(trial, report, resume_from=Path(ckpt), heartbeat=heartbeat)


def _where() -> dict[str, str]:
    """The Ray node and host of this process, shown on the trial's MLflow run."""
    import ray

    return {NODE_KEY: ray.get_runtime_context().get_node_id(), HOST_KEY: socket.gethostname()}
