"""Fuzzed specs: a mutation of a valid spec is a valid SweepSpec or a SpecError that names the mutated field.

Hypothesis mutates the shipped examples and a spec on a local data file: wrong types, negative, zero, huge
and non-finite numbers, unknown methods and keys, missing keys, empty method lists, inverted LR ranges, ranks
wider than the base model, missing data files, non-mappings, corrupted YAML bytes. Parsing, loading and
``check_inputs`` raise nothing but SpecError, a valid spec survives the JSON hand-over to the trials, and
nothing starts Ray. Examples are derandomized, so CI sees the same ones on every run.
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from peftsweep.orchestrator.sweep import check_inputs
from peftsweep.spec import MethodSpec, SpecError, SweepSpec, load_spec, parse_spec
from peftsweep.trainables.builtin import builtin_model_dir
from tests.conftest import EXAMPLES

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI cannot flake on a newly drawn one
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
WIDTH = json.loads((builtin_model_dir() / "config.json").read_text())["hidden_size"]  # the built-in base's
EXAMPLE_NAMES = ("quickstart.yaml", "all_methods.yaml")
FieldPath = tuple[str | int, ...]  # e.g. ("methods", 0, "lr_min"); () is the whole document


# ----------------------------------------------------------------------------------------- valid bases


RAY_STARTS: list[tuple] = []  # every ray.init call made while this module's tests run


@pytest.fixture(scope="module", autouse=True)
def _spy_on_ray_init() -> Iterator[None]:
    """Bad input must fail before any cluster work: record (and refuse) any ray.init. A spy, not
    ``ray.is_initialized()``: other modules' tests share one Ray session, so Ray may already be up."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        RAY_STARTS.append((args, kwargs))
        raise AssertionError("ray.init called during a spec or input check")

    real, ray.init = ray.init, refuse
    try:
        yield
    finally:
        ray.init = real


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def bases(scratch: Path) -> dict[str, dict[str, Any]]:
    """The shipped examples and a spec on a local JSONL file (so data mutations reach a real file)."""
    task = scratch / "task.jsonl"
    task.write_text(
        "".join(json.dumps({"prompt": f"{i}-1=", "completion": f"{i - 1}"}) + "\n" for i in range(20))
    )
    out = {name: yaml.safe_load((EXAMPLES / name).read_text()) for name in EXAMPLE_NAMES}
    out["local"] = {
        "name": "local",
        "data": {"task": str(task), "split": [0.8, 0.1, 0.1], "max_row_bytes": 4096},
        "methods": [{"name": "lora", "lr_min": 1e-4, "lr_max": 1e-1, "ranks": [4, 8]}, "ia3"],
        "training": {"max_steps": 10, "eval_every": 5},
    }
    for data in out.values():  # every base is valid, so any error comes from the mutation
        check_inputs(parse_spec(data, base_dir=scratch))
    return out


