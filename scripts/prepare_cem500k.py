"""Check a CEM500K folder (EMPIAR-10592, ~0.5 M 2D 224x224 uint8 patches) before pretraining.

    python scripts/prepare_cem500k.py SRC [--file_list LIST.txt] [--relative] [--size 224]
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

import fire

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # find custom/ without an install

from custom.prepare import check_cem500k, run_cli  # noqa: E402


def main(
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


if __name__ == "__main__":
    fire.Fire(main)
