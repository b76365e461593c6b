"""scripts/run_experiment.py: the grid runs through the finetune bundle, writes CSV/PNG/table, and resumes."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "run_experiment.py"


def _module():
    spec = importlib.util.spec_from_file_location("run_experiment", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_experiment"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _fake_cell(root: Path, mod, init: str, seed: int, ious: dict[int, float]) -> None:
    """A finished cell as run_cell leaves it: evaluation summaries and the done marker."""
    cell = mod.Cell("toy", str(root / "data"), mod.Init(init, None, "none", "none"), seed)
    evaluations = {}
    for it, iou in ious.items():
        summary = root / "runs" / cell.name / f"evaluation_it{it}" / "eval_summary.json"
        summary.parent.mkdir(parents=True)
        means = {"mito": {"iou": iou, "f1": 2 * iou / (1 + iou)}, "mean": {"iou": iou, "f1": 2 * iou / (1 + iou)}}
        summary.write_text(json.dumps({"classes": [1], "mean": means}))
        evaluations[str(it)] = str(summary)
    marker = root / "runs" / cell.name / mod.DONE
    marker.write_text(json.dumps({"cell": mod.asdict(cell), "iterations": sorted(ious), "evaluations": evaluations}))


def test_outputs_and_resume_logic(tmp_path):
    """Table, figure and CSV from finished cells' summaries; pending() skips cells with a marker."""
    mod = _module()
    _fake_cell(tmp_path, mod, "random", 0, {10: 0.2, 20: 0.4})
    _fake_cell(tmp_path, mod, "random", 1, {10: 0.4, 20: 0.6})
    paths = mod.report(str(tmp_path))
    rows = _read_csv(Path(paths["csv"]))
    assert {r["class"] for r in rows} == {"mito", "mean"} and len(rows) == 8
    assert list(rows[0]) == mod.COLUMNS
    table = Path(paths["table"]).read_text()
    # mean +- sample std over the two seeds: (0.2, 0.4) -> 0.300 +- 0.141; (0.4, 0.6) -> 0.500 +- 0.141
    assert "| random | 0.300 +- 0.141 | 0.500 +- 0.141 |" in table
    assert Path(paths["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cells = mod.grid({"toy": str(tmp_path / "data")}, ["random"], [0, 1, 2])
    assert [c.seed for c in mod.pending(cells, tmp_path)] == [2]
    assert mod.epoch_length([100, 200, 400, 800]) == 100 and mod.epoch_length([50, 75]) == 25


def test_init_specs(tmp_path):
    mod = _module()
    ckpt = tmp_path / "pre.pt"
    ckpt.write_bytes(b"x")
    assert mod.parse_init("random") == mod.Init("random", None, "none", "none")
    assert mod.parse_init(str(ckpt)) == mod.Init("pretrained", str(ckpt), "encoder", "transformer")
    assert mod.parse_init(f"nf={ckpt}:encoder:none") == mod.Init("nf", str(ckpt), "encoder", "none")
    with pytest.raises(SystemExit, match="no checkpoint"):
        mod.parse_init(str(tmp_path / "missing.pt"))


@pytest.mark.slow
def test_grid_on_demo_data(tmp_path):
    """2 initialisations x 2 seeds x 2 iteration counts, tiny preset, real bundle runs, MLflow read back; rerun skips."""
    import torch
    from mlflow.tracking import MlflowClient

    from custom.networks import transunet_from_preset
    from custom.synthetic import write_labelled_demo

    data = tmp_path / "data"
    write_labelled_demo(data, shape=(4, 64, 64))
    pre = tmp_path / "pre.pt"
    torch.save(transunet_from_preset("tiny", img_size=32, head="reconstruction").state_dict(), pre)
    out = tmp_path / "exp"
    cmd = [sys.executable, str(SCRIPT), "run", "--datasets", f"{{'demo': '{data}'}}", "--inits", f"['random', '{pre}']",
           "--seeds", "[0, 1]", "--iterations", "[2, 4]", "--out_dir", str(out), "--crop_size", "32",
           "--batch_size", "2", "--train_overrides", "{'num_workers': 0}",
           "--eval_overrides", "{'distances': False, 'overlay_images': 0, 'eval_overlap': 0.0}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]

    rows = _read_csv(out / "results.csv")
    assert len(rows) == 2 * 2 * 2 * 2  # inits x seeds x iterations x (mitochondrion, mean)
    markers = sorted(out.glob("runs/*/done.json"))
    assert len(markers) == 4
    for marker in markers:  # the CSV holds exactly what each run's evaluate.json summary says
        rec = json.loads(marker.read_text())
        for it, summary in rec["evaluations"].items():
            means = json.loads(Path(summary).read_text())["mean"]
            got = [r for r in rows if r["seed"] == str(rec["cell"]["seed"]) and r["init"] == rec["cell"]["init"]["label"]
                   and r["iteration"] == it]
            assert {r["class"]: float(r["iou"]) for r in got} == pytest.approx({k: v["iou"] for k, v in means.items()})
    table = (out / "table.md").read_text()
    assert "| random |" in table and "| pretrained (encoder, freeze transformer) |" in table
    assert (out / "learning_curves.png").stat().st_size > 1000

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("retina_experiment")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'train'")
    assert sorted((r.data.tags["init"], r.data.tags["seed"]) for r in runs) == [
        ("pretrained", "0"), ("pretrained", "1"), ("random", "0"), ("random", "1")]
    history = client.get_metric_history(runs[0].info.run_id, "eval_mean_iou")
    assert sorted(m.step for m in history) == [2, 4]

    stamps = {m: m.stat().st_mtime_ns for m in markers}
    again = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 to run" in again.stderr + again.stdout
    assert {m: m.stat().st_mtime_ns for m in markers} == stamps
