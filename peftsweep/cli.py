"""The `peftsweep` command: each command resolves the spec and calls one library function."""

from __future__ import annotations

import atexit
import gc
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from peftsweep.cli_redact import RedactingConsole, RedactingTyper
from peftsweep.cluster.templates import Kind
from peftsweep.spec import SpecError, SweepSpec, load_spec

if TYPE_CHECKING:
    from peftsweep.orchestrator.sweep import SweepResult

app = RedactingTyper(
    help="Fair per-method LR × rank sweeps of PEFT methods (Ray Tune, Optuna, Ray Train/DeepSpeed, MLflow).",
    no_args_is_help=True,
    add_completion=False,
)
# Logs and CI are not terminals: keep tables readable there instead of rich's 80-column default.
console = Console() if sys.stdout.isatty() else Console(width=120)
# Errors quote their inputs (a tracking URI, a DSN): every line on stderr is redacted (cli_redact.py).
err = RedactingConsole(stderr=True) if sys.stderr.isatty() else RedactingConsole(stderr=True, width=120)

# Registered first, so it runs after every other exit handler (Ray's shutdown, MLflow's): with torch,
# transformers, PEFT, MLflow and Ray loaded, the collections during interpreter shutdown took ~1.3 s of every
# command's wall time; objects frozen out of the collector are freed by the OS instead (bench/overhead.py).
atexit.register(gc.freeze)

SpecArg = Annotated[Path, typer.Argument(help="Sweep spec (YAML), e.g. examples/quickstart.yaml")]


def _shown(uri: str) -> str:
    """A store URI as printed: its password (postgresql://user:pw@host) masked, as in what MLflow gets."""
    from peftsweep.orchestrator.redact import Redactor

    return Redactor().text(uri)


def _load(spec_path: Path) -> SweepSpec:
    try:
        return load_spec(spec_path)
    except SpecError as exc:
        err.print(f"[red]{exc}[/]", highlight=False)
        raise typer.Exit(2) from None


def _exit_code(result: SweepResult) -> None:
    """0: a champion (or challenger) was registered; 4: every trial failed (a systematic error, printed);
    1: trials ran but none produced an adapter (e.g. every one diverged)."""
    if result.all_failed:
        raise typer.Exit(4)
    if result.champion is None:
        raise typer.Exit(1)


@app.command()
def run(
    spec_path: SpecArg,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster to join ('auto', 'ray://host:10001'); default: embedded")
    ] = None,
    nightly: Annotated[
        bool,
        typer.Option(
            "--nightly",
            help="A scheduled run (`peftsweep schedule`): continue the studies, tag peftsweep.nightly=<date>",
        ),
    ] = False,
) -> None:
    """Run a sweep: one Optuna study per method searched by Ray Tune, each trial a Ray Train job."""
    spec = _load(spec_path)
    from peftsweep.orchestrator.lock import SweepLocked
    from peftsweep.orchestrator.sweep import run_sweep

    try:
        result = run_sweep(spec, address=address, console=console, nightly=nightly)
    except SpecError as exc:
        err.print(f"[red]{exc}[/]", highlight=False)
        raise typer.Exit(2) from None
    except SweepLocked as exc:
        err.print(f"[red]{escape(str(exc))}[/]", highlight=False)
        raise typer.Exit(3) from None
    _exit_code(result)


@app.command()
def resume(
    spec_path: SpecArg,
    address: Annotated[str | None, typer.Option(help="Join this Ray cluster instead of starting one")] = None,
) -> None:
    """Continue a sweep whose driver died: finished trials are kept, the rest of each budget runs."""
    spec = _load(spec_path)
    from peftsweep.orchestrator.lock import SweepLocked
    from peftsweep.orchestrator.sweep import run_sweep

    try:
        result = run_sweep(spec, address=address, console=console, resume=True)
    except SpecError as exc:
        err.print(f"[red]{exc}[/]", highlight=False)
        raise typer.Exit(2) from None
    except SweepLocked as exc:
        err.print(f"[red]{escape(str(exc))}[/]", highlight=False)
        raise typer.Exit(3) from None
    _exit_code(result)


