"""Deterministic synthetic EM-like images and labelled volumes for demos and tests.

The generator paints what a segmentation model has to tell apart in serial-section EM:

- bright cytoplasm with low-frequency texture and a per-cell brightness offset;
- dark cell membranes: boundaries of a domain-warped Voronoi tessellation whose seeds drift
  slowly along z, so cells persist from section to section;
- mitochondria: dark elongated tubes (elliptical cross-sections that drift, rotate and
  taper at their ends) with transverse cristae stripes and a darker outer membrane;
- clustered small vesicles with a dark rim;
- in-plane blur, Poisson (shot) noise and Gaussian read noise.

Everything is drawn from one ``numpy.random.Generator`` seeded by the caller, so the same
seed gives the same bytes. Sizes scale with the image (the defaults are tuned for 160 px);
mitochondria cover about 12-18 % of the pixels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from .utils import atomic_path

__all__ = ["em_image", "em_volume", "write_labelled_demo", "write_unlabelled_demo", "labelled_data_root"]

SeedLike = Any  # what numpy.random.default_rng accepts: int, sequence of ints, SeedSequence

# grey levels on a [0, 1] scale
_CYTOPLASM = 0.72
_MEMBRANE_DEPTH = 0.42
_MITO_MATRIX = 0.42
_MITO_RIM_DEPTH = 0.22
_CRISTAE_AMP = 0.09


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: Sequence[float]) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation, float32 of ``shape``."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    sigma = [s if n > 1 else 0.0 for s, n in zip(sigma, shape)]
    out = ndimage.gaussian_filter(noise, sigma, mode="wrap")
    return out / max(float(out.std()), 1e-6)


def _render(shape: Sequence[int], seed: SeedLike) -> tuple[np.ndarray, np.ndarray]:
    """Draw a (Z, Y, X) EM-like volume.

    Returns:
        image uint8 (Z, Y, X) and label uint8 (Z, Y, X) with 0 background, 1 mitochondrion,
        2 cell membrane (outside mitochondria).
    """
    nz, ny, nx = (int(s) for s in shape)
    if min(nz, ny, nx) < 1:
        raise ValueError(f"shape must be positive, got {tuple(shape)}")
    rng = np.random.default_rng(seed)
    scale = float(np.clip(min(ny, nx) / 160.0, 0.4, 2.5))

    # cytoplasm: coarse and fine texture
    img = _CYTOPLASM + 0.05 * _smooth_noise(rng, (nz, ny, nx), (2.0, 12 * scale, 12 * scale))
    img += 0.025 * _smooth_noise(rng, (nz, ny, nx), (0.7, 1.5, 1.5))

    # membranes: warped Voronoi boundaries with seeds drifting along z
    cell = 70.0 * scale
    n_cells = max(3, int(round((ny + 0.2 * ny) * (nx + 0.2 * nx) / cell**2)))
    seeds = np.stack([rng.uniform(-0.1 * ny, 1.1 * ny, n_cells), rng.uniform(-0.1 * nx, 1.1 * nx, n_cells)], 1)
    drift = rng.normal(0.0, 0.5, (n_cells, 2))
    offsets = rng.normal(0.0, 0.035, n_cells).astype(np.float32)
    warp_y = 4.0 * scale * _smooth_noise(rng, (nz, ny, nx), (3.0, 10 * scale, 10 * scale))
    warp_x = 4.0 * scale * _smooth_noise(rng, (nz, ny, nx), (3.0, 10 * scale, 10 * scale))
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    width = 1.5 * np.sqrt(scale)
    membrane = np.empty((nz, ny, nx), np.float32)
    owner = np.empty((nz, ny, nx), np.int32)
    for z in range(nz):
        pos = (seeds + drift * z).astype(np.float32)
        wy, wx = yy + warp_y[z], xx + warp_x[z]
        sq = (wy[None] - pos[:, 0, None, None]) ** 2 + (wx[None] - pos[:, 1, None, None]) ** 2
        near = np.argpartition(sq, 1, axis=0)[:2]
        d_sq = np.take_along_axis(sq, near, axis=0)
        first = d_sq[0] <= d_sq[1]
        i1, i2 = np.where(first, near[0], near[1]), np.where(first, near[1], near[0])
        gap = np.linalg.norm(pos[i1] - pos[i2], axis=-1)
        # exact distance to the bisector of the two nearest seeds
        bisector = np.abs(d_sq[1] - d_sq[0]) / (2.0 * np.maximum(gap, 1e-3))
        owner[z] = i1
        membrane[z] = np.exp(-((bisector / width) ** 2))
    img += offsets[owner]
    img -= _MEMBRANE_DEPTH * membrane * img
    membrane_mask = membrane > 0.35

    # mitochondria: tapered elliptical tubes moving with their cell
    cristae_warp = 1.2 * _smooth_noise(rng, (nz, ny, nx), (1.0, 2.0 * scale, 2.0 * scale))
    label = np.zeros((nz, ny, nx), np.uint8)
    target = rng.uniform(0.12, 0.18) * label.size
    covered = 0
    zz = np.arange(nz, dtype=np.float32)
    for _ in range(400):
        if covered >= target:
            break
        a = rng.uniform(9.0, 18.0) * scale
        b = rng.uniform(4.5, 7.5) * scale
        cy, cx = rng.uniform(0, ny), rng.uniform(0, nx)
        z0 = rng.uniform(0, nz) if nz > 1 else 0.0
        half = rng.uniform(0.5, 1.5) * nz if nz > 1 else 1.0
        theta, dtheta = rng.uniform(0, np.pi), rng.normal(0, 0.015)
        phase = rng.uniform(0, 2 * np.pi)
        period = rng.uniform(3.5, 5.5) * np.sqrt(scale)
        cell_id = owner[min(int(z0), nz - 1), min(int(cy), ny - 1), min(int(cx), nx - 1)]
        vel = drift[cell_id] + rng.normal(0, 0.1, 2)
        # tube geometry for all slices at once, within the bounding box of its path
        taper = np.sqrt(np.clip(1.0 - ((zz - z0) / half) ** 2, 0.0, 1.0))
        taper = np.where(taper > 0.35, taper, 0.0)
        zs = np.nonzero(taper)[0]
        if zs.size == 0:
            continue
        ctr_y, ctr_x = cy + vel[0] * (zz - z0), cx + vel[1] * (zz - z0)
        reach = a + 3.0
        y0 = int(max(0, np.floor(ctr_y[zs].min() - reach)))
        y1 = int(min(ny, np.ceil(ctr_y[zs].max() + reach)))
        x0 = int(max(0, np.floor(ctr_x[zs].min() - reach)))
        x1 = int(min(nx, np.ceil(ctr_x[zs].max() + reach)))
        if y1 <= y0 or x1 <= x0:
            continue
        z_lo, z_hi = int(zs.min()), int(zs.max()) + 1
        sub = (slice(z_lo, z_hi), slice(y0, y1), slice(x0, x1))
        k = taper[z_lo:z_hi, None, None]
        dy = yy[None, y0:y1, x0:x1] - ctr_y[z_lo:z_hi, None, None]
        dx = xx[None, y0:y1, x0:x1] - ctr_x[z_lo:z_hi, None, None]
        ang = theta + dtheta * (zz[z_lo:z_hi, None, None] - z0)
        u = dx * np.cos(ang) + dy * np.sin(ang)
        v = -dx * np.sin(ang) + dy * np.cos(ang)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.sqrt((u / (a * k)) ** 2 + (v / (b * k)) ** 2)
        r = np.where(k > 0, r, np.inf)
        inside = r <= 1.0
        area = int(inside.sum())
        if area == 0:
            continue
        if (label[sub][inside] > 0).mean() > 0.02 or membrane_mask[sub][inside].mean() > 0.15:
            continue
        # paint: matrix with transverse cristae, dark outer membrane, soft edge
        stripes = np.cos(2 * np.pi * u / period + phase + 0.6 * np.sin(v / (1.5 * scale)) + cristae_warp[sub])
        mito = _MITO_MATRIX + rng.normal(0, 0.03) + _CRISTAE_AMP * stripes
        alpha = np.clip((1.06 - r) / 0.12, 0.0, 1.0)
        rim = np.exp(-(((r - 1.0) * b * k / 1.1) ** 2))
        region = img[sub]
        region = region * (1 - alpha) + mito * alpha
        region -= _MITO_RIM_DEPTH * rim * region
        img[sub] = region
        label[sub][inside] = 1
        covered += area

    # vesicles: small dark-rimmed spheres, partly clustered
    n_ves = int(nz * ny * nx / (700.0 * scale**2) / max(1.0, min(3.0, nz / 2)))
    clusters = np.stack([rng.uniform(0, nz, 3), rng.uniform(0, ny, 3), rng.uniform(0, nx, 3)], 1)
    for _ in range(n_ves):
        if rng.random() < 0.6:
            c = clusters[rng.integers(3)] + rng.normal(0, [1.5, 10 * scale, 10 * scale])
        else:
            c = np.array([rng.uniform(0, nz), rng.uniform(0, ny), rng.uniform(0, nx)])
        if nz == 1:
            c[0] = 0.0
        rad = rng.uniform(2.0, 3.5) * np.sqrt(scale)
        rz = max(0.8, rad / 2.5)
        iz, iy, ix = (int(np.floor(v)) for v in c)
        if not (0 <= iz < nz and 0 <= iy < ny and 0 <= ix < nx) or label[iz, iy, ix]:
            continue
        zr = slice(max(0, int(c[0] - rz)), min(nz, int(c[0] + rz) + 1))
        yr = slice(max(0, int(c[1] - rad - 2)), min(ny, int(c[1] + rad + 3)))
        xr = slice(max(0, int(c[2] - rad - 2)), min(nx, int(c[2] + rad + 3)))
        gz, gy, gx = np.ogrid[zr, yr, xr]
        d = np.sqrt(((gz - c[0]) / rz) ** 2 + ((gy - c[1]) / rad) ** 2 + ((gx - c[2]) / rad) ** 2)
        rim = np.exp(-(((d - 1.0) * rad / 0.8) ** 2)) * (label[zr, yr, xr] == 0)
        img[zr, yr, xr] -= 0.3 * rim * img[zr, yr, xr]

    # optics and detector: in-plane blur, shot noise, read noise
    img = ndimage.gaussian_filter(img, (0.0, 0.8, 0.8))
    photons = 300.0
    img = rng.poisson(np.clip(img, 0, None) * photons).astype(np.float32) / photons
    img += rng.normal(0.0, 0.02, img.shape).astype(np.float32)
    image = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)

    label[(label == 0) & membrane_mask] = 2
    return image, label


def em_image(shape: Sequence[int] = (160, 160), seed: SeedLike = 0) -> np.ndarray:
    """One EM-like 2D image.

    Args:
        shape: ``(H, W)``.
        seed: anything ``numpy.random.default_rng`` accepts (int, list of ints, SeedSequence).

    Returns:
        uint8 array ``(H, W)``; the same seed gives the same bytes.
    """
    if len(shape) != 2:
        raise ValueError(f"shape must be (H, W), got {tuple(shape)}")
    return _render((1, *shape), seed)[0][0]


def em_volume(
    shape: Sequence[int] = (24, 160, 160), seed: SeedLike = 0, num_classes: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """An EM-like volume whose structures change smoothly from section to section.

    Args:
        shape: ``(Z, Y, X)``.
        seed: as :func:`em_image`.
        num_classes: 2 (0 background, 1 mitochondrion) or 3 (also 2 = cell membrane).

    Returns:
        ``(image, label)``: uint8 ``(Z, Y, X)`` each.
    """
    if len(shape) != 3:
        raise ValueError(f"shape must be (Z, Y, X), got {tuple(shape)}")
    if num_classes not in (2, 3):
        raise ValueError(f"num_classes must be 2 or 3, got {num_classes}")
    image, label = _render(shape, seed)
    if num_classes == 2:
        label[label == 2] = 0
    return image, label


# --------------------------------------------------------------------------------------
# demo folders
# --------------------------------------------------------------------------------------
def _write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def _write_tif(path: Path, arr: np.ndarray) -> None:
    import tifffile

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, arr, photometric="minisblack")


def _up_to_date(folder: Path, manifest: str, params: dict, files: list[Path]) -> bool:
    try:
        recorded = json.loads((folder / manifest).read_text())
    except (OSError, ValueError):
        return False
    return recorded == params and all(f.is_file() for f in files)


def _record(folder: Path, manifest: str, params: dict) -> None:
    with atomic_path(folder / manifest) as tmp:
        tmp.write_text(json.dumps(params, sort_keys=True))


def write_unlabelled_demo(
    folder: str | os.PathLike, n_images: int = 24, size: int = 160, n_stacks: int = 1, seed: int = 0
) -> list[str]:
    """Fill ``folder`` with unlabelled EM-like data for the pretraining demo.

    Writes ``demo_000.png`` ... (``n_images`` 2D uint8 images of ``size`` x ``size``) and
    ``stack_0.tif`` ... (``n_stacks`` multi-page TIFFs of shape ``(8, size, size)``). Files that
    already exist from the same parameters are kept (a hidden manifest records them), so calling
    it again costs nothing; writes are atomic.

    Returns:
        the written (or existing) file paths, sorted.
    """
    folder = Path(folder)
    params = {"kind": "unlabelled", "n_images": n_images, "size": size, "n_stacks": n_stacks, "seed": seed, "v": 1}
    pngs = [folder / f"demo_{i:03d}.png" for i in range(n_images)]
    stacks = [folder / f"stack_{j}.tif" for j in range(n_stacks)]
    manifest = ".retina_demo_unlabelled.json"
    if not _up_to_date(folder, manifest, params, pngs + stacks):
        for i, p in enumerate(pngs):
            _write_png(p, em_image((size, size), seed=[seed, 0, i]))
        for j, p in enumerate(stacks):
            _write_tif(p, em_volume((8, size, size), seed=[seed, 1, j])[0])
        _record(folder, manifest, params)
    return sorted(str(p) for p in pngs + stacks)


def write_labelled_demo(
    folder: str | os.PathLike, shape: Sequence[int] = (24, 160, 160), seed: int = 0, num_classes: int = 2
) -> dict[str, list[dict[str, str]]]:
    """Write a labelled EM-like demo: one training and one validation volume.

    Layout: ``train/images/vol0.tif``, ``train/labels/vol0.tif``, ``val/images/vol0.tif``,
    ``val/labels/vol0.tif``; images uint8 (Z, Y, X), labels uint8 class indices (0 background,
    1 mitochondrion, 2 membrane when ``num_classes=3``). Existing files from the same
    parameters are kept; writes are atomic.

    Returns:
        ``{"train": [{"image": path, "label": path}], "val": [{"image": ..., "label": ...}]}``.
    """
    folder = Path(folder)
    shape = tuple(int(s) for s in shape)
    params = {"kind": "labelled", "shape": list(shape), "seed": seed, "num_classes": num_classes, "v": 1}
    splits = {"train": 0, "val": 1}
    items = {
        split: [{"image": str(folder / split / "images" / "vol0.tif"), "label": str(folder / split / "labels" / "vol0.tif")}]
        for split in splits
    }
    files = [Path(p) for split in items for it in items[split] for p in it.values()]
    manifest = ".retina_demo_labelled.json"
    if not _up_to_date(folder, manifest, params, files):
        for split, offset in splits.items():
            image, label = em_volume(shape, seed=[seed, 2, offset], num_classes=num_classes)
            _write_tif(Path(items[split][0]["image"]), image)
            _write_tif(Path(items[split][0]["label"]), label)
        _record(folder, manifest, params)
    return items


def labelled_data_root(
    dataset_dir: str | os.PathLike | None, demo_dir: str | os.PathLike, shape: Sequence[int] = (24, 160, 160),
    num_classes: int = 2,
) -> str:
    """The fine-tuning data folder: ``dataset_dir`` when given, else ``demo_dir`` holding the synthetic
    demo (:func:`write_labelled_demo`, written once), so the bundle's demo runs with no data at all."""
    if dataset_dir:
        return os.fspath(dataset_dir)
    write_labelled_demo(demo_dir, shape=shape, num_classes=num_classes)
    return os.fspath(demo_dir)
