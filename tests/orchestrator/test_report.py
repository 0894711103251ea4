"""The sweep report over a known store: a real sqlite MLflow run tree and Optuna studies, built by hand.

The numbers are chosen so that each rule shows: the final (not the best) metric of a history counts, a
failed trial's partial metric does not, confirm seeds give mean ± sample std, one method ties with the best
and one does not, and the latest sweep run (by start time, not by creation order) is the default.
"""

from __future__ import annotations

import base64
import html
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from peftsweep.cli import app
from peftsweep.orchestrator.report import ReportResult, build_report, gap_table, gpu_hours
from peftsweep.spec import ResourcesSpec, SweepSpec, parse_spec

T0 = 1_700_000_000_000  # epoch ms of the reported sweep's start
HOUR_MS = 3_600_000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPEC = {
    "name": "rep",
    "methods": ["lora", "pissa", "dora"],
    "resources": {"workers_per_trial": 2, "gpus_per_worker": 1},
}


@dataclass
class Store:
    spec: SweepSpec
    spec_path: Path
    client: MlflowClient
    latest: str  # the sweep run with the later start time
    older: str


def _trial(
    client: MlflowClient,
    exp: str,
    parent: str,
    method: str,
    start: int,
    lr: float,
    rank: int,
    history: list[float],
    outcome: str,
    seconds: int,
    role: str | None = None,
    seed: int = 0,
) -> None:
    tags = {"mlflow.parentRunId": parent, "peftsweep.level": "trial", "peftsweep.method": method}
    if role:
        tags["peftsweep.role"] = role
    run_id = client.create_run(exp, start_time=start, tags=tags).info.run_id
    params = {"lr": lr, "rank": rank, "seed": seed}
    metrics = [Metric("exact_match", v, start + i, 75 * (i + 1)) for i, v in enumerate(history)]
    # The LR schedule's last value: a report reading metrics["lr"] instead of the param would see 0.
    metrics.append(Metric("lr", 0.0, start, 75 * len(history)))
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()], metrics=metrics)
    client.set_tag(run_id, "peftsweep.outcome", outcome)
    client.set_terminated(
        run_id, "FAILED" if outcome == "failed" else "FINISHED", end_time=start + seconds * 1000
    )


def _sweep(client: MlflowClient, exp: str, start: int, trials: dict[str, list[tuple]]) -> str:
    sweep = client.create_run(exp, start_time=start, tags={"peftsweep.level": "sweep"}).info.run_id
    for method, rows in trials.items():
        tags = {"mlflow.parentRunId": sweep, "peftsweep.level": "method", "peftsweep.method": method}
        mrun = client.create_run(exp, start_time=start, tags=tags).info.run_id
        for row in rows:
            _trial(client, exp, mrun, method, start, *row)
    return sweep