@app.command()
def validate(spec_path: SpecArg) -> None:
    """Check a spec and its data files without starting anything."""
    spec = _load(spec_path)
    from peftsweep.orchestrator.sweep import check_inputs

    try:
        counts = check_inputs(spec)
    except SpecError as exc:
        err.print(f"[red]{exc}[/]", highlight=False)
        raise typer.Exit(2) from None
    console.print(f"{spec_path}: ok ({len(spec.methods)} methods, tracking in {spec.tracking.root})")
    for section, rows in counts.items():
        split = ", ".join(f"{name} {n}" for name, n in rows.items())
        if section == "forgetting":  # general data is used whole, whatever its files' split
            split = f"{sum(rows.values())}"
        fmt = getattr(spec, section).format
        console.print(f"  {section}: {fmt}, {split} rows", highlight=False)
    console.print(f"  search.metric: {spec.search.metric} ({spec.search.direction})", highlight=False)


@app.command()
def methods() -> None:
    """List every PEFT method: its default search space, knobs, and whether it runs on this machine."""
    from rich.table import Table

    from peftsweep import search_spaces

    cuda = _cuda_available()
    table = Table(title="PEFT methods (defaults; override per method in the spec)")
    for col in ("method", "lr range", "ranks", "options", "runs here", "summary"):
        table.add_column(col)
    for name in search_spaces.method_names():
        m = search_spaces.get_method(name)
        why = m.rejection(None, cuda=cuda)
        here = "no: needs CUDA" if why else "yes"
        if m.unsupported:
            here += f" (not on {', '.join(sorted(m.unsupported))})"
        if m.max_zero_stage < 3:
            here += f" (ZeRO ≤ {m.max_zero_stage})"
        table.add_row(
            name,
            f"{m.lr_range[0]:g} … {m.lr_range[1]:g}",
            ", ".join(map(str, m.ranks)) if m.uses_rank else "-",
            ", ".join(f"{k}={v}" for k, v in m.options.items()) or "-",
            here,
            m.summary,
        )
    console.print(table)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@app.command()
def best(spec_path: SpecArg) -> None:
    """Show the registered champion: method, params, metric and where its adapter is."""
    spec = _load(spec_path)
    from peftsweep.orchestrator.champion import champion_info

    info = champion_info(spec)
    if info is None:
        store = _shown(spec.tracking.mlflow_tracking_uri())
        err.print(f"no champion registered yet for sweep {spec.name!r} in {store}")
        raise typer.Exit(1)
    for key, value in info.items():
        console.print(f"[bold]{key:>14}[/]: {value}", highlight=False)


@app.command()
def report(
    spec_path: SpecArg,
    out: Annotated[
        Path | None, typer.Option(help="Output directory; default: <tracking.root>/reports/<sweep run id>/")
    ] = None,
    run_id: Annotated[str | None, typer.Option(help="Sweep run to report; default: the latest")] = None,
) -> None:
    """Write the sweep's report: LR curves, method gaps over seeds, trial counts and compute, importances."""
    spec = _load(spec_path)
    from rich.table import Table

    from peftsweep.orchestrator.report import ReportError, build_report, gap_table, resolve_sweep_run

    try:
        sweep_run = resolve_sweep_run(spec, run_id)
        result = build_report(spec, out or spec.tracking.root / "reports" / sweep_run, sweep_run)
    except ReportError as exc:
        err.print(f"[red]{exc}[/]", highlight=False)
        raise typer.Exit(1) from None
    header, cells = gap_table(result)
    why = header.index("why")  # the test's numbers: under the table, where they have room
    table = Table(title=f"sweep {spec.name}: run {result.sweep_run_id} ({result.metric}, {result.direction})")
    for col in header[:why] + header[why + 1 :]:
        table.add_column(col, justify="left" if col in ("method", "verdict", "bracketed") else "right")
    for row in cells:
        table.add_row(*row[:why], *row[why + 1 :])
    console.print(table)
    for row in cells:
        console.print(f"  {row[0]}: {row[why]}", highlight=False)
    if result.finding:
        console.print(result.finding, highlight=False)
    for path in (result.markdown, result.html, result.lr_curves):
        console.print(f"  {path}", highlight=False)


