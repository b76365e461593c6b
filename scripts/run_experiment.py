"""The paper's experiment as one command: fine-tuning from several initialisations, learning curves, a Table 1.

``python scripts/run_experiment.py run --datasets "{'isbi2012': 'DATA/isbi2012'}" --inits "['random', 'PRE.pt']"
--seeds "[0, 1, 2]" --iterations "[100, 200, 400, 800]" --out_dir EXP`` runs one fine-tuning per grid cell
(dataset x initialisation x seed) through the retina_finetune bundle's own ``train.json`` for the largest
iteration count, keeping its epoch checkpoints (one epoch = the greatest common divisor of the counts), and
scores the checkpoint of each listed count with ``evaluate.json`` (per-class IoU and F1). Both are MONAI
bundle workflows run in-process (``monai.bundle.run``), with the bundle's own command-line checks. Then:

- ``EXP/results.csv``: dataset, init, transfer, freeze, seed, iteration, class, iou, f1 (one row per class,
  plus the ``mean`` over the evaluated classes);
- ``EXP/learning_curves.png``: IoU against iterations, mean and min-max spread over seeds, one line per
  initialisation, one panel per dataset and class;
- ``EXP/table.md``: mean +- std over seeds, like the paper's Table 1.

An initialisation is ``random``, a checkpoint path (the pretraining bundle's ``model.pt``, or the authors'
weights after ``scripts/import_reference_checkpoint.py``) with the bundle's default transfer and freezing,
or ``LABEL=PATH:TRANSFER:FREEZE`` (e.g. ``nofreeze=PRE.pt:encoder:none``). A dataset is any finetune layout
(``DIR/{train,val}/{images,labels}``); its ``DIR/dataset.json`` (what ``scripts/prepare.py`` writes) is added
as a config overlay when present. Every training and evaluation is an MLflow run of one experiment
(``EXP/mlflow.db``), tagged with its cell; the evaluated IoUs are also logged to the training run with the
iteration as step, so the MLflow UI draws the learning curves side by side.

Resume: a cell is finished when ``EXP/runs/<cell>/done.json`` exists (written atomically after its last
evaluation); a rerun skips finished cells, continues an interrupted training from its checkpoint (the bundle's
own resume) and skips evaluations whose summary exists. ``report`` rewrites the three outputs from the
finished cells' evaluation files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import fire

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "retina_finetune"
DEFAULT_TRANSFER, DEFAULT_FREEZE = "encoder", "transformer"  # train.json's defaults (the paper's recipe)
COLUMNS = ["dataset", "init", "transfer", "freeze", "seed", "iteration", "class", "iou", "f1"]
DONE = "done.json"

logger = logging.getLogger("run_experiment")


@dataclass(frozen=True)
class Init:
    """One initialisation: ``label``, checkpoint ``path`` (None: random) and the bundle's transfer/freeze modes."""

    label: str
    path: str | None
    transfer: str
    freeze: str


@dataclass(frozen=True)
class Cell:
    """One grid cell: one fine-tuning run, evaluated at each of ``iterations``; ``train``/``evaluate``: the
    dataset's own extra bundle settings as ``(name, value)`` pairs."""

    dataset: str
    data_dir: str
    init: Init
    seed: int
    train: tuple = ()
    evaluate: tuple = ()

    @property
    def name(self) -> str:
        i = self.init
        return f"{self.dataset}__{i.label}__{i.transfer}-{i.freeze}__seed{self.seed}"

    def tags(self) -> dict[str, str]:
        i = self.init
        return {"dataset": self.dataset, "init": i.label, "transfer": i.transfer, "freeze": i.freeze,
                "seed": str(self.seed), "cell": self.name, "pretrained_path": str(i.path)}


