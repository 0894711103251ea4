"""Nightly sweeps: a crontab entry on this machine, or a Kubernetes CronJob beside the cluster templates.

Each night runs `peftsweep run --nightly SPEC`; running a spec again adds trials to the same per-method
studies, and the champion gate decides whether the registered model changes. One entry per sweep name:
scheduling again replaces it.
The cron expression is checked here, before anything is written, with the fields both cron and Kubernetes
accept, so a schedule that works in a crontab also works in a CronJob.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from peftsweep.cluster import templates
from peftsweep.spec import SweepSpec

MARKER = "# peftsweep:"  # the comment line above a sweep's entry: `# peftsweep:<sweep name>`

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# (field, lowest, highest, names that may stand for the whole field). Day of week stops at 6: cron also
# takes 7 for Sunday, Kubernetes' parser does not.
_FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 6, _DAYS),
)
_NUMBER = re.compile(r"[0-9]+")


class ScheduleError(ValueError):
    """A schedule that cannot be installed; the message says what to change."""


def validate_cron(expr: str) -> str:
    """The expression with single spaces, or ScheduleError naming the field at fault.

    Five fields (minute hour day-of-month month day-of-week) of `*`, numbers, ranges `a-b`, steps `*/n` and
    `a-b/n`, and comma lists; month and weekday names (`jan`, `mon`) stand alone. No `@daily` macros.
    """
    fields = expr.split()
    if len(fields) != len(_FIELDS):
        raise ScheduleError(
            f"cron expression {expr!r} needs 5 fields, got {len(fields)}: "
            "minute hour day-of-month month day-of-week, e.g. '0 2 * * *' for 02:00 every day"
        )
    for text, (name, low, high, names) in zip(fields, _FIELDS, strict=True):
        problem = _field_problem(text, low, high, names)
        if problem:
            raise ScheduleError(f"cron expression {expr!r}: {name} {text!r}: {problem}")
    return " ".join(fields)


def _field_problem(text: str, low: int, high: int, names: tuple[str, ...]) -> str | None:
    if names and text.lower() in names:
        return None
    for part in text.split(","):
        base, slash, step = part.partition("/")
        if slash and not (_NUMBER.fullmatch(step) and int(step) >= 1):
            return f"step {step!r} must be a positive number"
        if base == "*":
            continue
        first, dash, last = base.partition("-")
        if not dash and slash:
            return f"a step needs '*' or a range before it ({part!r})"
        for value in (first, last) if dash else (first,):
            if not _NUMBER.fullmatch(value):
                hint = f"; names ({names[0]}, {names[1]}, …) only stand alone" if names else ""
                return f"{value!r} is not a number{hint}"
            if not low <= int(value) <= high:
                return f"{value} is outside {low}-{high}"
        if dash and int(first) > int(last):
            return f"range {base!r} runs backwards"
    return None


@dataclass(frozen=True)
class CronEntry:
    """A sweep's two crontab lines: the marker comment, then the schedule and command."""

    name: str
    schedule: str
    command: str

    @property
    def lines(self) -> list[str]:
        # cron turns an unescaped % into a newline; `\%` reaches the shell as %
        return [f"{MARKER}{self.name}", f"{self.schedule} {self.command.replace('%', chr(92) + '%')}"]


def nightly_entry(spec: SweepSpec, spec_path: Path, schedule: str, address: str | None = None) -> CronEntry:
    """Run the sweep from this directory (relative tracking and data paths resolve as they do when you run it
    by hand), with this install's peftsweep, its output appended to `<tracking.root>/nightly-<name>.log`."""
    root = spec.tracking.root
    run = [peftsweep_executable(), "run", "--nightly", str(Path(spec_path).resolve())]
    run += ["--address", address] if address else []
    command = (
        f"cd {shlex.quote(str(Path.cwd()))} && mkdir -p {shlex.quote(str(root))} && {shlex.join(run)}"
        f" >> {shlex.quote(str(root / f'nightly-{spec.name}.log'))} 2>&1"
    )
    if "\n" in command:
        raise ScheduleError("a path in the nightly command contains a newline, which a crontab cannot hold")
    return CronEntry(spec.name, validate_cron(schedule), command)


