"""The sweep report: which PEFT method wins, at which learning rate, and by how much beyond seed noise.

Why: peftsweep exists to give a *fair* answer to "which method, at which LR" (arXiv 2602.04998 did it by hand:
LR grid × methods × seeds, mean ± std, LR-sensitivity curves, PiSSA preferring a lower LR than LoRA). This
module reads one sweep's MLflow run tree (and its Optuna studies) back and writes that evidence as
``lr_curves.png``, ``report.md`` and a self-contained ``report.html``, also logged to the sweep run.
It only reads what ``tracking.SweepTracker`` writes; nothing here needs Ray.
"""

from __future__ import annotations

import base64
import html
import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from peftsweep.orchestrator.status import open_storage
from peftsweep.orchestrator.tracking import LEVEL_TAG, METHOD_TAG, OUTCOME_TAG, ROLE_TAG
from peftsweep.spec import ResourcesSpec, SweepSpec

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from peftsweep.orchestrator.redact import RedactingClient

# search: a trial of the method's study; confirm: a re-run of the best configuration with another seed.
# An absent tag means search (sweeps recorded before confirm runs existed).
PARENT_TAG = "mlflow.parentRunId"
OUTCOMES = ("completed", "stopped_early", "diverged", "failed")
REFERENCE_METHOD = "lora"  # LR ratios are quoted against LoRA, the paper's baseline, when it was swept
ARTIFACT_DIR = "report"  # where the files go among the sweep run's artifacts
SECONDS_PER_HOUR = 3600
MS_PER_S = 1000  # MLflow run times are epoch milliseconds
PAPER = "arXiv 2602.04998"


class ReportError(RuntimeError):
    """The sweep cannot be reported: no tracking store, no sweep run, or a sweep run without trials."""


@dataclass(frozen=True)
class Trial:
    """One trial run as the report sees it: its config, role, outcome, final metric and duration."""

    run_id: str
    method: str
    role: Literal["search", "confirm"]
    outcome: str  # completed | stopped_early | diverged | failed | running (no outcome tag yet)
    lr: float
    rank: int  # 0: rank-less method
    seed: int | None
    value: float | None  # the search metric's last reported value; None if never reported or not finite
    seconds: float | None  # end - start; None while the run has no end time

    def same_config(self, other: Trial) -> bool:
        return self.rank == other.rank and math.isclose(self.lr, other.lr, rel_tol=1e-9)


@dataclass(frozen=True)
class MethodRow:
    """One method's line of the report: its best configuration over seeds, costs, and study diagnostics."""

    method: str
    seeds: tuple[float, ...]  # the best configuration's metric, one per seed (scoring.method_score)
    best_lr: float | None
    best_rank: int | None
    gap: float | None  # how much worse than the best method's mean (metric units, ≥ 0); 0 for the best
    lr_ratio: float | None  # best_lr / the reference method's best_lr (ReportResult.ratio_reference)
    verdict: str  # best | tie | worse | no result (scoring.verdicts: Welch's test over seeds)
    verdict_reason: str  # the test's numbers ("Welch p 0.31 ≥ 0.05; ≈ 27 seeds each would settle it")
    bracketed: str  # "yes", "no: upper side open" (strategy.bracket_text), "-" without a study
    counts: dict[str, int]  # search trials per outcome, plus "trials" (all search trials) and "confirm"
    trial_seconds: float  # sum of finished trial runs' durations (search + confirm)
    gpu_hours: float | None  # None on CPU sweeps (gpus_per_worker == 0)
    importances: dict[str, float] | str  # Optuna parameter importances, or "n/a (why)"
    curvature: float | None = None  # λ_max at init, when given
    curvature_ratio: float | None = None  # λ_max / LoRA's λ_max

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def mean(self) -> float | None:
        return mean_std(self.seeds)[0] if self.seeds else None

    @property
    def std(self) -> float | None:
        return mean_std(self.seeds)[1] if self.seeds else None