def _study(spec: SweepSpec, method: str, trials: list[tuple[float, int, float | None]]) -> None:
    storage = optuna.storages.RDBStorage(spec.tracking.optuna_storage_url())
    study = optuna.create_study(study_name=f"{spec.name}/{method}", storage=storage, direction="maximize")
    space = {
        "lr": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True),
        "rank": optuna.distributions.CategoricalDistribution([4, 8, 16]),
    }
    for lr, rank, value in trials:
        state = optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL
        trial = optuna.trial.create_trial(
            params={"lr": lr, "rank": rank}, distributions=space, value=value, state=state
        )
        study.add_trial(trial)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    tmp = tmp_path_factory.mktemp("report")
    root = tmp / "runs"
    root.mkdir()
    spec_path = tmp / "s.yaml"
    spec_path.write_text(yaml.safe_dump({**SPEC, "tracking": {"root": str(root)}}))
    spec = parse_spec({**SPEC, "tracking": {"root": str(root)}})
    client = MlflowClient(tracking_uri=spec.tracking.mlflow_tracking_uri())
    exp = client.create_experiment(spec.name, artifact_location=(root / "mlartifacts").as_uri())
    # (lr, rank, metric history, outcome, seconds[, role, seed])
    latest = _sweep(
        client,
        exp,
        T0,
        {
            "lora": [
                (1e-4, 4, [0.3, 0.50], "completed", 100),
                (1e-3, 8, [0.6, 0.80], "completed", 100),
                (1e-2, 16, [0.60, 0.05], "diverged", 100),
                (1e-3, 8, [0.5, 0.76], "completed", 50, "confirm", 1),
                (1e-3, 8, [0.5, 0.84], "completed", 50, "confirm", 2),
            ],
            "pissa": [
                (3e-5, 8, [0.95, 0.60], "completed", 60),  # its best eval point is not its result
                (3e-4, 16, [0.5, 0.78], "completed", 60),
                (3e-3, 8, [0.20], "stopped_early", 60),
                (1e-3, 8, [0.99], "failed", 60),  # a partial metric of a failed trial is no result
            ],
            "dora": [
                (1e-3, 4, [0.4, 0.60], "completed", 30),
                (1e-4, 4, [0.2, 0.40], "completed", 30),
                (1e-3, 4, [0.4, 0.61], "completed", 30, "confirm", 1),
                (1e-3, 4, [0.4, 0.59], "completed", 30, "confirm", 2),
            ],
        },
    )
    # Created last but started earlier: the default report must still pick `latest`.
    older = _sweep(
        client,
        exp,
        T0 - HOUR_MS,
        {
            "pissa": [(3e-4, 8, [0.99], "completed", 10)],
            "dora": [(1e-3, 8, [0.50], "completed", 10)],
        },
    )
    _study(spec, "lora", [(1e-4, 4, 0.5), (1e-3, 8, 0.8), (1e-2, 16, 0.05)])
    _study(spec, "dora", [(1e-3, 4, 0.6), (1e-4, 4, None)])  # one complete trial: no importances
    return Store(spec, spec_path, client, latest, older)


@pytest.fixture(scope="module")
def report(store: Store, tmp_path_factory: pytest.TempPathFactory) -> ReportResult:
    out = tmp_path_factory.mktemp("out")
    return build_report(store.spec, out, curvature={"lora": 2.0, "pissa": 20.0})


def _row(result: ReportResult, method: str):  # noqa: ANN202 - MethodRow, looked up by name
    return next(r for r in result.rows if r.method == method)


def test_gap_table_is_mean_and_sample_std_over_the_best_configs_seeds(report: ReportResult) -> None:
    assert report.metric == "exact_match" and report.direction == "max"
    lora, pissa, dora = (_row(report, m) for m in ("lora", "pissa", "dora"))
    assert sorted(lora.seeds) == pytest.approx([0.76, 0.80, 0.84])
    assert (lora.mean, lora.std) == pytest.approx((0.80, statistics.stdev([0.80, 0.76, 0.84])))
    assert lora.std == pytest.approx(0.04) and lora.n == 3
    # lora leads but is not "best": pissa's one seed cannot be separated from it (scoring.verdicts)
    assert (lora.best_lr, lora.best_rank, lora.gap, lora.verdict) == (1e-3, 8, 0.0, "tie")
    # pissa: the final 0.60 (not the history's 0.95) at 3e-5, and the failed trial's 0.99 is ignored
    assert (pissa.best_lr, pissa.best_rank, pissa.n, pissa.std) == (3e-4, 16, 1, 0.0)
    assert pissa.mean == pytest.approx(0.78) and pissa.gap == pytest.approx(0.02)
    assert report.ratio_reference == "lora"
    assert pissa.lr_ratio == pytest.approx(3e-4 / 1e-3) and dora.lr_ratio == pytest.approx(1.0)
    assert report.finding == (
        "PiSSA's optimal LR is 0.3× LoRA's (lower, as in arXiv 2602.04998). "
        "lora's optimum is not bracketed: a bound, not a ratio."
    )


def test_verdicts_come_from_welchs_test_over_seeds(report: ReportResult) -> None:
    pissa, dora = _row(report, "pissa"), _row(report, "dora")
    assert pissa.verdict == "tie" and "one seed" in pissa.verdict_reason  # no spread: cannot be separated
    assert dora.verdict == "worse" and dora.gap == pytest.approx(0.20)  # 3 seeds each, 0.20 behind
    assert dora.verdict_reason.startswith("Welch p ")
    header, cells = gap_table(report)
    assert header[3:5] == ["verdict", "why"] and "bracketed" in header
    # lora's study: best 1e-3, neighbours a decade away on both sides (> 0.3 decades); pissa has no study
    assert [c[header.index("bracketed")] for c in cells] == [
        "no: lower and upper side open",
        "-",
        "no: lower and upper side open",
    ]