# ----------------------------------------------------------------------------------------- field paths


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The section model inside ``annotation`` (``ForgettingSpec | None`` too); None for lists of models."""
    if typing.get_origin(annotation) is list:
        return None
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _section_models(model: type[BaseModel], prefix: FieldPath = ()) -> dict[FieldPath, type[BaseModel]]:
    """Every section of the spec (the top level too) and its model; methods are indexed separately."""
    out = {prefix: model}
    for name, info in model.model_fields.items():
        sub = _submodel(info.annotation)
        if sub is not None:
            out |= _section_models(sub, (*prefix, name))
    return out


SECTIONS = _section_models(SweepSpec)
FIELD_PATHS = [(*section, name) for section, model in SECTIONS.items() for name in model.model_fields]
METHOD_FIELDS = list(MethodSpec.model_fields)


def known_keys(section: FieldPath) -> set[str]:
    return set(METHOD_FIELDS if section[:1] == ("methods",) else SECTIONS[section].model_fields)


def present_paths(node: Any, prefix: FieldPath = ()) -> list[FieldPath]:
    """Paths of the keys a spec mapping holds (methods' entries included), to drop one."""
    out: list[FieldPath] = []
    if isinstance(node, dict):
        for key, value in node.items():
            out += [(*prefix, key), *present_paths(value, (*prefix, key))]
    elif isinstance(node, list) and prefix == ("methods",):
        for i, entry in enumerate(node):
            out += present_paths(entry, (*prefix, i))
    return out


def set_path(data: dict[str, Any], path: FieldPath, value: Any) -> dict[str, Any]:
    """A deep copy of ``data`` with ``value`` at ``path``; missing sections are created, ``lora`` → {name}."""
    data = copy.deepcopy(data)
    node: Any = data
    for key in path[:-1]:
        if isinstance(key, int) and isinstance(node[key], str):
            node[key] = {"name": node[key]}
        elif isinstance(key, str) and not isinstance(node.get(key), dict | list):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return data


def drop_path(data: dict[str, Any], path: FieldPath) -> dict[str, Any]:
    data = copy.deepcopy(data)
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return data


def names_field(message: str, path: FieldPath) -> bool:
    """Whether ``message`` names ``path``: the dotted path anywhere, or it or a parent followed by . or :"""
    dotted = [".".join(map(str, path[:n])) for n in range(len(path), 0, -1)]
    if len(path) > 1 and re.search(rf"(?<![\w.]){re.escape(dotted[0])}(?!\w)", message):
        return True
    return any(re.search(rf"(?<![\w.]){re.escape(p)}[.:]", message) for p in dotted)


def show(value: Any) -> str:
    """A short repr, also of ints too long for ``repr`` (10**5000)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"<int of {value.bit_length()} bits>"
    return repr(value)[:40]


def outcome(data: Any, base_dir: Path) -> SweepSpec | SpecError:
    """Parse and check ``data``: the spec, or the SpecError; any other exception fails the test.

    A valid spec must also survive the JSON hand-over to every trial (``model_dump(mode="json")`` →
    ``SweepSpec.model_validate``): an ``inf`` learning rate, for one, used to come back as the default.
    """
    try:
        spec = parse_spec(data, "fuzz.yaml", base_dir=base_dir)
    except SpecError as exc:
        return exc
    assert SweepSpec.model_validate(json.loads(json.dumps(spec.model_dump(mode="json")))) == spec
    try:
        check_inputs(spec)
    except SpecError as exc:
        return exc
    return spec


# ----------------------------------------------------------------------------------------- strategies

EDGE_NUMBERS = [
    0,
    -1,
    1,
    2**31,
    2**32,
    2**63,
    2**64,
    -(2**64),
    10**5000,
    0.0,
    -0.0,
    -1e-9,
    0.5,
    1e308,
    5e-324,
]
EDGE_NUMBERS += [math.nan, math.inf, -math.inf]
# No "hf:<id>": check_inputs would try to download it (a bare "hf:" is refused before any download).
EDGE_TEXTS = ["", " ", "\x00", "a\nb", "nosuchmethod", "lora", "qlora", "fullft", "~nosuchuser0/x", "a" * 300]
EDGE_TEXTS += ["builtin:", "builtin:nope", "builtin:../models/tiny-arith", "..", "/", "hf:", "gpt2", "x y"]
EDGE_OTHERS = [None, True, [], [1], [""], {}, {"x": 1}]
VALUES = st.one_of(
    st.sampled_from(EDGE_NUMBERS + EDGE_TEXTS + EDGE_OTHERS),
    st.integers(),
    st.floats(),
    st.text(max_size=12).filter(lambda s: not s.startswith("hf:")),
    st.lists(st.one_of(st.integers(), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
UNKNOWN_KEYS = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
LRS = st.floats(min_value=1e-9, max_value=10.0)
BAD_METHOD_LISTS = [[], ["nosuchmethod"], ["lora", "lora"], "lora", {"lora": {}}, [None], [{"lr_min": 1e-3}]]
MISSING_FILES = ["gone.jsonl", "gone.csv", "gone.json", "gone.parquet", "gone.txt", "gone"]
KINDS = ["field", "method_field", "unknown_key", "drop", "methods", "lr", "rank", "data_file", "document"]
MUST_FAIL = {"unknown_key", "methods", "lr", "rank", "data_file", "document"}  # the others may stay valid


@st.composite
def mutations(draw: st.DrawFn, bases: dict[str, dict[str, Any]], scratch: Path) -> tuple[str, Any, FieldPath]:
    """(kind, mutated spec data, the path it changed); the path is () when the whole document was replaced."""
    base = bases[draw(st.sampled_from(sorted(bases)))]
    method = draw(st.integers(0, len(base["methods"]) - 1))
    kind = draw(st.sampled_from(KINDS))
    event(kind)
    if kind == "field":
        path = draw(st.sampled_from(FIELD_PATHS))
    elif kind == "method_field":
        path = ("methods", method, draw(st.sampled_from(METHOD_FIELDS)))
    elif kind == "unknown_key":
        section = draw(st.sampled_from([*SECTIONS, ("methods", method)]))
        path = (*section, draw(UNKNOWN_KEYS.filter(lambda k: k not in known_keys(section))))
    elif kind == "drop":
        path = draw(st.sampled_from(present_paths(base)))
        return kind, drop_path(base, path), path
    elif kind == "methods":
        return kind, set_path(base, ("methods",), draw(st.sampled_from(BAD_METHOD_LISTS))), ("methods",)
    elif kind == "lr":  # an inverted (or empty) range
        lo, hi = sorted((draw(LRS), draw(LRS)))
        data = set_path(base, ("methods", method, "lr_min"), hi)
        return kind, set_path(data, ("methods", method, "lr_max"), lo), ("methods", method)
    elif kind == "rank":  # wider than the base model's hidden size
        path = ("methods", method, "ranks")
        return kind, set_path(base, path, [4, WIDTH + draw(st.integers(1, 2**40))]), path
    elif kind == "data_file":
        path = (draw(st.sampled_from(["data", "forgetting"])), "task")
        return (
            kind,
            set_path(base, path, str(scratch / "missing" / draw(st.sampled_from(MISSING_FILES)))),
            path,
        )
    else:
        document = st.one_of(
            st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)
        )
        return kind, draw(document), ()
    return kind, set_path(base, path, draw(VALUES)), path


# ----------------------------------------------------------------------------------------- properties


@FUZZ
@given(data=st.data())
def test_mutated_specs_are_valid_or_a_spec_error_naming_the_field(
    bases: dict[str, dict[str, Any]], scratch: Path, data: st.DataObject
) -> None:
    kind, spec_data, path = data.draw(mutations(bases, scratch))
    result = outcome(spec_data, scratch)
    event(type(result).__name__)  # pytest --hypothesis-show-statistics: the share of each outcome
    assert kind not in MUST_FAIL or isinstance(result, SpecError), f"{kind} {path} passed"
    if isinstance(result, SpecError):
        message = str(result)
        assert "Traceback" not in message
        if path == ():
            assert "a sweep spec must be a mapping" in message, message
        else:
            assert names_field(message, path), f"{path}: {message}"
    assert not RAY_STARTS


def test_every_field_with_every_edge_value_is_valid_or_named(
    bases: dict[str, dict[str, Any]], scratch: Path
) -> None:
    """The systematic half of the fuzzing: no field is left to chance (the first method's fields too)."""
    unnamed = []
    for path in FIELD_PATHS + [("methods", 0, f) for f in METHOD_FIELDS]:
        for value in EDGE_NUMBERS + EDGE_TEXTS + EDGE_OTHERS:
            result = outcome(set_path(bases["local"], path, value), scratch)
            if isinstance(result, SpecError) and not names_field(str(result), path):
                unnamed.append(f"{path} = {show(value)}: {result}")
    assert not unnamed, "\n".join(unnamed)
    assert not RAY_STARTS


@st.composite
def corruptions(draw: st.DrawFn) -> tuple[str, bytes]:
    """A shipped example's bytes with a few inserted bytes, deleted spans or duplicated lines."""
    name = draw(st.sampled_from(EXAMPLE_NAMES))
    raw = bytearray((EXAMPLES / name).read_bytes())
    special = st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\t", b": ", b"- ", b"[", b"{", b"&a *a", b"!!"])
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(raw)))
        kind = draw(st.sampled_from(["insert", "delete", "duplicate_line"]))
        if kind == "insert":
            raw[at:at] = draw(st.one_of(special, st.binary(min_size=1, max_size=4)))
        elif kind == "delete":
            del raw[at : at + draw(st.integers(1, 40))]
        else:
            lines = bytes(raw).splitlines(keepends=True)
            line = lines[draw(st.integers(0, len(lines) - 1))]
            raw[at:at] = line if at == 0 or raw[at - 1 : at] == b"\n" else b"\n" + line
    return name, bytes(raw)


@FUZZ
@given(corrupted=corruptions())
def test_corrupted_yaml_files_load_or_fail_with_a_spec_error_naming_the_file(
    scratch: Path, corrupted: tuple[str, bytes]
) -> None:
    name, raw = corrupted
    path = scratch / f"corrupt-{name}"
    path.write_bytes(raw)
    try:
        spec = load_spec(path)
    except SpecError as exc:
        assert str(exc).startswith(str(path)), str(exc)
    else:
        try:
            check_inputs(spec)
        except SpecError as exc:
            assert re.match(r"[a-z_]+(\.\w+)*: ", str(exc)), str(exc)  # a field path leads the message
    assert not RAY_STARTS


# ----------------------------------------------------------------------------------------- what it found


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("methods", 0, "lr_max"), math.inf, "methods.0.lr_max: Input should be a finite number"),
        (("data", "split"), [math.nan, 0.5, 0.5], "data.split.0: Input should be a finite number"),
        (("search", "max_wall_time_s"), math.inf, "search.max_wall_time_s: Input should be a finite number"),
        (("search", "seed"), -1, "search.seed: Input should be greater than or equal to 0"),
        (("training", "seed"), 2**32, "training.seed: Input should be less than 4294967296"),
        (("training", "max_steps"), 2**64, "training.max_steps: integers must lie in [-2**63, 2**63)"),
        (("methods", 0, "options"), {"niter": 2**64}, "methods.0.options: integers must lie in"),
        (("methods", 0, "target_modules"), [], "methods.0.target_modules: name at least one module"),
        (("name",), "quickstart\n", "name: use letters"),
        (("name",), "a" * 300, "name: String should have at most 100 characters"),
        (("tracking", "root"), "runs\x00", "tracking.root: embedded null byte"),
        (("tracking", "registry_name"), "team/model", "tracking.registry_name: an MLflow registered model"),
        (("tracking", "mlflow_uri"), " ", "tracking.mlflow_uri: ' ' is not a URI"),
        (("data", "fields"), {"label": "y"}, "data.fields: format 'prompt_completion' has no role ['label']"),
        (("data", "format"), "classification", "search.metric: 'exact_match' is not a metric of data.format"),
    ],
)
def test_values_that_used_to_pass_or_crash_are_spec_errors(
    bases: dict[str, dict[str, Any]], path: FieldPath, value: Any, expected: str
) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(set_path(bases["quickstart.yaml"], path, value))
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            ("methods", 0, "ranks"),
            [8, 65],
            "methods.0.ranks: rank 65 exceeds the base model's hidden size 64",
        ),
        (("data", "task"), "~nosuchuser0/t.jsonl", "data.task: '~nosuchuser0/t.jsonl': not a usable path"),
        (("data", "task"), "t\x00.jsonl", "data.task: 't\\x00.jsonl': not a usable path"),
        (("data", "task"), "/" + "t" * 300, "data.task: '/ttt"),
        (("base_model",), "~nosuchuser0/model", "base_model: '~nosuchuser0/model' is not a usable path"),
        (("base_model",), "m" * 300, "base_model: 'mmm"),
        (("base_model",), "not a hub id", "base_model: 'not a hub id' is neither a local model directory"),
        (("data", "split"), [1.0, 0.0, 0.0], "data.split: the validation split of"),
    ],
)
def test_inputs_that_used_to_pass_or_crash_fail_the_check(
    bases: dict[str, dict[str, Any]], path: FieldPath, value: Any, expected: str
) -> None:
    spec = parse_spec(set_path(bases["local"], path, value))
    with pytest.raises(SpecError) as info:
        check_inputs(spec)
    assert expected in str(info.value)
    assert not RAY_STARTS


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("{", "config.json is not a readable JSON file (Expecting property name"),
        ("[]", "config.json holds list, not a JSON object"),
        (
            '{"model_type": "gpt2", "n_embd": 32}',
            "methods.0.ranks: rank 64 exceeds the base model's hidden size 32",
        ),
    ],
    ids=["broken-json", "not-an-object", "gpt2-width"],
)
def test_a_local_base_models_config_is_read_safely(
    bases: dict[str, dict[str, Any]], tmp_path: Path, config: str, expected: str
) -> None:
    (tmp_path / "config.json").write_text(config)
    data = set_path(bases["local"], ("base_model",), str(tmp_path))
    spec = parse_spec(set_path(data, ("methods", 0, "ranks"), [4, 64]))
    with pytest.raises(SpecError, match=re.escape(expected)):
        check_inputs(spec)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"name: t\nmethods: [lora]\ndata: {task: caf\xe9}\n", "bad.yaml:3: not UTF-8"),
        (b"name: t\nmethods: [lora]\nname: u\n", "found duplicate key 'name'"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    ],
    ids=["latin-1", "duplicate-key", "deep-nesting"],
)
def test_yaml_bytes_that_used_to_crash_or_pass(tmp_path: Path, raw: bytes, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(raw)
    with pytest.raises(SpecError, match=re.escape(expected)):
        load_spec(path)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    """`<<: {...}` followed by one of its keys is YAML's override idiom, not a duplicate key."""
    path = tmp_path / "merge.yaml"
    path.write_text(
        "name: t\nmethods: [lora]\ntraining:\n  <<: {max_steps: 10, eval_every: 5}\n  max_steps: 20\n"
    )
    assert load_spec(path).training.max_steps == 20


# ----------------------------------------------------------------------------------------- the real CLI


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"methods": [{"name": "lora", "lr_min": 1e-2, "lr_max": 1e-4}]}, "methods.0: lr_min (0.01) must be"),
        ({"methods": ["lora"], "trainng": {"max_steps": 10}}, "trainng: unknown key"),
        ({"methods": [{"name": "pissa", "ranks": [128]}]}, "methods.0.ranks: rank 128 exceeds"),
        ({"methods": ["lora"], "data": {"task": "missing/train.jsonl"}}, "data.task:"),
    ],
    ids=["inverted-lr", "unknown-key", "rank-too-wide", "missing-data-file"],
)
def test_cli_validate_exits_2_naming_the_field_without_a_traceback(
    tmp_path: Path, spec: dict[str, Any], field: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", **spec}))
    peftsweep = Path(sys.executable).parent / "peftsweep"  # the installed entry point, in its own process
    result = subprocess.run(
        [str(peftsweep), "validate", str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert field in result.stderr.replace("\n", " "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
