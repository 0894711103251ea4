"""Read the registry back: the sweep's champion adapter and where to load it from.

A version's source is its MLflow model (``models:/<model id>``, `logged_model`); the trial run still holds
the adapter files (``adapter/``), which `download_champion` fetches for `load_trained`/plain PEFT.
"""

from __future__ import annotations

from typing import Any

from peftsweep.orchestrator.tracking import ADAPTER_ARTIFACT, CHAMPION_ALIAS, FLAVOR_TAG, METHOD_TAG
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
    uri = f"models:/{name}@{CHAMPION_ALIAS}"
    flavour = version.tags.get(FLAVOR_TAG, "")
    loader = {"transformers": "mlflow.transformers", "python_function": "mlflow.pyfunc"}.get(flavour)
    return {
        "method": version.tags.get(METHOD_TAG),
        "lr": float(version.tags["lr"]),
        "rank": int(version.tags["rank"]),
        metric: float(version.tags[metric]),
        "base_model": version.tags.get("base_model"),
        "model_uri": uri,
        # one call (with the sweep's tracking URI set); a version without a logged model says why not
        "load": f'{loader}.load_model("{uri}")' if loader else flavour or "download_champion + load_trained",
        "version": version.version,
        "run_id": version.run_id,
        "adapter": f"{run.info.artifact_uri}/{ADAPTER_ARTIFACT}",
    }


def download_champion(spec: SweepSpec, dst: str) -> str:
    """Download the champion adapter into `dst`, ready for `PeftModel.from_pretrained(base, path)`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=spec.tracking.mlflow_tracking_uri())
    version = client.get_model_version_by_alias(spec.tracking.registry_name or spec.name, CHAMPION_ALIAS)
    # The adapter files of the version's run, through our client (the module-level download helper would
    # consult the default registry URI, not this sweep's store).
    return client.download_artifacts(version.run_id, ADAPTER_ARTIFACT, dst)