def test_counts_and_compute_come_from_outcomes_and_run_times(report: ReportResult) -> None:
    lora, pissa, dora = (_row(report, m) for m in ("lora", "pissa", "dora"))
    assert lora.counts == {
        "trials": 3,
        "completed": 2,
        "stopped_early": 0,
        "diverged": 1,
        "failed": 0,
        "running": 0,
        "confirm": 2,
    }
    assert (pissa.counts["trials"], pissa.counts["stopped_early"], pissa.counts["failed"]) == (4, 1, 1)
    assert (dora.counts["completed"], dora.counts["confirm"]) == (2, 2)
    assert (lora.trial_seconds, pissa.trial_seconds, dora.trial_seconds) == (400, 240, 120)
    assert lora.gpu_hours == pytest.approx(400 * 2 * 1 / 3600)  # 2 workers × 1 GPU each
    assert gpu_hours(3600, ResourcesSpec()) is None  # CPU sweep: no GPU-hours
    assert gpu_hours(3600, ResourcesSpec(workers_per_trial=4, gpus_per_worker=0.5)) == 2.0


def test_importances_are_a_dict_or_say_why_not(report: ReportResult) -> None:
    lora = _row(report, "lora").importances
    assert isinstance(lora, dict) and set(lora) == {"lr", "rank"}
    assert math.isclose(sum(lora.values()), 1.0, rel_tol=1e-6)
    assert _row(report, "dora").importances == "n/a (1 complete trial; needs ≥ 2)"
    assert _row(report, "pissa").importances == "n/a (no Optuna study)"


def test_curvature_column_is_relative_to_lora(report: ReportResult) -> None:
    pissa, dora = _row(report, "pissa"), _row(report, "dora")
    assert (pissa.curvature, pissa.curvature_ratio) == (20.0, 10.0)
    assert (dora.curvature, dora.curvature_ratio) == (None, None)
    assert "λ_max at init" in report.markdown.read_text()


def test_files_are_written_inlined_and_logged_to_the_sweep_run(store: Store, report: ReportResult) -> None:
    png = report.lr_curves.read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > len(PNG_MAGIC)
    md = report.markdown.read_text()
    assert "](lr_curves.png)" in md and "| lora | 0.8000 ± 0.0400 (3) | 0.0000 | tie | not separated" in md
    page = report.html.read_text()
    assert (
        f"data:image/png;base64,{base64.b64encode(png).decode()}" in page
        and "src='lr_curves.png'" not in page
    )
    assert "<td>tie</td>" in page and html.escape(report.finding) in page
    logged = {a.path for a in store.client.list_artifacts(report.sweep_run_id, "report")}
    assert report.sweep_run_id == store.latest
    assert logged == {"report/report.md", "report/report.html", "report/lr_curves.png"}


def test_an_older_sweep_run_by_id_without_lora_quotes_ratios_to_the_best(
    store: Store, tmp_path: Path
) -> None:
    result = build_report(store.spec, tmp_path, sweep_run_id=store.older)
    assert [r.method for r in result.rows] == ["pissa", "dora"]
    assert result.ratio_reference == "pissa" and result.finding is None
    assert _row(result, "dora").lr_ratio == pytest.approx(1e-3 / 3e-4)
    assert "relative to the best method (pissa)" in result.markdown.read_text()


def test_cli_report_prints_the_gap_table_into_the_default_directory(store: Store) -> None:
    result = CliRunner().invoke(app, ["report", str(store.spec_path)])
    assert result.exit_code == 0, result.output
    assert "0.8000 ± 0.0400 (3)" in result.output and "tie" in result.output
    assert "dora: Welch p " in result.output  # the verdict's reason, under the table
    assert "0.3×" in result.output
    default = store.spec.tracking.root / "reports" / store.latest
    assert str(default / "report.html") in result.output and (default / "lr_curves.png").is_file()


@pytest.mark.parametrize("case", ["no store", "no runs"])
def test_cli_report_without_runs_exits_1_saying_so(store: Store, tmp_path: Path, case: str) -> None:
    root = tmp_path / "r" if case == "no store" else store.spec.tracking.root
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "other", "methods": ["lora"], "tracking": {"root": str(root)}}))
    result = CliRunner().invoke(app, ["report", str(path)])
    assert result.exit_code == 1
    assert ("no tracking store" if case == "no store" else "has no runs") in result.output


