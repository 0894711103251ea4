"""Cluster templates for a sweep: Ray autoscaler config, KubeRay RayCluster/RayJob manifests, MLflow server.

The fixed parts, with the values a user must supply marked CHANGEME, are package data under
``peftsweep/assets/cluster/``. This module sizes them from the spec's ``resources`` so that a cluster holds
exactly the sweep's concurrent trials, and names everything after the sweep. Ray is not imported: its version
(for the image and ``rayVersion``) comes from the installed distribution's metadata, so this stays fast.
"""

from __future__ import annotations

import math
import re
import string
import sys
from dataclasses import dataclass
from enum import StrEnum
from importlib.metadata import version
from itertools import takewhile
from pathlib import Path
from typing import Any

import yaml

from peftsweep.spec import SweepSpec

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "cluster"

CHANGEME = "CHANGEME"  # every value a user must supply contains this word
SPEC_DIR = "/spec"  # where the spec's ConfigMap is mounted in every pod
SPEC_FILE = f"{SPEC_DIR}/spec.yaml"
RUNS_DIR = "/runs"  # the shared volume: working directory, so a relative tracking.root resolves onto it
RUNS_CLAIM = "peftsweep-runs"  # one shared volume for every sweep of a namespace
AUTOSCALER_SPEC_FILE = "/home/ray/sweep/spec.yaml"  # where `ray up` copies the spec on the head

# The largest common GPU machine (p4d/p5, a3, 8 GPUs): a trial wider than that spreads its workers over nodes.
MAX_GPUS_PER_NODE = 8
# Host memory per pod: every worker loads the whole base model before DeepSpeed shards it (a 7B model is 14 GB
# in bf16), and a CPU worker needs room for its model copy, optimizer and data loader.
GIB_PER_GPU = 32
GIB_PER_CPU = 4
# The driver (data preparation, MLflow logging, the champion gate): the Ray head, the nightly CronJob's pod.
DRIVER_RESOURCES = {"cpu": "4", "memory": "16Gi"}
PART_OF = {"app.kubernetes.io/part-of": "peftsweep"}  # on every object, including the shared ones
# Secrets the user creates (the headers say how); manifests only reference them.
RAY_AUTH_SECRET = "peftsweep-ray-auth"  # key `token`: Ray's token authentication, on every Ray pod
MLFLOW_AUTH_SECRET = "peftsweep-mlflow-auth"  # keys `username`, `password`: the tracking server's login
# KubeRay limits a RayJob's name to 47 characters (its cluster gets a 6-character suffix, 53 at most).
_MAX_NAME = 47


class Kind(StrEnum):
    """What `peftsweep cluster template` writes."""

    autoscaler = "autoscaler"  # Ray autoscaler cluster YAML (AWS) for `ray up`
    raycluster = "raycluster"  # KubeRay RayCluster, a long-lived cluster for sweeps submitted to it
    rayjob = "rayjob"  # KubeRay RayJob: a cluster that runs one sweep and goes away
    tracking = "tracking"  # MLflow server on Postgres (Deployment, StatefulSet, Services)


@dataclass(frozen=True)
class Sizing:
    """What the sweep's concurrent trials need, packed into identical worker nodes (pods)."""

    trial_gpus: float  # workers_per_trial × gpus_per_worker
    trial_cpus: float  # workers_per_trial × cpus_per_worker + trial_driver_cpus
    concurrent_trials: int
    replicas: int  # worker nodes
    node_gpus: int
    node_cpus: int
    node_memory_gib: int

    @property
    def total_gpus(self) -> int:
        return self.replicas * self.node_gpus

    @property
    def total_cpus(self) -> int:
        return self.replicas * self.node_cpus


def sizing(spec: SweepSpec) -> Sizing:
    """Worker nodes for `max_concurrent_trials` trials: one node per trial, several small trials per GPU node
    when they share one GPU, several nodes per trial when it needs more than `MAX_GPUS_PER_NODE`."""
    res = spec.resources
    workers, cpw, gpw = res.workers_per_trial, res.cpus_per_worker, res.gpus_per_worker
    trial_gpus, trial_cpus = workers * gpw, workers * cpw + res.trial_driver_cpus
    trials_per_node, nodes_per_trial, workers_per_node = 1, 1, workers
    if 0 < trial_gpus < 1:  # fractional GPUs: pack trials onto one GPU
        trials_per_node = min(res.max_concurrent_trials, math.floor(1 / trial_gpus + 1e-9))
    elif trial_gpus > MAX_GPUS_PER_NODE:
        workers_per_node = max(1, math.floor(MAX_GPUS_PER_NODE / gpw + 1e-9))
        nodes_per_trial = math.ceil(workers / workers_per_node)
    node_gpus = math.ceil(trials_per_node * workers_per_node * gpw - 1e-9)
    node_cpus = math.ceil(trials_per_node * (workers_per_node * cpw + res.trial_driver_cpus) - 1e-9)
    return Sizing(
        trial_gpus=trial_gpus,
        trial_cpus=trial_cpus,
        concurrent_trials=res.max_concurrent_trials,
        replicas=math.ceil(res.max_concurrent_trials / trials_per_node) * nodes_per_trial,
        node_gpus=node_gpus,
        node_cpus=node_cpus,
        node_memory_gib=GIB_PER_CPU * node_cpus + GIB_PER_GPU * node_gpus,
    )


