"""Evaluation metrics (custom/metrics.py) and their handlers (custom/handlers/), against values computed by hand."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from custom.handlers import PredictionOverlays, SegmentationMetricsSaver, overlay_image
from custom.metrics import (
    ClassConfusionMetric,
    PooledClassScore,
    class_confusion,
    cremi_distances,
    directed_surface_distances,
    evaluate_segmentation,
    mean_false_distance,
    scores_from_confusion,
    summarize,
)


def _squares():
    """Truth: 3x3 block at rows 1-3, cols 1-3; prediction: the block shifted one column right."""
    truth = np.zeros((6, 6), np.uint8)
    pred = np.zeros((6, 6), np.uint8)
    truth[1:4, 1:4] = 1
    pred[1:4, 2:5] = 1
    return pred, truth


def test_confusion_and_scores_binary():
    pred, truth = _squares()
    cm = class_confusion(pred, truth, [0, 1])
    # class 1: 6 overlapping pixels, 3 predicted only, 3 true only, 36 - 12 = 24 elsewhere
    assert cm[1].tolist() == [6, 3, 24, 3]
    # class 0 is the mirror image
    assert cm[0].tolist() == [24, 3, 6, 3]
    s = scores_from_confusion(cm)
    assert s["iou"][1].item() == pytest.approx(6 / 12)
    assert s["f1"][1].item() == pytest.approx(12 / 18)
    assert s["precision"][1].item() == pytest.approx(6 / 9)
    assert s["recall"][1].item() == pytest.approx(6 / 9)
    assert s["iou"][0].item() == pytest.approx(24 / 30)


def test_scores_multiclass_by_hand():
    truth = np.array([[0, 1, 1, 2], [0, 2, 2, 2]])
    pred = np.array([[0, 1, 2, 2], [1, 2, 2, 0]])
    res = evaluate_segmentation(pred, truth, [1, 2], class_names={1: "a", "2": "b"}, distances=False)
    # class 1: tp 1 (0,1), fp 1 (1,0), fn 1 (0,2)
    assert res["a"]["iou"] == pytest.approx(1 / 3)
    assert res["a"]["precision"] == pytest.approx(1 / 2)
    assert res["a"]["recall"] == pytest.approx(1 / 2)
    # class 2: tp 3 ((0,3), (1,1), (1,2)), fp 1 (0,2), fn 1 (1,3)
    assert res["b"]["iou"] == pytest.approx(3 / 5)
    assert res["b"]["f1"] == pytest.approx(6 / 8)
    assert res["mean"]["iou"] == pytest.approx((1 / 3 + 3 / 5) / 2)
    # a class absent from both is NaN and left out of the mean
    res = evaluate_segmentation(pred, truth, [1, 2, 5], distances=False)
    assert math.isnan(res["class_5"]["iou"])
    assert res["mean"]["iou"] == pytest.approx((1 / 3 + 3 / 5) / 2)


def test_mean_false_distance_squares():
    pred, truth = _squares()
    d_pt, d_tp = directed_surface_distances(pred, truth)
    # surfaces are the 8-pixel rings; half of the shifted ring lies on the other ring, the rest 1 away
    assert sorted(d_pt.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert sorted(d_tp.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert mean_false_distance(pred, truth) == pytest.approx(0.5)


def test_mean_false_distance_is_mean_of_directed_means():
    truth = np.zeros((5, 5), bool)
    pred = np.zeros((5, 5), bool)
    truth[2, 2] = True
    pred[2, 2:5] = True  # a 1-pixel line: its surface is all 3 pixels
    # prediction -> truth: 0, 1, 2 (mean 1); truth -> prediction: 0 (mean 0)
    assert mean_false_distance(pred, truth) == pytest.approx(0.5)
    # the pooled (MONAI symmetric ASD) mean would be 3 / 4; ours is not that
    assert mean_false_distance(pred, truth) != pytest.approx(0.75)
    # anisotropic spacing scales the x distances
    assert mean_false_distance(pred, truth, spacing=(1.0, 2.0)) == pytest.approx(1.0)


def test_mean_false_distance_3d_and_empty():
    truth = np.zeros((4, 6, 6), bool)
    truth[1:3, 1:3, 1:3] = True  # a 2x2x2 cube: all 8 voxels are surface
    pred = np.roll(truth, 1, axis=0)  # shifted one slice
    # 4 voxels of each cube coincide with the other's, 4 are 1 away
    assert mean_false_distance(pred, truth) == pytest.approx(0.5)
    empty = np.zeros_like(truth)
    assert math.isnan(mean_false_distance(empty, empty))
    assert math.isinf(mean_false_distance(pred, empty))
    assert math.isinf(mean_false_distance(empty, truth))


def test_cremi_distances_by_hand():
    truth = np.zeros((5, 5), bool)
    pred = np.zeros((5, 5), bool)
    truth[2, 2] = True
    pred[2, 2:5] = True
    res = cremi_distances(pred, truth, threshold=1.5)
    assert res["adgt"] == pytest.approx(1.0)  # predicted voxels: 0, 1, 2 from the true one
    assert res["adf"] == pytest.approx(0.0)  # the true voxel is predicted
    assert res["cremi_score"] == pytest.approx(0.5)
    assert res["fp"] == 1 and res["fn"] == 0
    res = cremi_distances(pred, truth, spacing=(1.0, 2.0))
    assert res["adgt"] == pytest.approx(2.0) and "fp" not in res
    # nothing predicted: ADGT undefined, ADF infinite
    res = cremi_distances(np.zeros_like(pred), truth)
    assert math.isnan(res["adgt"]) and math.isinf(res["adf"])
    full = evaluate_segmentation(pred.astype(int), truth.astype(int), [1], cremi=True, cremi_threshold=1.5)
    assert full["class_1"]["cremi_score"] == pytest.approx(0.5)
    assert full["class_1"]["mfd"] == pytest.approx(0.5)


def test_summarize_means_over_volumes():
    per_volume = {
        "a": {"x": {"iou": 0.5, "mfd": 1.0}, "mean": {"iou": 0.5, "mfd": 1.0}},
        "b": {"x": {"iou": 0.7, "mfd": math.nan}, "mean": {"iou": 0.7, "mfd": math.nan}},
    }
    s = summarize(per_volume)
    assert s["x"]["iou"] == pytest.approx(0.6)
    assert s["mean"]["mfd"] == pytest.approx(1.0)


def test_class_confusion_metric_pools_counts():
    m = ClassConfusionMetric(classes=[1], metric_name="iou")
    p1, t1 = torch.tensor([[[1, 1, 0]]]), torch.tensor([[[1, 0, 0]]])  # tp 1, fp 1
    p2, t2 = torch.tensor([[[1, 0, 0]]]), torch.tensor([[[1, 1, 1]]])  # tp 1, fn 2
    m(p1[None], t1[None])
    m(p2[None], t2[None])
    # pooled: 2 / (2 + 1 + 2); the mean of per-image IoUs would be (1/2 + 1/3) / 2
    assert m.aggregate().item() == pytest.approx(0.4)
    assert m.aggregate("none").tolist() == pytest.approx([0.4])


def _engine_with_outputs(outputs):
    """An Ignite engine whose iterations emit the given decollated outputs."""
    engine = Engine(lambda e, batch: batch)
    engine.state.metric_details = {}
    return engine, list(outputs)


def test_pooled_class_score_handler():
    pred = torch.tensor([[[0, 1], [2, 2]]]).float()
    label = torch.tensor([[[0, 1], [1, 2]]]).float()
    engine, data = _engine_with_outputs([[{"pred": pred, "label": label}]] * 2)
    PooledClassScore(classes=[1, 2]).attach(engine, "iou")
    engine.run(data, max_epochs=1)
    # class 1: tp 1, fn 1 -> 1/2; class 2: tp 1, fp 1 -> 1/2 (pooled over both iterations alike)
    assert engine.state.metrics["iou"] == pytest.approx(0.5)


def test_metrics_saver_and_overlays(tmp_path):
    pred, truth = _squares()
    img = torch.rand(1, 6, 6)
    items = [
        {"image": img, "pred": torch.as_tensor(pred)[None].float(), "label": torch.as_tensor(truth)[None]},
        {"image": img, "pred": torch.as_tensor(truth)[None].float(), "label": torch.as_tensor(truth)[None]},
    ]
    engine, data = _engine_with_outputs([[items[0]], [items[1]]])
    saver = SegmentationMetricsSaver(str(tmp_path), classes=[1], class_names={"1": "mito"}, cremi=True)
    saver.attach(engine)
    overlays = PredictionOverlays(str(tmp_path / "ov"), max_images=2, num_classes=2)
    overlays.attach(engine)
    engine.run(data, max_epochs=1)
    assert engine.state.metrics["eval_mean_iou"] == pytest.approx((0.5 + 1.0) / 2)
    assert engine.state.metrics["eval_mito_mfd"] == pytest.approx(0.25)
    rows = list(csv.DictReader(open(tmp_path / "eval_metrics.csv")))
    assert [r["volume"] for r in rows] == ["item_0000", "item_0000", "item_0001", "item_0001", "mean", "mean"]
    assert float(rows[0]["iou"]) == pytest.approx(0.5) and rows[0]["class"] == "mito"
    doc = json.load(open(tmp_path / "eval_summary.json"))
    assert doc["mean"]["mean"]["iou"] == pytest.approx(0.75)
    assert doc["per_volume"]["item_0001"]["mito"]["cremi_score"] == 0
    assert len(list((tmp_path / "ov").glob("epoch0001_*.png"))) == 2


def test_overlay_image_panels():
    img = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    lab = np.zeros((20, 30), np.uint8)
    lab[5:10, 5:10] = 1
    rgb = overlay_image(img, lab, np.zeros_like(lab), num_classes=2)
    assert rgb.shape == (20, 90, 3) and rgb.dtype == np.uint8
    # the truth panel is coloured where the label is, the prediction panel is not
    assert not np.array_equal(rgb[7, 37], rgb[7, 67])
    assert rgb[7, 67, 0] == rgb[7, 67, 1] == rgb[7, 67, 2]


@pytest.mark.parametrize("ignore_index, grey", [(255, True), (None, False)])
def test_overlays_leave_unlabelled_truth_uncoloured(tmp_path, ignore_index, grey):
    from PIL import Image

    img = torch.linspace(0, 1, 64).reshape(1, 8, 8)
    label = torch.zeros(1, 8, 8)
    label[:, :4] = 255  # the top half is unlabelled
    items = [{"image": img, "pred": torch.zeros(1, 8, 8), "label": label}]
    engine, data = _engine_with_outputs([items])
    PredictionOverlays(str(tmp_path), max_images=1, num_classes=2, ignore_index=ignore_index).attach(engine)
    engine.run(data, max_epochs=1)
    (png,) = tmp_path.glob("epoch0001_*.png")
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    truth = rgb[:4, 8 + 2]  # the truth panel's unlabelled rows
    assert bool((truth[:, 0] == truth[:, 1]).all() and (truth[:, 1] == truth[:, 2]).all()) is grey
