"""The errors a user can cause, and their one-line reports on the bundles' command line.

A user who feeds a bundle a bad file or a bad setting gets one line on stderr and a non-zero exit
status, never a traceback through MONAI's config machinery::

    retina_finetune: dataset error: /data/labels/vol3.tif: label values up to 7 but num_classes is 3 (expected 0..2)
    retina_finetune: config error: num_classes: expected an integer >= 1, got 'abc' (str)

Every such error is a :class:`RetinaError` (a ``ValueError``) whose class names its ``kind``; the
modules that raise them import them from here (``custom.checkpoints.CheckpointError`` is this
module's :class:`CheckpointError`, and so on):

=========================  ==============  ====================================================
class                      ``kind``        raised for
=========================  ==============  ====================================================
:class:`DatasetError`      ``dataset``     a data file or folder (``custom.data``, ``custom.io``)
:class:`CheckpointError`   ``checkpoint``  weights that cannot be read or do not fit
:class:`HeadMismatchError` ``checkpoint``  weights trained for the other head (``custom.networks``)
:class:`ConfigError`       ``config``      a setting that cannot work
:class:`OverlayError`      ``config``      a config overlay from outside ``configs/`` holding code
:class:`OutputError`       ``output``      an output folder or file that cannot be written
:class:`TrackingError`     ``tracking``    an MLflow server that does not answer
:class:`InferenceError`    ``inference``   inputs that could not be processed
``OSError`` naming a file  ``file``        disk full, read-only file system, ...
=========================  ==============  ====================================================

:func:`report_errors`, the first entry of each config's ``initialize``, reports them as one line
``<bundle>: <kind> error: <path or setting>: <problem>``, wherever in the exception chain they are
(MONAI wraps them in ``RuntimeError("Failed to evaluate ...")``). The checks a run makes before
training are in ``custom.preflight``. Anything else is a bug, not a user error: its traceback is
printed as usual. Set the environment variable ``RETINA_TRACEBACK=1`` to get the full traceback of
the reported errors too.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Optional

__all__ = [
    "RetinaError",
    "ConfigError",
    "OverlayError",
    "OutputError",
    "TrackingError",
    "DatasetError",
    "CheckpointError",
    "HeadMismatchError",
    "InferenceError",
    "kind_of",
    "report_errors",
    "one_line_error",
    "describe",
    "check_config",
]

logger = logging.getLogger(__name__)

TRACEBACK_ENV = "RETINA_TRACEBACK"


class RetinaError(ValueError):
    """A problem the user can fix; the message is one line, ``"<path or setting>: <problem>"``.

    ``kind`` (a class attribute) names it in the one-line report: ``<bundle>: <kind> error: ...``.
    """

    kind = "retina"


class ConfigError(RetinaError):
    """A setting that cannot work; the message is ``"<config id>: <problem>"``, one line."""

    kind = "config"


class OverlayError(ConfigError):
    """A config file from outside the bundle's ``configs/`` folder that holds code (``custom.overlays``)."""


class OutputError(ConfigError):
    """An output folder that cannot be written (read-only, not a folder, disk full), or an output
    that would replace an input or an existing file."""

    kind = "output"


class TrackingError(ConfigError):
    """An experiment-tracking service that does not answer."""

    kind = "tracking"


class DatasetError(RetinaError):
    """A data file or folder that cannot be used; the message is ``"<path>: <problem>"``, one line."""

    kind = "dataset"


class CheckpointError(RetinaError):
    """A checkpoint that cannot be read or does not fit the network (one-line message)."""

    kind = "checkpoint"


class HeadMismatchError(CheckpointError):
    """Weights trained for another head (reconstruction vs segmentation)."""


class InferenceError(RetinaError, RuntimeError):
    """Some inputs could not be processed (the message lists them, one per line)."""

    kind = "inference"


# --------------------------------------------------------------------------------------
# the reporter
# --------------------------------------------------------------------------------------
def kind_of(exc: BaseException) -> Optional[str]:
    """The ``kind`` of a user-fixable error (a :class:`RetinaError`, or an ``OSError`` naming a file), else None."""
    if isinstance(exc, RetinaError):
        return exc.kind
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
        if kind_of(e) is not None:
            return _message(e)
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def one_line_error(exc: BaseException, bundle: str = "retina") -> Optional[str]:
    """``"<bundle>: <kind> error: <message>"`` for the first user-fixable error in ``exc``'s chain, else None."""
    for e in _chain(exc):
        kind = kind_of(e)
        if kind is not None:
            return f"{bundle}: {kind} error: {_message(e)}"
    return None


def _install_record_factory() -> None:
    """Log records of known errors (e.g. MONAI's ``StatsHandler`` logging the exception that stops
    training, through a logger and handler of its own) keep their message but lose their traceback:
    the reporter prints the one line. A record factory sees every record of every logger."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "retina_reporter", False):
        return

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and not os.environ.get(TRACEBACK_ENV) and one_line_error(exc) is not None:
            record.exc_info, record.exc_text = None, None
        return record

    factory.retina_reporter = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def report_errors(bundle: str) -> bool:
    """Report user-fixable errors that end the program as one line on stderr (exit status 1).

    Installs a ``sys.excepthook`` (other exceptions go to the previous hook, traceback and all) and
    a log-record factory that drops the tracebacks of those errors from the log (the records stay).
    Idempotent; returns True so that a config's ``initialize`` list can call it.

    Args:
        bundle: name printed at the start of the line, e.g. ``"retina_finetune"``.
    """
    previous = getattr(sys.excepthook, "retina_previous", sys.excepthook)

    def hook(etype, value, tb):
        line = one_line_error(value, bundle) if value is not None else None
        if line is None or os.environ.get(TRACEBACK_ENV):
            previous(etype, value, tb)
        if line is not None:
            sys.stdout.flush()
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    hook.retina_previous = previous  # type: ignore[attr-defined]
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
