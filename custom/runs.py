"""What a training run is, so that a rerun resumes only itself and two runs never share a folder.

- :class:`RunSettings`: the training-relevant settings of a run (data files, classes, preset, crop,
  schedule) as a checkpointable object: put it in the resume checkpoint's ``save_dict``; on a
  rerun, :func:`check_resume` compares the checkpoint's record with the new settings *before*
  anything is trained and refuses, naming what changed, instead of silently continuing another
  run (or dying on a head that no longer fits).
- :func:`lock_folder`: a lock file in a training's output folders, so a second training started
  there stops with one line instead of overwriting the first one's checkpoints and ``model.pt``.
  The lock of a process that no longer runs (killed, machine rebooted) is taken over.
- :class:`StopAtIteration`: ends training at exactly ``iterations`` (the last epoch shortened),
  with that epoch's validation and checkpoints, so ``--iterations 10`` with ``val_interval`` 250
  trains 10 iterations, not 250 (:func:`epochs_for` gives the trainer's ``max_epochs``).
- The steps the configs call by name: :func:`resume_from` / :func:`resume_loader`, :func:`set_seed`,
  :func:`record_intensity`, :func:`attach_handlers`, :func:`log_summary` (with the peak memory).
- Distributed runs (``multi_gpu_train.json``): :func:`rank`, :func:`rank_handlers`, :func:`join_ranks`,
  :func:`leave_ranks`; single-process runs are rank 0, for which each of these changes nothing.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "LOCK_NAME",
    "RunSettings",
    "StopAtIteration",
    "attach_handlers",
    "check_resume",
    "epochs_for",
    "join_ranks",
    "leave_ranks",
    "lock_folder",
    "log_summary",
    "rank",
    "rank_handlers",
    "record_intensity",
    "resume_from",
    "resume_loader",
    "set_seed",
    "use_threads",
]

logger = logging.getLogger(__name__)

LOCK_NAME = ".retina-training.lock"
#: the entry of a resume checkpoint that holds the settings
SETTINGS_KEY = "run_settings"


def _plain(value: Any) -> Any:
    """JSON-ready copy of a settings value (paths as str, tuples as lists, items lists digested)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(_plain(value), sort_keys=True).encode()).hexdigest()[:16]


def _items_record(items: Sequence[Any]) -> dict[str, Any]:
    """A dataset list as its size, its first file and a digest of all its (absolute) paths."""
    paths = []
    for item in items:
        values = item.values() if isinstance(item, Mapping) else [item]
        paths.append([os.path.abspath(os.fspath(v)) if isinstance(v, (str, os.PathLike)) else _plain(v) for v in values])
    first = paths[0][0] if paths and paths[0] else None
    return {"count": len(paths), "first": first, "digest": _digest(paths)}


