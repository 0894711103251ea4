"""Security defaults: no remote code unless the spec asks, no pickle loaded unsafely — by our code or by the
libraries on our load paths (DeepSpeed's resume, PEFT's and transformers' adapter loads) — stale build locks
cleared.

(Secrets in MLflow: tests/orchestrator/test_redact.py; the code sandbox: tests/trainables/test_sandbox.py;
loopback-only UIs: tests/test_cli.py.)
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peftsweep.spec import SweepSpec, parse_spec
from peftsweep.trainables.model import hub_options
from peftsweep.vocab import TRAINER_STATE

PACKAGE = Path(__file__).resolve().parents[1] / "peftsweep"


def _remote_code_model(tmp_path: Path) -> tuple[Path, Path]:
    """A model directory whose config asks for its own Python code; importing that code leaves a marker."""
    model = tmp_path / "remote-code-model"
    model.mkdir()
    marker = tmp_path / "remote-code-ran"
    (model / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "auto_map": {
                    "AutoConfig": "evil.EvilConfig",
                    "AutoModelForCausalLM": "evil.EvilModel",
                    "AutoTokenizer": ["evil.EvilTokenizer", None],
                },
            }
        )
    )
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return model, marker


def test_remote_code_is_off_unless_the_spec_sets_it(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftsweep.trainables.prepared import prepare_data

    model, marker = _remote_code_model(tmp_path)
    spec = parse_spec(
        {"name": "rc", "base_model": str(model), "methods": [{"name": "lora", "ranks": [4]}]},
        base_dir=tmp_path,
    )
    assert spec.trust_remote_code is False and hub_options(spec) == {"trust_remote_code": False}
    with pytest.raises(Exception):  # noqa: B017 - transformers' refusal differs by class; no code may run
        prepare_data(spec)  # the sweep's own first load of the base (its tokenizer)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(str(model), **hub_options(spec))
    assert not marker.exists()  # refused before any of the model's code ran
    opted_in = spec.model_copy(update={"trust_remote_code": True})
    assert hub_options(opted_in) == {"trust_remote_code": True}
    # The control: opted in, the same directory's code does run (so the marker above can tell).
    with pytest.raises(AttributeError):  # evil.py defines no EvilConfig; importing it is enough
        AutoConfig.from_pretrained(str(model), **hub_options(opted_in))
    assert marker.read_text() == "ran"


def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(name):
                found.append((path, node))
    return found


def test_every_torch_load_is_weights_only() -> None:
    loads = _calls("torch.load")
    assert loads, "expected the resume-state loader"
    for path, call in loads:
        flags = {kw.arg: ast.unparse(kw.value) for kw in call.keywords}
        where = f"{path}:{call.lineno}"
        assert flags.get("weights_only") == "True", f"{where}: torch.load without weights_only=True"
    assert not _calls("pickle.load") and not _calls("pickle.loads")
    # Tune's restore unpickles its experiment state (tuner.pkl, trial and searcher states) under
    # tracking.root: a sweep resumes from Optuna and MLflow instead, never through it.
    assert not _calls("Tuner.restore") and not _calls("Tuner.can_restore")


# --- third-party loads of files under tracking.root ---


class _Bomb:
    """A pickle that runs code when unpickled without restriction: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _plant(path: Path, marker: Path) -> None:
    import torch

    path.unlink(missing_ok=True)
    torch.save({"state": _Bomb(marker), "step": 1}, path)


def test_the_planted_pickle_runs_code_when_loaded_without_restriction(tmp_path: Path) -> None:
    """The control: the bomb the tests below plant is live (so its absent marker means it was refused)."""
    import torch

    marker = tmp_path / "ran"
    _plant(tmp_path / "bomb.pt", marker)
    with pytest.raises(pickle.UnpicklingError, match="GLOBAL exec was not an allowed global"):
        torch.load(tmp_path / "bomb.pt", weights_only=True)
    assert not marker.exists()
    torch.load(tmp_path / "bomb.pt", weights_only=False)
    assert marker.read_text() == "ran"


def _loop_spec(tmp_path: Path, engine: str, **resources: object) -> SweepSpec:
    return parse_spec(
        {
            "name": "sec",
            "methods": ["lora"],
            "training": {"max_steps": 2, "eval_every": 1, "engine": engine},
            "data": {"max_eval_examples": 4},
            "resources": {"zero_stage": 2, **resources},
            "tracking": {"root": str(tmp_path / "runs")},
        },
        base_dir=tmp_path,
    )


