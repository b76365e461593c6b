"""One-line error reports for the bundles' command line, and the checks a run makes before training.

A user who feeds a bundle a bad file or a bad setting gets one line on stderr and a non-zero exit
status, never a traceback through MONAI's config machinery::

    retina_finetune: dataset error: /data/labels/vol3.tif: label values up to 7 but num_classes is 3 (expected 0..2)
    retina_finetune: config error: num_classes: expected an integer >= 1, got 'abc' (str)

The bundles' ``initialize`` lists call, first, :func:`report_errors` (installs the reporter), then
the cheap checks: :func:`check_config` (types and ranges of the settings),
:func:`check_output_dirs` (output folders writable, some free space) and
:func:`check_tracking_uri` (an MLflow server answers), then the dataset validation of
``custom.data.validate_items``. So every problem a user can cause is found in seconds, before
the first training iteration.

Reported as one line ``<bundle>: <kind> error: <path or setting>: <problem>``, wherever in the
exception chain they are (MONAI wraps them in ``RuntimeError("Failed to evaluate ...")``):

====================================================  ============
``custom.data.DatasetError``                          ``dataset``
``custom.checkpoints.CheckpointError``                ``checkpoint``
:class:`ConfigError`                                  ``config``
:class:`OutputError`                                  ``output``
:class:`TrackingError`                                ``tracking``
``custom.inference.InferenceError``                   ``inference``
``OSError`` naming a file (disk full, read-only...)   ``file``
====================================================  ============

Anything else is a bug, not a user error: its traceback is printed as usual. Set the environment
variable ``RETINA_TRACEBACK=1`` to get the full traceback of the reported errors too.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Optional

__all__ = [
    "ConfigError",
    "OutputError",
    "TrackingError",
    "report_errors",
    "one_line_error",
    "describe",
    "check_config",
    "check_output_dirs",
    "check_tracking_uri",
]

logger = logging.getLogger(__name__)

TRACEBACK_ENV = "RETINA_TRACEBACK"


class ConfigError(ValueError):
    """A setting that cannot work; the message is ``"<config id>: <problem>"``, one line."""


class OutputError(ConfigError):
    """An output folder that cannot be written (read-only, not a folder, disk full)."""


class TrackingError(ConfigError):
    """An experiment-tracking service that does not answer."""


# --------------------------------------------------------------------------------------
# the reporter
# --------------------------------------------------------------------------------------
def _kind(exc: BaseException) -> Optional[str]:
    """Kind name of a user-fixable error, or None."""
    from custom.checkpoints import CheckpointError
    from custom.data import DatasetError
    from custom.transunet import HeadMismatchError

    if isinstance(exc, TrackingError):
        return "tracking"
    if isinstance(exc, OutputError):
        return "output"
    if isinstance(exc, ConfigError):
        return "config"
    if isinstance(exc, DatasetError):
        return "dataset"
    if isinstance(exc, (CheckpointError, HeadMismatchError)):
        return "checkpoint"
    inference = sys.modules.get("custom.inference")
    if inference is not None and isinstance(exc, getattr(inference, "InferenceError", ())):
        return "inference"
    if isinstance(exc, OSError) and getattr(exc, "filename", None):
        return "file"
    return None


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and getattr(exc, "filename", None) and not isinstance(exc, ConfigError):
        return f"{exc.filename}: {exc.strerror or exc}"
    text = str(exc)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the original message
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        prefix = f"{type(exc).__name__}: "
        text = last.split(prefix, 1)[1] if prefix in last else last
    lines = [" ".join(line.split()) for line in text.splitlines()]
    out = ""
    for line in (line for line in lines if line):
        out += (" " if out.endswith(":") else "; ") + line if out else line
    return out or type(exc).__name__


def _chain(exc: BaseException):
    """``exc`` and its causes and contexts, outermost first, each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def describe(exc: BaseException) -> str:
    """One line for a failure: the message of the first user-fixable error in ``exc``'s chain (MONAI's
    ``RuntimeError("applying transform ...")`` wrappers hide it), else ``exc``'s own message."""
    for e in _chain(exc):
        if _kind(e) is not None:
            return _message(e)
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def one_line_error(exc: BaseException, bundle: str = "retina") -> Optional[str]:
    """``"<bundle>: <kind> error: <message>"`` for the first user-fixable error in ``exc``'s chain, else None."""
    for e in _chain(exc):
        kind = _kind(e)
        if kind is not None:
            return f"{bundle}: {kind} error: {_message(e)}"
    return None


