"""Read the registry back: the sweep's champion adapter and where to load it from."""

from __future__ import annotations

from typing import Any

from peftsweep.orchestrator.tracking import CHAMPION_ALIAS, METHOD_TAG
from peftsweep.spec import SweepSpec


def champion_info(spec: SweepSpec) -> dict[str, Any] | None:
    """The `champion` model version of the sweep's registered model, or None if there is none."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=spec.tracking.mlflow_tracking_uri())
    name = spec.tracking.registry_name or spec.name
    try:
        version = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:
        return None
    run = client.get_run(version.run_id)
    metric = spec.search.metric
    return {
        "method": version.tags.get(METHOD_TAG),
        "lr": float(version.tags["lr"]),
        "rank": int(version.tags["rank"]),
        metric: float(version.tags[metric]),
        "base_model": version.tags.get("base_model"),
        "model_uri": f"models:/{name}@{CHAMPION_ALIAS}",
        "version": version.version,
        "run_id": version.run_id,
        "adapter": f"{run.info.artifact_uri}/adapter",
    }


def download_champion(spec: SweepSpec, dst: str) -> str:
    """Download the champion adapter into `dst`, ready for `PeftModel.from_pretrained(base, path)`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=spec.tracking.mlflow_tracking_uri())
    version = client.get_model_version_by_alias(spec.tracking.registry_name or spec.name, CHAMPION_ALIAS)
    # The version's source is runs:/<run>/adapter; resolve it through our client (the module-level
    # download helper would consult the default registry URI, not this sweep's store).
    return client.download_artifacts(version.run_id, "adapter", dst)
