"""Where a metric becomes an MLflow run: the driver-side writer of the sweep → method → trial run tree.

The driver is MLflow's only writer (a Tune callback), so the embedded sqlite store never sees concurrent
writers and workers on other nodes need no tracking access. The registry step turns each method's best
trial into a model version and aliases the overall best as `champion`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from ray.tune import Callback

from peftsweep.orchestrator import scoring
from peftsweep.orchestrator.redact import RedactingClient
from peftsweep.orchestrator.scoring import ConfigScore, RunRecord, run_record
from peftsweep.orchestrator.trial import executor_for, prune_finished
from peftsweep.orchestrator.writes import Writes
from peftsweep.spec import SweepSpec
from peftsweep.trainables.trial_config import TRIAL_KEY, TrialConfig
from peftsweep.vocab import (
    CHECKPOINT_PATH_KEY,
    FAILURE_KEY,
    HOST_KEY,
    NODE_KEY,
    STEP,
    TRAINER_STATE,
    trial_metric_names,
)

_log = logging.getLogger(__name__)

LEVEL_TAG = "peftsweep.level"  # sweep | method | trial
METHOD_TAG = "peftsweep.method"
ROLE_TAG = "peftsweep.role"  # search | confirm
OUTCOME_TAG = "peftsweep.outcome"  # completed | stopped_early | diverged | failed | killed
FAILURE_TAG = "peftsweep.failure"  # why a failed trial failed, in one line (the full error: error.txt)
CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"  # a new best that did not pass the promotion gate
PROMOTION_TAG = "peftsweep.promotion"  # the gate's reason, on the sweep run and the new version
NODE_TAG, HOST_TAG = "peftsweep.node_id", "peftsweep.host"  # where the trial's rank 0 trained (latest)
NIGHTLY_TAG = "peftsweep.nightly"  # the UTC date (YYYY-MM-DD) of a `run --nightly` sweep run
DRILL_TAG = "peftsweep.drill"  # the reliability drill injected into the trial (`Fault.label`; tests only)
ADAPTER_ARTIFACT = "adapter"
# A version's MLflow model flavour (transformers | python_function), or "none: <why>" when it could not be
# logged and the version's source is the run's adapter artifact instead (orchestrator/logged_model.py).
FLAVOR_TAG = "peftsweep.flavor"


@dataclass
class TrialRecord:
    """What the driver knows about one trial, for the final table and the registry."""

    method: str
    trial_id: str
    run_id: str  # "" until the writer thread has created the trial's MLflow run (`SweepTracker.start_trial`)
    lr: float
    rank: int
    status: str = "running"  # running | completed | stopped_early | diverged | failed | killed
    seed: int = 0
    role: str = "search"  # search (Optuna's) | confirm (a top config re-run with another seed)
    metrics: dict[str, float] = field(default_factory=dict)
    has_adapter: bool = False
    failure: str = ""  # why it failed (status failed)
    node: str = ""  # the Ray node id of its rank-0 worker (the latest, after a restart)


@dataclass(frozen=True)
class GateDecision:
    """What the promotion gate (`promotion.run_gate`) decided and why; the numbers are both adapters' scores
    on the same rows. Here, beside the registry that acts on it, so that tracking needs nothing of
    promotion (which reads the registry)."""

    promoted: bool
    reason: str
    new_score: float | None = None
    champion_score: float | None = None
    champion_version: str | None = None


# "OSError: …", "torch.OutOfMemoryError: …", "peftsweep.trainables.faults.SetupStalled: …" (not Ray's wrapper)
_EXCEPTION_LINE = re.compile(r"^(?!ray\.)(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*): (\S.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_error_line(error: str) -> str:
    """The line of a trial's error that says what went wrong: the first line of the innermost exception's
    message, as ``Name: message`` (Ray wraps it in a traceback of its own), else the last non-empty line."""
    lines = [_ANSI.sub("", line).strip() for line in error.strip().splitlines()]
    lines = [line for line in lines if line]
    for line in reversed(lines):
        match = _EXCEPTION_LINE.match(line)
        if match and not line.startswith(("File ", "raise ")):
            return f"{match.group(1)}: {match.group(2)}"
    return lines[-1] if lines else error


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


class SweepTracker:
    """Opens the sweep's MLflow experiment and parent run, and one child run per method."""

    def __init__(self, spec: SweepSpec, resume: bool = False, tags: dict[str, str] | None = None) -> None:
        """A new sweep run (with extra ``tags``); with ``resume``, the latest sweep run of this spec reopened
        (see `_reload`)."""
        self.spec = spec
        # With a tracking server, MLflow fetches the whole run again to print a "View run" line each time a
        # run ends: one more request per trial on the writer thread, and lines through the live table.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.client = RedactingClient(tracking_uri=spec.tracking.mlflow_tracking_uri())
        self.experiment_id = self._experiment()
        self.method_runs: dict[str, str] = {}
        self.trials: dict[str, TrialRecord] = {}
        # the same records by method, in start order: what per-method questions read (a sweep asks them on
        # every suggestion; scanning all trials there grows with the sweep: bench/scale.py)
        self._by_method: dict[str, list[TrialRecord]] = {}
        self.killed: list[str] = []  # run ids of trials a dead driver left RUNNING (resume only)
        self._writes = Writes("peftsweep-mlflow")  # a trial's params, results and outcome (`writes`)
        latest = self._latest_sweep_run() if resume else None
        if latest is not None:
            self.sweep_run_id = latest
            self._reload()
            return
        self.sweep_run_id = self.client.create_run(
            self.experiment_id,
            run_name=f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={LEVEL_TAG: "sweep", **(tags or {})},
        ).info.run_id
        self.client.log_dict(self.sweep_run_id, spec.model_dump(mode="json"), "spec.json")

    def log_data(self, data_dir: Path) -> None:
        """The data version as an MLflow dataset input of the sweep run: name the task, digest the prepared
        data's fingerprint (its cache directory is ``cache/data-<digest>``; any changed file byte, data
        section or tokenizer changes it), so runs on other data show another digest. Idempotent (resume)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        from peftsweep.vocab import BUILTIN_PREFIX, HF_PREFIX

        task = self.spec.data.task
        if task.startswith(HF_PREFIX):
            source_type, source = "hugging_face", task.removeprefix(HF_PREFIX)
        elif task.startswith(BUILTIN_PREFIX):
            source_type, source = "builtin", task
        else:
            source_type, source = "local", str(Path(task).expanduser().resolve())
        done = data_dir / "DONE"  # rows per part, written by prepare_data
        dataset = Dataset(
            name=self.client.redactor.text(task)[:500],  # MLflow's limit on dataset names
            digest=data_dir.name.removeprefix("data-"),
            source_type=source_type,
            source=self.client.redactor.text(source),
            profile=done.read_text() if done.is_file() else None,
        )
        context = InputTag(MLFLOW_DATASET_CONTEXT, "training")
        self.client.log_inputs(self.sweep_run_id, datasets=[DatasetInput(dataset, tags=[context])])

    def _children(self, parent: str, level: str) -> list[Any]:
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.`{LEVEL_TAG}` = '{level}'",
            order_by=["attributes.start_time ASC"],
            max_results=50_000,  # far above any sweep's trial count; search_runs pages below this
        )

    def _latest_sweep_run(self) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{LEVEL_TAG}` = 'sweep'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def _reload(self) -> None:
        """Reopen the sweep and its method runs, load their finished trials back, and mark the trials that
        a dead driver left RUNNING as KILLED (no zombie runs)."""
        self.client.update_run(self.sweep_run_id, status="RUNNING")
        for method_run in self._children(self.sweep_run_id, "method"):
            method = method_run.data.tags[METHOD_TAG]
            self.method_runs[method] = method_run.info.run_id
            self.client.update_run(method_run.info.run_id, status="RUNNING")
            for run in self._children(method_run.info.run_id, "trial"):
                run_id = run.info.run_id
                if run.info.status == "RUNNING":
                    self.client.set_tag(run_id, OUTCOME_TAG, "killed")
                    self.client.set_terminated(run_id, "KILLED")
                    self.killed.append(run_id)
                    continue
                record = TrialRecord(
                    method,
                    run.data.tags.get("peftsweep.trial_id", run_id),
                    run_id,
                    float(run.data.params["lr"]),
                    int(run.data.params["rank"]),
                    status=run.data.tags.get(OUTCOME_TAG, "failed"),
                    seed=int(run.data.params.get("seed", self.spec.training.seed)),
                    role=run.data.tags.get(ROLE_TAG, "search"),
                    metrics=dict(run.data.metrics),
                    has_adapter=bool(self.client.list_artifacts(run_id, ADAPTER_ARTIFACT)),
                    failure=run.data.tags.get(FAILURE_TAG, ""),
                )
                self._add(record)

    def _add(self, record: TrialRecord) -> None:
        self.trials[record.trial_id] = record
        self._by_method.setdefault(record.method, []).append(record)

    def _experiment(self) -> str:
        existing = self.client.get_experiment_by_name(self.spec.name)
        if existing is not None:
            return existing.experiment_id
        # An absolute artifact location: Ray changes workers' working directories.
        artifacts = self.spec.tracking.artifact_root
        artifacts.mkdir(parents=True, exist_ok=True)
        return self.client.create_experiment(self.spec.name, artifact_location=artifacts.as_uri())

    def start_method(self, method: str) -> str:
        if method in self.method_runs:  # resumed: its run exists already
            return self.method_runs[method]
        mspec = self.spec.method(method)
        run_id = self.client.create_run(
            self.experiment_id,
            run_name=method,
            tags={"mlflow.parentRunId": self.sweep_run_id, LEVEL_TAG: "method", METHOD_TAG: method},
        ).info.run_id
        params = {
            "method": method,
            "lr_min": mspec.lr_min,
            "lr_max": mspec.lr_max,
            "ranks": mspec.ranks,
            "trials": self.spec.search.trials_per_method,
        }
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.method_runs[method] = run_id
        return run_id

    def note_method(self, method: str, metrics: dict[str, float], tags: dict[str, str]) -> None:
        """Extra facts about a method's search (its curvature, the LR prior it used)."""
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.method_runs[method],
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )

    def start_trial(self, trial: TrialConfig) -> TrialRecord:
        """The trial's record at once; its MLflow run under its method's run, with the parameters it trains
        with, by the writer thread (creating a run took ~20 ms on Tune's thread with a tracking server:
        bench/scale.py). The record's ``run_id`` is filled in there, before any other write of the trial."""
        method = trial.method
        record = TrialRecord(
            method, trial.trial_id, "", trial.lr, trial.rank, seed=trial.seed, role=trial.role
        )
        tags = {
            "mlflow.parentRunId": self.method_runs[method],
            LEVEL_TAG: "trial",
            METHOD_TAG: method,
            ROLE_TAG: trial.role,
            "peftsweep.trial_id": trial.trial_id,
            **({DRILL_TAG: trial.fault.label()} if trial.fault else {}),
        }
        run_name = f"{method}-{trial.trial_id}" + (f"-seed{trial.seed}" if trial.role == "confirm" else "")
        batch = [Param(k, str(v)) for k, v in self._trial_params(trial).items()]

        def write() -> None:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            record.run_id = run.info.run_id
            self.client.log_batch(record.run_id, params=batch)

        self._writes.submit(write)
        self._add(record)
        return record

    def _trial_params(self, trial: TrialConfig) -> dict[str, Any]:
        """What a trial's MLflow run records as its parameters."""
        from peftsweep.trainables.engine import engine_for

        method, mspec = trial.method, self.spec.method(trial.method)
        return {
            "method": method,
            "lr": trial.lr,
            "rank": trial.rank,  # 0: the method has no rank
            "alpha": trial.rank * mspec.alpha_over_rank,
            "dropout": mspec.dropout,
            "target_modules": mspec.target_modules,
            "seed": trial.seed,
            "max_steps": self.spec.training.max_steps,
            "batch_size": self.spec.training.batch_size,
            "zero_stage": self.spec.resources.zero_stage,
            "workers": self.spec.resources.workers_per_trial,
            "engine": engine_for(self.spec),
            "executor": executor_for(self.spec),
            **{f"option.{k}": v for k, v in mspec.options.items()},
        }

    def log_result(self, record: TrialRecord, result: dict[str, Any]) -> None:
        step = int(result.get(STEP, 0))
        now = int(time.time() * 1000)
        names = trial_metric_names(self.spec.data.format)
        metrics = [Metric(k, float(result[k]), now, step) for k in names if _finite(result.get(k))]
        tags = []
        if result.get(NODE_KEY) and result[NODE_KEY] != record.node:  # a first result, or a restart elsewhere
            record.node = str(result[NODE_KEY])
            tags = [RunTag(NODE_TAG, record.node), RunTag(HOST_TAG, str(result.get(HOST_KEY, "")))]
        self._writes.submit(lambda: self.client.log_batch(record.run_id, metrics=metrics, tags=tags))
        record.metrics = {k: float(result[k]) for k in names if k in result}
        record.metrics["step"] = step
        if result.get(FAILURE_KEY):
            record.failure = str(result[FAILURE_KEY])

    def finish_trial(
        self,
        record: TrialRecord,
        checkpoint_path: str | None,
        error: str | None = None,
        then: Callable[[], None] = lambda: None,
    ) -> None:
        """The trial's outcome, at once in ``record``; in MLflow (its error, its adapter files, its status)
        by the writer thread, which calls ``then`` afterwards (e.g. drop the checkpoint it copied)."""
        if error is not None or record.metrics.get("oom"):
            record.status = "failed"
            record.failure = record.failure or first_error_line(error or "failed")
        elif record.metrics.get("diverged"):
            record.status = "diverged"
        elif record.metrics.get("step", 0) < self.spec.training.max_steps:
            record.status = "stopped_early"
        else:
            record.status = "completed"
        checkpoint = Path(checkpoint_path) if checkpoint_path and Path(checkpoint_path).is_dir() else None
        if checkpoint is not None:
            record.has_adapter = True
        status, failure = record.status, record.failure

        def write() -> None:
            run_id = record.run_id  # created by an earlier write
            if status == "failed":
                self.client.log_text(run_id, error or failure, "error.txt")
                self.client.set_tag(run_id, FAILURE_TAG, failure[:500])
            if checkpoint is not None:
                self._log_adapter(run_id, checkpoint)
            self.client.set_tag(run_id, OUTCOME_TAG, status)
            self.client.set_terminated(run_id, "FAILED" if status == "failed" else "FINISHED")
            then()

        self._writes.submit(write)

    def flush(self) -> None:
        """Wait until MLflow holds every write made so far (`writes`): before anything reads MLflow back."""
        self._writes.flush()

    def _log_adapter(self, run_id: str, checkpoint: Path) -> None:
        """The checkpoint's adapter files, not its resume state (optimizer moments are not the product)."""
        for entry in sorted(checkpoint.iterdir()):
            if entry.name == TRAINER_STATE:
                continue
            if entry.is_dir():
                self.client.log_artifacts(run_id, str(entry), f"{ADAPTER_ARTIFACT}/{entry.name}")
            else:
                self.client.log_artifact(run_id, str(entry), ADAPTER_ARTIFACT)

    def records(self, method: str | None = None) -> list[RunRecord]:
        """The trials as `scoring` reads them (one rule for every reading of "best": scoring.py)."""
        metric = self.spec.search.metric or ""
        trials = self.trials.values() if method is None else self._by_method.get(method, [])
        return [run_record(t, metric) for t in trials]

    def top_configs(self, method: str, k: int) -> list[tuple[float, int]]:
        """The k best (lr, rank) of the method's search trials: what the confirmation runs re-seed."""
        top = scoring.top_configs(self.records(method), k, self.spec.search.direction)
        return [(c.lr, c.rank) for c in top]

    def failure_streak(self, method: str, k: int) -> str | None:
        """The error that the method's first ``k`` search trials all failed with, or None: a systematic
        failure (a bad path, an out-of-memory base at every config) that the rest of its budget would only
        repeat."""
        first = [t for t in self._by_method.get(method, []) if t.role == "search"][:k]
        reasons = {t.failure for t in first}
        if len(first) < k or any(t.status != "failed" for t in first) or len(reasons) != 1:
            return None
        return reasons.pop()

    def method_score(self, method: str) -> ConfigScore | None:
        """The method's score: the mean over seeds of its best configuration (`scoring.method_score`)."""
        return scoring.method_score(self.records(method), self.spec.search.direction)

    def verdicts(self) -> dict[str, scoring.MethodVerdict]:
        """Every method's verdict against the best (`scoring.verdicts`: Welch's test over seeds)."""
        scores = {m.name: self.method_score(m.name) for m in self.spec.methods}
        return scoring.verdicts(scores, self.spec.search.direction, alpha=self.spec.search.verdict_alpha)

    def best_trial(self, method: str) -> TrialRecord | None:
        """The trial that represents a method (registered as best-<method>): `scoring.representative`."""
        trials = self._by_method.get(method, [])
        return scoring.representative_trial(trials, self.spec.search.metric or "", self.spec.search.direction)

    def champion_method(self) -> str | None:
        """The best-scored method (`scoring.best_method`): what becomes champion or challenger."""
        scores = {m.name: self.method_score(m.name) for m in self.spec.methods}
        return scoring.best_method(scores, self.spec.search.direction)

    def finish_method(self, method: str) -> TrialRecord | None:
        self.flush()  # its trials' runs exist (the best one's run id is a tag of the method's run)
        best, score = self.best_trial(method), self.method_score(method)
        run_id = self.method_runs[method]
        if best is not None and score is not None:
            now, metric = int(time.time() * 1000), self.spec.search.metric
            values = {f"best_{metric}": best.metrics[metric], f"{metric}_mean": score.mean}
            values |= {f"{metric}_std": score.std, "seeds": score.n}
            self.client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), now, 0) for k, v in values.items()],
                # tags, not params: a resumed sweep may update them
                tags=[
                    RunTag("peftsweep.best_trial_run", best.run_id),
                    RunTag("best_lr", str(best.lr)),
                    RunTag("best_rank", str(best.rank)),
                ],
            )
        self.client.set_terminated(run_id, "FINISHED")
        return best

    def register(
        self, gate: Callable[[str, str], GateDecision]
    ) -> tuple[str, TrialRecord, GateDecision] | None:
        """One model version per method's representative trial (alias `best-<method>`); the best-scored
        method's becomes `champion` if ``gate(registry_name, run_id)`` promotes it, else `challenger`.
        Everything here reads `scoring`, like the final table, the report and `peftsweep best`."""
        from peftsweep.orchestrator.logged_model import tracking_uri

        self.flush()  # the trials' adapters are logged
        # MLflow's own URI: its sqlalchemy registry resolves a version's models:/ source through it
        with tracking_uri(self.spec.tracking.mlflow_tracking_uri()):
            return self._register(gate)

    def _register(
        self, gate: Callable[[str, str], GateDecision]
    ) -> tuple[str, TrialRecord, GateDecision] | None:
        bests = {m.name: b for m in self.spec.methods if (b := self.best_trial(m.name)) is not None}
        leader = self.champion_method()
        if not bests or leader not in bests:
            return None
        name = self.spec.tracking.registry_name or self.spec.name
        if not self._model_exists(name):
            self.client.create_registered_model(name, description=f"Best adapters of sweep {self.spec.name}")
        metric = self.spec.search.metric or ""
        versions: dict[str, str] = {}
        for method, rec in bests.items():
            score = self.method_score(method)
            assert score is not None  # a representative trial exists only for a scored method
            source, model_id, flavour = self._log_model(rec)
            version = self.client.create_model_version(
                name,
                source=source,
                run_id=rec.run_id,
                model_id=model_id,
                tags={
                    METHOD_TAG: method,
                    "lr": str(rec.lr),
                    "rank": str(rec.rank),
                    metric: str(rec.metrics[metric]),  # this trial's (one seed)
                    f"{metric}_mean": str(score.mean),  # the method's score: its config's seed mean
                    "seeds": str(score.n),
                    "base_model": self.spec.base_model_name or self.spec.base_model,
                    # what the method costs, next to what it scores
                    "trainable_params": str(int(rec.metrics.get("trainable_params", 0))),
                    "adapter_bytes": str(int(rec.metrics.get("adapter_bytes", 0))),
                    FLAVOR_TAG: flavour,
                },
            ).version
            self.client.set_registered_model_alias(name, f"best-{method}", version)
            versions[method] = version
        champion, verdicts = bests[leader], self.verdicts()
        decision = gate(name, champion.run_id)
        alias = CHAMPION_ALIAS if decision.promoted else CHALLENGER_ALIAS
        self.client.set_registered_model_alias(name, alias, versions[champion.method])
        self.client.set_model_version_tag(name, versions[champion.method], PROMOTION_TAG, decision.reason)
        self.client.set_tag(self.sweep_run_id, PROMOTION_TAG, f"{alias}: {decision.reason}")
        summary = {
            alias: {"method": champion.method, "version": versions[champion.method]},
            "promotion": {"promoted": decision.promoted, "reason": decision.reason},
            "methods": {
                m: {
                    "lr": r.lr,
                    "rank": r.rank,
                    metric: r.metrics[metric],
                    "run_id": r.run_id,
                    "version": versions[m],
                    "verdict": v.verdict,
                    "mean": v.score.mean if v.score else None,
                    "seeds": v.score.n if v.score else 0,
                    "why": v.reason,
                }
                for m, r in bests.items()
                for v in [verdicts[m]]
            },
        }
        self.client.log_text(self.sweep_run_id, json.dumps(summary, indent=2), "summary.json")
        self.client.set_tag(self.sweep_run_id, f"peftsweep.{alias}_method", champion.method)
        return name, champion, decision

    def _log_model(self, rec: TrialRecord) -> tuple[str, str | None, str]:
        """The trial's adapter as an MLflow model (`logged_model`): (version source, model id, flavour).

        A model that cannot be logged (e.g. a hub base while the hub is unreachable: MLflow pins the base's
        commit) does not cost the sweep its registry: the version then points at the run's adapter files,
        as `download_champion` and the promotion gate read them anyway, and its flavour tag says why.
        """
        import tempfile

        from peftsweep.orchestrator.logged_model import log_trained

        try:
            with tempfile.TemporaryDirectory(prefix="peftsweep-register-") as tmp:
                export = self.client.download_artifacts(rec.run_id, ADAPTER_ARTIFACT, tmp)
                model, flavour = log_trained(
                    self.client, self.spec, rec.run_id, Path(export), self.experiment_id
                )
            return model.model_uri, model.model_id, flavour
        except Exception as exc:  # noqa: BLE001 - any failure here only loses the convenience
            why = first_error_line(f"{type(exc).__name__}: {exc}")
            _log.warning("%s: registering the adapter files only; no MLflow model (%s)", rec.run_id, why)
            return f"runs:/{rec.run_id}/{ADAPTER_ARTIFACT}", None, f"none: {why}"[:500]

    def _model_exists(self, name: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            return False
        return True

    def finish_sweep(self, status: str = "FINISHED") -> None:
        try:
            self.flush()
        except Exception:  # a failed sweep still closes its runs; a finished one says what was not written
            if status == "FINISHED":
                raise
            _log.warning("an MLflow write of the failed sweep failed too", exc_info=True)
        for trial in self.trials.values():  # no RUNNING leftovers, whatever happened
            if trial.status == "running" and trial.run_id:  # "": its run was never created
                self.client.set_terminated(trial.run_id, "KILLED")
        for run_id in self.method_runs.values():
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, "KILLED")
        self.client.set_terminated(self.sweep_run_id, status)


