"""Progress bars, training curves and image savers on real Ignite engines, logged to a real MLflow store."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from ignite.metrics import MeanSquaredError
from monai.handlers import MLFlowHandler
from PIL import Image

from custom.handlers import (
    EngineProgress,
    PredictionOverlays,
    SampleTripletSaver,
    TrainingCurves,
    close_tracking,
    connect_tracking,
    loss_postfix,
)


def trainer_engine() -> Engine:
    """A MONAI-like trainer: output a list of decollated dicts with a loss that falls over iterations."""
    return Engine(lambda e, batch: [{"loss": torch.tensor(1.0 / e.state.iteration)}])


def validator_engine(trainer: Engine | None = None) -> Engine:
    """Outputs (pred, label) whose mean squared error is known: pred = label + the trainer's epoch / 10."""
    def step(e, batch):
        label = torch.full((2, 1, 4, 4), float(batch))
        return label + (trainer.state.epoch if trainer else 1) / 10.0, label

    v = Engine(step)
    MeanSquaredError().attach(v, "val_mse")
    return v


def mlflow_tracker(uri: str, name: str, **kwargs) -> MLFlowHandler:
    return MLFlowHandler(tracking_uri=uri, experiment_name=name, tag_name="loss", **kwargs)


def the_run(uri: str, name: str):
    import mlflow

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    return client, run.info.run_id


def test_loss_postfix_reads_monai_outputs():
    assert loss_postfix([{"loss": torch.tensor(0.25)}]) == {"loss": 0.25}
    assert loss_postfix({"loss": 2}) == {"loss": 2.0}
    assert loss_postfix([{"pred": 1}]) == {} and loss_postfix(None) == {}


def test_progress_bar_shows_epochs_and_loss_on_a_stream():
    out = io.StringIO()
    engine = trainer_engine()
    EngineProgress(file=out, disable=False, mininterval=0, miniters=1).attach(engine)
    engine.run(range(4), max_epochs=2)
    text = out.getvalue()
    assert "Epoch [2/2]" in text and "[4/4]" in text
    assert "loss=0.125" in text  # iteration 8: 1/8


def test_progress_bar_is_silent_off_a_terminal(capsys):
    engine = trainer_engine()
    EngineProgress().attach(engine)  # stderr under pytest is no terminal
    evaluator = validator_engine()
    EngineProgress(loss_key=None, desc="evaluating").attach(evaluator)
    engine.run(range(3), max_epochs=1)
    evaluator.run(range(2))
    assert capsys.readouterr().err == ""


def test_training_curves_png_csv_and_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trainer = trainer_engine()
    validator = validator_engine(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: validator.run(range(3)))  # as ValidationHandler
    curves = TrainingCurves(tmp_path / "out", validator=validator)
    tracker = mlflow_tracker(uri, "curves", output_transform=lambda o: o[0]["loss"].item(), close_on_complete=True)
    handlers = [curves, tracker]
    assert connect_tracking(handlers)
    for h in handlers:
        h.attach(trainer)
    trainer.run(range(4), max_epochs=3)

    png, table = tmp_path / "out" / "training_curves.png", tmp_path / "out" / "training_curves.csv"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1000, 400)
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 10  # curves and axes drawn, not a blank canvas
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    loss = [(int(r["iteration"]), float(r["value"])) for r in rows if r["series"] == "loss"]
    mse = [(int(r["iteration"]), float(r["value"])) for r in rows if r["series"] == "val_mse"]
    assert loss == [(i, pytest.approx(1.0 / i)) for i in range(1, 13)]
    # validation after epochs 1, 2, 3 (trainer iterations 4, 8, 12): Ignite's MSE sums the 16 pixels of a sample
    assert mse == [(4, pytest.approx(0.16)), (8, pytest.approx(0.64)), (12, pytest.approx(1.44))]

    client, run_id = the_run(uri, "curves")
    assert sorted(a.path for a in client.list_artifacts(run_id, "plots")) == ["plots/training_curves.csv",
                                                                            "plots/training_curves.png"]
    local = client.download_artifacts(run_id, "plots/training_curves.png", str(tmp_path / "dl"))
    assert Path(local).read_bytes() == png.read_bytes()


def test_curves_without_tracking_still_write_files(tmp_path):
    trainer = trainer_engine()
    curves = TrainingCurves(tmp_path, name="loss_only")
    curves.attach(trainer)
    trainer.run(range(2), max_epochs=1)
    assert (tmp_path / "loss_only.png").stat().st_size > 1000 and curves.metrics == {}


def test_resumed_curves_continue_the_earlier_run_and_a_new_run_starts_afresh(tmp_path):
    first = trainer_engine()
    TrainingCurves(tmp_path, name="c").attach(first)
    first.run(range(4), max_epochs=2)  # iterations 1..8 written; the checkpoint is at 4
    resumed = trainer_engine()
    curves = TrainingCurves(tmp_path, name="c")
    curves.attach(resumed)
    resumed.load_state_dict({"iteration": 4, "epoch_length": 4, "max_epochs": 3})
    resumed.run(range(4))  # iterations 5..12
    assert curves.loss == [(i, pytest.approx(1.0 / i)) for i in range(1, 13)]  # 1..4 kept, 5..8 redone once
    fresh = trainer_engine()
    again = TrainingCurves(tmp_path, name="c")
    again.attach(fresh)
    fresh.run(range(2), max_epochs=1)
    assert [i for i, _ in again.loss] == [1, 2]


def test_overlays_and_samples_are_logged_to_mlflow(tmp_path):
    """The fine-tuning prediction overlays and the pretraining reconstruction samples reach the evaluator's run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rng = np.random.default_rng(0)

    def step(e, batch):
        img = torch.from_numpy(rng.random((1, 16, 16)).astype(np.float32))
        lab = (img > 0.5).float()
        return [{"image": img, "label": lab, "pred": 1 - lab}]

    evaluator = Engine(step)
    overlays = PredictionOverlays(str(tmp_path / "overlays"), max_images=2, num_classes=2)
    samples = SampleTripletSaver(tmp_path / "samples", num_samples=2, iterations_per_epoch=5)
    tracker = mlflow_tracker(uri, "images", iteration_log=False, epoch_log=False)
    handlers = [overlays, samples, tracker]
    assert connect_tracking(handlers)
    for h in handlers:
        h.attach(evaluator)
    evaluator.run(range(4), max_epochs=1)
    assert close_tracking(handlers) == 1

    client, run_id = the_run(uri, "images")
    assert sorted(a.path for a in client.list_artifacts(run_id, "overlays")) == [
        "overlays/epoch0001_0.png", "overlays/epoch0001_1.png"]
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/samples_iter0000005.png"]
    with Image.open(tmp_path / "overlays" / "epoch0001_0.png") as im:
        assert im.size == (48, 16)  # image | truth | prediction