def ray_version() -> str:
    return version("ray")


def default_image(spec: SweepSpec) -> str:
    """The Ray image of the installed Ray and Python (GPU build when the spec trains on GPUs): the base to
    install peftsweep into, so the cluster runs the same Ray as the driver."""
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    flavour = "gpu" if spec.resources.gpus_per_worker > 0 else "cpu"
    return f"rayproject/ray:{ray_version()}-{py}-{flavour}"


def k8s_name(spec: SweepSpec) -> str:
    """`peftsweep-<sweep>` as a DNS-1123 label short enough for every KubeRay object built from it."""
    slug = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", spec.name.lower())).strip("-")
    return f"peftsweep-{slug}"[:_MAX_NAME].rstrip("-")


def head_service(spec: SweepSpec) -> str:
    """The Ray client address of the `raycluster` template's head (KubeRay names it <cluster>-head-svc)."""
    return f"ray://{k8s_name(spec)}-head-svc:10001"


def render(kind: Kind | str, spec: SweepSpec, spec_path: Path, image: str | None = None) -> str:
    """The template of `kind` for this sweep, as YAML text (several documents for Kubernetes kinds)."""
    kind = Kind(kind)
    image = image or default_image(spec)
    if kind is Kind.autoscaler:
        return _autoscaler(spec, spec_path, image)
    if kind is Kind.tracking:
        header, docs = load_asset("tracking.yaml")
        for doc in docs:  # one server for every sweep: no sweep's instance label
            doc["metadata"].setdefault("labels", {}).update(PART_OF)
            if doc["kind"] == "Deployment":
                doc["spec"]["template"]["spec"]["containers"][0]["image"] = (
                    f"ghcr.io/mlflow/mlflow:v{version('mlflow')}"  # the server at the client's version
                )
        return dump(fill_header(header, sweep=spec.name), docs)
    name, size = k8s_name(spec), sizing(spec)
    values = _size_values(spec, size, image) | {"cluster": name, "runs": RUNS_DIR, "spec_file": SPEC_FILE}
    header, cluster = _raycluster(spec, image)
    if kind is Kind.raycluster:
        return dump(fill_header(header, **values), [*shared_documents(spec, spec_path), cluster])
    header, (job,) = load_asset("rayjob.yaml")
    entrypoint = f"cd {RUNS_DIR} && peftsweep run {SPEC_FILE} --address auto"
    job["metadata"] = {"name": name, "labels": labels(spec)}
    job["spec"].update(entrypoint=entrypoint, rayClusterSpec=cluster["spec"])
    values |= {"entrypoint": entrypoint, "job": name, "ttl": job["spec"]["ttlSecondsAfterFinished"]}
    return dump(fill_header(header, **values), [*shared_documents(spec, spec_path), job])


def shared_documents(spec: SweepSpec, spec_path: Path) -> list[dict[str, Any]]:
    """The spec's ConfigMap (the file verbatim, comments included) and the shared runs volume's claim."""
    _, (config_map, claim) = load_asset("shared.yaml")
    config_map["metadata"] = {"name": config_map_name(spec), "labels": labels(spec)}
    config_map["data"] = {"spec.yaml": Path(spec_path).read_text()}
    claim["metadata"] = {"name": RUNS_CLAIM, "labels": dict(PART_OF)}
    return [config_map, claim]


def config_map_name(spec: SweepSpec) -> str:
    return f"{k8s_name(spec)}-spec"


def driver_pod(spec: SweepSpec, pod: dict[str, Any], image: str) -> dict[str, Any]:
    """Fill a pod spec whose first container runs a sweep driver: image, resources, spec and runs volumes,
    the Ray token and the MLflow login (only the driver talks to MLflow)."""
    container = pod["containers"][0]
    container["image"] = image
    container["resources"] = {"requests": dict(DRIVER_RESOURCES), "limits": dict(DRIVER_RESOURCES)}
    container["env"] = ray_auth_env() + [
        _secret_env(f"MLFLOW_TRACKING_{key.upper()}", MLFLOW_AUTH_SECRET, key, optional=True)
        for key in ("username", "password")  # optional: a sweep may track to sqlite or an open server
    ]
    return _mount_sweep_volumes(spec, pod)