@dataclass(frozen=True)
class ReportResult:
    """Where the report was written and what it says."""

    markdown: Path
    html: Path
    lr_curves: Path
    rows: list[MethodRow]
    sweep_run_id: str
    metric: str
    direction: Literal["max", "min"]
    ratio_reference: str | None  # the method LR ratios are relative to: lora if swept, else the best method
    finding: str | None  # PiSSA vs LoRA optimal LR, when both have a result
    notes: list[str] = field(default_factory=list)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1: seeds are a sample); std 0 with one value, which means no
    spread was measured, not that there is none."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def gpu_hours(trial_seconds: float, resources: ResourcesSpec) -> float | None:
    """GPU-hours of `trial_seconds` of trials: every worker of a trial holds its GPUs for the whole run."""
    if resources.gpus_per_worker <= 0:
        return None
    return trial_seconds * resources.workers_per_trial * resources.gpus_per_worker / SECONDS_PER_HOUR


def _client(spec: SweepSpec) -> RedactingClient:
    from peftsweep.orchestrator.redact import RedactingClient

    # The default store is a sqlite file: opening a missing one would create an empty database.
    db = spec.tracking.root / "mlflow.db"
    if spec.tracking.mlflow_uri is None and not db.is_file():
        raise ReportError(f"no tracking store at {db}: sweep {spec.name!r} has not run")
    return RedactingClient(tracking_uri=spec.tracking.mlflow_tracking_uri())