def _install_record_factory() -> None:
    """Log records of known errors (e.g. MONAI's ``StatsHandler`` logging the exception that stops
    training, through a logger and handler of its own) keep their message but lose their traceback:
    the reporter prints the one line. A record factory sees every record of every logger."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_retina", False):
        return

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and not os.environ.get(TRACEBACK_ENV) and one_line_error(exc) is not None:
            record.exc_info, record.exc_text = None, None
        return record

    factory._retina = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def report_errors(bundle: str) -> bool:
    """Report user-fixable errors that end the program as one line on stderr (exit status 1).

    Installs a ``sys.excepthook`` (other exceptions go to the previous hook, traceback and all) and
    a log-record factory that drops the tracebacks of those errors from the log (the records stay).
    Idempotent; returns True so that a config's ``initialize`` list can call it.

    Args:
        bundle: name printed at the start of the line, e.g. ``"retina_finetune"``.
    """
    previous = getattr(sys.excepthook, "_retina_previous", sys.excepthook)

    def hook(etype, value, tb):
        line = one_line_error(value, bundle) if value is not None else None
        if line is None or os.environ.get(TRACEBACK_ENV):
            previous(etype, value, tb)
        if line is not None:
            sys.stdout.flush()
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    hook._retina_previous = previous  # type: ignore[attr-defined]
    sys.excepthook = hook
    _install_record_factory()
    return True


# --------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_SPECS = {
    "int": (_is_int, "an integer"),
    "int>0": (lambda v: _is_int(v) and v > 0, "an integer >= 1"),
    "int>=0": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "size": (lambda v: _is_int(v) and v > 0 and v % 16 == 0, "a positive multiple of 16"),
    "number": (_is_number, "a number"),
    "number>0": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "number>=0": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "fraction": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "overlap": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "bool": (lambda v: isinstance(v, bool), "True or False"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "numbers": (
        lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_number(x) for x in v),
        "a list of numbers such as [1.0, 2.0]",
    ),
}


def _check_one(value: Any, spec: Any) -> Optional[str]:
    """None when ``value`` satisfies ``spec``, else what was expected."""
    if isinstance(spec, (list, tuple, set)):  # choices
        return None if value in spec else f"one of {', '.join(repr(c) for c in spec)}"
    spec = str(spec)
    optional = spec.endswith("?")
    base = spec[:-1] if optional else spec
    if optional and value is None:
        return None
    if base not in _SPECS:
        raise ValueError(f"unknown check {spec!r} (known: {', '.join(sorted(_SPECS))}, a trailing '?' allows None)")
    ok, expected = _SPECS[base]
    if ok(value):
        return None
    return expected + (" or None" if optional else "")


def check_config(checks: Mapping[str, Sequence]) -> bool:
    """Check the types and ranges of settings; raise :class:`ConfigError` naming the first bad one.

    ``python -m monai.bundle run ... --num_classes abc`` passes the string ``"abc"`` on; without
    this check it fails much later with a ``TypeError`` deep in MONAI.

    Args:
        checks: ``{config id: [value, spec]}``; ``spec`` is one of ``"int"``, ``"int>0"``,
            ``"int>=0"``, ``"size"`` (positive multiple of 16), ``"number"``, ``"number>0"``,
            ``"number>=0"``, ``"fraction"`` ([0, 1]), ``"overlap"`` ([0, 1)), ``"bool"``,
            ``"str"``, ``"numbers"`` (non-empty list), each optionally followed by ``?`` (None
            allowed), or a list of allowed values. In a config:
            ``"config_checks": {"num_classes": ["@num_classes", "int>0"]}`` and
            ``"$custom.errors.check_config(@config_checks)"`` in ``initialize``.

    Returns:
        True.
    """
    for name, pair in checks.items():
        value, spec = pair
        expected = _check_one(value, spec)
        if expected is not None:
            base = None if isinstance(spec, (list, tuple, set)) else str(spec).rstrip("?")
            if base == "bool":  # fire passes --flag false / yes / 1 on as a string or an int
                fix = f"write --{name} True or --{name} False (capitalised: Python's literals)"
            else:
                fix = f"fix it in the config or on the command line (--{name} ...)"
            raise ConfigError(f"{name}: expected {expected}, got {value!r} ({type(value).__name__}); {fix}")
    return True


# --------------------------------------------------------------------------------------
# output folders
# --------------------------------------------------------------------------------------
def check_output_dirs(paths: Sequence[Any] | str | os.PathLike, min_free_mb: float = 0) -> bool:
    """Create each output folder and write (then remove) a small probe file in it.

    Raises :class:`OutputError` (``"<folder>: <problem>"``) when a folder cannot be created or
    written (read-only file system, no permission, a file in the way) or when its disk has less
    than ``min_free_mb`` MiB free. Returns True.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for p in paths:
        if p is None or p == "":
            continue
        folder = os.path.abspath(os.fspath(p))
        probe = os.path.join(folder, f".retina-write-test-{os.getpid()}")
        try:
            os.makedirs(folder, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            reason = e.strerror or type(e).__name__
            if e.filename and os.path.abspath(os.fspath(e.filename)) not in (folder, probe):
                reason += f" ({e.filename})"
            raise OutputError(
                f"{folder}: output folder cannot be written: {reason}; choose another folder "
                "(--bundle_root, --output_dir) or fix its permissions"
            ) from None
        finally:
            if os.path.exists(probe):
                try:
                    os.remove(probe)
                except OSError:
                    pass
        if min_free_mb and min_free_mb > 0:
            free = shutil.disk_usage(folder).free / 2**20
            if free < float(min_free_mb):
                raise OutputError(
                    f"{folder}: only {free:.0f} MiB free on its disk, {float(min_free_mb):g} MiB needed "
                    "(min_free_mb); free some space or choose another folder"
                )
    return True


# --------------------------------------------------------------------------------------
# experiment tracking
# --------------------------------------------------------------------------------------
def check_tracking_uri(uri: Optional[str], timeout: float = 5.0) -> bool:
    """Fail fast when an MLflow tracking server does not answer.

    ``http(s)://`` URIs get one request to the server's ``/health`` with a ``timeout``-second
    limit (any HTTP answer counts as reachable; proxies are honoured as MLflow honours them).
    Without this check MLflow retries for minutes when training starts, then fails. The folder of
    a local ``sqlite:///`` store is created and checked for writing; other schemes are left to MLflow.

    Raises:
        TrackingError: ``"<uri>: MLflow tracking server unreachable (<reason>); ..."``.
        OutputError: the folder of a local store cannot be written.
    """
    if not uri:
        return True
    uri = str(uri)
    low = uri.lower()
    if low.startswith(("http://", "https://")):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as e:
            reason = type(e).__name__
            root = e.__context__ or (e.args[0] if e.args else None)
            for part in (root, e):
                text = str(getattr(part, "reason", part) or "")
                if "refused" in text.lower():
                    reason = "connection refused"
                    break
                if "timed out" in text.lower() or isinstance(e, requests.Timeout):
                    reason = f"no answer within {timeout:g} s"
                    break
            raise TrackingError(
                f"{uri}: MLflow tracking server unreachable ({reason}); start it, pass another --tracking_uri, "
                "or leave --tracking_uri out to track into the bundle's local store (mlruns/mlflow.db)"
            ) from None
        return True
    if low.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        check_output_dirs([os.path.dirname(os.path.abspath(path)) or "."])
        return True
    return True