@app.command()
def status(spec_path: SpecArg) -> None:
    """Trials per method (done, running, failed, left of the budget) and the best so far, from Optuna."""
    spec = _load(spec_path)
    from rich.table import Table

    from peftsweep.orchestrator.status import sweep_status

    if spec.tracking.optuna_storage is None and not (spec.tracking.root / "optuna.db").is_file():
        err.print(f"no sweep store at {spec.tracking.root / 'optuna.db'}: sweep {spec.name!r} has not run")
        raise typer.Exit(1)
    metric = spec.search.metric
    table = Table(title=f"sweep {spec.name}: {_shown(spec.tracking.optuna_storage_url())}")
    for col in ("method", "complete", "running", "failed", "pruned", "left", f"best {metric}", "best params"):
        table.add_column(col, justify="left" if col in ("method", "best params") else "right")
    rows = sweep_status(spec)
    for row in rows:
        table.add_row(
            row.method,
            *(str(n) for n in (row.complete, row.running, row.failed, row.pruned, row.remaining)),
            f"{row.best_value:.4f}" if row.best_value is not None else "-",
            ", ".join(_param(k, v) for k, v in row.best_params.items()) or "-",
        )
    if len(rows) > 1:  # the sweep at a glance, under one row per method (20 methods: 20 rows, then this)
        sign = 1 if spec.search.direction == "max" else -1
        scored = [r for r in rows if r.best_value is not None]
        best = max(scored, key=lambda r: sign * r.best_value, default=None)  # type: ignore[operator]
        sums = [
            sum(getattr(r, k) for r in rows) for k in ("complete", "running", "failed", "pruned", "remaining")
        ]
        table.add_section()
        table.add_row(
            f"all {len(rows)} methods",
            *(str(n) for n in sums),
            f"{best.best_value:.4f}" if best and best.best_value is not None else "-",
            f"{best.method}: " + ", ".join(_param(k, v) for k, v in best.best_params.items())
            if best
            else "-",
        )
    console.print(table)


@app.command()
def unlock(
    spec_path: SpecArg,
    force: Annotated[bool, typer.Option("--force", help="Delete without asking")] = False,
) -> None:
    """Clear the sweep's lock left by a run that is gone (a live run's lock keeps a second driver out)."""
    spec = _load(spec_path)
    from peftsweep.orchestrator.lock import delete_lock, read_lock

    no_store = spec.tracking.optuna_storage is None and not (spec.tracking.root / "optuna.db").is_file()
    holder = None if no_store else read_lock(spec)
    if holder is None:
        typer.echo(f"sweep {spec.name!r} is not locked")
        return
    typer.echo(f"sweep {spec.name!r} is locked by {holder.describe()}")
    if not force and not typer.confirm("Delete the lock? Only if that run is gone"):
        raise typer.Exit(1)
    if not delete_lock(spec, holder.token):
        err.print("the lock changed meanwhile (released, or taken by another run): nothing deleted")
        raise typer.Exit(1)
    typer.echo(f"deleted the lock of sweep {spec.name!r}")


def _param(key: str, value: object) -> str:
    return f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"


@app.command()
def ui(
    spec_path: SpecArg,
    port: Annotated[int, typer.Option(help="Port of the MLflow UI")] = 5000,
    host: Annotated[
        str, typer.Option(help="Interface to bind; keep 127.0.0.1 unless you mean it")
    ] = "127.0.0.1",
    optuna: Annotated[bool, typer.Option("--optuna", help="optuna-dashboard on the studies instead")] = False,
) -> None:
    """Serve the MLflow UI for the sweep's tracking store (--optuna: optuna-dashboard on its studies)."""
    spec = _load(spec_path)
    if optuna:
        storage = spec.tracking.optuna_storage_url()
        console.print(f"optuna-dashboard for {_shown(storage)} on http://{host}:{port} (Ctrl-C to stop)")
        from optuna_dashboard import run_server

        run_server(storage, host=host, port=port)
        return
    uri = spec.tracking.mlflow_tracking_uri()
    if uri.startswith(("http://", "https://")):  # a tracking server (`peftsweep tracking serve`) is the UI
        console.print(f"the sweep tracks to an MLflow server; its UI is {_shown(uri)}")
        return
    console.print(f"MLflow UI for {_shown(uri)} on http://{host}:{port} (Ctrl-C to stop)")
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
    ]
    raise typer.Exit(subprocess.call(cmd, env=os.environ.copy()))


# ----------------------------------------------------------------------------------- clusters, schedules

cluster_app = typer.Typer(
    help="Cluster templates sized from a spec: Ray autoscaler, KubeRay RayCluster/RayJob, MLflow server.",
    no_args_is_help=True,
)
app.add_typer(cluster_app, name="cluster")

ImageOpt = Annotated[
    str | None,
    typer.Option(help="Container image (must contain peftsweep); default: the installed Ray's Ray image"),
]