def _search_all(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    """Every matching run, page by page (one page is capped at 1000 runs)."""
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs([experiment_id], filter_string, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def resolve_sweep_run(spec: SweepSpec, sweep_run_id: str | None = None) -> str:
    """The sweep run to report: `sweep_run_id` (checked to be a sweep run of this sweep), else the latest."""
    client = _client(spec)
    experiment = client.get_experiment_by_name(spec.name)
    if experiment is None:
        raise ReportError(f"sweep {spec.name!r} has no runs in {spec.tracking.mlflow_tracking_uri()}")
    if sweep_run_id is not None:
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(sweep_run_id)
        except MlflowException:
            raise ReportError(f"no run {sweep_run_id!r} in {spec.tracking.mlflow_tracking_uri()}") from None
        if run.info.experiment_id != experiment.experiment_id or run.data.tags.get(LEVEL_TAG) != "sweep":
            raise ReportError(f"run {sweep_run_id!r} is not a sweep run of sweep {spec.name!r}")
        return sweep_run_id
    latest = client.search_runs(
        [experiment.experiment_id],
        f"tags.`{LEVEL_TAG}` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not latest:
        raise ReportError(f"sweep {spec.name!r} has no sweep run in {spec.tracking.mlflow_tracking_uri()}")
    return latest[0].info.run_id


def _finite_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _trial(run: Run, metric: str) -> Trial:
    tags, params, info = run.data.tags, run.data.params, run.info
    seed = params.get("seed")
    end = info.end_time
    return Trial(
        run_id=info.run_id,
        method=tags.get(METHOD_TAG, "?"),
        role="confirm" if tags.get(ROLE_TAG) == "confirm" else "search",
        outcome=tags.get(OUTCOME_TAG, "running"),
        lr=float(params["lr"]),
        rank=int(params.get("rank", 0)),
        seed=int(seed) if seed is not None else None,
        # run.data.metrics holds each metric's value at its highest step: the trial's result
        value=_finite_or_none(run.data.metrics.get(metric)),
        seconds=(end - info.start_time) / MS_PER_S if end and info.start_time else None,
    )


def load_trials(spec: SweepSpec, sweep_run_id: str) -> dict[str, list[Trial]]:
    """The sweep run's trials per method (method runs are the children of the sweep run)."""
    client = _client(spec)
    experiment_id = client.get_run(sweep_run_id).info.experiment_id
    method_runs = _search_all(
        client, experiment_id, f"tags.`{PARENT_TAG}` = '{sweep_run_id}' and tags.`{LEVEL_TAG}` = 'method'"
    )
    out: dict[str, list[Trial]] = {}
    for mrun in sorted(method_runs, key=lambda r: r.info.start_time or 0):
        runs = _search_all(
            client,
            experiment_id,
            f"tags.`{PARENT_TAG}` = '{mrun.info.run_id}' and tags.`{LEVEL_TAG}` = 'trial'",
        )
        trials = [_trial(r, spec.search.metric) for r in runs if "lr" in r.data.params]
        method = mrun.data.tags.get(METHOD_TAG, mrun.info.run_name)
        out.setdefault(method, []).extend(sorted(trials, key=lambda t: (t.lr, t.rank)))
    order = [m.name for m in spec.methods]  # spec order; methods the spec no longer lists go last
    return dict(
        sorted(out.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0]))
    )


def _counts(trials: Sequence[Trial]) -> dict[str, int]:
    search = [t for t in trials if t.role == "search"]
    by_outcome = Counter(t.outcome for t in search)
    counts = {"trials": len(search), **{o: by_outcome.get(o, 0) for o in OUTCOMES}}
    counts["running"] = len(search) - sum(counts[o] for o in OUTCOMES)
    counts["confirm"] = sum(t.role == "confirm" for t in trials)
    return counts


def _bracketed(spec: SweepSpec, method: str) -> str:
    """Whether the method's study brackets its best LR (`strategy.bracket_text`); never raises."""
    from peftsweep.orchestrator.strategy import bracket_text, study_bracket

    if spec.tracking.optuna_storage is None and not (spec.tracking.root / "optuna.db").is_file():
        return "-"  # opening a missing default sqlite store would create it
    try:
        storage = open_storage(spec.tracking.optuna_storage_url())
        search = spec.search
        bracket = study_bracket(storage, f"{spec.name}/{method}", search.bracket_resolution, search.lr_grid)
        return bracket_text(bracket)
    except Exception as exc:  # diagnostics only
        return f"n/a ({type(exc).__name__})"


def param_importances(spec: SweepSpec, method: str) -> dict[str, float] | str:
    """Optuna's parameter importances of the method's study, or "n/a (why)"; never raises.

    The study holds every run of this spec (re-running a sweep adds trials), not only the reported one.
    """
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        url = spec.tracking.optuna_storage_url()
        # Opening a missing default sqlite store would create it: a report must not write the sweep's store.
        if spec.tracking.optuna_storage is None and not (spec.tracking.root / "optuna.db").is_file():
            return "n/a (no Optuna store)"
        storage = open_storage(url)
        name = f"{spec.name}/{method}"
        if name not in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
            return "n/a (no Optuna study)"
        study = optuna.load_study(study_name=name, storage=storage)
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        complete = [t for t in complete if t.value is not None]
        if len(complete) < 2:  # an importance compares trials: one trial explains nothing
            return f"n/a ({len(complete)} complete trial{'s' * (len(complete) != 1)}; needs ≥ 2)"
        names = sorted({p for t in complete for p in t.params})
        varying = [p for p in names if len({repr(t.params.get(p)) for t in complete}) > 1]
        if not varying:
            return "n/a (every complete trial has the same params)"
        importances = optuna.importance.get_param_importances(study, params=varying)
        return {k: float(v) for k, v in importances.items()}
    except Exception as exc:  # diagnostics only: a broken study must not cost the whole report
        return f"n/a ({type(exc).__name__}: {exc})"


def _rows(
    spec: SweepSpec,
    trials: Mapping[str, Sequence[Trial]],
    curvature: Mapping[str, float] | None,
) -> tuple[list[MethodRow], str | None]:
    """One row per method, scored and compared by `scoring` (the rule of the final table and the registry)."""
    from peftsweep.orchestrator import scoring

    metric, direction = spec.search.metric or "", spec.search.direction
    methods = list(trials)  # load_trials' order: the spec's
    scores = {
        m: scoring.method_score([scoring.run_record(t, metric) for t in trials[m]], direction)
        for m in methods
    }
    verdicts = scoring.verdicts(scores, direction, alpha=spec.search.verdict_alpha)
    winner = scoring.best_method(scores, direction)
    reference = REFERENCE_METHOD if scores.get(REFERENCE_METHOD) is not None else winner
    ref_score = scores.get(reference) if reference is not None else None
    ref_curv = (curvature or {}).get(REFERENCE_METHOD)
    rows = []
    for m in methods:
        score, verdict = scores[m], verdicts[m]
        seconds = sum(t.seconds for t in trials[m] if t.seconds is not None)
        curv = (curvature or {}).get(m)
        rows.append(
            MethodRow(
                method=m,
                seeds=score.values if score else (),
                best_lr=score.lr if score else None,
                best_rank=score.rank if score else None,
                gap=verdict.gap,
                lr_ratio=score.lr / ref_score.lr if score and ref_score else None,
                verdict=verdict.verdict,
                verdict_reason=verdict.reason,
                bracketed=_bracketed(spec, m),
                counts=_counts(trials[m]),
                trial_seconds=seconds,
                gpu_hours=gpu_hours(seconds, spec.resources),
                importances=param_importances(spec, m),
                curvature=curv,
                curvature_ratio=curv / ref_curv if curv is not None and ref_curv else None,
            )
        )
    return rows, reference


# Optimal LRs closer than this factor are not told apart: seed noise moves a method's argmax by about half a
# decade on the built-in task (STACK.md), and LR samples of a short search are that coarse too.
SAME_LR_FACTOR = 2.0


def same_lr_factor(spec: SweepSpec) -> float:
    """LRs closer than this factor are the same optimum: half a step of the search's LR grid (bracketed
    optima on a grid are exact grid points), else `SAME_LR_FACTOR`."""
    lora = next((m for m in spec.methods if m.name == REFERENCE_METHOD), spec.methods[0])
    grid = spec.search.lr_grid
    if grid is None or spec.search.strategy != "bracket" or lora.lr_min is None or lora.lr_max is None:
        return SAME_LR_FACTOR
    return float((lora.lr_max / lora.lr_min) ** (0.5 / (grid - 1)))


def pissa_finding(rows: Sequence[MethodRow], same: float = SAME_LR_FACTOR) -> str | None:
    """PiSSA's optimal LR against LoRA's, worded from the numbers; None unless both have a result. LRs
    within a factor ``same`` of each other are the same optimum."""
    by = {r.method: r for r in rows}
    pissa, lora = by.get("pissa"), by.get("lora")
    if not (pissa and lora and pissa.best_lr and lora.best_lr):
        return None
    ratio = pissa.best_lr / lora.best_lr
    open_ends = [r.method for r in (pissa, lora) if r.bracketed not in ("yes", "-")]
    caveat = (
        f" {' and '.join(open_ends)}'s optimum is not bracketed: a bound, not a ratio." if open_ends else ""
    )
    if ratio <= 1 / same:
        verdict = f"lower, as in {PAPER}"
    elif ratio < same:
        verdict = f"about the same: within {same:.2g}×; {PAPER} finds PiSSA's lower"
    else:
        verdict = f"higher, unlike {PAPER}"
    return f"PiSSA's optimal LR is {ratio:.2g}× LoRA's ({verdict}).{caveat}"


# ---- rendering -------------------------------------------------------------------------------------------


def _num(value: float | None, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def gap_table(result: ReportResult) -> tuple[list[str], list[list[str]]]:
    """The method-gap table as header + string cells, shared by markdown, HTML and the CLI."""
    ref = result.ratio_reference or "-"
    header = [
        "method",
        f"{result.metric} mean ± std (n)",
        "gap to best",
        "verdict",
        "why",
        "optimal LR",
        "bracketed",
        f"LR / {ref}'s",
        "best rank",
    ]
    with_curv = any(r.curvature is not None for r in result.rows)
    if with_curv:
        header += ["λ_max at init", f"λ / {REFERENCE_METHOD}'s"]
    cells = []
    for r in result.rows:
        rank = "-" if r.best_rank in (None, 0) else str(r.best_rank)
        row = [
            r.method,
            "-" if r.mean is None else f"{r.mean:.4f} ± {r.std:.4f} ({r.n})",
            _num(r.gap),
            r.verdict,
            r.verdict_reason,
            _num(r.best_lr, ".3g"),
            r.bracketed,
            _num(r.lr_ratio, ".3g"),
            rank,
        ]
        if with_curv:
            row += [_num(r.curvature, ".4g"), _num(r.curvature_ratio, ".3g")]
        cells.append(row)
    return header, cells


def _counts_table(result: ReportResult) -> tuple[list[str], list[list[str]]]:
    header = ["method", "trials", "completed", "stopped early (ASHA)", "diverged", "failed", "running"]
    header += ["confirm runs", "trial-seconds", "GPU-hours"]
    cells = []
    for r in result.rows:
        c = r.counts
        cells.append(
            [r.method]
            + [str(c[k]) for k in ("trials", *OUTCOMES, "running", "confirm")]
            + [f"{r.trial_seconds:.0f}", _num(r.gpu_hours, ".3f")]
        )
    return header, cells


def _importance_text(value: dict[str, float] | str) -> str:
    if isinstance(value, str):
        return value
    return ", ".join(f"{k} {v:.2f}" for k, v in value.items())


def _md_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    def line(items: Sequence[str]) -> str:
        return "| " + " | ".join(s.replace("|", "\\|") for s in items) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(c) for c in cells)])


