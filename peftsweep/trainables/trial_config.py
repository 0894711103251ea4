"""One trial's configuration: built once on the driver, handed as is to whichever executor runs it.

Why one frozen object: the sweep's spec was validated once on the driver. Passing it (and the trial's own lr,
rank, seed, role, data location and drill) as one typed value through Ray's object store means no JSON round
trip and no re-validation in every worker and every restart, and the driver's MLflow recorder reads the
same fields the trial trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftsweep.spec import SweepSpec
from peftsweep.trainables.faults import Fault
from peftsweep.vocab import TrialRole

# The key under which a Tune trial's config holds its `TrialConfig` (the rest of the dict is for display).
TRIAL_KEY = "trial"


@dataclass(frozen=True)
class TrialConfig:
    """Everything a trial needs; the spec inside is the validated, path-resolved spec of the sweep."""

    spec: SweepSpec
    method: str
    lr: float
    rank: int  # 0: the method has no rank
    seed: int
    data_dir: Path  # the sweep's prepared (tokenised) data, shared by every trial
    trial_id: str = "standalone"
    role: TrialRole = "search"
    fault: Fault | None = None  # a reliability drill (trainables.faults); None in real sweeps

    @property
    def run_dir(self) -> Path:
        """The trial's own directory under the sweep's shared storage: markers that must outlive a restart
        (a fired drill, an out-of-memory verdict) and, for Ray Train trials, the checkpoints."""
        return train_run_dir(self.spec, self.trial_id)

    def display(self) -> dict[str, float | int | str]:
        """The fields Tune shows and names trial directories by."""
        return {"lr": self.lr, "rank": self.rank, "seed": self.seed, "role": self.role}


def train_run_dir(spec: SweepSpec, trial_id: str) -> Path:
    """Where a trial keeps what must survive its restarts (and a Ray Train trial its checkpoints)."""
    return spec.tracking.ray_storage / "train" / f"train-{trial_id}"


def standalone_trial(
    spec: SweepSpec, method: str, lr: float, rank: int, seed: int, data_dir: Path | None = None
) -> TrialConfig:
    """A trial outside a sweep (benchmarks, tests): prepares the spec's data when ``data_dir`` is None."""
    if data_dir is None:
        from peftsweep.trainables.prepared import prepare_data

        data_dir = prepare_data(spec)
    return TrialConfig(spec, method, float(lr), int(rank), int(seed), Path(data_dir))
