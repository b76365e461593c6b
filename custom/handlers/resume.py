"""Which checkpoint a restarted training resumes from, and which resume checkpoints stay on disk.

Resume checkpoints are the interval checkpoints of :class:`~custom.handlers.AtomicCheckpointSaver`,
named as MONAI's ``CheckpointSaver`` names them: ``{prefix}_{epoch|iteration}=N.pt`` (``prefix``
``checkpoint`` for a ``save_dict`` of several objects, else the object's name).

- :func:`latest_checkpoint`: the newest complete one (a truncated file is skipped with a warning).
- :func:`resume_checkpoint`: that one while its training is unfinished; a finished training's files
  are renamed ``previous_*`` so the same command trains again.
- :func:`prune_checkpoints`: keep the ``n_saved`` newest (also those a killed process left).
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Optional

from custom.errors import CheckpointError

__all__ = ["checkpoint_number", "is_complete_checkpoint", "latest_checkpoint", "prune_checkpoints", "resume_checkpoint"]

logger = logging.getLogger(__name__)

#: ``{prefix}_{score name}=N.pt``
CHECKPOINT_NAME = re.compile(r"^(.+)_(iteration|epoch)=(\d+)\.pt$")


def checkpoint_number(name: str, prefix: Optional[str] = None, score_name: Optional[str] = None) -> Optional[int]:
    """N of a file named ``{prefix}_{score_name}=N.pt`` (any prefix / score name when None), else None."""
    m = CHECKPOINT_NAME.match(os.path.basename(name))
    if m is None or (prefix is not None and m.group(1) != prefix) or (score_name is not None and m.group(2) != score_name):
        return None
    return int(m.group(3))


def _numbered(folder: Path, prefix: str, score_name: str) -> list[tuple[int, Path]]:
    """The ``{prefix}_{score_name}=N.pt`` files of ``folder`` as ``(N, path)``, in no particular order."""
    found = []
    for p in folder.glob(f"{prefix}_{score_name}=*.pt"):
        n = checkpoint_number(p.name, prefix, score_name)
        if n is not None:
            found.append((n, p))
    return found


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a whole ``torch.save`` zip archive (a truncated one lacks its central directory)."""
    try:
        return os.path.getsize(path) > 0 and zipfile.is_zipfile(path)
    except OSError:
        return False


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint", score_name: str = "iteration") -> str | None:
    """Path of the complete ``{prefix}_{score_name}=N.pt`` file with the largest N in ``ckpt_dir``, or None.

    ``score_name`` is ``"iteration"`` or ``"epoch"`` (``CheckpointSaver`` with ``epoch_level``).

    Temporary files of an interrupted atomic save (``tmp*``, ``*.tmp<pid>``) do not match the pattern.
    A truncated or empty checkpoint (written by a non-atomic saver killed mid-write, or a full disk)
    is skipped with a warning in favour of the next older one.

    Raises:
        custom.errors.CheckpointError: checkpoints exist but none is complete.
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    found = _numbered(folder, prefix, score_name)
    if not found:
        return None
    for _, path in sorted(found, reverse=True):
        if is_complete_checkpoint(path):
            logger.info(f"latest checkpoint in {ckpt_dir}: {path}")
            return str(path)
        logger.warning(f"{path}: incomplete checkpoint (truncated or empty); not resuming from it")
    raise CheckpointError(
        f"{ckpt_dir}: no complete checkpoint to resume from ({len(found)} truncated); "
        "delete them, or pass --resume False to start afresh"
    )


def prune_checkpoints(
    ckpt_dir: str | os.PathLike,
    prefix: str = "checkpoint",
    score_name: str = "iteration",
    n_saved: int = 1,
    newest: str | None = None,
) -> list[str]:
    """Remove all but the ``n_saved`` newest ``{prefix}_{score_name}=N.pt`` files of ``ckpt_dir`` (largest N kept).

    The resume checkpoints' file writer calls it after each successful save (``newest``: the file
    just written, always kept), so the checkpoint a resumed training started from does not stay
    beside the new ones. Other files (``previous_*``, ``model.pt``, temporary files) are not
    touched. Returns the removed paths.
    """
    found = [(p.name == newest, n, p) for n, p in _numbered(Path(ckpt_dir), prefix, score_name)]
    found.sort(key=lambda t: (t[0], t[1]), reverse=True)  # the file just written first, then newest first
    removed = []
    for _, _, p in found[max(int(n_saved), 1):]:
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        removed.append(str(p))
        logger.info(f"removed the older checkpoint {p} (n_saved={n_saved})")
    return removed


def resume_checkpoint(
    ckpt_dir: str | os.PathLike, planned: int | None = None, prefix: str = "checkpoint", score_name: str = "iteration"
) -> str | None:
    """The checkpoint an interrupted training resumes from, or None to start a new training.

    The newest complete ``{prefix}_{score_name}=N.pt`` (:func:`latest_checkpoint`) when N is below
    ``planned`` (iterations or epochs, as ``score_name``). When N has reached it, that training
    finished: its checkpoints are renamed ``previous_...`` (no longer matched, so a later
    interruption of the new training resumes the new one) and None is returned, so the same command
    trains again (what MONAI Label expects of each training request) instead of doing nothing.
    """
    path = latest_checkpoint(ckpt_dir, prefix, score_name)
    if path is None or planned is None:
        return path
    done = checkpoint_number(path)
    if done is None or done < int(planned):
        return path
    for _, p in _numbered(Path(ckpt_dir), prefix, score_name):
        os.replace(p, p.with_name(f"previous_{p.name}"))
    logger.warning(
        f"{path}: the training in {ckpt_dir} finished ({score_name} {done} of {planned}); starting a "
        f"new one (its checkpoints were renamed previous_*)"
    )
    return None