@cluster_app.command("template")
def cluster_template(
    kind: Annotated[
        Kind,
        typer.Argument(
            help="autoscaler: `ray up` config (AWS); raycluster, rayjob: KubeRay; tracking: MLflow"
        ),
    ],
    spec_path: SpecArg,
    out: Annotated[
        Path | None, typer.Option(help="Write <DIR>/<sweep>-<kind>.yaml instead of printing it")
    ] = None,
    image: ImageOpt = None,
) -> None:
    """Write a cluster template for the sweep, its GPUs and CPUs sized from the spec's resources."""
    spec = _load(spec_path)
    from peftsweep.cluster.templates import render

    text = render(kind, spec, spec_path, image=image)
    if out is None:
        typer.echo(text, nl=False)
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{spec.name}-{kind.value}.yaml"
    path.write_text(text)
    typer.echo(f"{path} (replace every CHANGEME in it before use)")


@app.command()
def schedule(
    spec_path: SpecArg,
    cron: Annotated[
        str | None, typer.Option(help='When, as 5 cron fields, e.g. "0 2 * * *" (02:00 every day)')
    ] = None,
    crontab_file: Annotated[
        Path | None, typer.Option(help="Edit this file instead of your crontab (`crontab -l` / `crontab -`)")
    ] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Delete the sweep's entry instead")] = False,
    k8s: Annotated[
        bool, typer.Option("--k8s", help="Print a Kubernetes CronJob (with the spec's ConfigMap) instead")
    ] = False,
    image: ImageOpt = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster the nightly run joins; default: embedded, or with --k8s the raycluster"
        ),
    ] = None,
) -> None:
    """Run the sweep every night (`peftsweep run --nightly`): one crontab entry per sweep, or a CronJob."""
    spec = _load(spec_path)
    from peftsweep.cluster import schedule as sched

    where = str(crontab_file) if crontab_file else "your crontab"
    try:
        if remove:
            if k8s:
                raise sched.ScheduleError("--remove edits a crontab; for --k8s use `kubectl delete cronjob`")
            found = sched.remove(spec.name, crontab_file)
            said = f"removed sweep {spec.name!r} from" if found else f"no entry for sweep {spec.name!r} in"
            typer.echo(f"{said} {where}")
            return
        if cron is None:
            raise sched.ScheduleError('--cron is required, e.g. --cron "0 2 * * *"')
        if k8s:
            typer.echo(sched.render_cronjob(spec, spec_path, cron, image=image, address=address), nl=False)
            return
        entry = sched.nightly_entry(spec, spec_path, cron, address=address)
        sched.install(entry, crontab_file)
    except sched.ScheduleError as exc:
        err.print(f"[red]{exc}[/]", highlight=False)
        raise typer.Exit(2) from None
    typer.echo(f"scheduled sweep {spec.name!r} in {where}:")
    for line in entry.lines:
        typer.echo(f"  {line}")


# ----------------------------------------------------------------------------------- Ray Jobs

JobsAddress = Annotated[
    str | None,
    typer.Option(
        help="The cluster's dashboard (Jobs API), e.g. http://HEAD:8265; default: $RAY_API_SERVER_ADDRESS "
        "or $RAY_ADDRESS"
    ),
]
JobArg = Annotated[str, typer.Argument(help="The job id `peftsweep submit` printed")]


def _job_call(fn: object, *args: object, **kwargs: object) -> object:
    """Run a Jobs API call; a refused connection or unknown job becomes one red line and exit 2."""
    try:
        return fn(*args, **kwargs)  # type: ignore[operator]
    except (ConnectionError, RuntimeError, ValueError) as exc:
        err.print(f"[red]{escape(str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc))}[/]")
        raise typer.Exit(2) from None