class RunSettings:
    """The settings that make a training what it is, as a checkpointable record.

    Args:
        settings: name -> value (numbers, strings, lists, dicts). Values named in ``item_lists``
            are dataset lists and are recorded as their size, first file and a digest of all paths.
        item_lists: which settings are dataset lists (default ``("train_items", "val_items")``).
    """

    def __init__(self, settings: Mapping[str, Any], item_lists: Sequence[str] = ("train_items", "val_items")) -> None:
        self.settings = {
            k: _items_record(v) if k in item_lists else _plain(v) for k, v in dict(settings).items()
        }

    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "digest": _digest(self.settings)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Loading a record that differs refuses (``check_resume`` normally found it before)."""
        problem = self.differences(state)
        if problem:
            from custom.errors import ConfigError

            raise ConfigError(problem)

    def differences(self, state: Mapping[str, Any] | None) -> str:
        """Empty when ``state`` (a :meth:`state_dict`) records the same settings, else what differs (one line)."""
        old = dict((state or {}).get("settings") or {})
        changed = []
        for k in sorted(set(old) | set(self.settings)):
            if old.get(k) != self.settings.get(k):
                changed.append(f"{k} {_short(old.get(k, '(not set)'))} -> {_short(self.settings.get(k, '(not set)'))}")
        return "; ".join(changed)


def _short(value: Any, limit: int = 80) -> str:
    if isinstance(value, Mapping) and "digest" in value and "count" in value:
        text = f"{value['count']} items from {value.get('first')}"
    else:
        text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_resume(checkpoint: str | os.PathLike | None, settings: RunSettings) -> bool:
    """Refuse to resume ``checkpoint`` when it was written by a run with other settings (True otherwise).

    Checkpoints written before settings were recorded resume as they did, with a warning.

    Raises:
        custom.errors.ConfigError: ``"<checkpoint>: written by a training with other settings (...); ..."``.
    """
    if not checkpoint:
        return True
    import torch

    from custom.errors import ConfigError

    state = torch.load(os.fspath(checkpoint), map_location="cpu", weights_only=True)
    record = state.get(SETTINGS_KEY) if isinstance(state, Mapping) else None
    if record is None:
        logger.warning("%s: records no run settings (an older checkpoint); resuming it as it is", checkpoint)
        return True
    changed = settings.differences(record)
    if changed:
        folder = os.path.dirname(os.path.abspath(os.fspath(checkpoint)))
        raise ConfigError(
            f"{os.fspath(checkpoint)}: written by a training with other settings ({changed}); not resuming it: "
            f"pass --resume False to start a new training here (its checkpoints in {folder} are then replaced), "
            "or choose another --bundle_root"
        )
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_lock(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return dict(json.load(f))
    except (OSError, ValueError, TypeError):
        return {}


def _release(path: str, token: str) -> None:
    if _read_lock(path).get("token") == token:
        try:
            os.remove(path)
        except OSError:
            pass


def lock_folder(folders: str | os.PathLike | Sequence[str | os.PathLike]) -> bool:
    """Take the training lock of each folder (a ``.retina-training.lock`` file) until this process exits.

    Only the first process of a distributed run (``RANK`` 0 or unset) takes locks. A lock held by
    a running process on this host, or by any process on another host, stops this one; a lock whose
    process is gone is taken over with a warning.

    Raises:
        custom.errors.ConfigError: ``"<folder>: another training (pid N on host, started ...) is using this
            folder; ..."``.
    """
    from custom.errors import ConfigError

    if rank() != 0:
        return True
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    host = socket.gethostname()
    token = f"{host}:{os.getpid()}:{time.time_ns()}"
    mine = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "token": token}
    for folder in dict.fromkeys(os.path.abspath(os.fspath(f)) for f in folders):
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, LOCK_NAME)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = _read_lock(path)
                pid, where = int(held.get("pid", -1) or -1), held.get("host", "?")
                if held.get("token") == token:
                    break
                if where == host and pid == os.getpid():  # this process trains again (MONAI Label's server)
                    os.remove(path)
                    continue
                if where == host and pid > 0 and not _alive(pid) or not held:
                    logger.warning("%s: taking over the lock of a training that no longer runs (pid %s)", folder, pid)
                    os.remove(path)
                    continue
                raise ConfigError(
                    f"{folder}: another training (pid {pid} on {where}, started {held.get('started', '?')}) is using "
                    f"this folder; wait for it to finish, or choose another --bundle_root (if no such training "
                    f"runs, delete {path})"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
            atexit.register(_release, path, token)
            break
    return True


class StopAtIteration:
    """Ignite handler: end the trainer's epoch at iteration ``iterations`` (a shortened last epoch).

    Ignite's ``Engine.terminate_epoch`` still fires ``EPOCH_COMPLETED``, so the validation and the
    epoch-level checkpoints of that epoch happen; with ``max_epochs = ceil(iterations / epoch_length)``
    the run then completes. Iteration counts restored on resume are honoured.
    """

    def __init__(self, iterations: int) -> None:
        self.iterations = int(iterations)

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED(once=self.iterations), self)

    def __call__(self, engine: Any) -> None:
        if engine.state.iteration % engine.state.epoch_length:  # only a run that would go on needs it
            engine.terminate_epoch()


def resume_from(
    folder: str | os.PathLike, planned: int | None, enabled: bool = True, score_name: str = "epoch"
) -> str | None:
    """The checkpoint a training resumes from (``custom.handlers.resume_checkpoint``: with ``planned`` None
    the newest one, even of a finished run), or None when ``enabled`` is False (``--resume False``: a new
    training, whatever the folder holds)."""
    if not enabled:
        return None
    from custom.handlers import resume_checkpoint

    return resume_checkpoint(folder, planned, score_name=score_name)


def log_summary(
    evaluator: Any, epoch_length: int, model_path: str | os.PathLike, device: Any = None, metric: str = "mean IoU"
) -> None:
    """Log (rank 0) the best validation score of a finished training, where its weights are and, given the
    training's ``device``, its peak memory there (``custom.devices.peak_memory_mb``), one line each."""
    if rank() != 0:
        return
    state = evaluator.state
    logger.info(
        "[retina] best validation %s %.4f at epoch %d (of %d iterations each); checkpoint %s",
        metric, state.best_metric, state.best_metric_epoch, epoch_length, os.fspath(model_path),
    )
    if device is not None:
        from custom.devices import peak_memory_mb

        logger.info("[retina] peak memory on %s: %.0f MiB", device, peak_memory_mb(device))


