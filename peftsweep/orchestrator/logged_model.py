"""A registered adapter as an MLflow model, so that ``mlflow.<flavour>.load_model("models:/<name>@champion")``
gives a model that generates on the base it was trained on.

- PEFT adapters (every LoRA-family and prompt method) use MLflow's ``transformers`` flavour, which saves only
  the adapter (``peft/``) and the tokenizer and refers to the base: ``mlflow.transformers.load_model`` gives a
  text-generation pipeline, ``mlflow.pyfunc.load_model`` a model whose ``predict`` takes prompts.
- Results PEFT cannot load (full FT, BitFit, FineGates) use a pyfunc around `load_trained`
  (`TrainedModel`): ``mlflow.pyfunc.load_model(...).predict(prompts)`` gives the completions, generated as
  evaluation generates them. Loading it needs peftsweep installed (its pip requirements say so).

How the base is referred to, by the kind of ``base_model`` (`base_reference`):

- ``builtin:NAME``: embedded. The packaged directory lies at a different path in every installation, and the
  tiny base costs ~0.5 MB, so a champion of the built-in task loads on any machine.
- a local directory: its absolute path (MLflow's ``base_model_path``); where the base lies elsewhere, pass
  ``base_model_path=`` to ``mlflow.transformers.load_model`` (``model_config={"base_model": ...}`` to
  ``mlflow.pyfunc.load_model`` for the pyfunc models).
- a hub id: the id, with the commit the hub reports at registration (MLflow's PEFT default; it asks the hub).

The driver, MLflow's only writer, logs the models but never loads base weights: the pipeline MLflow saves is
built on the meta device (MLflow reads only the model's class and name from it), and the adapter files are
the trial's export as they are (`_ExportedAdapter`: mutating inits already converted to plain LoRA, the base
named as the spec names it). The model is saved to a local directory and uploaded through the sweep's client
(``create_logged_model`` → ``log_model_artifacts`` → ``finalize_logged_model``), not through MLflow's fluent
``log_model``, which writes through the process-wide tracking URI.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import mlflow.pyfunc

from peftsweep.vocab import BUILTIN_PREFIX

if TYPE_CHECKING:
    from mlflow.entities import LoggedModel

    from peftsweep.orchestrator.redact import RedactingClient
    from peftsweep.spec import SweepSpec

MODEL_NAME = "model"  # the LoggedModel's name (one per registered version)
# Longest completion a loaded model generates when the spec does not bound it (evaluation.max_new_tokens);
# generation stops at EOS first, as evaluation does.
DEFAULT_MAX_NEW_TOKENS = 256
BaseKind = Literal["builtin", "path", "hub"]


@contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``uri`` inside, restored after. Needed where MLflow resolves
    a ``models:/`` URI itself: registering a version from ``models:/<model id>`` (its sqlalchemy registry
    looks the model up through the global URI), and loading ``models:/<name>@<alias>``."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(uri):
        yield


def base_reference(spec: SweepSpec) -> tuple[BaseKind, str]:
    """How a logged model refers to the sweep's base: (kind, what to load it from on this machine)."""
    from peftsweep.trainables.model import resolve_base_model

    if spec.base_model.startswith(BUILTIN_PREFIX):
        return "builtin", resolve_base_model(spec.base_model)
    if Path(spec.base_model).is_dir():
        return "path", spec.base_model  # parse_spec made it absolute
    return "hub", spec.base_model


def _requirements() -> list[str]:
    """Pinned like MLflow pins its own defaults (which also list torchvision, a package we do not use)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "transformers", "peft", "safetensors")]


def _max_new_tokens(spec: SweepSpec) -> int:
    return spec.evaluation.max_new_tokens or DEFAULT_MAX_NEW_TOKENS


def log_trained(
    client: RedactingClient, spec: SweepSpec, run_id: str, export_dir: Path, experiment_id: str
) -> tuple[LoggedModel, str]:
    """Log the trial's exported result (``export_dir``: an adapter checkpoint without its resume state) as an
    MLflow model of run ``run_id``; returns the finalized LoggedModel and its flavour."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    from peftsweep.search_spaces._export import METADATA

    meta_path = export_dir / METADATA
    method = json.loads(meta_path.read_text())["method"] if meta_path.is_file() else "unknown"
    is_peft = (export_dir / "adapter_config.json").is_file()
    flavour = "transformers" if is_peft else "python_function"
    logged = client.create_logged_model(
        experiment_id, name=MODEL_NAME, source_run_id=run_id, tags={"peftsweep.method": method}
    )
    try:
        with tempfile.TemporaryDirectory(prefix="peftsweep-model-") as tmp:
            local = Path(tmp) / MODEL_NAME
            mlflow_model = Model(
                artifact_path=logged.artifact_location,
                model_uuid=logged.model_id,
                run_id=run_id,
                model_id=logged.model_id,
                metadata={
                    "peftsweep_method": method,
                    "base_model": client.redactor.text(spec.base_model_name or spec.base_model),
                },
            )
            if is_peft:
                _save_peft(spec, export_dir, local, mlflow_model)
            else:
                _save_pyfunc(spec, export_dir, local, mlflow_model)
            client.log_model_artifacts(logged.model_id, str(local))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY), flavour