def _html_table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _better(direction: str) -> str:
    return "higher is better" if direction == "max" else "lower is better"


OVERLAY_UP_TO = 6  # methods drawn on one plot; more get one panel each (20 colours on one plot: a mess)


def plot_lr_curves(
    path: Path, trials: Mapping[str, Sequence[Trial]], rows: Sequence[MethodRow], metric: str, direction: str
) -> Path:
    """`lr_curves_figure` saved as a PNG."""
    fig = lr_curves_figure(trials, rows, metric, direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def lr_curves_figure(
    trials: Mapping[str, Sequence[Trial]], rows: Sequence[MethodRow], metric: str, direction: str
) -> Figure:
    """Metric vs LR per method: search trials as points, the best configuration's seeds as mean ± std.

    Up to `OVERLAY_UP_TO` methods share one plot (one colour each); beyond, small multiples: one panel per
    method with shared axes, titled with its verdict, and the best method's mean as a dashed line in every
    panel so that panels compare at a glance. Failed trials are left out: their partial metric is no result
    (they are counted in the tables).
    """
    from matplotlib import rcParams
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    by_method = {r.method: r for r in rows}
    methods = list(trials)
    panels = len(methods) > OVERLAY_UP_TO
    cols = math.ceil(math.sqrt(len(methods))) if panels else 1
    nrows = math.ceil(len(methods) / cols) if panels else 1
    # Figure + the Agg canvas directly: no pyplot global state, no display needed. Inches; readable in a
    # browser at 100 dpi (a 20-method grid: 5 × 4 panels of 3 × 2.4 in).
    size = (max(8.0, 3.0 * cols), max(5.0, 2.4 * nrows + 0.8)) if panels else (8.0, 5.0)
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(nrows, cols, sharex=True, sharey=True, squeeze=False)
    axes = {m: grid[i // cols][i % cols] for i, m in enumerate(methods)} if panels else {}
    cycle = rcParams["axes.prop_cycle"].by_key()["color"]
    sign = 1.0 if direction == "max" else -1.0
    means = [r.mean for r in rows if r.mean is not None]
    leader = max(means, key=lambda v: sign * v) if means else None
    plotted = False
    for i, (method, method_trials) in enumerate(trials.items()):
        ax = axes.get(method, grid[0][0])
        color = cycle[0 if panels else i % len(cycle)]
        label = None if panels else method
        search = [t for t in method_trials if t.role == "search" and t.value is not None]
        full = [t for t in search if t.outcome in ("completed", "running")]
        early = [t for t in search if t.outcome == "stopped_early"]
        diverged = [t for t in search if t.outcome == "diverged"]
        if full:
            ax.scatter([t.lr for t in full], [t.value for t in full], color=color, label=label, zorder=2)
        if diverged:
            xs, ys = [t.lr for t in diverged], [t.value for t in diverged]
            ax.scatter(xs, ys, marker="x", color=color, label=None if full else label, zorder=2)
        if early:
            ax.scatter(
                [t.lr for t in early],
                [t.value for t in early],
                facecolors="none",
                edgecolors=color,
                alpha=0.6,  # lighter: an ASHA-stopped trial's metric is from an earlier eval point
                label=None if full or diverged else label,
                zorder=2,
            )
        row = by_method.get(method)
        if row is not None and row.mean is not None and row.best_lr is not None:
            ax.errorbar(row.best_lr, row.mean, yerr=row.std, color=color, capsize=4, zorder=3)
            ax.scatter(
                [row.best_lr], [row.mean], marker="*", s=220, color=color, edgecolors="black", zorder=4
            )  # s: marker area in pt², large enough to stand out over the trial points
        if panels:
            verdict = row.verdict if row is not None else "no result"
            ax.set_title(f"{method}: {verdict}", fontsize="medium", loc="left")
            if leader is not None:  # the best method's mean: how far below it this method lands
                ax.axhline(leader, color="gray", ls="--", lw=0.8, zorder=1)
        plotted = plotted or bool(search)
    for ax in grid.flat[len(methods) :] if panels else ():
        ax.set_visible(False)  # the grid's unused cells
    for ax in grid.flat:
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)  # faint: the points matter, the grid only guides the eye
    xlabel, ylabel = "learning rate (log scale)", f"{metric} ({_better(direction)})"
    if panels:
        fig.supxlabel(xlabel)
        fig.supylabel(ylabel)
    else:
        grid[0][0].set_xlabel(xlabel)
        grid[0][0].set_ylabel(ylabel)
    keys = [
        Line2D([], [], marker="o", ls="", color="gray", label="search trial (final)"),
        Line2D([], [], marker="o", ls="", mfc="none", color="gray", label="stopped early (ASHA)"),
        Line2D([], [], marker="x", ls="", color="gray", label="diverged"),
        Line2D([], [], marker="*", ls="", color="gray", ms=12, label="best LR: mean ± std over seeds"),
    ]
    if not plotted:
        ax = grid[0][0]
        ax.text(0.5, 0.5, "no trial reported the metric", ha="center", va="center", transform=ax.transAxes)
    elif panels:
        keys.append(Line2D([], [], ls="--", color="gray", label="best method's mean"))
        fig.legend(handles=keys, loc="outside upper center", ncols=len(keys), fontsize="small")
    else:
        ax = grid[0][0]
        legend = ax.legend(title="method", loc="best")
        ax.add_artist(legend)
        ax.legend(handles=keys, loc="lower center", fontsize="small")
    return fig


def _markdown(spec: SweepSpec, result: ReportResult) -> str:
    lines = [
        f"# Sweep report: {spec.name}",
        "",
        f"Sweep run `{result.sweep_run_id}`; metric `{result.metric}` ({_better(result.direction)}).",
        "",
    ]
    if result.finding:
        lines += [f"**Finding:** {result.finding}", ""]
    lines += [f"![{result.metric} vs learning rate]({result.lr_curves.name})", "", "## Method gap", ""]
    lines += [_md_table(*gap_table(result)), ""]
    lines += [f"- {n}" for n in result.notes] + ["", "## Trials and compute", ""]
    lines += [_md_table(*_counts_table(result)), "", "## Optuna parameter importances", ""]
    lines += [f"- {r.method}: {_importance_text(r.importances)}" for r in result.rows] + [""]
    return "\n".join(lines)


_PNG_SLOT = "@@peftsweep-png@@"  # where the plot's base64 goes once the page's text has been redacted


def _html(spec: SweepSpec, result: ReportResult) -> str:
    png = _PNG_SLOT
    esc = html.escape
    finding = f"<p><strong>Finding:</strong> {esc(result.finding)}</p>" if result.finding else ""
    notes = "".join(f"<li>{esc(n)}</li>" for n in result.notes)
    imps = "".join(f"<li>{esc(r.method)}: {esc(_importance_text(r.importances))}</li>" for r in result.rows)
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Sweep report: {esc(spec.name)}</title>"
        f"<style>{style}</style></head><body><h1>Sweep report: {esc(spec.name)}</h1>"
        f"<p>Sweep run <code>{esc(result.sweep_run_id)}</code>; metric <code>{esc(result.metric)}</code> "
        f"({_better(result.direction)}).</p>{finding}"
        f"<img alt='{esc(result.metric)} vs learning rate' src='data:image/png;base64,{png}'>"
        f"<h2>Method gap</h2>{_html_table(*gap_table(result))}<ul>{notes}</ul>"
        f"<h2>Trials and compute</h2>{_html_table(*_counts_table(result))}"
        f"<h2>Optuna parameter importances</h2><ul>{imps}</ul></body></html>\n"
    )


def _notes(reference: str | None, resources: ResourcesSpec) -> list[str]:
    notes = [
        "mean ± std: sample std over the best configuration's seeds (its best search trial plus its confirm "
        "runs); 0 with one seed.",
        "gap: how much worse the mean is than the best method's, in metric units.",
        "tie: the mean is within the best method's std + its own std of the best mean.",
    ]
    if reference == REFERENCE_METHOD:
        notes.append(f"LR ratio: a method's optimal LR / {REFERENCE_METHOD}'s optimal LR.")
    elif reference:
        notes.append(
            f"LR ratio: relative to the best method ({reference}); lora has no result in this sweep."
        )
    if resources.gpus_per_worker > 0:
        notes.append(
            f"GPU-hours: trial-seconds × {resources.workers_per_trial} workers × "
            f"{resources.gpus_per_worker:g} GPUs per worker / 3600."
        )
    notes.append("Importances use every complete trial of the method's Optuna study (all runs of this spec).")
    return notes


def build_report(
    spec: SweepSpec,
    out_dir: Path,
    sweep_run_id: str | None = None,
    curvature: Mapping[str, float] | None = None,
) -> ReportResult:
    """Write report.md, report.html and lr_curves.png for one sweep run (default: the latest) into `out_dir`,
    and log them to that sweep run's artifacts under ``report/``.

    `curvature` (method → λ_max at init) adds a curvature column, with ratios to LoRA's λ_max.
    """
    run_id = resolve_sweep_run(spec, sweep_run_id)
    trials = load_trials(spec, run_id)
    if not any(trials.values()):
        raise ReportError(f"sweep run {run_id} of {spec.name!r} has no trial runs yet")
    rows, reference = _rows(spec, trials, curvature)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metric, direction = spec.search.metric or "", spec.search.direction
    png = plot_lr_curves(out_dir / "lr_curves.png", trials, rows, metric, direction)
    result = ReportResult(
        markdown=out_dir / "report.md",
        html=out_dir / "report.html",
        lr_curves=png,
        rows=rows,
        sweep_run_id=run_id,
        metric=metric,
        direction=direction,
        ratio_reference=reference,
        finding=pissa_finding(rows, same_lr_factor(spec)),
        notes=_notes(reference, spec.resources),
    )
    # Logged as files (log_artifact copies bytes), so redacted here: an importance's error text may quote
    # the Optuna storage URL, password included.
    client = _client(spec)
    result.markdown.write_text(client.redactor.text(_markdown(spec, result)))
    # The plot's base64 goes in after redaction: random base64 can look like `…key=…` to the secret rules.
    png = base64.b64encode(result.lr_curves.read_bytes()).decode("ascii")
    result.html.write_text(client.redactor.text(_html(spec, result)).replace(_PNG_SLOT, png))
    for path in (result.markdown, result.html, result.lr_curves):
        client.log_artifact(run_id, str(path), ARTIFACT_DIR)
    return result
