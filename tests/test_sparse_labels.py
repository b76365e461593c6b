"""Sparse labels (issue 15 part 2): ``ignore_index`` marks unlabelled voxels, which add nothing to the loss or
the metrics, are accepted by the dataset checks as not-a-class, and are not learned as background.

The training test fails without ``ignore_index``: ``RETINA_SPARSE_IGNORE_INDEX=none`` runs it the naive way
(unlabelled voxels stored as background 0, as a user without the setting would have to), and the network then
learns the unlabelled mitochondria as background.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from custom.errors import ConfigError
from custom.io import DatasetError, check_foreground, validate_items, write_em
from custom.losses import CEWeightedDiceCELoss
from custom.metrics import (
    ClassConfusionMetric,
    PooledClassScore,
    class_confusion,
    evaluate_segmentation,
)
from custom.preflight import check_data
from tests.helpers import REPO, run_workflow

IGNORE = 255


def _sparse_target(shape, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random class indices ``shape`` (B, 1, H, W) with a third of the voxels unlabelled; and that mask."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, max(2, num_classes), shape, generator=g).float()
    unlabelled = torch.rand(shape, generator=g) < 0.35
    return torch.where(unlabelled, torch.full_like(target, IGNORE), target), unlabelled


# ------------------------------------------------------------------------------------------
# loss


@pytest.mark.parametrize("num_classes, class_weights", [(1, None), (3, None), (3, [0.2, 1.0, 3.0])])
def test_loss_gradient_is_zero_at_ignored_voxels(num_classes, class_weights):
    target, unlabelled = _sparse_target((2, 1, 16, 16), num_classes)
    logits = torch.randn(2, num_classes, 16, 16, requires_grad=True)
    loss = CEWeightedDiceCELoss(num_classes=num_classes, class_weights=class_weights, ignore_index=IGNORE)(logits, target)
    loss.backward()
    grad = logits.grad.abs().sum(dim=1, keepdim=True)
    assert torch.isfinite(loss) and float(loss) > 0
    assert float(grad[unlabelled].max()) == 0.0
    assert float(grad[~unlabelled].min()) > 0.0  # the labelled voxels do train


@pytest.mark.parametrize("num_classes", [1, 3])
def test_loss_does_not_see_what_is_predicted_at_unlabelled_voxels(num_classes):
    target, unlabelled = _sparse_target((2, 1, 16, 16), num_classes, seed=1)
    loss = CEWeightedDiceCELoss(num_classes=num_classes, ignore_index=IGNORE)
    logits = torch.randn(2, num_classes, 16, 16)
    other = torch.where(unlabelled, 10 * torch.randn_like(logits), logits)  # anything at unlabelled voxels
    assert torch.allclose(loss(logits, target), loss(other, target))
    # where nothing is unlabelled it is the plain loss (ignore_index=None: DiceCELoss exactly)
    full = torch.where(unlabelled, torch.zeros_like(target), target)
    plain = CEWeightedDiceCELoss(num_classes=num_classes)
    assert torch.allclose(loss(logits, full), plain(logits, full))
    assert not torch.allclose(loss(logits, target), plain(logits, full))


@pytest.mark.parametrize("num_classes", [1, 3])
def test_loss_of_a_wholly_unlabelled_batch_is_zero(num_classes):
    logits = torch.randn(2, num_classes, 8, 8, requires_grad=True)
    loss = CEWeightedDiceCELoss(num_classes=num_classes, ignore_index=IGNORE)(logits, torch.full((2, 1, 8, 8), 255.0))
    loss.backward()
    assert float(loss) == 0.0 and float(logits.grad.abs().max()) == 0.0


@pytest.mark.parametrize("ignore_index, fill", [(255, 255), (None, 0)])
def test_a_padded_border_is_unlabelled_with_sparse_labels_and_background_without(ignore_index, fill):
    from custom.transforms import PadForCropd

    data = {"image": torch.full((1, 5, 6), 0.5), "label": torch.ones(1, 5, 6)}
    out = PadForCropd("image", "label", (8, 8), ignore_index=ignore_index)(data)
    image, label = out["image"], out["label"]
    assert tuple(image.shape) == tuple(label.shape) == (1, 8, 8)
    inside = label == 1
    assert int(inside.sum()) == 30 and bool((image[inside] == 0.5).all())  # the data is kept, once
    assert bool((label[~inside] == fill).all()) and bool((image[~inside] == 0).all())


def test_an_ignore_index_that_is_a_class_is_refused():
    with pytest.raises(ConfigError, match="ignore_index: 2 is a class of a 3-class task"):
        CEWeightedDiceCELoss(num_classes=3, ignore_index=2)
    CEWeightedDiceCELoss(num_classes=3, ignore_index=3)
    with pytest.raises(ConfigError, match="ignore_index: 1 is a class of a 2-class task"):
        validate_items([], num_classes=2, ignore_index=1)  # the data check says so before any file is read


# ------------------------------------------------------------------------------------------
# metrics


def test_metrics_equal_the_metrics_of_the_labelled_voxels_only():
    g = torch.Generator().manual_seed(3)
    truth, unlabelled = _sparse_target((3, 1, 20, 20), 3, seed=3)
    pred = torch.randint(0, 3, truth.shape, generator=g).float()
    labelled = ~unlabelled
    # the reference: the labelled voxels alone, as one flat image (no ignore value left in it)
    flat_pred, flat_truth = pred[labelled].reshape(1, 1, -1), truth[labelled].reshape(1, 1, -1)
    for name in ("iou", "f1", "precision", "recall"):
        sparse = ClassConfusionMetric([1, 2], name, ignore_index=IGNORE)
        sparse(pred, truth)
        reference = ClassConfusionMetric([1, 2], name)
        reference(flat_pred, flat_truth)
        assert torch.allclose(sparse.aggregate("none"), reference.aggregate("none")), name
        assert torch.allclose(sparse.aggregate(), reference.aggregate()), name
    assert torch.equal(class_confusion(pred, truth, [1, 2], IGNORE), class_confusion(flat_pred, flat_truth, [1, 2]))
    # without ignore_index, predictions at unlabelled voxels would count as false positives
    assert not torch.equal(class_confusion(pred, truth, [1, 2]), class_confusion(flat_pred, flat_truth, [1, 2]))
    # the evaluation tables too (per volume)
    table = evaluate_segmentation(pred[0, 0], truth[0, 0], [1, 2], distances=False, ignore_index=IGNORE)
    ref = evaluate_segmentation(pred[0, 0][labelled[0, 0]], truth[0, 0][labelled[0, 0]], [1, 2], distances=False)
    assert table == ref


def test_pooled_score_handler_counts_labelled_voxels_only():
    from ignite.engine import Engine

    truth, unlabelled = _sparse_target((2, 1, 12, 12), 1, seed=4)
    pred = torch.where(unlabelled, torch.ones_like(truth), (truth == 1).float())  # right wherever labelled
    engine = Engine(lambda e, b: b)
    PooledClassScore([1], ignore_index=IGNORE).attach(engine, "iou")
    PooledClassScore([1]).attach(engine, "iou_all")
    engine.run([{"pred": pred, "label": truth}])
    assert engine.state.metrics["iou"] == pytest.approx(1.0)
    assert engine.state.metrics["iou_all"] < 0.9


def test_evaluation_distances_see_no_prediction_at_unlabelled_voxels():
    truth = np.full((16, 16), IGNORE, np.uint8)
    truth[:, :8] = 0
    truth[4:8, 2:6] = 1
    pred = (truth == 1).astype(np.uint8)
    pred[10:14, 10:14] = 1  # a prediction where nothing is labelled: neither right nor wrong
    result = evaluate_segmentation(pred, truth, [1], ignore_index=IGNORE)["class_1"]
    assert result["iou"] == 1.0 and result["mfd"] == 0.0


# ------------------------------------------------------------------------------------------
# dataset checks


def _dataset(tmp_path: Path, label: np.ndarray) -> list[dict]:
    img = np.full(label.shape, 100, np.uint8)
    write_em(tmp_path / "img.tif", img)
    write_em(tmp_path / "lab.tif", label)
    return [{"image": str(tmp_path / "img.tif"), "label": str(tmp_path / "lab.tif")}]


def test_validation_accepts_the_ignore_value_only_when_it_is_set(tmp_path):
    label = np.full((2, 16, 16), IGNORE, np.uint8)
    label[:, :4, :4] = 0
    label[:, 1:3, 1:3] = 1
    items = _dataset(tmp_path, label)
    with pytest.raises(DatasetError, match="label values up to 255 but num_classes is 2"):
        validate_items(items, num_classes=2)
    validate_items(items, num_classes=2, ignore_index=IGNORE)
    assert check_data(items=[items], num_classes=2, foreground_items=items, ignore_index=IGNORE)
    label[0, 0, 0] = 2  # a real class out of range is still refused
    with pytest.raises(DatasetError, match=r"up to 2 but num_classes is 2 \(expected 0..1 or 255 \(ignore_index"):
        validate_items(_dataset(tmp_path, label), num_classes=2, ignore_index=IGNORE)


def test_unlabelled_voxels_are_not_foreground(tmp_path):
    label = np.full((2, 16, 16), IGNORE, np.uint8)
    label[:, :4] = 0
    items = _dataset(tmp_path, label)
    assert check_foreground(items) == 2 * 12 * 16  # without ignore_index 255 is a class value, as before
    with pytest.raises(DatasetError, match="no training label holds a foreground class .* are 0 or 255"):
        check_foreground(items, ignore_index=IGNORE)
    with pytest.raises(DatasetError, match="no training label holds a foreground class"):
        check_data(items=[items], num_classes=2, foreground_items=items, ignore_index=IGNORE)
    label[1, 2, 2] = 1
    assert check_foreground(_dataset(tmp_path, label), ignore_index=IGNORE) == 1


# ------------------------------------------------------------------------------------------
# training: the unlabelled part is not learned as background


def _blobs(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 volume of bright disks ("mitochondria", class 1) on a noisy background, and its full truth."""
    rng = np.random.default_rng(seed)
    z, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    truth = np.zeros(shape, np.uint8)
    for k in range(z):
        for _ in range(14):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, 8)
            truth[k][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
    img = np.where(truth == 1, 170, 80) + rng.normal(0, 25, shape)
    return np.clip(img, 0, 255).astype(np.uint8), truth


def _ignore_setting() -> int | None:
    value = os.environ.get("RETINA_SPARSE_IGNORE_INDEX", str(IGNORE))
    return None if value.lower() == "none" else int(value)


def test_sparse_training_learns_the_unlabelled_part(tmp_path):
    """Only the left third of each slice is annotated (the rest 255); validation scores the whole slices against
    the full truth. With ``ignore_index`` the disks of the unannotated two thirds are found; stored as
    background instead (``RETINA_SPARSE_IGNORE_INDEX=none``) they are learned as background."""
    ignore = _ignore_setting()
    img, truth = _blobs((4, 96, 96), seed=0)
    sparse = truth.copy()
    sparse[:, :, 32:] = IGNORE if ignore is not None else 0
    data = tmp_path / "data"
    for split, label in (("train", sparse), ("val", truth)):
        write_em(data / split / "images" / "vol.tif", img)
        write_em(data / split / "labels" / "vol.tif", label)
    wf = run_workflow(
        REPO / "bundles" / "retina_finetune", ["train", "demo"], tmp_path / "bundle",
        dataset_dir=str(data), ignore_index=ignore, transfer="none",
        iterations=40, val_interval=20, batch_size=4, learning_rate=0.03, val_overlap=0.0,
    )
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    trainer = wf.parser.get_parsed_content("train#trainer")
    unlabelled_truth = truth[:, :, 32:]
    print(f"ignore_index={ignore}: best val IoU {evaluator.state.best_metric:.3f}, "
          f"train IoU {trainer.state.metrics['train_mean_iou']:.3f}, unlabelled part {unlabelled_truth.mean():.1%} class 1")
    # two thirds of the scored mitochondria lie in the unannotated part: a network that learned them as
    # background cannot reach this
    assert evaluator.state.best_metric > 0.6
    assert trainer.state.metrics["train_mean_iou"] > 0.5  # converged on the labelled part
    # evaluation of sparse labels scores the labelled voxels only (the left third here)
    run_workflow(
        REPO / "bundles" / "retina_finetune", ["train", "evaluate", "demo"], tmp_path / "bundle",
        dataset_dir=str(data), ignore_index=ignore, eval_label_dir=str(data / "train" / "labels"), distances=False,
    )
    summary = json.loads((tmp_path / "bundle" / "eval" / "evaluation" / "eval_summary.json").read_text())
    print(f"evaluation of the labelled part: IoU {summary['mean']['mitochondrion']['iou']:.3f}")
    assert summary["mean"]["mitochondrion"]["iou"] > 0.6
