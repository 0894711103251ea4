"""A trial's configuration travels whole (pickle, deepcopy), but a process keeps one copy of each spec:
Tune sends the config back with every result and keeps each trial's last one (trainables/trial_config.py)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

from ray import cloudpickle

from peftsweep.spec import parse_spec
from peftsweep.trainables import trial_config
from peftsweep.trainables.trial_config import TrialConfig


def _config(tmp_path: Path, name: str = "share", trial_id: str = "t-1") -> TrialConfig:
    spec = parse_spec({"name": name, "methods": ["lora", "dora"], "tracking": {"root": str(tmp_path)}})
    return TrialConfig(spec, "dora", 3e-3, 8, 7, tmp_path / "data", trial_id=trial_id, role="confirm")


def test_copies_of_trial_configs_keep_every_field_and_share_one_spec(tmp_path: Path) -> None:
    config = _config(tmp_path)
    copies = [pickle.loads(pickle.dumps(config)) for _ in range(3)]
    copies += [copy.deepcopy(config), cloudpickle.loads(cloudpickle.dumps(config))]
    assert all(c == config for c in copies)  # every field, the spec's content included
    assert all(c.spec is copies[0].spec for c in copies)  # one spec object, however many copies


def test_a_process_keeps_one_spec_however_many_results_carry_it(tmp_path: Path) -> None:
    blob = pickle.dumps(_config(tmp_path))
    trial_config._specs.clear()  # as in a fresh process (the driver receiving its first result)
    trial_config._digests.clear()
    received = [pickle.loads(blob) for _ in range(50)]  # 50 results of trials of one sweep
    assert all(r.spec is received[0].spec for r in received)
    assert list(trial_config._specs.values()) == [received[0].spec]


def test_different_specs_stay_different_and_the_shared_copies_are_bounded(tmp_path: Path) -> None:
    configs = [_config(tmp_path, name=f"sweep{i}") for i in range(trial_config.SHARED_SPECS + 4)]
    copies = [pickle.loads(pickle.dumps(c)) for c in configs]
    assert [c.spec.name for c in copies] == [f"sweep{i}" for i in range(len(configs))]
    assert len(trial_config._specs) <= trial_config.SHARED_SPECS
