"""One trial's configuration: built once on the driver, handed as is to whichever executor runs it.

Why one frozen object: the sweep's spec was validated once on the driver. Passing it (and the trial's own lr,
rank, seed, role, data location and drill) as one typed value through Ray's object store means no JSON round
trip and no re-validation in every worker and every restart, and the driver's MLflow recorder reads the
same fields the trial trained with.
"""

from __future__ import annotations

import hashlib
import pickle
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled (and deep-copied) with its spec's digest, so that the trial configs a process receives
        share one copy of each spec (`_shared_spec`; a received duplicate is dropped at once).

        Why: Tune sends a trial's config back with every result (``Trainable.get_auto_filled_metrics``) and
        keeps each trial's last result, so each finished trial kept a spec of its own: the driver grew by
        ~0.07 MiB a trial for that alone (bench/scale.py)."""
        fields = (self.method, self.lr, self.rank, self.seed, self.data_dir, self.trial_id, self.role)
        return (_trial_config, (_spec_digest(self.spec), self.spec, *fields, self.fault))


# --- specs shared by the trial configs of a process ---

SHARED_SPECS = 16  # specs a process keeps (a sweep has one; a test session many)
_specs: OrderedDict[str, SweepSpec] = OrderedDict()  # digest -> the process's one copy of that spec
_digests: dict[int, str] = {}  # id(spec) -> its digest, for the specs in `_specs`
_lock = threading.Lock()


def _spec_digest(spec: SweepSpec) -> str:
    """A digest of the spec's content (its pickle), computed once per spec object of the process."""
    with _lock:
        digest = _digests.get(id(spec))
        if digest is not None and _specs.get(digest) is spec:
            return digest
    digest = hashlib.sha256(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)).hexdigest()
    _shared_spec(digest, spec)
    return digest


def _shared_spec(digest: str, spec: SweepSpec) -> SweepSpec:
    """The process's copy of the spec with ``digest``: ``spec`` itself the first time."""
    with _lock:
        known = _specs.get(digest)
        if known is not None:
            _specs.move_to_end(digest)
            return known
        _specs[digest] = spec
        _digests[id(spec)] = digest
        while len(_specs) > SHARED_SPECS:
            _, old = _specs.popitem(last=False)
            _digests.pop(id(old), None)
        return spec


def _trial_config(digest: str, spec: SweepSpec, *fields: Any) -> TrialConfig:
    return TrialConfig(_shared_spec(digest, spec), *fields)


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
