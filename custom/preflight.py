"""The cheap checks a run makes before its first iteration, so that a problem costs seconds, not a training.

The bundles' ``initialize`` lists call them right after the error reporter and the settings check:
:func:`check_output_dirs` (output folders writable, some free space) and :func:`check_tracking_uri`
(an MLflow server answers, a local store can be written). The dataset is then validated by
``custom.data.validate_items``. Problems raise one-line errors of :mod:`custom.errors`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any, Optional

from custom.errors import OutputError, TrackingError

__all__ = ["check_output_dirs", "check_tracking_uri"]


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
