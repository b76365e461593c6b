"""Check a CEM500K folder (EMPIAR-10592, ~0.5 M 2D 224x224 uint8 patches) before pretraining.

    python scripts/prepare.py cem500k SRC [--file_list LIST.txt] [--relative] [--size 224]
        [--read] [--strict] [--quiet]

Nothing is converted: the retina_pretrain bundle reads the folder as it is
(--dataset_dir SRC). This lists every image under SRC, reads each header (--read: all pixels,
which also finds truncated files), reports sizes and pixel types, and optionally writes the
readable 2D images to LIST.txt, one path a line (absolute, or relative to SRC with --relative).
Exit status 1 when a file is unreadable; with --strict also when a file is not a 2D SIZE x SIZE
uint8 image.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

from custom.io import DatasetError, em_shape, find_em_files, read_em
from custom.utils import atomic_path

from .common import Reporter, existing_folder, listing, run_cli


def _header_dtype(path: str) -> str:
    """Pixel type from a 2D file's header (PIL mode or TIFF sample type), without reading pixels."""
    low = path.lower()
    if low.endswith((".tif", ".tiff")):
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return str(tif.series[0].dtype)
    from PIL import Image

    with Image.open(path) as im:
        return {"L": "uint8", "1": "bool", "I;16": "uint16", "I": "int32", "F": "float32"}.get(im.mode, im.mode)


def check_cem500k(
    src: str | os.PathLike,
    file_list: str | os.PathLike | None = None,
    size: int = 224,
    read: bool = False,
    relative: bool = False,
    reporter: Reporter | None = None,
) -> dict:
    """Check a CEM500K folder (EMPIAR-10592: ~0.5 M 2D 224x224 uint8 patches) before pretraining.

    Lists every image under ``src`` (recursive), reads each header (with ``read``, all pixels,
    which finds truncated files) and counts shapes and pixel types. Nothing is converted: the
    ``retina_pretrain`` bundle reads the folder as it is (``--dataset_dir``).

    Args:
        file_list: write the readable 2D images to this text file, one path a line.
        size: expected patch side; other sizes are counted (they still train: the pipeline crops).
        relative: paths in ``file_list`` relative to ``src`` instead of absolute.

    Returns:
        ``{"folder", "files", "ok", "size_counts", "dtype_counts", "not_2d", "unreadable", "problems"}``
        (``ok``: 2D ``size`` x ``size`` uint8 images; ``problems``: the first 20 messages).

    Raises:
        DatasetError: ``src`` is missing or holds no image.
    """
    rep = reporter or Reporter("prepare_cem500k")
    root = existing_folder(src, "the CEM500K image patches (EMPIAR-10592)")
    try:
        files = find_em_files(root)
    except DatasetError:
        raise DatasetError(
            f"{root}: holds no images; expected the CEM500K patches (2D {size}x{size} uint8 .tiff/.png); found {listing(root)}"
        ) from None
    sizes: Counter = Counter()
    dtypes: Counter = Counter()
    problems: list[str] = []
    usable: list[str] = []
    not_2d = unreadable = ok = 0
    prog = rep.progress("checked", len(files))
    for p in files:
        try:
            if read:
                arr = read_em(p)
                shape, dtype = arr.shape, str(arr.dtype)
            else:
                shape, dtype = em_shape(p), _header_dtype(p)
        except DatasetError as e:
            unreadable += 1
            problems.append(str(e))
        except Exception as e:  # a header library failing on a damaged file
            unreadable += 1
            problems.append(f"{p}: cannot read ({type(e).__name__}: {' '.join(str(e).split())})")
        else:
            if len(shape) != 2:
                not_2d += 1
                problems.append(f"{p}: shape {tuple(shape)} is not a 2D image")
            else:
                sizes["x".join(str(s) for s in shape)] += 1
                dtypes[dtype] += 1
                usable.append(p)
                ok += tuple(shape) == (size, size) and dtype == "uint8"
        prog.update()
    expected = f"{size}x{size}"
    if len(sizes) > 1 or (sizes and expected not in sizes):
        n_other = len(usable) - sizes.get(expected, 0)
        rep.warn(f"{n_other} image(s) are not {expected} (sizes: {dict(sizes.most_common(5))})")
    if set(dtypes) - {"uint8"}:
        rep.warn(f"pixel types other than uint8: {dict(dtypes)}")
    if file_list:
        out = Path(os.fspath(file_list))
        lines = [os.path.relpath(p, root) if relative else os.path.abspath(p) for p in usable]
        with atomic_path(out) as tmp:
            tmp.write_text("".join(line + "\n" for line in lines))
        rep.say(f"wrote {out}: {len(lines)} path(s)")
    summary = {
        "folder": os.fspath(root),
        "files": len(files),
        "ok": ok,
        "size_counts": dict(sizes.most_common()),
        "dtype_counts": dict(dtypes.most_common()),
        "not_2d": not_2d,
        "unreadable": unreadable,
        "problems": problems[:20],
    }
    rep.say(f"{len(files)} file(s): {ok} {expected} uint8, {len(usable) - ok} other 2D, {not_2d} not 2D, {unreadable} unreadable")
    for msg in problems[:20]:
        print(f"[{rep.prog}] problem: {msg}", file=sys.stderr, flush=True)
    return summary


def cli(
    src: str,
    file_list: str = "",
    size: int = 224,
    read: bool = False,
    relative: bool = False,
    strict: bool = False,
    quiet: bool = False,
) -> None:
    """Check the CEM500K patches in ``src``.

    Args:
        src: the CEM500K folder (searched recursively).
        file_list: write the readable 2D images' paths here ('' for none).
        size: expected patch side.
        read: read every pixel (slow; finds truncated files), not just headers.
        relative: paths in ``file_list`` relative to ``src``.
        strict: also fail on other sizes, pixel types and non-2D files.
        quiet: no progress output.
    """
    s = run_cli("prepare_cem500k", check_cem500k, src, file_list=file_list or None, size=size, read=read,
                relative=relative, quiet=quiet)
    bad = s["files"] - s["ok"] if strict else s["unreadable"]
    if bad:
        print(f"prepare_cem500k: error: {bad} problem file(s) in {s['folder']} (listed above)", file=sys.stderr)
        raise SystemExit(1)
    print(f"ok: {s['files']} image(s) in {s['folder']}; pretrain with --dataset_dir {s['folder']}")
