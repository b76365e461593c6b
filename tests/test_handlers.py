"""custom.handlers on tiny Ignite engines: atomic checkpoints, the best-model bookkeeping, MLflow connection."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Engine, Events

from custom.handlers import (
    AtomicCheckpointSaver,
    AtomicDiskSaver,
    MLflowExtras,
    MLflowRun,
    ValidationState,
    connect_tracking,
)
from custom.handlers.resume import checkpoint_number
from custom.utils import progress


def _engine() -> Engine:
    return Engine(lambda e, b: None)


def test_disk_saver_keeps_the_replaced_file_until_its_successor_is_whole(tmp_path, monkeypatch):
    saver = AtomicDiskSaver(tmp_path, n_saved=1)
    net = torch.nn.Linear(2, 2)
    saver(net.state_dict(), "model_iteration=1.pt")
    saver.remove("model_iteration=1.pt")  # what Ignite's Checkpoint does before it writes the next one
    assert (tmp_path / "model_iteration=1.pt").is_file()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        saver(net.state_dict(), "model_iteration=2.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_iteration=1.pt"]  # no temporary file left
    monkeypatch.undo()
    saver(net.state_dict(), "model_iteration=3.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_iteration=3.pt"]


def test_disk_saver_with_a_fixed_name_replaces_it_in_place(tmp_path):
    saver = AtomicDiskSaver(tmp_path, filename="model.pt")
    saver({"w": torch.zeros(1)}, "model_key_metric=0.5000.pt")
    saver.remove("model_key_metric=0.5000.pt")
    saver({"w": torch.ones(1)}, "model_key_metric=0.7000.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    assert torch.load(tmp_path / "model.pt", weights_only=True)["w"].item() == 1.0


def test_final_checkpoint_on_completion_and_on_a_failure(tmp_path, caplog):
    net = torch.nn.Linear(2, 2)
    engine = _engine()
    AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_final=True, final_filename="model_final.pt").attach(engine)
    with caplog.at_level(logging.INFO):
        engine.run(range(2), max_epochs=1)
    assert [p.name for p in tmp_path.iterdir()] == ["model_final.pt"]
    assert f"Train completed, saved final checkpoint: {tmp_path / 'model_final.pt'}" in caplog.text
    assert set(torch.load(tmp_path / "model_final.pt", weights_only=True)) == {"weight", "bias"}

    failing = Engine(lambda e, b: 1 / 0)
    AtomicCheckpointSaver(str(tmp_path / "f"), {"model": net}, save_final=True).attach(failing)
    with pytest.raises(ZeroDivisionError):
        failing.run(range(2), max_epochs=1)
    assert [p.name for p in (tmp_path / "f").iterdir()] == ["model_final_iteration=1.pt"]


def test_validation_state_restores_the_best_model_bookkeeping(tmp_path):
    net = torch.nn.Linear(2, 2)
    evaluator = _engine()
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="iou",
                                  key_metric_filename="model.pt")
    saver.attach(evaluator)

    @evaluator.on(Events.ITERATION_COMPLETED)  # before the saver's EPOCH_COMPLETED
    def score(e):
        e.state.metrics["iou"] = 0.25 * e.state.epoch

    evaluator.run(range(1), max_epochs=2)
    state = ValidationState(evaluator, saver).state_dict()
    assert state["key_metric_saved"] == [[(0.5, "model_key_metric=0.5000.pt")]]

    other = AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="iou",
                                  key_metric_filename="model.pt")
    ValidationState(_engine(), other).load_state_dict(state)
    assert other.state_dict() == {"_saved": [(0.5, "model_key_metric=0.5000.pt")]}
    (tmp_path / "model.pt").unlink()  # gone: the next validation writes it again, whatever its score
    ValidationState(_engine(), other).load_state_dict(state)
    assert other.state_dict() == {"_saved": []}
    with pytest.raises(TypeError, match="best-model savers"):
        ValidationState(evaluator, AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_final=True))


def test_checkpoint_number():
    assert checkpoint_number("/a/checkpoint_epoch=12.pt") == 12
    assert checkpoint_number("model_iteration=3.pt", prefix="model", score_name="iteration") == 3
    assert checkpoint_number("model_iteration=3.pt", prefix="checkpoint") is None
    assert checkpoint_number("tmpab12") is None and checkpoint_number("previous_checkpoint_epoch=1.pt", "checkpoint") is None


def test_extras_log_to_the_run_of_the_mlflow_handler_they_are_connected_to(tmp_path):
    import mlflow
    from monai.handlers import MLFlowHandler

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    extras = MLflowExtras(params={"a": {"b": 1}}, artifacts=[str(model)], tags={"resumed_from": "x.pt", "empty": ""})
    unconnected = MLflowRun()
    tracker = MLFlowHandler(tracking_uri=uri, experiment_name="t", tag_name="loss", output_transform=lambda o: 0.5,
                            close_on_complete=True)
    handlers = [extras, tracker]
    assert connect_tracking(handlers, [extras], None) and not connect_tracking([extras], None)
    engine = _engine()
    for h in handlers:
        h.attach(engine)
    engine.run(range(2), max_epochs=1)
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert run.data.params["a.b"] == "1" and run.data.tags["resumed_from"] == "x.pt" and "empty" not in run.data.tags
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]
    assert unconnected.run_id is None and not unconnected.log_text("x", "x.txt") and not unconnected.set_tags({"a": 1})


def test_progress_is_silent_off_a_terminal(capsys):
    assert list(progress(range(3), "counting")) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # pytest's captured stderr is no terminal