# --- PEFT adapters: the transformers flavour ---


class _ExportedAdapter:
    """Stands in for ``PeftModel.save_pretrained`` while MLflow saves the pipeline: copies the trial's
    exported adapter files byte for byte (the meta-device model holds no weights to save)."""

    def __init__(self, export_dir: Path) -> None:
        self.export_dir = export_dir

    def __call__(self, save_directory: str | Path, **_: Any) -> None:
        shutil.copytree(self.export_dir, save_directory, dirs_exist_ok=True)


def _save_peft(spec: SweepSpec, export_dir: Path, local: Path, mlflow_model: Any) -> None:
    import torch
    from mlflow.transformers.flavor_config import update_flavor_conf_to_persist_pretrained_model
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, pipeline

    from peftsweep.trainables.model import hub_options, load_tokenizer

    kind, source = base_reference(spec)
    config = AutoConfig.from_pretrained(source, **hub_options(spec))
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, **hub_options(spec))
    base.config._name_or_path = source  # what MLflow records (and, for a hub id, looks up)
    model = PeftModel.from_pretrained(base, str(export_dir), low_cpu_mem_usage=True)
    model.save_pretrained = _ExportedAdapter(export_dir)
    tokenizer = load_tokenizer(spec)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device="meta")
    mlflow.transformers.save_model(
        generator,
        str(local),
        task="text-generation",
        mlflow_model=mlflow_model,
        base_model_path=None if kind == "hub" else source,
        # what the pyfunc's predict does with a prompt: greedy, the completion only
        model_config={"max_new_tokens": _max_new_tokens(spec), "do_sample": False, "return_full_text": False},
        pip_requirements=_requirements(),
    )
    if kind == "builtin":  # embed the packaged base: MLflow then loads it from the model's own files
        flavour = mlflow_model.flavors["transformers"]
        embedded = update_flavor_conf_to_persist_pretrained_model(flavour)
        shutil.copytree(source, local / embedded["model_binary"], ignore=shutil.ignore_patterns("tokenizer*"))
        mlflow_model.flavors["transformers"] = embedded
        mlflow_model.save(str(local / "MLmodel"))


# --- results PEFT cannot load: a pyfunc around load_trained ---


class TrainedModel(mlflow.pyfunc.PythonModel):
    """A full-FT, BitFit or FineGates result behind MLflow's pyfunc: prompts in, greedy completions out."""

    def load_context(self, context: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from peftsweep.search_spaces import load_trained

        config = context.model_config
        options = {"trust_remote_code": bool(config.get("trust_remote_code", False))}
        base_path = context.artifacts.get("base") or config["base_model"]
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, **options)
        self.model = load_trained(base, context.artifacts["trained"]).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"], **options)
        self.max_new_tokens = int(config["max_new_tokens"])

    def predict(
        self, context: Any, model_input: list[str], params: dict[str, Any] | None = None
    ) -> list[str]:
        from peftsweep.trainables.metrics import complete

        limit = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        return complete(self.model, self.tokenizer, list(model_input), max_new_tokens=limit)


def _save_pyfunc(spec: SweepSpec, export_dir: Path, local: Path, mlflow_model: Any) -> None:
    from peftsweep.trainables.model import load_tokenizer

    kind, source = base_reference(spec)
    with tempfile.TemporaryDirectory(prefix="peftsweep-pyfunc-") as tmp:
        staged = Path(tmp)  # MLflow names each artifact directory after its source directory
        shutil.copytree(export_dir, staged / "trained")
        load_tokenizer(spec).save_pretrained(staged / "tokenizer")
        if kind == "builtin":
            shutil.copytree(source, staged / "base")
        mlflow.pyfunc.save_model(
            str(local),
            python_model=str(Path(__file__).with_name("_pyfunc_code.py")),  # code, not a pickle
            artifacts={p.name: str(p) for p in sorted(staged.iterdir())},
            mlflow_model=mlflow_model,
            model_config={
                "base_model": None if kind == "builtin" else source,
                "trust_remote_code": spec.trust_remote_code,
                "max_new_tokens": _max_new_tokens(spec),
            },
            pip_requirements=[*_requirements(), "peftsweep"],
        )
