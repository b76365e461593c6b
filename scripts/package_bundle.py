"""Write a self-contained model-zoo zip of one bundle.

    python scripts/package_bundle.py retina_finetune [--out dist] [--url_base URL] [--weights PATH]
        [--overlay configs/demo.json]

The zip holds ``NAME/configs``, ``NAME/docs``, ``NAME/LICENSE``, ``NAME/models/model.pt`` (when
present or given), ``NAME/large_files.yml`` (where ``models/model.pt`` is fetched from, with its
md5) and a copy of this repository's ``custom/`` package at the bundle root: ``python -m
monai.bundle run`` puts the bundle folder first on ``sys.path``, so the unzipped bundle runs with only
its declared packages installed. Run-time outputs (checkpoints, mlruns, demo data) are left out.

The weights must load strictly (``custom.checkpoints.load_weights``) into the network that the
bundle's own configs build (``network_def`` of ``configs/inference.json`` and ``configs/train.json``
with their default settings), since that is what a user of the downloaded bundle runs; otherwise the
script refuses with one line, ``package_bundle: error: <weights>: <problem>``, and exit status 1.
Weights meant for an overlay of the bundle's configs (the tiny demo weights: ``configs/demo.json``)
are checked with ``--overlay configs/demo.json`` merged on top; the zip's users must then pass the
same overlay (``--config_file "['configs/inference.json','configs/demo.json']"``).
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # find custom/ without an install
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


def _overlays(bundle: Path, overlay) -> list[str]:
    names = [] if not overlay else [overlay] if isinstance(overlay, str) else list(overlay)
    return [str(Path(n) if Path(n).is_absolute() else bundle / n) for n in names]


def check_weights(bundle: Path, model_pt: Path, overlay=None) -> list[str]:
    """Load ``model_pt`` strictly into the ``network_def`` of each of the bundle's inference.json and
    train.json (with ``overlay`` files merged on top); returns the configs checked.

    Raises:
        custom.checkpoints.CheckpointError: the weights do not fit one of them (the message names the
            weights, the config and the settings that shape the network).
    """
    from monai.bundle import ConfigParser

    from custom.checkpoints import CheckpointError, load_weights

    extra = _overlays(bundle, overlay)
    checked = []
    for name in ("inference.json", "train.json"):
        config = bundle / "configs" / name
        if not config.is_file():
            continue
        parser = ConfigParser()
        parser.read_config([str(config), *extra])
        if "network_def" not in parser:
            continue
        parser["bundle_root"] = str(bundle)
        settings = {k: parser[k] for k in ("preset", "crop_size", "num_classes") if k in parser}
        try:
            load_weights(parser.get_parsed_content("network_def"), model_pt)
        except CheckpointError as e:
            used = "+".join(Path(c).name for c in [str(config), *extra])
            raise CheckpointError(
                f"{e}; the bundle's {used} build the network with {settings}: package weights trained with "
                "these settings, or pass the overlay they were trained with (--overlay configs/demo.json for "
                "the demo weights)"
            ) from None
        checked.append(name)
    return checked


def main(name: str, out: str = "dist", url_base: str = "", weights: str = "", overlay=None) -> str:
    """Package ``bundles/<name>`` into ``<out>/<name>_v<version>.zip``; returns the zip's path.

    Args:
        name: the bundle folder under ``bundles/``.
        out: output folder.
        url_base: where ``models/model.pt`` will be downloadable from (written to ``large_files.yml``).
        weights: the weights to pack (default: the bundle's ``models/model.pt``).
        overlay: bundle config file(s) the weights were trained with, merged on top of the bundle's
            configs for the check (e.g. ``configs/demo.json``).
    """
    bundle = ROOT / "bundles" / name
    if not (bundle / "configs" / "metadata.json").is_file():
        print(f"error: {bundle} is not a bundle (no configs/metadata.json)", file=sys.stderr)
        sys.exit(2)
    version = json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    model_pt = Path(weights) if weights else bundle / "models" / "model.pt"
    for path in _overlays(bundle, overlay):
        if not Path(path).is_file():
            print(f"package_bundle: error: {path}: overlay config not found", file=sys.stderr)
            sys.exit(1)
    if model_pt.is_file():
        from custom.checkpoints import CheckpointError

        try:
            checked = check_weights(bundle, model_pt, overlay)
        except CheckpointError as e:
            print(f"package_bundle: error: {' '.join(str(e).split())}", file=sys.stderr)
            sys.exit(1)
        print(f"{model_pt}: loads strictly into the network of {', '.join(checked) or 'no config'}")
    os.makedirs(out, exist_ok=True)
    zpath = Path(out) / f"{name}_v{version}.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
        for p, rel in _bundle_files(bundle):
            if rel == Path("models/model.pt"):
                continue
            z.write(p, f"{name}/{rel.as_posix()}")
        for p in sorted((ROOT / "custom").rglob("*.py")):  # the package with its sub-packages (custom/io/)
            z.write(p, f"{name}/custom/{p.relative_to(ROOT / 'custom').as_posix()}")
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