def parse_init(spec: str) -> Init:
    """``random`` | ``PATH`` | ``LABEL=PATH[:TRANSFER[:FREEZE]]`` -> :class:`Init` (defaults: encoder, transformer)."""
    spec = str(spec)
    if spec == "random":
        return Init("random", None, "none", "none")
    label, _, rest = spec.rpartition("=")
    path, *modes = rest.split(":")
    transfer = modes[0] if modes else DEFAULT_TRANSFER
    freeze = modes[1] if len(modes) > 1 else DEFAULT_FREEZE
    if not os.path.isfile(path):
        raise SystemExit(f"run_experiment: no checkpoint {path!r} for initialisation {spec!r}")
    label = label or ("pretrained" if (transfer, freeze) == (DEFAULT_TRANSFER, DEFAULT_FREEZE) else f"pretrained-{freeze}")
    return Init(label, os.path.abspath(path), transfer, freeze)


def epoch_length(iterations: Sequence[int]) -> int:
    """Iterations per epoch (= per checkpoint): the greatest common divisor of the evaluated counts."""
    return reduce(math.gcd, [int(i) for i in iterations])


def dataset_entry(value: Any) -> tuple[str, tuple, tuple]:
    """``DIR`` or ``{'dir': DIR, 'train': {...}, 'evaluate': {...}}`` -> (folder, train pairs, evaluate pairs)."""
    if isinstance(value, dict):
        extra = {k: tuple(sorted(dict(value.get(k) or {}).items())) for k in ("train", "evaluate")}
        return os.path.abspath(value["dir"]), extra["train"], extra["evaluate"]
    return os.path.abspath(str(value)), (), ()


def grid(datasets: dict, inits: Sequence[str], seeds: Sequence[int]) -> list[Cell]:
    """Cells ordered seed-major, so an interrupted grid has whole seeds done for every initialisation."""
    parsed = [parse_init(s) for s in inits]
    labels = [i.label for i in parsed]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"run_experiment: initialisation labels repeat ({labels}); name them LABEL=PATH:...")
    entries = {d: dataset_entry(v) for d, v in datasets.items()}
    return [Cell(d, *entries[d][:1], i, int(s), *entries[d][1:]) for s in seeds for d in datasets for i in parsed]


def config_files(data_dir: str, *names: str) -> list[str]:
    """The bundle configs ``names`` plus the dataset's ``dataset.json`` overlay when it has one."""
    files = [str(BUNDLE / "configs" / n) for n in names]
    overlay = Path(data_dir) / "dataset.json"
    return files + ([str(overlay)] if overlay.is_file() else [])


def bundle_run(files: list[str], tracking: bool, **overrides: Any) -> None:
    """Run a bundle workflow in-process after the checks its command line gets (names, values, overlays)."""
    from monai.bundle import run

    import custom.settings

    argv = ["monai.bundle", "run", "--config_file", repr(files)]
    for k, v in overrides.items():
        argv += [f"--{k}", repr(v) if not isinstance(v, str) else v]
    custom.settings.check_command_line(argv, str(BUNDLE / "configs"))
    run(config_file=files, tracking="mlflow" if tracking else None, **overrides)


def tracking_client(out_dir: Path, experiment: str):
    """MLflow client of ``out_dir/mlflow.db`` and the id of ``experiment`` (created with artifacts under out_dir)."""
    from mlflow.tracking import MlflowClient

    import custom.handlers

    client = MlflowClient(custom.handlers.local_tracking_uri(out_dir))
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return client, exp.experiment_id
    return client, client.create_experiment(experiment, artifact_location=(out_dir / "artifacts").as_uri())