@app.command()
def submit(
    spec_path: SpecArg,
    address: JobsAddress = None,
    nightly: Annotated[bool, typer.Option("--nightly", help="A nightly run (`run --nightly`)")] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue a stopped or dead sweep (`peftsweep resume`)")
    ] = False,
    ship_package: Annotated[
        bool,
        typer.Option(help="Upload this install's peftsweep with the job (off: use the cluster's own)"),
    ] = True,
    env: Annotated[
        list[str] | None,
        typer.Option(help="Pass this shell's variable to the job (repeatable), e.g. --env PGPASSWORD"),
    ] = None,
    job_id: Annotated[str | None, typer.Option(help="Job id; default: peftsweep-<name>-<time>")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Stream the job's logs until it ends")] = False,
) -> None:
    """Send the sweep to a Ray cluster as a Ray Job; its driver runs on the head node."""
    spec = _load(spec_path)
    from peftsweep.cluster import jobs

    job = _job_call(
        jobs.submit,
        spec,
        address,
        nightly=nightly,
        resume=resume,
        ship_package=ship_package,
        env=env or (),
        job_id=job_id,
    )
    typer.echo(f"submitted {job}")
    if not follow:
        typer.echo(f"  follow: peftsweep logs {job} --follow    stop: peftsweep stop {job}")
        return
    _finish_follow(address, str(job))


def _finish_follow(address: str | None, job: str) -> None:
    from peftsweep.cluster import jobs

    status = str(_job_call(jobs.follow, address, job))
    typer.echo(f"job {job}: {status}")
    raise typer.Exit(jobs.EXIT_CODES.get(status, 1))


@app.command()
def logs(
    job: JobArg,
    address: JobsAddress = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream until the job ends; exit 0 if it succeeded")
    ] = False,
) -> None:
    """Print a submitted sweep's logs (its driver's output)."""
    from peftsweep.cluster import jobs

    if follow:
        _finish_follow(address, job)
    client = _job_call(jobs.client, address)
    typer.echo(_job_call(client.get_job_logs, job), nl=False)  # type: ignore[attr-defined]
    typer.echo(f"job {job}: {_job_call(client.get_job_status, job).value}")  # type: ignore[attr-defined]


@app.command()
def stop(job: JobArg, address: JobsAddress = None) -> None:
    """Stop a submitted sweep. Its finished trials are kept: `peftsweep submit SPEC --resume` continues."""
    from peftsweep.cluster import jobs

    client = _job_call(jobs.client, address)
    stopped = _job_call(client.stop_job, job)  # type: ignore[attr-defined]
    typer.echo(f"{'stopping' if stopped else 'already ended:'} {job}")


# ----------------------------------------------------------------------------------- tracking server

tracking_app = typer.Typer(help="The tracking server that many nodes and users share.", no_args_is_help=True)
app.add_typer(tracking_app, name="tracking")


@tracking_app.command("serve")
def tracking_serve(
    backend_store_uri: Annotated[
        str, typer.Option(help="Runs and registry: postgresql://USER@HOST:5432/mlflow (its own database)")
    ],
    artifacts_destination: Annotated[
        str, typer.Option(help="Where adapters are stored: a path every reader can reach, or s3://BUCKET/…")
    ],
    host: Annotated[
        str,
        typer.Option(help="Interface to bind; beyond loopback (0.0.0.0) only with MLFLOW_TRACKING_PASSWORD"),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the server (and of its UI)")] = 5000,
    workers: Annotated[int, typer.Option(help="Server processes")] = 2,
    allowed_hosts: Annotated[
        str | None,
        typer.Option(help="Host headers to accept (MLflow's DNS-rebinding guard), e.g. 'mlflow.internal:*'"),
    ] = None,
) -> None:
    """Run an MLflow tracking server for many writers: a database backend, artifacts proxied by the server.

    Point the spec at it with tracking.mlflow_uri: http://HOST:PORT, and tracking.optuna_storage at another
    database on the same Postgres. Clients then need no access to the artifact store themselves.
    """
    if backend_store_uri.startswith("sqlite") or "://" not in backend_store_uri:
        err.print("[red]--backend-store-uri: a shared server needs a database server (postgresql://…)[/]")
        raise typer.Exit(2)
    from peftsweep.cluster import tracking_server as ts

    try:
        env = ts.server_env(host, os.environ)
    except ts.ExposureError as exc:
        err.print(f"[red]{escape(str(exc))}[/]", highlight=False)
        raise typer.Exit(2) from None
    auth = ts.auth_configured(env)
    cmd = ts.server_command(
        backend_store_uri,
        artifacts_destination,
        host=host,
        port=port,
        workers=workers,
        allowed_hosts=allowed_hosts,
        auth=auth,
    )
    login = " with basic auth" if auth else " without authentication (loopback only)"
    console.print(
        f"MLflow server for {_shown(backend_store_uri)} on http://{host}:{port}{login} (Ctrl-C to stop)"
    )
    raise typer.Exit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    app()
