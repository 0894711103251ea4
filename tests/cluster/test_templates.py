"""`peftsweep cluster template`: every kind parses, has the keys its consumer needs, fits the spec."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from peftsweep.cli import app
from peftsweep.cluster import templates
from peftsweep.cluster.templates import CHANGEME, Kind, sizing
from peftsweep.spec import ResourcesSpec, SweepSpec, load_spec, parse_spec

DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


# 2 workers × 1 GPU (4 CPUs each) per trial, 3 trials at once: 6 GPUs
GPU_RESOURCES = {
    "workers_per_trial": 2,
    "gpus_per_worker": 1,
    "cpus_per_worker": 4,
    "max_concurrent_trials": 3,
    "precision": "bf16",
}


def _spec_file(tmp_path: Path, **resources: Any) -> Path:
    path = tmp_path / "gpu.yaml"
    data = {
        "name": "Nightly_GPU.v2",
        "methods": ["lora", "pissa"],
        "resources": resources or GPU_RESOURCES,
        "tracking": {"root": str(tmp_path / "runs")},
    }
    path.write_text("# the nightly GPU sweep\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def _render(kind: str, spec_path: Path, *extra: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(app, ["cluster", "template", kind, str(spec_path), *extra])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("# "), "a header says what the file is and what to replace"
    return [doc for doc in yaml.safe_load_all(result.output) if doc is not None]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every (path, value) in a parsed document, so a test can look for a key anywhere."""
    if isinstance(node, dict):
        return [item for k, v in node.items() for item in [(f"{path}.{k}", v), *_walk(v, f"{path}.{k}")]]
    if isinstance(node, list):
        return [item for i, v in enumerate(node) for item in _walk(v, f"{path}[{i}]")]
    return []


@pytest.mark.parametrize("kind", [k.value for k in Kind if k is not Kind.autoscaler])
def test_kubernetes_kinds_parse_with_the_required_keys(kind: str, tmp_path: Path) -> None:
    docs = _render(kind, _spec_file(tmp_path))
    assert docs
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
        assert DNS_LABEL.match(doc["metadata"]["name"]), doc["metadata"]["name"]
        assert ("data" if doc["kind"] == "ConfigMap" else "spec") in doc, doc["kind"]
    assert "Secret" not in {doc["kind"] for doc in docs}, "secrets are the user's to create"
    if kind in ("raycluster", "rayjob"):
        ray = _one(docs, "RayCluster" if kind == "raycluster" else "RayJob")
        assert ray["apiVersion"] == "ray.io/v1"


def test_autoscaler_config_has_the_required_keys_and_fits_rays_schema(tmp_path: Path) -> None:
    spec_path = _spec_file(tmp_path)
    (config,) = _render("autoscaler", spec_path)
    assert {"cluster_name", "provider", "available_node_types", "head_node_type"} <= config.keys()
    assert config["head_node_type"] in config["available_node_types"]
    assert config["provider"]["type"] == "aws"
    # Ray's own schema for `ray up`, read from the installed package without importing Ray
    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    jsonschema.validate(config, json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text()))
    assert config["file_mounts"] == {templates.AUTOSCALER_SPEC_FILE: str(spec_path.resolve())}


def test_gpus_and_cpus_follow_the_spec(tmp_path: Path) -> None:
    """2 workers × 1 GPU (4 CPUs each) per trial, 3 trials at once → 6 GPUs over the worker replicas."""
    spec_path = _spec_file(tmp_path)
    trial_cpus = 2 * 4 + ResourcesSpec().trial_driver_cpus
    for kind in ("raycluster", "rayjob"):
        docs = _render(kind, spec_path)
        ray = _one(docs, "RayCluster" if kind == "raycluster" else "RayJob")
        cluster = ray["spec"] if kind == "raycluster" else ray["spec"]["rayClusterSpec"]
        (group,) = cluster["workerGroupSpecs"]
        (worker,) = group["template"]["spec"]["containers"]
        limits = worker["resources"]["limits"]
        assert worker["resources"]["requests"] == limits  # GPUs cannot be overcommitted; keep CPUs honest too
        assert group["replicas"] == group["maxReplicas"] == 3
        assert group["replicas"] * int(limits["nvidia.com/gpu"]) == 6
        assert group["replicas"] * int(limits["cpu"]) >= 3 * trial_cpus
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no trial beside the driver
        assert cluster["rayVersion"] == version("ray")
    (config,) = _render("autoscaler", spec_path)
    worker_type = config["available_node_types"]["ray.worker.default"]
    assert worker_type["max_workers"] * worker_type["resources"]["GPU"] == 6
    assert worker_type["max_workers"] * worker_type["resources"]["CPU"] >= 3 * trial_cpus
    assert config["max_workers"] == worker_type["max_workers"]


