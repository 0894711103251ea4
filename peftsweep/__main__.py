"""`python -m peftsweep …`: the CLI, for Ray Job entrypoints where the console script may not be on PATH."""

from peftsweep.cli import app

app(prog_name="peftsweep")