def _first_checkpoint(spec: SweepSpec, out: Path) -> Path:
    """A real trial's step-1 checkpoint (adapter + resume state), copied to ``out``."""
    from peftsweep.trainables.loop import run_trial
    from peftsweep.trainables.trial_config import standalone_trial

    def keep(metrics: dict, ckpt: Path | None) -> None:
        if metrics["step"] == 1:
            shutil.copytree(ckpt, out)

    run_trial(standalone_trial(spec, "lora", 1e-3, 4, 0), keep)
    return out


@pytest.fixture(scope="module")
def resume_states(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[SweepSpec, Path]]:
    """A step-1 checkpoint of each engine (DeepSpeed at ZeRO-2, the multi-worker default)."""
    tmp = tmp_path_factory.mktemp("resume-states")
    out = {}
    for engine in ("torch", "deepspeed"):
        spec = _loop_spec(tmp / engine, engine)
        out[engine] = (spec, _first_checkpoint(spec, tmp / engine / "ckpt"))
    return out


_PICKLES = {  # every pickle a resume reads, per engine (our own rank file, and each engine's own)
    "torch": ["optimizer.pt", "rank0.pt"],
    "deepspeed": [
        "state/mp_rank_00_model_states.pt",  # DeepSpeed's torch.load(weights_only=False) ...
        "state/zero_pp_rank_0_mp_rank_00_optim_states.pt",  # ... and its ZeRO partition's
        "rank0.pt",
    ],
}


@pytest.mark.parametrize(
    ("engine", "name"), [(engine, name) for engine, names in _PICKLES.items() for name in names]
)
def test_a_planted_pickle_in_the_resume_state_is_refused_before_it_runs(
    engine: str, name: str, resume_states: dict, tmp_path: Path
) -> None:
    """Whoever can write under tracking.root can replace a resume file: the resume must fail, not run it."""
    from peftsweep.trainables.loop import run_trial
    from peftsweep.trainables.trial_config import standalone_trial

    spec, clean = resume_states[engine]
    ckpt = Path(shutil.copytree(clean, tmp_path / "ckpt"))
    assert (ckpt / TRAINER_STATE / name).is_file(), sorted((ckpt / TRAINER_STATE).rglob("*"))
    marker = tmp_path / "ran"
    _plant(ckpt / TRAINER_STATE / name, marker)
    reports: list[dict] = []
    with pytest.raises(Exception) as refused:  # noqa: B017 - which error is checked below, after the marker
        run_trial(
            standalone_trial(spec, "lora", 1e-3, 4, 0), lambda m, c: reports.append(m), resume_from=ckpt
        )
    assert not marker.exists(), "the planted pickle ran"
    assert refused.type is pickle.UnpicklingError and "GLOBAL exec was not an allowed" in str(refused.value)
    assert reports == []  # refused before any training


_UNPICKLED: list[str] = []  # globals resolved by an unrestricted unpickler while `_watching_unpickling` runs
_WATCHING: list[bool] = [False]
_AUDIT_HOOKS: list[Any] = []  # audit hooks cannot be removed: one per process, switched on by the fixture


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "pickle.find_class" and _WATCHING[0]:
        _UNPICKLED.append(f"{args[0]}.{args[1]}")


@pytest.fixture
def unrestricted_unpickling() -> Iterator[list[str]]:
    """Every global an unrestricted unpickler (``pickle``'s, e.g. ``torch.load(weights_only=False)``) looks
    up in this process while the test runs, whoever calls it: the ``pickle.find_class`` audit event. Code in
    a pickle needs a global (a callable to run), so an empty list means no pickle could have run code;
    torch's weights-only unpickler resolves its allow-list itself and raises no such event."""
    if not _AUDIT_HOOKS:
        sys.addaudithook(_audit)
        _AUDIT_HOOKS.append(_audit)
    _UNPICKLED.clear()
    _WATCHING[0] = True
    yield _UNPICKLED
    _WATCHING[0] = False


