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
import os
import sys
from typing import Optional

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
