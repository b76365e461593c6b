"""What the converters of the benchmarks share: option and progress handling (:class:`OptionError`,
:class:`Reporter`, :func:`run_cli`), pixel conversions (:func:`image_to_uint8`, :func:`binary_mask`,
:func:`class_indices`), the deterministic validation split (:func:`holdout_count`,
:func:`holdout_indices`) and finding and pairing the files of a published layout."""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from custom.io import DatasetError, find_em_files, pair_images_labels, read_em
from custom.utils import file_stem


class OptionError(ValueError):
    """A command-line option has a value that cannot work (message: one line)."""


# --------------------------------------------------------------------------------------
# messages and progress
# --------------------------------------------------------------------------------------
class Reporter:
    """Progress and warning output of a preparation run.

    Messages go to stdout as ``[prog] message`` (suppressed by ``quiet``); warnings always go to
    stderr and are kept in :attr:`warnings` (recorded in ``dataset_info``). :meth:`progress`
    returns a counter that prints ``label: i/n`` at most every ``interval`` seconds and at the end.
    """

    def __init__(self, prog: str = "prepare", quiet: bool = False, interval: float = 2.0) -> None:
        self.prog = prog
        self.quiet = bool(quiet)
        self.interval = float(interval)
        self.warnings: list[str] = []

    def say(self, message: str) -> None:
        """Print one progress line (unless quiet)."""
        if not self.quiet:
            print(f"[{self.prog}] {message}", flush=True)

    def warn(self, message: str) -> None:
        """Print a warning to stderr and remember it."""
        self.warnings.append(message)
        print(f"[{self.prog}] warning: {message}", file=sys.stderr, flush=True)

    def progress(self, label: str, total: int) -> "_Progress":
        """A counter for ``total`` steps of ``label``."""
        return _Progress(self, label, int(total))


class _Progress:
    def __init__(self, reporter: Reporter, label: str, total: int) -> None:
        self.reporter, self.label, self.total = reporter, label, total
        self.done = 0
        self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self._last >= self.reporter.interval:
            self._last = now
            self.reporter.say(f"{self.label}: {self.done}/{self.total}")


@contextmanager
def quiet_reader_warnings():
    """Silence ``custom.io``'s per-file notices (e.g. 'identical colour channels' for every
    RGB mask of Kasthuri++) while masks are read."""
    log = logging.getLogger("custom.io")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# --------------------------------------------------------------------------------------
# pixel conversions
# --------------------------------------------------------------------------------------
def image_to_uint8(image: np.ndarray, source: str | os.PathLike = "") -> tuple[np.ndarray, str]:
    """Convert an EM image or volume to uint8, by its dtype and range.

    - uint8: unchanged; bool: 0/255.
    - float within [0, 1]: times 255, rounded; float within [0, 255]: rounded.
    - anything else (uint16, int16, other floats): linear min-max rescale of this array to
      [0, 255] (how the Guay volumes are published for benchmarks: uint16 -> uint8).

    Returns:
        ``(uint8 array, description of the conversion)``.

    Raises:
        DatasetError: non-finite values or a non-numeric dtype.
    """
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a, "uint8 as stored"
    if a.dtype == bool:
        return a.astype(np.uint8) * np.uint8(255), "bool -> 0/255"
    if not np.issubdtype(a.dtype, np.number):
        raise DatasetError(f"{os.fspath(source)}: image dtype {a.dtype} is not numeric")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise DatasetError(f"{os.fspath(source)}: image holds non-finite values (NaN or inf)")
    lo, hi = float(a.min()), float(a.max())
    if np.issubdtype(a.dtype, np.floating) and lo >= 0.0 and hi <= 255.0:
        scale, how = (255.0, "float [0, 1] x 255") if hi <= 1.0 else (1.0, "float [0, 255] rounded")
        return _scaled(a, 0.0, scale), how
    if hi == lo:
        return np.zeros(a.shape, np.uint8), f"constant {lo:g} -> 0"
    return _scaled(a, lo, 255.0 / (hi - lo)), f"{a.dtype} min-max [{lo:g}, {hi:g}] -> [0, 255]"