class TrialRecorder(Callback):
    """Tune callback on the driver: each Tune trial becomes an MLflow run under its method's run."""

    def __init__(self, tracker: SweepTracker, on_change: Callable[[str], None] | None = None) -> None:
        self.tracker = tracker
        self.on_change = on_change or (lambda _method: None)  # called with the trial's method

    def __reduce__(self) -> tuple:
        # Tune pickles its RunConfig (callbacks included) into the experiment state. The MLflow client and
        # the live display only make sense in this driver process, so a pickled copy is a detached no-op.
        return (_DetachedCallback, ())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.tracker.trials:  # Tune restarted it after a crash: the same run goes on
            return
        self.on_change(self.tracker.start_trial(trial.config[TRIAL_KEY]).method)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        record = self.tracker.trials[trial.trial_id]
        self.tracker.log_result(record, result)
        self.on_change(record.method)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, error=None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, error=trial_error(trial))

    def _finish(self, trial: Any, error: str | None) -> None:
        record = self.tracker.trials.get(trial.trial_id)
        if record is None:  # it failed before it started (its actor never came up, e.g. its node died)
            record = self.tracker.start_trial(trial.config[TRIAL_KEY])
        checkpoint = latest_checkpoint(trial)
        self.tracker.finish_trial(
            record,
            str(checkpoint) if checkpoint else None,
            error=error,
            then=lambda: prune_finished(checkpoint),  # once its adapter is in MLflow
        )
        self.on_change(record.method)


def trial_error(trial: Any) -> str:
    """The error a Tune trial failed with, as Tune wrote it (its error file; the last attempt's is last)."""
    error = trial.get_error()
    if error is not None:
        return str(error)
    path = Path(trial.error_file) if trial.error_file else None
    if path is not None and path.is_file():
        text = path.read_text(errors="replace")
        return text.rsplit("Failure # ", 1)[-1].split("\n", 1)[-1]  # the last failure's trace
    return "trial failed (Tune recorded no error)"


def latest_checkpoint(trial: Any) -> Path | None:
    """A finished Tune trial's latest checkpoint directory: Tune's own (inline trials), or the Ray Train
    checkpoint `TuneReportCallback` put in its last result (train trials)."""
    path = (trial.last_result or {}).get(CHECKPOINT_PATH_KEY)
    if path is None and trial.checkpoint is not None:
        path = trial.checkpoint.path
    return Path(path) if path else None


class _DetachedCallback(Callback):
    """What a pickled TrialRecorder becomes outside the driver that created it: records nothing."""
