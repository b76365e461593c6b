"""The cheap checks a run makes before its first iteration, so that a problem costs seconds, not a training.

:func:`check_output_dirs` (output folders writable, some free space) and :func:`check_tracking_uri`
(an MLflow server answers, a local store can be written). :func:`check_training` (the training configs'
``preflight`` step) runs them with the run's folder locks before any data is read; :func:`check_data`
(``data_check``) then the resume check and the dataset validation (``custom.io.validate_items``,
``check_foreground``). Problems raise one-line
errors of :mod:`custom.errors`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

from custom.errors import OutputError, TrackingError

__all__ = ["check_data", "check_output_dirs", "check_tracking_uri", "check_training"]


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
def check_tracking_uri(uri: str | None, timeout: float = 5.0) -> bool:
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


# --------------------------------------------------------------------------------------
# all of a training's checks
# --------------------------------------------------------------------------------------
def check_training(
    output_dirs: Sequence[Any], lock_dirs: Sequence[Any] = (), tracking_uri: str | None = None, min_free_mb: float = 0
) -> bool:
    """What a training checks before it reads any data (each raises a one-line error): ``output_dirs`` writable
    with ``min_free_mb`` MiB free and ``tracking_uri`` usable (rank 0 only), then the training lock of
    ``lock_dirs`` (``custom.runs.lock_folder``). Returns True (so that ``initialize`` can list it)."""
    from custom.runs import lock_folder, rank

    if rank() == 0:
        check_output_dirs(list(output_dirs), min_free_mb=min_free_mb)
        check_tracking_uri(tracking_uri)
    lock_folder(list(lock_dirs))
    return True


def check_data(
    resume: Any = None,
    settings: Any = None,
    items: Sequence[Sequence[Any]] | None = None,
    num_classes: int | None = None,
    foreground_items: Sequence[Any] | None = None,
    ignore_index: int | None = None,
) -> bool:
    """What a training checks of its data before the first iteration (each raises a one-line error):

    1. ``resume`` (a checkpoint or None) was written by a run with these ``settings`` (``custom.runs.check_resume``);
    2. with ``items`` (dataset lists): every file readable with labels < ``num_classes``
       (``custom.io.validate_items``), and ``foreground_items`` hold some foreground
       (``custom.io.check_foreground``) (rank 0 only); ``ignore_index`` (sparse labels) is the value of
       unlabelled voxels: allowed besides the classes, never foreground.

    Returns True (so that ``initialize`` can list it).
    """
    from custom.runs import check_resume, rank

    if settings is not None:
        check_resume(resume, settings)
    if items is not None and rank() == 0:
        from custom.io import check_foreground, validate_items

        validate_items([item for part in items for item in part], num_classes=num_classes, ignore_index=ignore_index)
        if foreground_items is not None:
            check_foreground(list(foreground_items), ignore_index=ignore_index)
    if foreground_items is not None:
        # the set has foreground, so MONAI's per-slice "Num foregrounds 0" warnings of the positive/negative
        # crops (slices without any) are expected noise
        import warnings

        warnings.filterwarnings("ignore", message="Num foregrounds 0")
    return True