def _scaled(a: np.ndarray, offset: float, scale: float) -> np.ndarray:
    """``rint((a - offset) * scale)`` clipped to uint8, one section at a time (bounded memory)."""
    out = np.empty(a.shape, np.uint8)
    parts = range(a.shape[0]) if a.ndim == 3 else [slice(None)]
    for i in parts:
        v = (a[i].astype(np.float32) - np.float32(offset)) * np.float32(scale)
        np.clip(np.rint(v), 0, 255, out=v)
        out[i] = v
    return out


def binary_mask(mask: np.ndarray, source: str | os.PathLike = "") -> tuple[np.ndarray, int]:
    """Binary uint8 label from a published mask.

    Masks already holding only 0 and 1 are kept. Otherwise foreground is every value >= 255
    (the 0/255 masks of Kasthuri++, Lucchi++ and Perez); other non-zero values, such as the
    padding of Kasthuri++ masks, become background, and are counted.

    Returns:
        ``(uint8 mask of 0/1, number of pixels with values strictly between 0 and 255)``.

    Raises:
        DatasetError: negative, non-finite or non-numeric values.
    """
    m = np.asarray(mask)
    if m.dtype == bool:
        return m.astype(np.uint8), 0
    if not np.issubdtype(m.dtype, np.number):
        raise DatasetError(f"{os.fspath(source)}: mask dtype {m.dtype} is not numeric")
    if np.issubdtype(m.dtype, np.floating) and not np.isfinite(m).all():
        raise DatasetError(f"{os.fspath(source)}: mask holds non-finite values (NaN or inf)")
    lo, hi = m.min(), m.max()
    if lo < 0:
        raise DatasetError(f"{os.fspath(source)}: mask holds negative values (min {lo})")
    if hi <= 1:
        if np.issubdtype(m.dtype, np.floating):
            return (m >= 0.5).astype(np.uint8), int(((m > 0) & (m < 1)).sum())
        return m.astype(np.uint8), 0
    fg = m >= 255
    return fg.astype(np.uint8), int(((m > 0) & ~fg).sum())


def class_indices(label: np.ndarray, label_classes: int, source: str | os.PathLike = "") -> np.ndarray:
    """A label map of class indices ``0 .. label_classes - 1`` as uint8.

    Raises:
        DatasetError: non-integer, negative or too large values.
    """
    a = np.asarray(label)
    src = os.fspath(source)
    if a.dtype == bool:
        return a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.number):
        raise DatasetError(f"{src}: label dtype {a.dtype} is not numeric")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or not np.array_equal(a, np.round(a)):
            raise DatasetError(f"{src}: label holds non-integer values; expected class indices 0..{label_classes - 1}")
    lo, hi = a.min(), a.max()
    if lo < 0 or hi >= label_classes:
        raise DatasetError(
            f"{src}: label values {lo:g}..{hi:g}; expected class indices 0..{label_classes - 1} "
            f"({label_classes} classes)"
        )
    return a.astype(np.uint8)


# --------------------------------------------------------------------------------------
# deterministic validation split
# --------------------------------------------------------------------------------------
def check_fraction(fraction: float) -> float:
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise OptionError(f"val_fraction must be a number in [0, 1), got {fraction!r}") from None
    if not 0.0 <= f < 1.0:
        raise OptionError(f"val_fraction must be in [0, 1), got {fraction!r}")
    return f


def check_val_by(val_by: str) -> str:
    if val_by not in ("sections", "volumes"):
        raise OptionError(f"val_by must be 'sections' or 'volumes', got {val_by!r}")
    return val_by


