"""The spec: defaults, shorthand, and errors that name the field path before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from peftsweep.cli import app
from peftsweep.spec import SpecError, load_spec, parse_spec
from tests.conftest import EXAMPLES

MINIMAL = {"name": "t", "methods": ["lora"]}


def _errors(data: dict) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return str(info.value)


def test_minimal_spec_gets_defaults_from_one_place(tmp_path: Path) -> None:
    spec = parse_spec(MINIMAL, base_dir=tmp_path)
    lora = spec.method("lora")
    assert (lora.lr_min, lora.lr_max) == (1e-5, 1e-2)  # registry default: paper protocol
    assert lora.ranks and lora.alpha_over_rank == 1.0 and lora.dropout == 0.0
    assert spec.tracking.root == tmp_path / "peftsweep-runs"
    assert spec.tracking.mlflow_tracking_uri() == f"sqlite:///{tmp_path}/peftsweep-runs/mlflow.db"
    assert spec.search.direction == "max"
    assert spec.data.chat_loss == "all_assistant"  # every assistant turn of a chat row is trained


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        ({"methods": ["lora"], "trainng": {}}, "trainng: unknown key"),
        (
            {"methods": [{"name": "lora", "lr_min": 1e-2, "lr_max": 1e-4}]},
            "methods.0: lr_min (0.01) must be below",
        ),
        ({"methods": ["lora", "nosuchmethod"]}, "methods.1: unknown method 'nosuchmethod'"),
        ({"methods": [{"name": "pissa", "options": {"nitre": 2}}]}, "methods.0: unknown option(s) ['nitre']"),
        ({"methods": [{"name": "lora", "ranks": [0]}]}, "methods.0.ranks.0"),
        ({"methods": []}, "methods: List should have at least 1 item"),
        ({"methods": ["lora", "lora"]}, "methods: method(s) listed twice: ['lora']"),
        ({"methods": ["lora"], "training": {"max_steps": 10, "eval_every": 20}}, "training: eval_every (20)"),
        ({"methods": ["lora"], "training": {"batch_size": "big"}}, "training.batch_size"),
        ({"methods": ["lora"], "resources": {"zero_stage": 4}}, "resources.zero_stage"),
        ({"methods": ["lora"], "resources": {"precision": "fp16"}}, "fp16' needs GPUs"),
        ({"methods": ["lora"], "search": {"trials_per_method": -1}}, "search.trials_per_method"),
        (
            {"methods": ["lora"], "search": {"metric": "accuracy"}},
            "search.metric: 'accuracy' is not a metric",
        ),
        ({"methods": ["lora"], "data": {"format": "tabular"}}, "data.format"),
        ({"methods": ["lora"], "data": {"split": [0.5, 0.5, 0.5]}}, "data: split [0.5, 0.5, 0.5] must be"),
        (
            {"methods": ["lora"], "evaluation": {"pass_k": 5}},
            "evaluation: pass_k (5) needs samples >= pass_k",
        ),
        (
            {"methods": ["lora"], "training": {"optimizer": "sl_sam"}, "resources": {"zero_stage": 3}},
            "training.optimizer: sl_sam works up to ZeRO stage 2",
        ),
        (
            {"methods": ["lora", "fullft"], "training": {"objective": "gradual"}},
            "methods.1: training.objective 'gradual' needs",
        ),
        (
            {"methods": ["lora"], "training": {"batch_size": 16, "global_batch_size": 40}},
            "training.global_batch_size (40) must be a multiple of batch_size × workers_per_trial (16)",
        ),
        ({"methods": ["lora"], "training": {"sam": {"sparsity": 0}}}, "training.sam.sparsity"),
        ({"methods": ["lora"], "forgetting": {"max_examples": 3}}, "forgetting.task: Field required"),
        ({"methods": ["lora"], "data": {"chat_loss": "every_turn"}}, "data.chat_loss: Input should be"),
    ],
)
def test_bad_values_name_the_field(mutation: dict, expected: str) -> None:
    assert expected in _errors({"name": "t", **mutation})


@pytest.mark.parametrize(
    ("data", "search", "metric", "direction"),
    [
        ({}, {}, "exact_match", "max"),
        ({"format": "classification"}, {}, "accuracy", "max"),
        ({"format": "code"}, {}, "pass_at_k", "max"),
        ({"format": "math"}, {"metric": "eval_loss"}, "eval_loss", "min"),
        # Free text is judged by token F1 unless asked otherwise; exact match stays available.
        ({"format": "qa"}, {}, "token_f1", "max"),
        ({"format": "instruction"}, {}, "token_f1", "max"),
        ({"format": "chat"}, {}, "token_f1", "max"),
        ({"format": "chat"}, {"metric": "exact_match"}, "exact_match", "max"),
    ],
)
def test_the_metric_defaults_to_the_formats_main_metric(
    data: dict, search: dict, metric: str, direction: str
) -> None:
    spec = parse_spec({**MINIMAL, "data": data, "search": search})
    assert (spec.search.metric, spec.search.direction) == (metric, direction)


def test_forgetting_can_be_the_search_metric_and_accumulation_is_derived() -> None:
    spec = parse_spec(
        {
            **MINIMAL,
            "forgetting": {"task": "builtin:arith-add"},
            "search": {"metric": "forgetting"},
            "training": {"batch_size": 8, "global_batch_size": 32},
            "resources": {"workers_per_trial": 2},
        }
    )
    assert spec.search.direction == "min" and spec.accumulation_steps == 2


def test_bad_name_and_missing_name() -> None:
    assert "name: use letters" in _errors({"name": "a b/c", "methods": ["lora"]})
    assert "name: Field required" in _errors({"methods": ["lora"]})


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="bad.yaml: not valid YAML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "missing.yaml")


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_examples_validate(example: Path) -> None:
    spec = load_spec(example)
    assert spec.methods


def _no_cluster(*_args: object, **_kwargs: object) -> bool:
    raise AssertionError("a bad spec must fail before any cluster work")


def test_cli_run_rejects_bad_spec_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("peftsweep.cluster.local.connect", _no_cluster)
    monkeypatch.setattr("peftsweep.cluster.connect", _no_cluster)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "t", "methods": [{"name": "lora", "lr_max": -1}]}))
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 2, result.output
    assert "methods.0.lr_max" in result.output


def test_cli_run_rejects_bad_data_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("peftsweep.cluster.connect", _no_cluster)
    spec = tmp_path / "s.yaml"
    spec.write_text(
        yaml.safe_dump({"name": "t", "methods": ["lora"], "data": {"task": str(tmp_path / "nope")}})
    )
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 2, result.output
    assert "data.task" in result.output and "nope" in result.output


def test_cli_validate_names_bad_data_file_and_row(tmp_path: Path) -> None:
    task = tmp_path / "task"
    task.mkdir()
    (task / "train.jsonl").write_text('{"prompt": "1-1=", "completion": "000"}\n{"prompt": "2-1="}\n')
    (task / "eval.jsonl").write_text('{"prompt": "1-1=", "completion": "000"}\n')
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "t", "methods": ["lora"], "data": {"task": str(task)}}))
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2
    assert "train.jsonl:2" in result.output and "completion" in result.output


@pytest.mark.parametrize(
    ("name", "content", "fmt", "where"),
    [
        ("c.csv", "text,label\ngood film,pos\n,neg\n", "classification", "c.csv: row 3"),
        ("q.jsonl", '{"question": "q?", "answers": ["a"]}\n{"question": "r?"}\n', "qa", "q.jsonl:2"),
    ],
)
def test_cli_run_names_the_bad_row_of_a_formatted_file_before_any_cluster_work(
    name: str, content: str, fmt: str, where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("peftsweep.cluster.connect", _no_cluster)
    (tmp_path / name).write_text(content)
    spec = tmp_path / "s.yaml"
    spec.write_text(
        yaml.safe_dump(
            {"name": "t", "methods": ["lora"], "data": {"task": str(tmp_path / name), "format": fmt}}
        )
    )
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 2, result.output
    assert where in result.output.replace("\n", ""), result.output


@pytest.mark.parametrize(
    ("snippet", "field"),
    [
        ("training: {max_steps: true}", "training.max_steps"),
        ("training: {max_steps: 100.0}", "training.max_steps"),
        ("resources: {zero_stage: true}", "resources.zero_stage"),
        ("search: {seed: false}", "search.seed"),
        ("search: {confirm_seeds: yes}", "search.confirm_seeds"),
        ("evaluation: {samples: 2, pass_k: true}", "evaluation.pass_k"),
        ("", "methods.0.ranks.1"),
    ],
)
def test_booleans_and_floats_are_not_integers(snippet: str, field: str, tmp_path: Path) -> None:
    """YAML `true` is not 1: `max_steps: true` must not train one step (pydantic's lax ints take it)."""
    path = tmp_path / "s.yaml"
    methods = "[{name: lora, ranks: [4, true]}]" if "ranks" in field else "[lora]"
    path.write_text(f"name: strict\nmethods: {methods}\n{snippet}\n")
    with pytest.raises(SpecError, match=rf"{field}: Input should be a valid integer"):
        load_spec(path)


def test_yaml_ints_and_floats_still_load(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: strict\nmethods: [{name: lora, ranks: [4, 8], lr_min: 1.0e-4, lr_max: 1}]\n"
        "training: {max_steps: 80, eval_every: 40, warmup_ratio: 0}\ntracking: {lock_max_age_s: 60}\n"
    )
    spec = load_spec(path)
    assert spec.training.max_steps == 80 and spec.methods[0].ranks == [4, 8]
    assert spec.methods[0].lr_max == 1.0 and spec.tracking.lock_max_age_s == 60.0
