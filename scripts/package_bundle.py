"""Write a self-contained model-zoo zip of one bundle.

    python scripts/package_bundle.py retina_finetune [--out dist] [--url_base URL] [--weights PATH]

The zip holds ``NAME/configs``, ``NAME/docs``, ``NAME/LICENSE``, ``NAME/models/model.pt`` (when
present or given), ``NAME/large_files.yml`` (where ``models/model.pt`` is fetched from, with its
md5) and a copy of this repository's ``custom/`` package at the bundle root: ``python -m
monai.bundle run`` puts the bundle folder first on ``sys.path``, so the unzipped bundle runs with only
its declared packages installed. Run-time outputs (checkpoints, mlruns, demo data) are left out.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

import fire

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"__pycache__", "mlruns", "eval", "outputs", "demo_data", "runs", "custom", "ckpt", "checkpoints"}
SKIP_SUFFIXES = {".pyc", ".db", ".tmp"}


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _bundle_files(bundle: Path):
    for dirpath, dirnames, filenames in os.walk(bundle):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        rel_dir = Path(dirpath).relative_to(bundle)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.suffix in SKIP_SUFFIXES or (rel_dir == Path("models") and name != "model.pt" and name != ".gitkeep"):
                continue
            yield p, rel_dir / name


def main(name: str, out: str = "dist", url_base: str = "", weights: str = "") -> str:
    """Package ``bundles/<name>`` into ``<out>/<name>_v<version>.zip``; returns the zip's path."""
    bundle = ROOT / "bundles" / name
    if not (bundle / "configs" / "metadata.json").is_file():
        print(f"error: {bundle} is not a bundle (no configs/metadata.json)", file=sys.stderr)
        sys.exit(2)
    version = json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    model_pt = Path(weights) if weights else bundle / "models" / "model.pt"
    os.makedirs(out, exist_ok=True)
    zpath = Path(out) / f"{name}_v{version}.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
        for p, rel in _bundle_files(bundle):
            if rel == Path("models/model.pt"):
                continue
            z.write(p, f"{name}/{rel.as_posix()}")
        for p in sorted((ROOT / "custom").glob("*.py")):
            z.write(p, f"{name}/custom/{p.name}")
        if model_pt.is_file():
            z.write(model_pt, f"{name}/models/model.pt")
            url = f"{url_base.rstrip('/')}/{name}/models/model.pt" if url_base else "models/model.pt"
            z.writestr(
                f"{name}/large_files.yml",
                "large_files:\n"
                f'  - path: "models/model.pt"\n    url: "{url}"\n    hash_val: "{_md5(model_pt)}"\n    hash_type: "md5"\n',
            )
        else:
            print(f"warning: {model_pt} does not exist; the zip carries no weights", file=sys.stderr)
    print(f"wrote {zpath} ({zpath.stat().st_size / 1e6:.1f} MB)")
    return str(zpath)


if __name__ == "__main__":
    fire.Fire(main)