def tag_run(out_dir: Path, experiment: str, run_name: str, tags: dict, metrics: dict | None = None) -> None:
    """Set ``tags`` on the newest run called ``run_name`` and log ``metrics`` (``{name: [(step, value)]}``)."""
    client, exp_id = tracking_client(out_dir, experiment)
    runs = client.search_runs([exp_id], filter_string=f"attributes.run_name = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        logger.warning("no MLflow run named %s to tag", run_name)
        return
    run_id = runs[0].info.run_id
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    for name, points in (metrics or {}).items():
        for step, value in points:
            client.log_metric(run_id, name, float(value), step=int(step))


def summary_rows(cell: Cell, iteration: int, summary_path: str | Path) -> list[dict]:
    """CSV rows of one ``eval_summary.json`` (its ``mean`` block: per class, and ``mean`` over classes)."""
    with open(summary_path) as f:
        means = json.load(f)["mean"]
    base = {k: v for k, v in cell.tags().items() if k in COLUMNS}
    return [{**base, "seed": cell.seed, "iteration": iteration, "class": name, "iou": m["iou"], "f1": m["f1"]}
            for name, m in means.items()]


def run_cell(cell: Cell, iterations: Sequence[int], out_dir: str, settings: dict, train_overrides: dict,
             eval_overrides: dict, tracking: bool, experiment: str, threads: int) -> dict:
    """Train ``cell`` once for max(iterations), evaluate each listed checkpoint, write the marker; returns it."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    out = Path(out_dir)
    root = out / "runs" / cell.name
    marker = root / DONE
    if marker.is_file():
        return json.loads(marker.read_text())
    import custom.handlers

    its = sorted(int(i) for i in iterations)
    every = epoch_length(its)
    uri = {"tracking_uri": custom.handlers.local_tracking_uri(out), "experiment_name": experiment} if tracking else {}
    init = cell.init
    checkpoints = root / "eval" / "checkpoints"  # train.json's resume_dir: one checkpoint per epoch kept
    started = time.time()
    if not (checkpoints / f"checkpoint_epoch={its[-1] // every}.pt").is_file():  # else trained, not evaluated
        bundle_run(
            config_files(cell.data_dir, "train.json"), tracking,
            bundle_root=str(root), dataset_dir=cell.data_dir, iterations=its[-1], val_interval=every, seed=cell.seed,
            transfer=init.transfer, freeze=init.freeze, pretrained_path=init.path or "",
            checkpoint_n_saved=its[-1] // every + 1, **settings, **uri,
            **({"run_name": cell.name} if tracking else {}), **train_overrides, **dict(cell.train),
        )
    train_s = time.time() - started
    evaluations, rows = {}, []
    for it in its:
        ckpt = checkpoints / f"checkpoint_epoch={it // every}.pt"
        eval_dir = root / f"evaluation_it{it}"
        summary = eval_dir / "eval_summary.json"
        if not summary.is_file():
            bundle_run(
                config_files(cell.data_dir, "train.json", "evaluate.json"), tracking,
                bundle_root=str(root), dataset_dir=cell.data_dir, model_path=str(ckpt), eval_output_dir=str(eval_dir),
                seed=cell.seed, **settings, **uri, **({"run_name": f"{cell.name}@{it}"} if tracking else {}),
                **eval_overrides, **dict(cell.evaluate),
            )
            if tracking:
                tag_run(out, experiment, f"{cell.name}@{it}", {**cell.tags(), "iteration": str(it), "kind": "evaluate"})
        evaluations[str(it)] = str(summary)
        rows += summary_rows(cell, it, summary)
    if tracking:
        curves = {f"eval_{r['class']}_{m}": [] for r in rows for m in ("iou", "f1")}
        for r in rows:
            for m in ("iou", "f1"):
                curves[f"eval_{r['class']}_{m}"].append((r["iteration"], r[m]))
        tag_run(out, experiment, cell.name, {**cell.tags(), "kind": "train"}, curves)
    record = {"cell": asdict(cell), "iterations": its, "evaluations": evaluations, "train_seconds": round(train_s, 1),
              "total_seconds": round(time.time() - started, 1)}
    from custom.utils import atomic_path

    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    logger.info("[run_experiment] %s done in %.0f s", cell.name, record["total_seconds"])
    return record


# --- the outputs: CSV, figure, table -----------------------------------------------------------------


def finished_rows(out_dir: str | Path) -> list[dict]:
    """Rows of every finished cell, read from the evaluation summaries its marker lists."""
    rows = []
    for marker in sorted(Path(out_dir).glob(f"runs/*/{DONE}")):
        rec = json.loads(marker.read_text())
        c = rec["cell"]
        cell = Cell(c["dataset"], c["data_dir"], Init(**c["init"]), int(c["seed"]))  # settings not needed here
        for it, summary in rec["evaluations"].items():
            rows += summary_rows(cell, int(it), summary)
    return rows


def init_name(row: Any) -> str:
    """The label of an initialisation in the figure and table: ``init (transfer/freeze)``."""
    return row["init"] if row["init"] == "random" else f"{row['init']} ({row['transfer']}, freeze {row['freeze']})"


def aggregate(frame):
    """Mean, std and min/max of IoU and F1 over seeds, per dataset, initialisation, class and iteration."""
    frame = frame.assign(initialisation=frame.apply(init_name, axis=1))
    keys = ["dataset", "class", "initialisation", "iteration"]
    agg = frame.groupby(keys, sort=True).agg(
        iou_mean=("iou", "mean"), iou_std=("iou", "std"), iou_min=("iou", "min"), iou_max=("iou", "max"),
        f1_mean=("f1", "mean"), f1_std=("f1", "std"), seeds=("seed", "nunique"))
    return agg.reset_index().fillna({"iou_std": 0.0, "f1_std": 0.0})


def plot_curves(agg, path: str | Path) -> Path:
    """IoU vs iterations: one panel per (dataset, class), one line per initialisation, min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(agg[["dataset", "class"]].drop_duplicates().itertuples(index=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (dataset, cls) in zip(axes[0], panels):
        sub = agg[(agg["dataset"] == dataset) & (agg["class"] == cls)]
        for k, (name, g) in enumerate(sub.groupby("initialisation", sort=True)):
            g = g.sort_values("iteration")  # line styles differ so that equal curves stay visible
            ax.plot(g["iteration"], g["iou_mean"], marker="osD^v"[k % 5], ls=["-", "--", ":", "-."][k % 4], label=name)
            ax.fill_between(g["iteration"], g["iou_min"], g["iou_max"], alpha=0.2)
        its = sorted(int(i) for i in sub["iteration"].unique())
        ax.set(title=f"{dataset}: {cls}", xlabel="fine-tuning iterations", ylabel="IoU (min-max over seeds)",
               xscale="log")
        ax.set_xticks(its, [str(i) for i in its])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)
    return path


def markdown_table(agg) -> str:
    """Mean +- std IoU (and F1 at the last count) over seeds, per dataset and class, like the paper's Table 1."""
    lines = []
    for (dataset, cls), sub in agg.groupby(["dataset", "class"], sort=True):
        its = sorted(sub["iteration"].unique())
        lines += [f"**{dataset}, {cls}**: IoU (mean +- std over seeds) by fine-tuning iterations; F1 at {its[-1]}", "",
                  "| initialisation | " + " | ".join(f"IoU @{i}" for i in its) + f" | F1 @{its[-1]} | seeds |",
                  "|---|" + "---|" * (len(its) + 2)]
        for name, g in sub.groupby("initialisation", sort=True):
            g = g.set_index("iteration")
            cells = [f"{g.at[i, 'iou_mean']:.3f} +- {g.at[i, 'iou_std']:.3f}" if i in g.index else "-" for i in its]
            last = g.loc[its[-1]] if its[-1] in g.index else None
            f1 = f"{last['f1_mean']:.3f} +- {last['f1_std']:.3f}" if last is not None else "-"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {f1} | {int(g['seeds'].max())} |")
        lines.append("")
    return "\n".join(lines)


def write_outputs(rows: Iterable[dict], out_dir: str | Path) -> dict[str, str]:
    """Write ``results.csv``, ``learning_curves.png`` and ``table.md`` under ``out_dir`` from result rows."""
    import pandas as pd

    from custom.utils import atomic_path

    out = Path(out_dir)
    frame = pd.DataFrame(list(rows), columns=COLUMNS)
    if frame.empty:
        raise SystemExit(f"run_experiment: no finished cells under {out}")
    frame = frame.sort_values(["dataset", "init", "transfer", "freeze", "seed", "iteration", "class"])
    paths = {"csv": out / "results.csv", "png": out / "learning_curves.png", "table": out / "table.md"}
    with atomic_path(paths["csv"]) as tmp:
        frame.to_csv(tmp, index=False)
    classes = frame[frame["class"] != "mean"].groupby("dataset")["class"].nunique()
    single = frame["dataset"].map(classes).eq(1) & frame["class"].eq("mean")  # binary: the mean is the class
    agg = aggregate(frame[~single])
    with atomic_path(paths["png"]) as tmp:
        plot_curves(agg, tmp)
    with atomic_path(paths["table"]) as tmp:
        tmp.write_text(markdown_table(agg))
    return {k: str(v) for k, v in paths.items()}


def pending(cells: Sequence[Cell], out_dir: str | Path) -> list[Cell]:
    """The cells without a finished marker."""
    return [c for c in cells if not (Path(out_dir) / "runs" / c.name / DONE).is_file()]


# --- the commands --------------------------------------------------------------------------------------


def run(datasets: dict, inits: Sequence[str] = ("random",), seeds: Sequence[int] = (0, 1, 2),
        iterations: Sequence[int] = (100, 200, 400, 800), out_dir: str = "experiment", preset: str = "tiny",
        crop_size: int = 128, batch_size: int = 4, workers: int = 1, threads: int = 1, gpus: int = 0,
        tracking: bool = True,
        experiment: str = "retina_experiment", train_overrides: dict | None = None,
        eval_overrides: dict | None = None) -> dict[str, str]:
    """Run the grid datasets x inits x seeds (finished cells skipped), then write the CSV, figure and table.

    Args:
        datasets: ``{name: finetune layout folder}``, or ``{name: {'dir': folder, 'train': {...}, 'evaluate':
            {...}}}`` with that dataset's own bundle settings (e.g. a smaller ``val_image_dir`` for the
            in-training validation, which only picks ``model.pt``; evaluations read ``dir``'s ``val``).
        inits: initialisations (module docstring): ``random``, ``PATH``, ``LABEL=PATH:TRANSFER:FREEZE``.
        seeds: one training per seed and initialisation.
        iterations: the counts evaluated; one training of the largest, checkpoints every gcd.
        out_dir: where runs, MLflow store and outputs go.
        preset, crop_size, batch_size: the bundle settings of every run (the pretrained checkpoint's preset).
        workers: cells run at once (processes); threads: torch threads of each.
        gpus: GPUs of this node; cell k trains and is evaluated on ``cuda:(k % gpus)`` (0: the bundle's choice),
            so ``--workers 8 --gpus 8`` runs eight cells at once on an 8-GPU node.
        tracking: MLflow runs in ``out_dir/mlflow.db``, experiment ``experiment``.
        train_overrides, eval_overrides: further bundle settings of the trainings / evaluations,
            e.g. ``{'num_workers': 0}`` / ``{'eval_overlap': 0.25, 'distances': False}``.
    """
    if not isinstance(datasets, dict) or not datasets:
        raise SystemExit("run_experiment: --datasets must be a dict {name: folder}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cells = grid(datasets, inits, seeds)
    todo = pending(cells, out)
    logger.info("[run_experiment] %d cells, %d finished, %d to run", len(cells), len(cells) - len(todo), len(todo))
    if tracking:
        tracking_client(out, experiment)  # one experiment with its artifact folder, before any worker
    settings = {"preset": preset, "crop_size": int(crop_size), "batch_size": int(batch_size)}
    args = (list(iterations), str(out), settings, dict(train_overrides or {}), dict(eval_overrides or {}), tracking,
            experiment, threads)
    from custom.utils import progress

    def cell_args(k: int) -> tuple:
        if int(gpus) <= 0:
            return args
        device = {"device": f"$torch.device('cuda:{k % int(gpus)}')"}
        return (args[0], args[1], {**settings, **device}, *args[3:])

    if int(workers) <= 1:
        for k, cell in enumerate(progress(todo, desc="grid cells")):
            run_cell(cell, *cell_args(k))
    else:
        import multiprocessing

        with ProcessPoolExecutor(int(workers), mp_context=multiprocessing.get_context("spawn")) as pool:
            for f in progress([pool.submit(run_cell, c, *cell_args(k)) for k, c in enumerate(todo)], desc="grid cells"):
                f.result()
    return report(out)


def report(out_dir: str = "experiment") -> dict[str, str]:
    """Rewrite ``results.csv``, ``learning_curves.png`` and ``table.md`` from the finished cells under ``out_dir``."""
    return write_outputs(finished_rows(out_dir), out_dir)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.path.insert(0, str(REPO))
    fire.Fire({"run": run, "report": report}, command=list(argv) if argv is not None else None)


if __name__ == "__main__":
    main()