def ray_auth_env() -> list[dict[str, Any]]:
    """Ray's token authentication on a pod: without it anyone reaching the GCS or dashboard runs code."""
    token = _secret_env("RAY_AUTH_TOKEN", RAY_AUTH_SECRET, "token")
    return [{"name": "RAY_AUTH_MODE", "value": "token"}, token]


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key} | ({"optional": True} if optional else {})
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _raycluster(spec: SweepSpec, image: str) -> tuple[str, dict[str, Any]]:
    """The raycluster asset's header and RayCluster, filled in: versions, image, volumes, worker group."""
    header, (cluster,) = load_asset("raycluster.yaml")
    size = sizing(spec)
    cluster["metadata"] = {"name": k8s_name(spec), "labels": labels(spec)}
    cluster["spec"]["rayVersion"] = ray_version()
    driver_pod(spec, cluster["spec"]["headGroupSpec"]["template"]["spec"], image)
    (group,) = cluster["spec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    worker = pod["containers"][0]
    worker["image"] = image
    worker["env"] = ray_auth_env()
    quantity = {"cpu": str(size.node_cpus), "memory": f"{size.node_memory_gib}Gi"}
    if size.node_gpus:
        quantity["nvidia.com/gpu"] = str(size.node_gpus)
        # GPU node pools are usually tainted so that only GPU work lands there
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    worker["resources"] = {"requests": dict(quantity), "limits": dict(quantity)}
    _mount_sweep_volumes(spec, pod)
    group.update(
        groupName="gpu-workers" if size.node_gpus else "cpu-workers",
        replicas=size.replicas,
        maxReplicas=size.replicas,
    )
    return header, cluster


def _mount_sweep_volumes(spec: SweepSpec, pod: dict[str, Any]) -> dict[str, Any]:
    """Mount the spec (read-only), the shared runs volume (the working directory) and a memory-backed
    /dev/shm (NCCL and Ray's object store need more than a container's 64 MB) into the first container."""
    pod["containers"][0].update(
        workingDir=RUNS_DIR,
        volumeMounts=[
            {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
            {"name": "runs", "mountPath": RUNS_DIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    )
    pod["volumes"] = [
        {"name": "spec", "configMap": {"name": config_map_name(spec)}},
        {"name": "runs", "persistentVolumeClaim": {"claimName": RUNS_CLAIM}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    return pod


def _autoscaler(spec: SweepSpec, spec_path: Path, image: str) -> str:
    header, (config,) = load_asset("autoscaler.yaml")
    size = sizing(spec)
    name = k8s_name(spec)
    worker = config["available_node_types"]["ray.worker.default"]
    resources = {"CPU": size.node_cpus} | ({"GPU": size.node_gpus} if size.node_gpus else {})
    need = f"{size.node_gpus} GPU, " if size.node_gpus else ""
    need += f"{size.node_cpus} vCPU, {size.node_memory_gib} GiB"
    worker.update(max_workers=size.replicas, resources=resources)
    worker["node_config"]["InstanceType"] = f"<{CHANGEME}: EC2 instance type with at least {need}>"
    config.update(cluster_name=name, max_workers=size.replicas)
    config["docker"]["image"] = image
    config["file_mounts"] = {AUTOSCALER_SPEC_FILE: str(Path(spec_path).resolve())}
    values = _size_values(spec, size, image) | {"spec_file": AUTOSCALER_SPEC_FILE}
    return dump(fill_header(header, **values), [config])


def _size_values(spec: SweepSpec, size: Sizing, image: str) -> dict[str, Any]:
    return {
        "sweep": spec.name,
        "concurrent": size.concurrent_trials,
        "trial_gpus": f"{size.trial_gpus:g}",
        "trial_cpus": f"{size.trial_cpus:g}",
        "replicas": size.replicas,
        "node_gpus": size.node_gpus,
        "node_cpus": size.node_cpus,
        "memory": size.node_memory_gib,
        "total_gpus": size.total_gpus,
        "image": image,
        "ray_version": ray_version(),
    }


def labels(spec: SweepSpec) -> dict[str, str]:
    return PART_OF | {"app.kubernetes.io/instance": k8s_name(spec)}


def load_asset(name: str) -> tuple[str, list[dict[str, Any]]]:
    """An asset's leading comment block (the rendered file's header) and its YAML documents."""
    text = (ASSETS / name).read_text()
    header = "".join(takewhile(lambda line: line.startswith("#"), text.splitlines(keepends=True)))
    return header, [doc for doc in yaml.safe_load_all(text) if doc is not None]


def fill_header(template: str, **values: Any) -> str:
    # substitute (not safe_substitute): a ${name} the code does not fill is a bug the tests should catch
    return string.Template(template).substitute({k: str(v) for k, v in values.items()})


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the embedded spec stays readable), the rest as PyYAML does."""


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_Dumper.add_representer(str, _represent_str)


def dump(header: str, docs: list[dict[str, Any]]) -> str:
    """The header comment, then the documents (`---` before each, so `kubectl apply -f` takes them all)."""
    body = yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, explicit_start=True, width=4096)
    return header + body