def holdout_count(n: int, fraction: float) -> int:
    """How many of ``n`` items (sections, images, volumes) go to validation.

    ``round(n * fraction)``, at least 1 when ``fraction > 0`` and at most ``n - 1`` so that
    training keeps at least one; 0 when ``fraction == 0`` or ``n < 2``.
    """
    f = check_fraction(fraction)
    if f == 0.0 or n < 2:
        return 0
    return min(n - 1, max(1, int(math.floor(n * f + 0.5))))


def holdout_indices(n: int, fraction: float, how: str = "tail") -> list[int]:
    """Indices of the ``holdout_count(n, fraction)`` validation items among ``n``.

    ``how="tail"``: the last ones (slices of one volume: neighbours stay together);
    ``how="spread"``: evenly spaced over the list (independent 2D images).
    """
    k = holdout_count(n, fraction)
    if k == 0:
        return []
    if how == "tail":
        return list(range(n - k, n))
    if how == "spread":
        return [int((i + 0.5) * n / k) for i in range(k)]
    raise OptionError(f"how must be 'tail' or 'spread', got {how!r}")


# --------------------------------------------------------------------------------------
# finding and pairing the files of a published layout
# --------------------------------------------------------------------------------------
def existing_folder(src: str | os.PathLike, expected: str) -> Path:
    """``src`` as an absolute path, checked to be a folder."""
    p = Path(os.path.abspath(os.fspath(src)))
    if not p.exists():
        raise DatasetError(f"{p}: no such folder; expected {expected}")
    if not p.is_dir():
        raise DatasetError(f"{p}: is a file; expected a folder holding {expected}")
    return p


def source_files(src: str | os.PathLike, expected: str) -> tuple[Path, list[str]]:
    """``(src checked to be a folder, the EM files below it)``; the error says what was expected there."""
    root = existing_folder(src, expected)
    try:
        return root, find_em_files(root)
    except DatasetError:
        raise DatasetError(f"{root}: expected {expected}; found {listing(root)}") from None


