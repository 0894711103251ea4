"""Keep secrets out of MLflow: what a sweep records is shared (UI, registry, artifacts); its tokens are not.

Why: a sweep's spec and errors carry what the environment handed them — an ``HF_TOKEN`` in a traceback, a
database password in ``tracking.optuna_storage`` — and an MLflow store keeps them forever, readable by anyone
who can browse it. Every write of text to MLflow goes through `RedactingClient`, which masks

- the values of environment variables with secret-looking names (``HF_TOKEN``, ``PGPASSWORD``...),
- the password of any URL with userinfo (``postgresql://user:***@host/db``, even with an unencoded ``@``),
- secret-named URL query parameters (``?token=***``, ``&sig=***``), ``Authorization``/``Bearer`` credentials,
  and ``name=value`` pairs under secret names (libpq's ``host=db password=***``),
- whatever sits under a secret-looking key (a param, a tag, a dict entry: ``api_key`` → ``***``).

The CLI prints its errors through the same rules (``peftsweep/cli_redact.py``).

Files logged with ``log_artifact(s)`` are copied byte for byte (adapters are binary): text that may hold
secrets is logged with ``log_text``/``log_dict`` (the spec, summaries, errors), or redacted by its writer
before it is written (the report). Names are matched conservatively: a false positive only masks a value.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient

MASK = "***"
# A name component that is, or ends with, one of these marks a secret (`HF_TOKEN`, `PGPASSWORD`, `HFTOKEN`,
# `SECRETKEY`). Singular on purpose: `max_new_tokens`, `sort_keys` are not secrets.
SECRET_WORDS = frozenset(
    {"token", "key", "secret", "password", "passwd", "pwd", "credential", "credentials", "passphrase"}
)
# A name's *last* component that is one of these marks a secret too (`DB_PASS`); first or inside it does not
# (`pass_at_k`, `pass_k` are metrics).
SECRET_LAST_WORDS = frozenset({"pass"})
# URL query parameters that carry a credential although their names are not secret words (Azure SAS `sig`,
# S3 presigned `X-Amz-Signature`).
SECRET_QUERY_NAMES = frozenset({"sig", "signature", "x-amz-signature", "auth"})
# Shell variables whose names match but which hold the working directory, not a password: masking them
# would blank every local path in the store.
NOT_SECRET_ENV = frozenset({"PWD", "OLDPWD"})
# Shorter values (`1`, `true`, `hf`) are ordinary words: masking them everywhere would garble the record,
# and no real credential is that short.
MIN_SECRET_LEN = 6

_NAME_PARTS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")  # HF_TOKEN, apiKey, APIKey, key2
# scheme://user:password@host — greedy up to the last @ before the path: a password with an unencoded @
# (`u:p@ss@host`) is masked whole; RFC 3986 says to encode it, but people paste what they have.
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*:)(?P<password>[^\s/?#]+)@")
# ?name=value / &name=value in a URL
_QUERY_PARAM = re.compile(r"(?P<head>[?&;](?P<name>[^=&#\s]+)=)(?P<value>[^&#\s'\"]+)")
# `Authorization: Bearer abc`, `authorization=Basic abc`, `Bearer abc` alone (a header pasted into an error)
_AUTH_HEADER = re.compile(
    r"(?P<head>\bauthorization[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token|digest)\s+)?)(?P<value>[^\s\"',]+)"
    r"|(?P<head2>\bbearer\s+)(?P<value2>[A-Za-z0-9._~+/=-]{6,})",
    re.IGNORECASE,
)
# name=value pairs (libpq DSNs `host=x password=y`, `PGPASSWORD=y` in a command line) and quoted "name": value
# pairs (JSON, a dict's repr). A bare `name: value` is left alone: reports say `token_f1: 0.51`.
_NAMED_VALUE = re.compile(
    r"(?P<head>(?P<q>[\"'])(?P<qname>[A-Za-z_][\w.-]*)(?P=q)\s*:\s*|\b(?P<name>[A-Za-z_][\w.-]*)\s*=\s*)"
    r"(?P<value>'[^']*'|\"[^\"]*\"|(?![\"'])[^\s&;,'\"]+)"
)
# A plain number under a token/key name is a count or a score (`max_tokens=5`, `token_f1=0.5`), never one of
# those credentials; under a password name it may well be the password.
_NUMBER = re.compile(r"[\"']?[-+]?\d+(\.\d*)?([eE][-+]?\d+)?[\"']?")
_PASSWORD_PARTS = ("pass", "pwd")


def is_secret_name(name: str) -> bool:
    """Whether a variable, field or key name looks like it holds a secret (see `SECRET_WORDS`)."""
    parts = [part.lower() for part in _NAME_PARTS.findall(name)]
    return bool(parts) and (
        parts[-1] in SECRET_LAST_WORDS or any(part.endswith(w) for part in parts for w in SECRET_WORDS)
    )


def _mask_named(m: re.Match[str]) -> str:
    name, value = m["name"] or m["qname"], m["value"]
    if not is_secret_name(name) or value.startswith(("[", "{")) or "://" in value:
        return m[0]  # a URL's password is the URL rule's; a structure is data(), not text
    if _NUMBER.fullmatch(value) and not any(p in name.lower() for p in _PASSWORD_PARTS):
        return m[0]
    quote_char = value[0] if value[0] in "'\"" else ""
    return f"{m['head']}{quote_char}{MASK}{quote_char}"


def _mask_query(m: re.Match[str]) -> str:
    name = m["name"]
    secret = is_secret_name(name) or name.lower() in SECRET_QUERY_NAMES
    return f"{m['head']}{MASK}" if secret else m[0]


def _mask_auth(m: re.Match[str]) -> str:
    return f"{m['head'] or m['head2']}{MASK}"


class Redactor:
    """Masks secrets in text and in nested data. The environment is read once, when it is built."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        values = {
            value
            for name, value in env.items()
            if is_secret_name(name) and name not in NOT_SECRET_ENV and len(value) >= MIN_SECRET_LEN
        }
        values |= {quote(v, safe="") for v in values}  # the same secret as it appears inside a URL
        # Longest first: a secret that contains another is masked whole, not around the shorter one.
        alternatives = sorted(values, key=len, reverse=True)
        self._values = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def text(self, s: str) -> str:
        """`s` with known secret values, URL passwords and secret-named values replaced by ``***``."""
        if self._values is not None:
            s = self._values.sub(MASK, s)
        s = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@", s)
        s = _QUERY_PARAM.sub(_mask_query, s)
        s = _AUTH_HEADER.sub(_mask_auth, s)
        return _NAMED_VALUE.sub(_mask_named, s)

    def value(self, key: str, value: Any) -> Any:
        """A key's value as it may be recorded: masked whole under a secret name; numbers and None as is."""
        if value is None:
            return None
        if is_secret_name(key):
            return MASK
        if isinstance(value, bool | int | float):
            return value
        return self.text(value if isinstance(value, str) else str(value))  # MLflow stringifies it anyway

    def data(self, obj: Any) -> Any:
        """A copy of nested dicts/lists/tuples with secret-keyed values masked and every string redacted.

        Other leaves are returned as they are (MLflow's JSON writer stringifies them without redaction).
        """
        if isinstance(obj, Mapping):
            return {
                k: (MASK if isinstance(k, str) and is_secret_name(k) and v is not None else self.data(v))
                for k, v in obj.items()
            }
        if isinstance(obj, list | tuple):
            items = [self.data(v) for v in obj]
            return obj._make(items) if hasattr(obj, "_make") else type(obj)(items)  # _make: a namedtuple
        if isinstance(obj, str):
            return self.text(obj)
        return obj

    def tags(self, tags: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """A tag dict (key → value) as it may be recorded."""
        return None if tags is None else {k: self.value(k, v) for k, v in tags.items()}


class RedactingClient(MlflowClient):
    """An `MlflowClient` whose writes of params, tags, names, descriptions, text and dicts are redacted.

    Reads, metrics and ``log_artifact(s)`` are untouched. Methods with long or version-dependent signatures
    take ``*args, **kwargs`` and bind them against MLflow's own signature, so any call that MLflow accepts
    is accepted here too.
    """

    def __init__(self, *args: Any, redactor: Redactor | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.redactor = redactor or Redactor()

    def _call(
        self, method: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any], **rewrite: Any
    ) -> Any:
        """Call MLflow's `method` with the named arguments in `rewrite` passed through their functions."""
        bound = inspect.signature(method).bind(self, *args, **kwargs)
        for name, fn in rewrite.items():
            if bound.arguments.get(name) is not None:
                bound.arguments[name] = fn(bound.arguments[name])
        return method(*bound.args, **bound.kwargs)

    def _run_tags(self, tags: Iterable[RunTag]) -> list[RunTag]:
        return [RunTag(t.key, self.redactor.value(t.key, t.value)) for t in tags]

    # --- runs
    def create_run(self, *args: Any, **kwargs: Any) -> Any:
        r = self.redactor
        return self._call(MlflowClient.create_run, args, kwargs, tags=r.tags, run_name=r.text)

    def update_run(self, run_id: str, status: str | None = None, name: str | None = None) -> None:
        super().update_run(run_id, status=status, name=None if name is None else self.redactor.text(name))

    def log_param(self, run_id: str, key: str, value: Any, synchronous: bool | None = None) -> Any:
        return super().log_param(run_id, key, self.redactor.value(key, value), synchronous=synchronous)

    def set_tag(self, run_id: str, key: str, value: Any, synchronous: bool | None = None) -> Any:
        return super().set_tag(run_id, key, self.redactor.value(key, value), synchronous=synchronous)

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[Any] = (),
        params: Sequence[Param] = (),
        tags: Sequence[RunTag] = (),
        synchronous: bool | None = None,
    ) -> Any:
        params = [Param(p.key, self.redactor.value(p.key, p.value)) for p in params]
        return super().log_batch(run_id, metrics, params, self._run_tags(tags), synchronous=synchronous)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        super().log_text(run_id, self.redactor.text(text), artifact_file)

    def log_dict(self, run_id: str, dictionary: dict[str, Any], artifact_file: str) -> None:
        super().log_dict(run_id, self.redactor.data(dictionary), artifact_file)

    # --- experiments
    def create_experiment(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(MlflowClient.create_experiment, args, kwargs, tags=self.redactor.tags)

    def set_experiment_tag(self, experiment_id: str, key: str, value: Any) -> None:
        super().set_experiment_tag(experiment_id, key, self.redactor.value(key, value))

    # --- registry
    def create_registered_model(self, *args: Any, **kwargs: Any) -> Any:
        r = self.redactor
        return self._call(MlflowClient.create_registered_model, args, kwargs, tags=r.tags, description=r.text)

    def update_registered_model(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(MlflowClient.update_registered_model, args, kwargs, description=self.redactor.text)

    def set_registered_model_tag(self, name: str, key: str, value: Any) -> None:
        super().set_registered_model_tag(name, key, self.redactor.value(key, value))

    def create_model_version(self, *args: Any, **kwargs: Any) -> Any:
        r = self.redactor
        return self._call(MlflowClient.create_model_version, args, kwargs, tags=r.tags, description=r.text)

    def update_model_version(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(MlflowClient.update_model_version, args, kwargs, description=self.redactor.text)

    def set_model_version_tag(self, *args: Any, **kwargs: Any) -> None:
        bound = inspect.signature(MlflowClient.set_model_version_tag).bind(self, *args, **kwargs)
        key = bound.arguments.get("key")
        if key is not None:
            bound.arguments["value"] = self.redactor.value(key, bound.arguments.get("value"))
        MlflowClient.set_model_version_tag(*bound.args, **bound.kwargs)