def test_the_unpickling_audit_sees_an_unrestricted_load(
    unrestricted_unpickling: list[str], tmp_path: Path
) -> None:
    """The control of the audits below: an unrestricted load (what DeepSpeed asks for) is seen."""
    import torch

    torch.save({"t": torch.zeros(1)}, tmp_path / "plain.pt")
    torch.load(tmp_path / "plain.pt", weights_only=True)
    assert unrestricted_unpickling == []
    torch.load(tmp_path / "plain.pt", weights_only=False)
    assert "torch._utils._rebuild_tensor_v2" in unrestricted_unpickling


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_a_resume_unpickles_nothing_without_restriction(
    engine: str, resume_states: dict, unrestricted_unpickling: list[str]
) -> None:
    """A whole resumed trial (set-up, the engine's and our state loads, training, the next checkpoint):
    no library on the path unpickles without torch's restrictions."""
    from peftsweep.trainables.loop import run_trial
    from peftsweep.trainables.trial_config import standalone_trial

    spec, ckpt = resume_states[engine]
    reports: list[dict] = []
    run_trial(standalone_trial(spec, "lora", 1e-3, 4, 0), lambda m, c: reports.append(m), resume_from=ckpt)
    assert [r["step"] for r in reports] == [2] and reports[0]["resumed_from_step"] == 1
    assert unrestricted_unpickling == []


@pytest.mark.parametrize(
    "resources",
    [{"zero_stage": 0}, {"zero_stage": 1}, {"zero_stage": 3}, {"zero_stage": 2, "precision": "bf16"}],
    ids=["zero0", "zero1", "zero3", "zero2-bf16"],
)
def test_deepspeed_resumes_weights_only_at_every_zero_stage(
    resources: dict, tmp_path: Path, unrestricted_unpickling: list[str]
) -> None:
    """The allow-list (`engine.deepspeed_checkpoint_globals`) holds what each ZeRO stage's checkpoint needs:
    a resume that needed more would fail with UnpicklingError here."""
    from peftsweep.trainables.loop import run_trial
    from peftsweep.trainables.trial_config import standalone_trial

    spec = _loop_spec(tmp_path, "deepspeed", **resources)
    ckpt = _first_checkpoint(spec, tmp_path / "ckpt")
    unrestricted_unpickling.clear()
    reports: list[dict] = []
    run_trial(standalone_trial(spec, "lora", 1e-3, 4, 0), lambda m, c: reports.append(m), resume_from=ckpt)
    assert [r["step"] for r in reports] == [2] and reports[0]["resumed_from_step"] == 1
    assert unrestricted_unpickling == []


@pytest.mark.parametrize(("method", "weights"), [("lora", "adapter_model"), ("fullft", "model")])
def test_a_planted_pickle_in_an_adapter_is_refused_by_its_loader(
    method: str, weights: str, tmp_path: Path, unrestricted_unpickling: list[str]
) -> None:
    """The promotion gate and `peftsweep best` load adapters from MLflow's artifact store under tracking.root
    with `load_trained` (PEFT's loader, or transformers' for a whole model): a real export loads with no
    unrestricted unpickling, and a pickle planted in place of its safetensors is refused, not run."""
    from transformers import AutoModelForCausalLM

    from peftsweep.search_spaces import load_trained
    from peftsweep.trainables.builtin import builtin_model_dir
    from peftsweep.trainables.loop import run_trial
    from peftsweep.trainables.trial_config import standalone_trial

    spec = _loop_spec(tmp_path, "torch")
    spec = spec.model_copy(update={"methods": [spec.methods[0].model_copy(update={"name": method})]})
    export = tmp_path / "export"

    def keep(metrics: dict, ckpt: Path | None) -> None:
        if metrics["step"] == 1:
            shutil.copytree(ckpt, export, ignore=shutil.ignore_patterns(TRAINER_STATE))

    run_trial(standalone_trial(spec, method, 1e-3, 4 if method == "lora" else 0, 0), keep)
    unrestricted_unpickling.clear()
    load_trained(AutoModelForCausalLM.from_pretrained(builtin_model_dir()), export)
    assert unrestricted_unpickling == []
    marker = tmp_path / "ran"
    (export / f"{weights}.safetensors").unlink()
    _plant(export / f"{weights}.bin" if method == "lora" else export / "pytorch_model.bin", marker)
    with pytest.raises(Exception) as refused:  # noqa: B017 - which error is checked below, after the marker
        load_trained(AutoModelForCausalLM.from_pretrained(builtin_model_dir()), export)
    assert not marker.exists(), "the planted pickle ran"
    assert refused.type is pickle.UnpicklingError and "GLOBAL exec was not an allowed" in str(refused.value)
    assert unrestricted_unpickling == []