def use_threads(threads: int) -> int:
    """Set torch's intra-op threads to ``threads`` when it is >= 1 (0: torch's default); returns the count in use."""
    import torch

    if int(threads) >= 1:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def attach_handlers(engine: Any, *handlers: Any) -> Any:
    """Attach each handler that is there (``None``, e.g. a disabled resume loader, is skipped) to ``engine``."""
    for handler in handlers:
        if handler is not None:
            handler.attach(engine)
    return engine


def epochs_for(iterations: int, epoch_length: int) -> int:
    """The trainer's ``max_epochs`` for ``iterations`` in epochs of ``epoch_length`` (the last one shortened
    by :class:`StopAtIteration`)."""
    return max(1, -(-int(iterations) // int(epoch_length)))


def resume_loader(checkpoint: str | os.PathLike | None, load_dict: Mapping[str, Any], map_location: Any = None):
    """MONAI's ``CheckpointLoader`` of ``checkpoint`` into ``load_dict`` (the resume entries), or None without a
    checkpoint (a new training; :func:`attach_handlers` skips it)."""
    if not checkpoint:
        return None
    from monai.handlers import CheckpointLoader

    return CheckpointLoader(load_path=os.fspath(checkpoint), load_dict=dict(load_dict), map_location=map_location)


def rank() -> int:
    """This process's rank in a distributed run (the process group's, else ``$RANK``), 0 in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def set_seed(seed: int) -> int:
    """MONAI's ``set_determinism`` with ``seed + rank`` (each rank of a distributed run draws its own
    augmentations; a single process gets ``seed``); returns the seed used."""
    from monai.utils import set_determinism

    seed = int(seed) + rank()
    set_determinism(seed=seed)
    return seed


def record_intensity(network: Any, record: Mapping[str, Any], folder: str | os.PathLike) -> Any:
    """Store the intensity record in ``network``'s state dict (every rank) and write ``<folder>/intensity.json``
    (rank 0), as ``custom.intensity.attach`` and ``write_record`` do; returns the network."""
    from custom.intensity import attach, write_record

    attach(network, record)
    if rank() == 0:
        write_record(os.path.join(os.fspath(folder), "intensity.json"), record)
    return network


def _lockstep_types() -> tuple:
    from monai.handlers import LrScheduleHandler, ValidationHandler

    # StopAtIteration too: when ``iterations`` is no multiple of ``val_interval`` rank 0 stops early, and a rank
    # without it would wait forever at its next collective
    return (LrScheduleHandler, StopAtIteration, ValidationHandler)


def rank_handlers(handlers: Sequence[Any] | None, lockstep: bool = True) -> list:
    """The handlers of this rank: all of them on rank 0; on the others only those every rank needs to stay in
    lockstep with rank 0 (learning-rate schedule, the stop at ``iterations``, validation; ``lockstep=False``: none), so
    only rank 0 logs, saves and tracks."""
    handlers = [h for h in (handlers or []) if h is not None]
    if rank() == 0:
        return handlers
    return [h for h in handlers if isinstance(h, _lockstep_types())] if lockstep else []


def join_ranks(*engines: Any) -> bool:
    """Wait for every rank (rank 0 has checked and written what the others need); engines of ranks > 0 then
    log warnings only. Nothing to do outside a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    if rank() > 0:
        for engine in engines:
            engine.logger.setLevel(logging.WARNING)
    return True


def leave_ranks(trainer: Any, sampler: Any = None, dataset: Any = None) -> bool:
    """Log what this rank trained, wait for the others, leave the process group (nothing outside one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    if sampler is not None and dataset is not None:
        logger.info(
            "[retina] rank %d of %d: %d iterations, %d of %d training slices per epoch of the DistributedSampler",
            dist.get_rank(), dist.get_world_size(), trainer.state.iteration, len(sampler), len(dataset),
        )
    dist.barrier()
    dist.destroy_process_group()
    return True
