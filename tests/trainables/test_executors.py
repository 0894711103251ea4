"""The executors' wrapping of the loop (trainables/executors.py) that the sweep tests cannot pin down."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftsweep.spec import parse_spec
from peftsweep.trainables.executors import _EndWhenAsked
from peftsweep.trainables.loop import run_trial
from peftsweep.trainables.trial_config import standalone_trial


class _Beats:
    """A watchdog stand-in that counts the optimizer-step beats after set-up."""

    def __init__(self) -> None:
        self.training_beats = 0
        self.in_training = False

    def beat(self, stage: str | None = None) -> None:
        self.training_beats += self.in_training

    def training(self) -> None:
        self.in_training = True


def test_a_trial_tune_asked_to_end_ends_at_its_next_step_not_at_its_next_report(tmp_path: Path) -> None:
    """Tune stops an inline trial by setting its session's stop event; the loop must end (SystemExit(0),
    Tune's own way) at the next beat, so the reused actor is free for the next trial at once, rather than an
    eval interval later when it would report."""
    spec = parse_spec(
        {
            "name": "ask",
            "methods": ["lora"],
            "training": {"max_steps": 40, "eval_every": 40},
            "data": {"max_eval_examples": 8},
            "tracking": {"root": str(tmp_path / "runs")},
        },
        base_dir=tmp_path,
    )
    beats = _Beats()
    heartbeat = _EndWhenAsked(beats, lambda: beats.training_beats >= 5)  # type: ignore[arg-type]
    reports: list[dict] = []
    with pytest.raises(SystemExit) as ended:
        run_trial(
            standalone_trial(spec, "lora", 5e-3, 4, 0), lambda m, _c: reports.append(m), heartbeat=heartbeat
        )
    assert ended.value.code == 0
    assert beats.training_beats == 5  # no step after the one where it was asked
    assert reports == []  # its first report would have come at step 40
