"""What the CLI prints on stderr passes through the same secret redaction as what a sweep records.

Why: error messages quote their inputs: a spec error echoes a tracking URI with its password, a refused
connection names the URL it tried, a library's exception may carry a DSN. A terminal is scrollback, CI logs
and screen shares. The redactor (and MLflow, which its module imports) is loaded only when an error is
printed, so ``peftsweep --help`` and a valid spec's validation stay fast.
"""

from __future__ import annotations

import functools
import sys
import traceback
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from peftsweep.orchestrator.redact import Redactor


@functools.cache
def _redactor() -> Redactor:
    from peftsweep.orchestrator.redact import Redactor

    return Redactor()


def redact(text: str) -> str:
    """``text`` with secrets (environment values, URL passwords, secret-named values) masked."""
    return _redactor().text(text)


class RedactingConsole(Console):
    """A rich console whose string arguments are redacted before they are rendered."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(redact(o) if isinstance(o, str) else o for o in objects), **kwargs)


class RedactingTyper(typer.Typer):
    """A typer app whose uncaught exceptions print as a redacted traceback (exit 1), not verbatim."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:  # click's own errors and typer.Exit leave through SystemExit, untouched
            sys.stderr.write(redact("".join(traceback.format_exception(exc))))
            raise SystemExit(1) from None