def peftsweep_executable() -> str:
    """The `peftsweep` beside this interpreter (a virtualenv's bin/), so cron runs this very install."""
    beside = Path(sys.executable).parent / "peftsweep"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside.absolute())
    found = shutil.which("peftsweep")
    if found is None:
        raise ScheduleError(f"no peftsweep executable beside {sys.executable} or on PATH")
    return str(Path(found).absolute())


def install(entry: CronEntry, crontab_file: Path | None = None) -> None:
    """Put the entry into the user's crontab (or `crontab_file`), replacing this sweep's previous one."""
    lines, _ = _without(read_crontab(crontab_file), entry.name)
    write_crontab([*lines, *entry.lines], crontab_file)


def remove(name: str, crontab_file: Path | None = None) -> bool:
    """Delete sweep `name`'s entry; False (and nothing written) when there was none."""
    lines, found = _without(read_crontab(crontab_file), name)
    if found:
        write_crontab(lines, crontab_file)
    return found


def _without(text: str, name: str) -> tuple[list[str], bool]:
    """The crontab's lines minus sweep `name`'s marker and the schedule line under it."""
    lines, out, found, i = text.splitlines(), [], False, 0
    while i < len(lines):
        if lines[i].strip() == f"{MARKER}{name}":
            found, i = True, i + 1
            if i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith("#"):
                i += 1  # the entry itself (unless someone deleted it and left the marker)
            continue
        out.append(lines[i])
        i += 1
    return out, found


def read_crontab(crontab_file: Path | None = None) -> str:
    if crontab_file is not None:
        return crontab_file.read_text() if crontab_file.exists() else ""
    result = subprocess.run([_crontab(), "-l"], capture_output=True, text=True)
    if result.returncode != 0:
        if "no crontab" in result.stderr.lower():
            return ""
        raise ScheduleError(f"crontab -l failed: {result.stderr.strip()}")
    return result.stdout


def write_crontab(lines: list[str], crontab_file: Path | None = None) -> None:
    text = "\n".join(lines) + "\n" if lines else ""  # cron ignores a last line without its newline
    if crontab_file is None:
        result = subprocess.run([_crontab(), "-"], input=text, capture_output=True, text=True)
        if result.returncode != 0:
            raise ScheduleError(f"crontab - failed: {result.stderr.strip()}")
        return
    # write beside it, then rename: a crontab file is never seen half-written
    crontab_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=crontab_file.parent, prefix=f".{crontab_file.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, crontab_file.stat().st_mode if crontab_file.exists() else 0o644)  # mkstemp's is 0600
    os.replace(tmp, crontab_file)


def _crontab() -> str:
    found = shutil.which("crontab")
    if found is None:
        raise ScheduleError("no `crontab` command here: use --crontab-file PATH, or --k8s for a CronJob")
    return found


def render_cronjob(
    spec: SweepSpec, spec_path: Path, schedule: str, image: str | None = None, address: str | None = None
) -> str:
    """A `batch/v1` CronJob (plus the spec's ConfigMap and the shared runs volume, as the RayJob template has)
    whose pod runs the nightly sweep against the `raycluster` template's cluster (or `address`)."""
    schedule = validate_cron(schedule)
    image = image or templates.default_image(spec)
    command = ["peftsweep", "run", "--nightly", templates.SPEC_FILE, "--address"]
    command.append(address or templates.head_service(spec))
    header, (cron_job,) = templates.load_asset("cronjob.yaml")
    name = f"{templates.k8s_name(spec)[:44].rstrip('-')}-nightly"  # CronJob names stop at 52 characters
    cron_job["metadata"] = {"name": name, "labels": templates.labels(spec)}
    cron_job["spec"]["schedule"] = schedule
    job = cron_job["spec"]["jobTemplate"]["spec"]
    job["template"] = {"metadata": {"labels": templates.labels(spec)}, **job["template"]}
    pod = templates.driver_pod(spec, job["template"]["spec"], image)
    pod["containers"][0]["command"] = command
    values = {
        "sweep": spec.name,
        "schedule": schedule,
        "command": shlex.join(command),
        "runs": templates.RUNS_DIR,
        "ray_version": templates.ray_version(),
    }
    docs = [*templates.shared_documents(spec, spec_path), cron_job]
    return templates.dump(templates.fill_header(header, **values), docs)
