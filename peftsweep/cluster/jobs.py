"""Send a sweep to a Ray cluster as a Ray Job, and follow or stop it (`peftsweep submit/logs/stop`).

The job's driver is `python -m peftsweep run spec.yaml --address auto` on the head node. Its runtime_env
carries the spec (resolved: absolute tracking and data paths, so the job sees the same places) and, unless
told otherwise, this install's peftsweep package, so the cluster runs the code that validated the spec.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

import peftsweep
from peftsweep.spec import SweepSpec

SPEC_FILE = "spec.yaml"  # the spec's name inside the job's working_dir
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")  # ray.job_submission.JobStatus values that end a job
# What `logs --follow` returns for a job's final status: 0 like a successful `peftsweep run`.
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 4}
# A freshly started head answers "No available agent to submit job" until its job agent registers (seconds).
AGENT_WAIT_S = 60.0


def client(address: str | None) -> Any:
    """A JobSubmissionClient for the dashboard at `address` (default: RAY_API_SERVER_ADDRESS/RAY_ADDRESS).

    With token authentication on (Ray's default) the client sends the token from RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, like the `ray` CLI.
    """
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def job_spec(spec: SweepSpec) -> dict[str, Any]:
    """The spec as the job loads it: every local path is already absolute (`spec.parse_spec`), which the job
    needs, since its working directory is a copy of its runtime_env."""
    return spec.model_dump(mode="json")


def submit(
    spec: SweepSpec,
    address: str | None,
    *,
    nightly: bool = False,
    resume: bool = False,
    ship_package: bool = True,
    env: Iterable[str] = (),
    job_id: str | None = None,
) -> str:
    """Submit the sweep as a Ray Job; return its id. `env`: names of variables of this shell to pass on
    (e.g. PGPASSWORD, so no password sits in the spec)."""
    missing = [name for name in env if name not in os.environ]
    if missing:
        raise ValueError(f"--env {', '.join(missing)}: not set in this shell")
    if resume and nightly:
        raise ValueError("--resume continues the latest run; it cannot also be a new --nightly run")
    stage = Path(tempfile.mkdtemp(prefix="peftsweep-job-"))
    try:
        (stage / SPEC_FILE).write_text(yaml.safe_dump(job_spec(spec), sort_keys=False))
        runtime_env: dict[str, Any] = {
            "working_dir": str(stage),
            "env_vars": {name: os.environ[name] for name in env} | {"PYTHONUNBUFFERED": "1"},
        }
        if ship_package:
            runtime_env["py_modules"] = [str(Path(peftsweep.__file__).parent)]
            runtime_env["excludes"] = ["__pycache__", "*.pyc"]
        command = "resume" if resume else "run" + (" --nightly" if nightly else "")
        entrypoint = f"python -m peftsweep {command} {SPEC_FILE} --address auto"
        jobs = client(address)
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return jobs.submit_job(
                    entrypoint=entrypoint,
                    runtime_env=runtime_env,
                    submission_id=job_id or f"peftsweep-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                    metadata={"peftsweep.sweep": spec.name},
                )
            except RuntimeError as exc:  # a head that just started has no job agent yet: HTTP 500
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(2.0)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # uploaded by submit_job; nothing else reads it


def follow(address: str | None, job_id: str, out: Any = sys.stdout) -> str:
    """Stream the job's logs until it ends; return its final status."""
    jobs = client(address)

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    status = str(jobs.get_job_status(job_id).value)
    while status not in TERMINAL:  # the log stream can close a moment before the status settles
        time.sleep(1.0)
        status = str(jobs.get_job_status(job_id).value)
    return status