@pytest.mark.parametrize(
    ("pissa_lr", "wording"),
    [
        (3e-4, "0.3× LoRA's (lower, as in"),
        (9.7e-4, "0.97× LoRA's (about the same"),
        (3e-3, "3× LoRA's (higher"),
    ],
)
def test_the_pissa_finding_does_not_read_noise_as_a_shift(pissa_lr: float, wording: str) -> None:
    from types import SimpleNamespace

    from peftsweep.orchestrator.report import pissa_finding

    rows = [
        SimpleNamespace(method="lora", best_lr=1e-3, bracketed="yes"),
        SimpleNamespace(method="pissa", best_lr=pissa_lr, bracketed="yes"),
    ]
    assert wording in (pissa_finding(rows) or "")


def test_the_pissa_finding_says_when_an_optimum_is_only_a_bound() -> None:
    from types import SimpleNamespace

    from peftsweep.orchestrator.report import pissa_finding

    rows = [
        SimpleNamespace(method="lora", best_lr=1e-3, bracketed="yes"),
        SimpleNamespace(method="pissa", best_lr=3e-4, bracketed="no: lower side open"),
    ]
    assert (pissa_finding(rows) or "").endswith("pissa's optimum is not bracketed: a bound, not a ratio.")


def _rows_and_trials(methods: list[str]) -> tuple[dict[str, list], list]:
    """Per method: 5 search trials over two decades of LR, its best config at 1e-3 scoring 0.5 + k/100."""
    from peftsweep.orchestrator.report import MethodRow, Trial

    trials, rows = {}, []
    for k, m in enumerate(methods):
        trials[m] = [
            Trial(f"{m}-{i}", m, "search", "completed", 10 ** (-4 + i / 2), 8, 0, 0.1 * i + k / 100, 60.0)
            for i in range(5)
        ]
        verdict = "best" if k == len(methods) - 1 else "tie"
        rows.append(
            MethodRow(m, (0.5 + k / 100,) * 3, 1e-3, 8, None, None, verdict, "", "yes", {}, 60.0, None, {})
        )
    return trials, rows


def test_lr_curves_of_many_methods_are_small_multiples_with_shared_axes() -> None:
    """20 methods on one plot would be 20 colours in one cloud: one panel each, shared axes, the verdict in
    each title and the best method's mean as a reference line in every panel."""
    from peftsweep.orchestrator.report import OVERLAY_UP_TO, lr_curves_figure

    methods = [f"method{k:02d}" for k in range(20)]
    trials, rows = _rows_and_trials(methods)
    fig = lr_curves_figure(trials, rows, "exact_match", "max")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 20 > OVERLAY_UP_TO and len(fig.axes) == 20  # a 5 × 4 grid, no spare cell
    assert [ax.get_title(loc="left") for ax in panels] == [f"{m}: tie" for m in methods[:-1]] + [
        "method19: best"
    ]
    first = panels[0]
    assert all(first.get_shared_x_axes().joined(first, ax) for ax in panels)
    assert all(first.get_shared_y_axes().joined(first, ax) for ax in panels)
    assert all(ax.get_xscale() == "log" for ax in panels)
    for ax in panels:  # the dashed line at the best mean, 0.69, in every panel
        assert any(list(line.get_ydata()) == [0.69, 0.69] for line in ax.get_lines() if line.get_ls() == "--")
    assert fig.get_size_inches()[0] >= 15 and fig.get_size_inches()[1] >= 9.6  # 3 × 2.4 in a panel
    assert len(fig.legends) == 1  # the marker key, once for the figure


def test_lr_curves_of_a_few_methods_share_one_plot() -> None:
    from peftsweep.orchestrator.report import lr_curves_figure

    trials, rows = _rows_and_trials(["lora", "pissa", "dora"])
    fig = lr_curves_figure(trials, rows, "exact_match", "max")
    assert len(fig.axes) == 1
    legend = fig.axes[0].get_legend()  # the marker key; the method legend is an extra artist
    methods = [a for a in fig.axes[0].artists if hasattr(a, "get_texts")]
    assert legend is not None and [t.get_text() for t in methods[0].get_texts()] == ["lora", "pissa", "dora"]