def listing(folder: Path, limit: int = 8) -> str:
    try:
        names = sorted(n + ("/" if (folder / n).is_dir() else "") for n in os.listdir(folder) if not n.startswith("."))
    except OSError:
        return "nothing readable"
    if not names:
        return "an empty folder"
    return ", ".join(names[:limit]) + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def subdirs(folder: Path) -> dict[str, Path]:
    """Child folders by lower-case name (hidden ones skipped)."""
    try:
        return {e.name.lower(): Path(e.path) for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")}
    except OSError:
        return {}


_LAST_INT = re.compile(r"(\d+)(?!.*\d)")


def pair_slices(image_dir: Path, label_dir: Path) -> list[dict]:
    """Pair per-slice images with masks: by file name (``custom.io.pair_images_labels``), else
    by the last number in the names (Lucchi++ names masks ``0.png`` for image ``mask0000.png``;
    Perez names ``<prefix>.<n>.png`` with different prefixes)."""

    def by_number(paths: list[str]) -> dict[int, str] | None:
        out: dict[int, str] = {}
        for p in paths:
            m = _LAST_INT.search(file_stem(p))
            if m is None or int(m.group(1)) in out:
                return None
            out[int(m.group(1))] = p
        return out

    try:
        return pair_images_labels(image_dir, label_dir)
    except DatasetError as by_name:
        first_error = str(by_name)
    try:
        ni, nl = by_number(find_em_files(image_dir)), by_number(find_em_files(label_dir))
    except DatasetError:
        ni = nl = None
    if ni is None or nl is None or set(ni) != set(nl):
        raise DatasetError(f"{first_error} (pairing by the number in the names failed too)")
    return [{"image": ni[k], "label": nl[k]} for k in sorted(ni)]


def read_pairs_2d(
    pairs: Sequence[dict], reporter: Reporter, label: str
) -> Iterable[tuple[str, np.ndarray, np.ndarray, dict, int]]:
    """Yield ``(name, image uint8, binary mask, info, intermediate-pixel count)`` per pair."""
    prog = reporter.progress(label, len(pairs))
    for pair in pairs:
        image, how = image_to_uint8(read_em(pair["image"]), pair["image"])
        with quiet_reader_warnings():
            raw_mask = read_em(pair["label"], role="label")
        mask, odd = binary_mask(raw_mask, pair["label"])
        if mask.shape != image.shape:
            raise DatasetError(f"{pair['label']}: mask shape {mask.shape} differs from image shape {image.shape} of {pair['image']}")
        info = {"label_source": pair["label"]}
        if how != "uint8 as stored":
            info["intensity_conversion"] = how
        yield file_stem(pair["image"]), image, mask, info, odd
        prog.update()


def warn_intermediate(reporter: Reporter, n: int) -> None:
    if n:
        reporter.warn(f"{n} mask pixel(s) with values between 1 and 254 (e.g. padding) were set to background (masks: 255 -> 1)")


def as_names(value: str | Sequence[str] | None) -> list[str]:
    """A list of names from ``"A,B"``, ``["A", "B"]`` or ``("A", "B")`` (fire passes either)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value if str(v).strip()]


def split_folders(base: Path) -> dict[str, tuple[Path, Path]]:
    """``{split: (image_dir, label_dir)}`` of a ``train/{images,masks|labels}`` layout under ``base``."""
    kids = subdirs(base)
    out: dict[str, tuple[Path, Path]] = {}
    for names, split in ((("train", "training"), "train"), (("valid", "val", "validation", "eval"), "val"), (("test",), "test")):
        for n in names:
            if n in kids:
                sub = subdirs(kids[n])
                lab = sub.get("masks") or sub.get("labels") or sub.get("mask") or sub.get("label")
                if "images" in sub and lab is not None:
                    out[split] = (sub["images"], lab)
                    break
    return out


# --------------------------------------------------------------------------------------
# command-line helper
# --------------------------------------------------------------------------------------
def run_cli(prog: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, reporter=Reporter(prog, quiet), **kwargs)`` for a script; a
    :class:`DatasetError` or :class:`OptionError` ends the program with ``prog: error: <message>``
    on stderr and exit status 1 (no traceback). ``quiet`` is taken from ``kwargs``."""
    quiet = bool(kwargs.pop("quiet", False))
    reporter = Reporter(prog, quiet=quiet)
    try:
        return fn(*args, reporter=reporter, **kwargs)
    except (DatasetError, OptionError) as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def print_hint(result: Any, arguments: dict) -> None:
    """After a preparation: print the command that trains on ``DST/dataset.json``."""
    print(bundle_hint(os.path.join(arguments["dst"], "dataset.json")))


def command(prog: str, fn: Callable[..., Any], after: Callable[[Any, dict], None] = print_hint) -> Callable[..., None]:
    """``fn`` as a sub-command of ``scripts/prepare.py``: its parameters, defaults and docstring (what
    ``--help`` shows) with ``quiet`` (no progress output) in place of ``reporter``; it runs through
    :func:`run_cli` (``prog`` names it in messages), then ``after(result, arguments)`` (default:
    :func:`print_hint`)."""
    sig = inspect.signature(fn)
    quiet = inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool")
    sig = sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "reporter"] + [quiet])

    @functools.wraps(fn)
    def cli(*args: Any, **kwargs: Any) -> None:
        arguments = dict(sig.bind(*args, **kwargs).arguments)
        after(run_cli(prog, fn, **arguments), arguments)

    del cli.__wrapped__  # fire reads the signature below, not fn's
    cli.__signature__ = sig  # type: ignore[attr-defined]
    return cli


def bundle_hint(dataset_json: str | os.PathLike) -> str:
    """The command that trains ``retina_finetune`` on a prepared dataset."""
    path = os.path.abspath(os.fspath(dataset_json))
    return (
        "train with: cd bundles/retina_finetune && python -m monai.bundle run "
        f"--config_file \"['configs/train.json','{path}']\""
    )