def test_a_cpu_spec_gets_cpu_workers_and_the_cpu_image(tmp_path: Path) -> None:
    spec_path = _spec_file(tmp_path, workers_per_trial=1, cpus_per_worker=0.95, max_concurrent_trials=2)
    cluster = _one(_render("raycluster", spec_path), "RayCluster")["spec"]
    (group,) = cluster["workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert group["groupName"] == "cpu-workers" and "tolerations" not in pod
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert pod["containers"][0]["image"].endswith("-cpu")


def test_rayjob_runs_the_sweep_on_the_spec_mounted_from_its_configmap(tmp_path: Path) -> None:
    spec_path = _spec_file(tmp_path)
    docs = _render("rayjob", spec_path)
    config_map, job = _one(docs, "ConfigMap"), _one(docs, "RayJob")
    assert config_map["data"]["spec.yaml"] == spec_path.read_text()  # verbatim, comments included
    assert "peftsweep run /spec/spec.yaml --address auto" in job["spec"]["entrypoint"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"], cluster["workerGroupSpecs"][0]["template"]["spec"]]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert volumes[mounts[templates.SPEC_DIR]]["configMap"]["name"] == config_map["metadata"]["name"]
        claim = volumes[mounts[templates.RUNS_DIR]]["persistentVolumeClaim"]["claimName"]
        assert claim == _one(docs, "PersistentVolumeClaim")["metadata"]["name"]
        assert pod["containers"][0]["workingDir"] == templates.RUNS_DIR


def test_images_default_to_the_installed_ray_and_follow_image(tmp_path: Path) -> None:
    spec_path = _spec_file(tmp_path)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    images = {v for p, v in _walk(_render("rayjob", spec_path)) if p.endswith(".image")}
    assert images == {f"rayproject/ray:{version('ray')}-{py}-gpu"}
    images = {
        v for p, v in _walk(_render("rayjob", spec_path, "--image", "me/peftsweep:1")) if p.endswith(".image")
    }
    assert images == {"me/peftsweep:1"}
    (config,) = _render("autoscaler", spec_path, "--image", "me/peftsweep:1")
    assert config["docker"]["image"] == "me/peftsweep:1"


def test_tracking_takes_the_postgres_password_from_a_secret_only(tmp_path: Path) -> None:
    docs = _render("tracking", _spec_file(tmp_path))
    assert {d["kind"] for d in docs} == {
        "Service",
        "StatefulSet",
        "Deployment",
        "PersistentVolumeClaim",
        "ConfigMap",
    }
    # Optuna's database is created next to MLflow's, from the init ConfigMap mounted into Postgres.
    assert _one(docs, "ConfigMap")["data"] == {"optuna.sql": "CREATE DATABASE optuna;"}
    postgres = _one(docs, "StatefulSet")["spec"]["template"]["spec"]
    assert {"name": "init", "mountPath": "/docker-entrypoint-initdb.d"} in postgres["containers"][0][
        "volumeMounts"
    ]
    assert postgres["volumes"] == [{"name": "init", "configMap": {"name": "peftsweep-postgres-init"}}]
    envs = [env for path, env in _walk(docs) if path.endswith(".env") for env in env]
    secret_refs = 0
    for env in envs:
        if "PASSWORD" in env["name"] and env["name"] != "MLFLOW_AUTH_ADMIN_PASSWORD":
            assert "value" not in env, env
            assert env["valueFrom"]["secretKeyRef"] == {"name": "peftsweep-postgres", "key": "password"}
            secret_refs += 1
    assert secret_refs == 2  # Postgres and MLflow
    (uri,) = [env["value"] for env in envs if env["name"] == "MLFLOW_BACKEND_STORE_URI"]
    assert uri == "postgresql://mlflow:$(POSTGRES_PASSWORD)@peftsweep-postgres:5432/mlflow"
    assert not [
        p for p, v in _walk(docs) if "password" in p.lower().rsplit(".", 1)[-1] and isinstance(v, str)
    ]
    deployment = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert deployment["image"] == f"ghcr.io/mlflow/mlflow:v{version('mlflow')}"
    assert "$(POSTGRES_PASSWORD)" not in " ".join(deployment["command"])  # never on a command line


def test_values_to_supply_are_marked(tmp_path: Path) -> None:
    spec_path = _spec_file(tmp_path)
    (config,) = _render("autoscaler", spec_path)
    assert CHANGEME in config["provider"]["region"]
    instance = config["available_node_types"]["ray.worker.default"]["node_config"]["InstanceType"]
    assert CHANGEME in instance and "2 GPU" in instance
    claim = _one(_render("rayjob", spec_path), "PersistentVolumeClaim")
    assert CHANGEME in claim["spec"]["storageClassName"]


def test_out_writes_a_file_named_after_the_sweep(tmp_path: Path) -> None:
    spec_path = _spec_file(tmp_path)
    result = CliRunner().invoke(
        app, ["cluster", "template", "raycluster", str(spec_path), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    written = tmp_path / "Nightly_GPU.v2-raycluster.yaml"
    assert str(written) in result.output
    assert _one(list(yaml.safe_load_all(written.read_text())), "RayCluster")["metadata"]["name"] == (
        "peftsweep-nightly-gpu-v2"
    )


def test_an_unknown_kind_or_bad_spec_fails_before_writing(tmp_path: Path) -> None:
    spec_path = _spec_file(tmp_path)
    result = CliRunner().invoke(
        app, ["cluster", "template", "slurm", str(spec_path), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and not (tmp_path / "o").exists()
    result = CliRunner().invoke(app, ["cluster", "template", "rayjob", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "spec file not found" in result.output


def test_names_are_dns_labels_short_enough_for_kuberay(tmp_path: Path) -> None:
    spec = load_spec(_spec_file(tmp_path))
    assert templates.k8s_name(spec) == "peftsweep-nightly-gpu-v2"
    long = spec.model_copy(update={"name": "A" * 30 + "__" + "b" * 40})
    assert DNS_LABEL.match(templates.k8s_name(long)) and len(templates.k8s_name(long)) <= 47


def test_templates_do_not_import_ray(tmp_path: Path) -> None:
    """`peftsweep --help` and the templates stay fast: Ray's version comes from package metadata."""
    spec_path = str(_spec_file(tmp_path))
    code = (
        "import sys; import peftsweep.cli; from peftsweep.spec import load_spec;"
        "from peftsweep.cluster.templates import Kind, render;"
        f"[render(k, load_spec({spec_path!r}), {spec_path!r}) for k in Kind];"
        "assert 'ray' not in sys.modules and 'torch' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("workers", "gpus", "concurrent", "replicas", "node_gpus"),
    [
        (2, 1.0, 3, 3, 2),  # one trial per node
        (1, 0.5, 3, 2, 1),  # two half-GPU trials share a GPU node
        (16, 1.0, 2, 4, 8),  # a 16-GPU trial spreads over two 8-GPU nodes
        (1, 0.0, 2, 2, 0),  # CPU trials
    ],
)
def test_sizing_packs_trials_into_nodes(
    workers: int, gpus: float, concurrent: int, replicas: int, node_gpus: int
) -> None:
    spec = _spec(workers, gpus, 1.0, concurrent)
    size = sizing(spec)
    assert (size.replicas, size.node_gpus) == (replicas, node_gpus)


@settings(max_examples=200, deadline=None)
@given(
    workers=st.integers(1, 32),
    gpus=st.sampled_from([0.0, 0.25, 0.3, 0.5, 1.0, 2.0, 3.0, 8.0]),
    cpus=st.sampled_from([0.5, 0.95, 1.0, 4.0, 12.0]),
    concurrent=st.integers(1, 8),
)
def test_sizing_always_holds_the_concurrent_trials(
    workers: int, gpus: float, cpus: float, concurrent: int
) -> None:
    spec = _spec(workers, gpus, cpus, concurrent)
    size = sizing(spec)
    assert size.total_gpus >= concurrent * workers * gpus - 1e-9
    assert size.total_cpus >= concurrent * (workers * cpus + spec.resources.trial_driver_cpus) - 1e-9
    assert size.node_gpus <= max(templates.MAX_GPUS_PER_NODE, math.ceil(gpus))
    assert size.replicas >= 1


_SIZING_BASE = parse_spec({"name": "size", "methods": ["lora"]}, base_dir=Path.cwd())


def _spec(workers: int, gpus: float, cpus: float, concurrent: int) -> SweepSpec:
    resources = ResourcesSpec(
        workers_per_trial=workers,
        gpus_per_worker=gpus,
        cpus_per_worker=cpus,
        max_concurrent_trials=concurrent,
    )
    return _SIZING_BASE.model_copy(update={"resources": resources})


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {env["name"]: env for env in container.get("env", [])}


def test_tracking_server_runs_basic_auth_with_its_login_from_a_secret(tmp_path: Path) -> None:
    """An MLflow server on 0.0.0.0 without authentication lets anyone in the cluster move @champion."""
    docs = _render("tracking", _spec_file(tmp_path))
    server = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(server["command"])
    assert "--app-name basic-auth" in command and "--host 0.0.0.0" in command
    env = _env(server)
    for name, key in [
        ("MLFLOW_AUTH_ADMIN_USERNAME", "username"),
        ("MLFLOW_AUTH_ADMIN_PASSWORD", "password"),
        ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key"),
    ]:
        assert env[name] == {
            "name": name,
            "valueFrom": {"secretKeyRef": {"name": "peftsweep-mlflow-auth", "key": key}},
        }
    header = CliRunner().invoke(app, ["cluster", "template", "tracking", str(_spec_file(tmp_path))]).output
    assert "kubectl create secret generic peftsweep-mlflow-auth" in header


RAY_TOKEN = {
    "name": "RAY_AUTH_TOKEN",
    "valueFrom": {"secretKeyRef": {"name": "peftsweep-ray-auth", "key": "token"}},
}


@pytest.mark.parametrize("kind", ["raycluster", "rayjob"])
def test_every_ray_pod_reads_the_auth_token_from_a_secret(kind: str, tmp_path: Path) -> None:
    spec_path = _spec_file(tmp_path)
    docs = _render(kind, spec_path)
    ray = _one(docs, "RayCluster" if kind == "raycluster" else "RayJob")
    cluster = ray["spec"] if kind == "raycluster" else ray["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    for pod in pods:
        env = _env(pod["containers"][0])
        assert env["RAY_AUTH_TOKEN"] == RAY_TOKEN
        assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}
    head = _env(pods[0]["containers"][0])  # the driver: the only MLflow client
    login = head["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert login == {"name": "peftsweep-mlflow-auth", "key": "password", "optional": True}
    output = CliRunner().invoke(app, ["cluster", "template", kind, str(spec_path)]).output
    assert "kubectl create secret generic peftsweep-ray-auth" in output


def test_nightly_cronjob_reads_the_ray_token_and_mlflow_login(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["schedule", str(_spec_file(tmp_path)), "--cron", "0 2 * * *", "--k8s"])
    assert result.exit_code == 0, result.output
    docs = [doc for doc in yaml.safe_load_all(result.output) if doc is not None]
    pod = _one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    env = _env(pod["containers"][0])
    assert env["RAY_AUTH_TOKEN"] == RAY_TOKEN
    assert "MLFLOW_TRACKING_USERNAME" in env and "MLFLOW_TRACKING_PASSWORD" in env
