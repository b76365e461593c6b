"""Statistics of the pretraining transforms: custom ones and the bundle's configured chain.

The chain is built from ``bundles/retina_pretrain/configs/train.json`` itself, so these tests
check the configured probabilities and ranges, not a copy of them.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import CacheDataset
from monai.transforms import Compose, RandCoarseDropoutd

from custom.transforms import FixedAugmentd, RandGaussianBlurd, RandGaussianNoiseVard, RandResizedCropd, opencv_sigma

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "retina_pretrain"
MEAN, STD = 0.57287007, 0.12740536


def _parser(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser["crop_size"] = 64
    for k, v in overrides.items():
        parser[k] = v
    return parser


def _chain(seed: int = 0, **overrides) -> Compose:
    """The configured geometric + copy + degradation chain (train#random_transforms)."""
    parser = _parser(**overrides)
    chain = Compose(parser.get_parsed_content("train#random_transforms"))
    chain.set_random_state(seed=seed)
    return chain


def _texture(h: int = 96, w: int = 80, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.uniform(0.2, 0.8, size=(1, h, w)).astype(np.float32)
    img[:, : h // 3] = 0.9  # an asymmetric structure so flips and rotations change the image
    return img


# ---------------------------------------------------------------- random resized crop


def test_resized_crop_scale_and_ratio_within_bounds():
    t = RandResizedCropd("image", spatial_size=32, scale=(0.08, 1.0), ratio=(0.5, 1.5))
    t.set_random_state(seed=1)
    h, w = 300, 200
    areas, ratios = [], []
    for _ in range(2000):
        t.randomize((h, w))
        top, left, bh, bw = t.box
        assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w
        areas.append(bh * bw / (h * w))
        ratios.append(bw / bh)
    areas, ratios = np.array(areas), np.array(ratios)
    # rounding of w and h to integers moves the area and ratio by well under 2 %
    assert areas.min() >= 0.08 * 0.97 and areas.max() <= 1.0
    assert ratios.min() >= 0.5 * 0.97 and ratios.max() <= 1.5 * 1.03
    assert areas.min() < 0.1 and areas.max() > 0.9  # the whole range is used
    # log-uniform aspect ratio: where every draw fits (small areas), the share of boxes wider
    # than tall is the share of the log range above 0
    t = RandResizedCropd("image", spatial_size=32, scale=(0.08, 0.3), ratio=(0.5, 1.5))
    t.set_random_state(seed=2)
    wide = []
    for _ in range(2000):
        t.randomize((300, 300))
        wide.append(t.box[3] > t.box[2])
    assert abs(np.mean(wide) - math.log(1.5) / math.log(3.0)) < 0.05


def test_resized_crop_output_size_same_box_for_all_keys_and_content():
    img = _texture()
    t = RandResizedCropd(["image", "other"], spatial_size=(48, 40))
    t.set_random_state(seed=3)
    out = t({"image": img, "other": img.copy()})
    assert out["image"].shape == (1, 48, 40) and isinstance(out["image"], np.ndarray)
    np.testing.assert_array_equal(out["image"], out["other"])
    # a box of the output's size is copied exactly (bilinear resize by 1 is the identity)
    t.box = (5, 7, 48, 40)
    same = t({"image": torch.as_tensor(img), "other": img}, randomize=False)["image"]
    assert isinstance(same, torch.Tensor)
    np.testing.assert_allclose(same.numpy(), img[:, 5:53, 7:47], atol=1e-6)


def test_resized_crop_fallback_and_validation():
    t = RandResizedCropd("image", spatial_size=16, scale=(0.99, 1.0), ratio=(3.0, 4.0), max_attempts=0)
    t.randomize((40, 40))  # no attempt: centred box with the ratio clamped to 3
    top, left, h, w = t.box
    assert (h, w) == (13, 40) and top == (40 - 13) // 2
    with pytest.raises(ValueError):
        RandResizedCropd("image", 16, scale=(0.0, 1.0))
    with pytest.raises(ValueError):
        RandResizedCropd("image", 16).__call__({"image": np.zeros((1, 4, 4, 4), np.float32)})


# ---------------------------------------------------------------- noise


def test_noise_variance_in_range_on_255_scale():
    t = RandGaussianNoiseVard("image", prob=1.0, var_range=(400, 1200))
    t.set_random_state(seed=0)
    base = np.full((1, 128, 128), 0.5, np.float32)  # clipping at 0/1 is > 3.7 sigma away
    variances = []
    for _ in range(60):
        out = t({"image": base})["image"]
        emp = float(np.var((out - base) * 255.0))
        assert 400 <= t.variance <= 1200
        assert abs(emp - t.variance) < 0.05 * t.variance  # 16384 pixels: ~1 % standard error
        assert abs(float(np.mean(out - base))) < 0.01
        variances.append(emp)
    assert min(variances) < 600 and max(variances) > 1000


def test_noise_probability_and_clipping():
    t = RandGaussianNoiseVard("image", prob=0.5)
    t.set_random_state(seed=1)
    base = np.zeros((1, 32, 32), np.float32)
    fired = 0
    for _ in range(400):
        out = t({"image": base})["image"]
        assert out.min() >= 0.0  # clipped like the reference's uint8 images
        fired += bool(np.any(out != base))
    assert abs(fired / 400 - 0.5) < 0.08


# ---------------------------------------------------------------- blur


def test_blur_kernel_sizes_and_sigma():
    t = RandGaussianBlurd("image", prob=1.0, kernel_size_range=(3, 7))
    t.set_random_state(seed=0)
    sizes = []
    for _ in range(3000):
        t.randomize()
        sizes.append(t.kernel_size)
        assert t.sigma == pytest.approx(opencv_sigma(t.kernel_size))
    counts = {k: sizes.count(k) / len(sizes) for k in (3, 5, 7)}
    assert set(sizes) == {3, 5, 7}
    assert counts[3] == pytest.approx(0.2, abs=0.03) and counts[5] == pytest.approx(0.4, abs=0.03)
    assert [opencv_sigma(k) for k in (3, 5, 7)] == pytest.approx([0.8, 1.1, 1.4])
    with pytest.raises(ValueError):
        RandGaussianBlurd("image", kernel_size_range=(2, 7))


def test_blur_keeps_constant_images_and_smooths_noise():
    t = RandGaussianBlurd("image", prob=1.0)
    t.set_random_state(seed=2)
    const = np.full((1, 40, 40), 0.7, np.float32)
    np.testing.assert_allclose(t({"image": const})["image"], const, atol=1e-6)  # borders intact
    noise = np.random.default_rng(0).uniform(0, 1, (1, 64, 64)).astype(np.float32)
    out = t({"image": noise})["image"]
    assert out.shape == noise.shape and np.var(out) < 0.5 * np.var(noise)
    assert abs(float(out.mean() - noise.mean())) < 0.01


# ---------------------------------------------------------------- holes (MONAI, as configured)


def _configured_holes() -> RandCoarseDropoutd:
    chain = _parser().get_parsed_content("train#random_transforms")
    holes = [t for t in chain if isinstance(t, RandCoarseDropoutd)]
    assert len(holes) == 1
    return holes[0]


def test_holes_count_size_and_fill():
    t = _configured_holes()
    assert t.prob == 0.5
    t.set_random_state(seed=0)
    t.prob = 1.0
    counts = []
    for _ in range(300):
        img = np.ones((1, 64, 64), np.float32)
        out = t({"image": img})["image"]
        out = out.numpy() if isinstance(out, torch.Tensor) else out
        coords = t.dropper.hole_coords
        assert 1 <= len(coords) <= 32
        expected = np.ones_like(img)
        for c in coords:
            _, ys, xs = c
            assert ys.stop - ys.start == 16 and xs.stop - xs.start == 16
            assert 0 <= ys.start and ys.stop <= 64 and 0 <= xs.start and xs.stop <= 64
            expected[c] = 0.0
        np.testing.assert_array_equal(out, expected)  # holes are 0, everything else untouched
        counts.append(len(coords))
    assert min(counts) <= 2 and max(counts) >= 31
    assert abs(np.mean(counts) - 16.5) < 1.5  # uniform on 1..32


# ---------------------------------------------------------------- the configured chain


def test_brightness_contrast_is_one_affine_map_with_probability_half():
    parser = _parser()
    one_of = [t for t in parser.get_parsed_content("train#random_transforms") if type(t).__name__ == "OneOf"][0]
    one_of.set_random_state(seed=0)
    ramp = np.linspace(0.35, 0.6, 64 * 64, dtype=np.float32).reshape(1, 64, 64)  # no clipping within +-0.3
    fired = 0
    for _ in range(400):
        out = one_of({"image": ramp.copy()})["image"]
        out = out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
        a, b = np.polyfit(ramp.ravel(), out.ravel(), 1)
        if not np.allclose(out, ramp):
            fired += 1
            assert 0.7 - 1e-4 <= a <= 1.3 + 1e-4 and -0.3 - 1e-4 <= b <= 0.3 + 1e-4
    assert abs(fired / 400 - 0.5) < 0.08


def test_target_and_input_share_the_geometric_transform():
    img = _texture()
    no_degradation = {
        "augmentation#brightness_contrast_prob": 0.0,
        "augmentation#noise_prob": 0.0,
        "augmentation#blur_prob": 0.0,
        "augmentation#holes_prob": 0.0,
    }
    full, clean = _chain(seed=5), _chain(seed=5, **no_degradation)
    changed_geometry = degraded = 0
    for _ in range(40):
        a = full({"image": torch.as_tensor(img)})
        b = clean({"image": torch.as_tensor(img)})
        for d in (a, b):
            assert d["image"].shape == d["label"].shape == (1, 64, 64)
        # with no degradation the input is the target
        torch.testing.assert_close(b["image"], b["label"])
        # the same geometric draw gives the same target whether or not degradations fire
        torch.testing.assert_close(a["label"], b["label"])
        degraded += not torch.allclose(a["image"], a["label"])
        resized = torch.nn.functional.interpolate(torch.as_tensor(img)[None], size=(64, 64), mode="bilinear")[0]
        changed_geometry += not torch.allclose(b["label"], resized, atol=1e-3)
    assert changed_geometry >= 38  # random crops almost never equal the plain resize
    assert degraded >= 30  # 1 - 0.5**4 of the items get at least one degradation


def test_normalisation_uses_cem500k_statistics():
    # the paper's CEM500K statistics as the intensity record (by default measured on the training
    # images: tests/test_intensity.py)
    record = {"mapping": "fixed", "low": 0.0, "high": 255.0, "mean": MEAN, "std": STD}
    norm = Compose(_parser(intensity=record).get_parsed_content("train#final_transforms"))
    x = torch.rand(1, 8, 8)
    out = norm({"image": x.clone(), "label": x.clone()})
    torch.testing.assert_close(out["image"], (x - MEAN) / STD)
    torch.testing.assert_close(out["label"], (x - MEAN) / STD)


# ---------------------------------------------------------------- fixed (validation) randomness


def test_fixed_augment_repeats_per_item_and_varies_across_items():
    chain = _chain(seed=0)
    fixed = FixedAugmentd(chain, key="image", seed=0)
    a, b = _texture(seed=1), _texture(seed=2)
    first = fixed({"image": torch.as_tensor(a)})
    chain({"image": torch.as_tensor(b)})  # consuming randomness elsewhere does not matter
    again = pickle.loads(pickle.dumps(fixed))({"image": torch.as_tensor(a)})
    torch.testing.assert_close(first["image"], again["image"])
    torch.testing.assert_close(first["label"], again["label"])
    other = fixed({"image": torch.as_tensor(b)})
    assert not torch.allclose(first["label"], other["label"])
    reseeded = FixedAugmentd(chain, key="image", seed=1)({"image": torch.as_tensor(a)})
    assert not torch.allclose(first["label"], reseeded["label"])


def test_fixed_augment_output_is_cached_by_cache_dataset():
    calls = []

    def degrade(d):
        calls.append(1)
        return {"image": d["image"] + 1}

    items = [{"image": torch.as_tensor(_texture(seed=i))} for i in range(3)]
    ds = CacheDataset(items, transform=Compose([FixedAugmentd(degrade)]), cache_rate=1.0, num_workers=2, progress=False)
    assert len(calls) == 3
    for i in range(3):
        torch.testing.assert_close(ds[i]["image"], items[i]["image"] + 1)
    assert len(calls) == 3  # served from the cache, not recomputed


# ------------------------------------------------------------------------------------------
# sparse labels: crops centred on labelled voxels (LabelledIndicesd + MONAI's RandCropByPosNegLabeld)


def _sparse_crops(ignore_index, with_indices: bool = True, n: int = 200, seed: int = 0) -> list[dict]:
    """``n`` (16, 16) crops of a (1, 64, 64) slice labelled only in its top-left (24, 24) box (the rest 255);
    the image holds each voxel's flat index, so a crop's centre tells where it was drawn."""
    from monai.transforms import RandCropByPosNegLabeld

    from custom.transforms import LabelledIndicesd

    label = torch.full((1, 64, 64), 255.0)
    label[:, :24, :24] = 0
    label[:, 4:10, 4:10] = 1
    image = torch.arange(64 * 64, dtype=torch.float32).reshape(1, 64, 64)
    crop = RandCropByPosNegLabeld(
        keys=["image", "label"], label_key="label", spatial_size=[16, 16], pos=0.8, neg=0.2,
        fg_indices_key="label_fg_indices", bg_indices_key="label_bg_indices",
    )
    chain = Compose([LabelledIndicesd("label", ignore_index=ignore_index), crop] if with_indices else [crop])
    chain.set_random_state(seed)
    return [chain({"image": image, "label": label})[0] for _ in range(n)]


def test_sparse_crops_are_centred_on_labelled_voxels():
    crops = _sparse_crops(255)
    centres = [int(c["image"][0, 8, 8]) for c in crops]
    rows, cols = np.divmod(np.array(centres), 64)
    assert ((rows < 24) & (cols < 24)).all()  # every centre in the labelled box
    on_class = np.mean([float(c["label"][0, 8, 8]) == 1.0 for c in crops])
    assert 0.65 < on_class < 0.95  # foreground_crop_prob 0.8 of them on a labelled class, the rest on labelled 0
    # without the labelled indices MONAI's "label > 0" takes the unlabelled 255 for foreground
    plain = [int(c["image"][0, 8, 8]) for c in _sparse_crops(255, with_indices=False)]
    prow, pcol = np.divmod(np.array(plain), 64)
    assert ((prow >= 24) | (pcol >= 24)).mean() > 0.5


def test_a_wholly_unlabelled_slice_still_crops():
    from custom.transforms import LabelledIndicesd

    out = LabelledIndicesd("label", ignore_index=255)({"label": torch.full((1, 8, 8), 255.0)})
    assert out["label_fg_indices"].numel() == 0 and out["label_bg_indices"].numel() == 64


def test_without_ignore_index_the_crops_are_todays():
    same = _sparse_crops(None, with_indices=True, n=30, seed=5)
    today = _sparse_crops(None, with_indices=False, n=30, seed=5)
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"]) for a, b in zip(same, today))
    assert "label_fg_indices" not in same[0]
