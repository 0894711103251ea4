"""Security defaults: no remote code unless the spec asks, no pickle loaded unsafely, stale build locks
cleared.

(Secrets in MLflow: tests/orchestrator/test_redact.py; the code sandbox: tests/trainables/test_sandbox.py;
loopback-only UIs: tests/test_cli.py.)
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from peftsweep.spec import parse_spec
from peftsweep.trainables.model import hub_options

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
