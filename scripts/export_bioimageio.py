"""Export a trained retina_finetune bundle as a bioimage.io model package (spec 0.5), then validate it.

    python scripts/export_bioimageio.py BUNDLE_DIR OUT.zip [--preset tiny --num_classes 2 --crop_size 64 ...]

``BUNDLE_DIR`` holds ``models/model.pt`` and ``configs/inference.json``; extra ``--name value`` options
override that config as they would on ``python -m monai.bundle run`` (give the same ones you trained
and infer with). The package holds:

- weights: TorchScript (``torch.jit.script``, self-contained) and the state dict with an architecture
  source file (``retina_architecture.py``, which builds the network from the ``custom`` package:
  ``pip install`` this project to use those weights);
- one input ``raw`` (batch, channel, y, x) of raw intensities and one output ``probabilities``: y/x sizes
  ``crop_size + 16 n`` (``crop_size`` is the inferer's tile), output halo ``round(crop_size * overlap / 2)``
  (the band the inferer's overlapping tiles blend away);
- preprocessing in the spec's terms: the intensity record of the weights (``custom.intensity``) as
  ``scale_linear`` + ``clip`` to [0, 1] (or ``scale_range`` 0.5-99.5 percentiles for weights without one),
  then ``fixed_zero_mean_unit_variance`` with the record's mean/std; postprocessing ``sigmoid`` (one class)
  or ``softmax`` over channels;
- a test input (a synthetic EM image) and its test output computed by this project's own pipeline
  (MONAI transforms of ``inference.json`` + the eager network + the inferer's activation), a cover
  image, the RETINA paper as citation, the Apache-2.0 licence.

bioimage.io's validation and test (``bioimageio.core.test_model``: the spec's preprocessing + each
weight format must reproduce the test output) run on the written zip, offline; a failure is one line
and exit 1. Needs the optional extra ``pip install -e ".[bioimageio]"`` (bioimageio.core 0.11.0;
its pins fit the project's environment, so no separate one). Never replaces an existing ``OUT``.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import fire
import numpy as np
import torch

logger = logging.getLogger("export_bioimageio")

CITATION = (
    "Xing, S., Xie, Y. and Bader, G. D. (2025) RETINA: Reconstruction-based pre-trained enhanced TransUNet "
    "for electron microscopy segmentation on the CEM500K dataset. PLoS Computational Biology 21(5): e1013115."
)
DOI = "10.1371/journal.pcbi.1013115"
SIZE_STEP = 16  # the network's input must be a multiple of 16 (4 stride-2 stages)

# The state-dict weights' architecture: a file of the package (bioimage.io loads it by path), building
# the network from the installed `custom` package rather than a second copy of its code.
ARCHITECTURE_SOURCE = '''"""RETINA TransUNet for the pytorch_state_dict weights (needs the `custom` package of retina-em)."""
from custom.networks import PRESETS, TransUNet


class RetinaTransUNet(TransUNet):
    """TransUNet of a named preset (custom.networks.PRESETS) with overrides; input (B, 1, H, W), H, W multiples of 16."""

    def __init__(self, preset="retina", **overrides):
        super().__init__(**{**PRESETS[preset], **overrides})
'''


def read_bundle(bundle_dir: str | os.PathLike, config_file: str = "configs/inference.json", **overrides: Any) -> dict:
    """The inference settings of a bundle: network (weights loaded), intensity record, tile, overlap, planes."""
    from monai.bundle import ConfigParser

    from custom.checkpoints import load_weights

    bundle = Path(bundle_dir)
    parser = ConfigParser()
    parser.read_config(str(bundle / config_file))
    parser["bundle_root"] = str(bundle)
    for key, value in overrides.items():
        parser[key] = value
    model_path = parser.get_parsed_content("model_path")
    if not os.path.isfile(model_path):
        from custom.errors import CheckpointError

        raise CheckpointError(f"{model_path}: no trained weights (train the bundle first, or pass --model_path)")
    network = parser.get_parsed_content("network_def")
    load_weights(network, model_path)
    return {
        "network": network.eval(),
        "network_kwargs": {k: parser.get_parsed_content(f"network_def#{k}") for k in ("preset", "img_size", "in_channels", "out_channels")},
        "preprocessing": parser.get_parsed_content("preprocessing#transforms")[2:],  # after loading the file
        "intensity": parser.get_parsed_content("intensity"),
        "roi_size": int(parser.get_parsed_content("roi_size")),
        "overlap": float(parser.get_parsed_content("overlap")),
        "planes": parser.get_parsed_content("planes"),
        "num_classes": int(parser.get_parsed_content("num_classes")),
        "model_path": model_path,
    }


def test_input(intensity: dict, size: int, seed: int = 0) -> np.ndarray:
    """A synthetic EM image (1, 1, size, size) float32 in the raw value range the weights were trained on."""
    from custom.synthetic import em_image

    unit = em_image((size, size), seed).astype(np.float32) / 255.0
    low, high = intensity.get("low"), intensity.get("high")
    if low is None or high is None:  # per-image mapping: any range; uint8-like values
        low, high = 0.0, 255.0
    return (low + unit * (high - low)).astype(np.float32)[None, None]


def predict(settings: dict, raw: np.ndarray) -> np.ndarray:
    """This project's own pipeline on (1, 1, H, W) raw values: inference.json's transforms, network, activation."""
    from monai.transforms import Compose

    image = Compose(settings["preprocessing"])({"image": torch.from_numpy(raw[0])})["image"]
    with torch.no_grad():
        logits = settings["network"](torch.as_tensor(image)[None].float())
    act = torch.sigmoid if logits.shape[1] == 1 else (lambda t: torch.softmax(t, dim=1))
    return act(logits).numpy().astype(np.float32)


def preprocessing_steps(intensity: dict) -> list:
    """The intensity record as bioimage.io preprocessing: raw -> [0, 1] -> (x - mean) / std."""
    from bioimageio.spec.model import v0_5 as spec

    steps: list = [spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32"))]
    low, high = intensity.get("low"), intensity.get("high")
    if low is None or high is None:  # weights without a record: MapIntensityd's per-image percentiles
        axes = [spec.AxisId("y"), spec.AxisId("x")]
        steps.append(spec.ScaleRangeDescr(kwargs=spec.ScaleRangeKwargs(axes=axes, min_percentile=0.5, max_percentile=99.5)))
    else:
        gain = 1.0 / (float(high) - float(low))
        steps.append(spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=gain, offset=-float(low) * gain)))
    steps.append(spec.ClipDescr(kwargs=spec.ClipKwargs(min=0.0, max=1.0)))
    steps.append(spec.FixedZeroMeanUnitVarianceDescr(
        kwargs=spec.FixedZeroMeanUnitVarianceKwargs(mean=float(intensity["mean"]), std=float(intensity["std"]))))
    return steps


def cover_image(raw: np.ndarray, probs: np.ndarray, path: Path) -> Path:
    """A 2:1 PNG: the test input | its foreground probability (the last class)."""
    from PIL import Image

    img = raw[0, 0]
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
    panel = np.concatenate([img, probs[0, -1]], axis=1)
    Image.fromarray((np.clip(panel, 0, 1) * 255).astype(np.uint8)).resize((512, 256)).save(path)
    return path


def describe_model(settings: dict, work: Path, name: str, raw: np.ndarray, probs: np.ndarray):
    """The bioimage.io ModelDescr of files written under ``work``."""
    from bioimageio.spec.model import v0_5 as spec

    roi, overlap, n_out = settings["roi_size"], settings["overlap"], probs.shape[1]
    halo = round(roi * overlap / 2)
    np.save(work / "test_input.npy", raw)
    np.save(work / "test_output.npy", probs)
    cover = cover_image(raw, probs, work / "cover.png")
    scripted = torch.jit.script(settings["network"])
    scripted.save(str(work / "weights_torchscript.pt"))
    torch.save(settings["network"].state_dict(), work / "weights_state_dict.pt")
    (work / "retina_architecture.py").write_text(ARCHITECTURE_SOURCE)
    rec = settings["intensity"]
    doc = work / "README.md"
    doc.write_text(
        f"# {name}\n\nRETINA TransUNet (2D, slice-wise for volumes) exported from a retina_finetune bundle.\n\n"
        f"- input `raw`: one EM image (batch, channel, y, x) of raw intensities; sizes {roi} + 16 n (the tile).\n"
        f"- preprocessing: [{rec.get('low')}, {rec.get('high')}] -> [0, 1] (clipped), then (x - {rec['mean']:.5f}) / "
        f"{rec['std']:.5f}.\n- output `probabilities`: {n_out} channel(s) ({'sigmoid' if n_out == 1 else 'softmax'}); "
        f"halo {halo} px per side (overlap {overlap} of the {roi}-px tile).\n"
        f"- 3D volumes: run each xy slice (the bundle's planes: {settings['planes']}).\n\n"
        "# Validation\n\nThe test output was computed by the retina_finetune bundle's own inference pipeline; "
        "`bioimageio test` reproduces it from the spec's preprocessing and each weight format. Accuracy on the "
        "paper's benchmarks: see the bundle's model card.\n\n"
        f"Cite: {CITATION} doi:{DOI}\n")
    space = [spec.AxisId("y"), spec.AxisId("x")]
    in_id, out_id = spec.TensorId("raw"), spec.TensorId("probabilities")
    classes = ["foreground"] if n_out == 1 else [f"class{c}" for c in range(n_out)]
    inputs = [spec.InputTensorDescr(
        id=in_id, description="raw EM intensities (the dtype and range the weights were trained on)",
        axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier("em")])]
        + [spec.SpaceInputAxis(id=a, size=spec.ParameterizedSize(min=roi, step=SIZE_STEP)) for a in space],
        test_tensor=spec.FileDescr(source=work / "test_input.npy"),
        data=spec.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=preprocessing_steps(rec))]
    outputs = [spec.OutputTensorDescr(
        id=out_id, description="class probabilities",
        axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier(c) for c in classes])]
        + [spec.SpaceOutputAxisWithHalo(id=a, halo=halo, size=spec.SizeReference(tensor_id=in_id, axis_id=a))
           for a in space],
        test_tensor=spec.FileDescr(source=work / "test_output.npy"),
        data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        postprocessing=[spec.SigmoidDescr() if n_out == 1 else spec.SoftmaxDescr(kwargs=spec.SoftmaxKwargs(axis=spec.AxisId("channel")))])]
    version = spec.Version(torch.__version__.split("+")[0])
    arch = spec.ArchitectureFromFileDescr(source=work / "retina_architecture.py", callable=spec.Identifier("RetinaTransUNet"),
                                          kwargs=settings["network_kwargs"])
    weights = spec.WeightsDescr(
        torchscript=spec.TorchscriptWeightsDescr(source=work / "weights_torchscript.pt", pytorch_version=version,
                                                 parent="pytorch_state_dict"),
        pytorch_state_dict=spec.PytorchStateDictWeightsDescr(source=work / "weights_state_dict.pt", architecture=arch,
                                                             pytorch_version=version))
    return spec.ModelDescr(
        name=name, description="RETINA: reconstruction-pretrained TransUNet for electron-microscopy segmentation",
        authors=[spec.Author(name="RETINA MONAI bundle contributors")],
        cite=[spec.CiteEntry(text=CITATION, doi=spec.Doi(DOI))], license=spec.LicenseId("Apache-2.0"),
        covers=[spec.FileDescr(source=cover)], documentation=spec.FileDescr(source=doc), tags=["electron-microscopy", "segmentation", "2d", "transunet", "pytorch"],
        inputs=inputs, outputs=outputs, weights=weights,
        config={"retina": {"roi_size": roi, "overlap": overlap, "planes": settings["planes"],
                           "intensity": {k: rec.get(k) for k in ("mapping", "low", "high", "mean", "std")}}})


def validate(package: str | os.PathLike) -> Any:
    """bioimage.io's own validation and test run of a package: its ValidationSummary (status 'passed')."""
    from bioimageio.core import test_model

    return test_model(os.fspath(package))


def export(bundle_dir: str, output: str, config_file: str = "configs/inference.json", name: str = "RETINA EM segmentation",
           seed: int = 0, check: bool = True, **overrides: Any) -> str:
    """Write the package ``output`` (a .zip, never replaced) from the bundle and test it; returns its path."""
    from custom.errors import OutputError

    out = Path(output)
    if out.exists():
        raise OutputError(f"{out}: exists already; choose another output (an export never replaces a file)")
    if out.suffix != ".zip":
        raise OutputError(f"{out}: the package is a .zip file")
    try:
        from bioimageio.spec import save_bioimageio_package
    except ImportError:
        raise OutputError('bioimageio.core is not installed: pip install -e ".[bioimageio]"') from None
    settings = read_bundle(bundle_dir, config_file, **overrides)
    raw = test_input(settings["intensity"], settings["roi_size"], seed)
    probs = predict(settings, raw)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        descr = describe_model(settings, Path(tmp), name, raw, probs)
        from custom.utils import atomic_path

        with atomic_path(out, replace=False) as partial:
            save_bioimageio_package(descr, output_path=Path(str(partial) + ".zip"))
            os.replace(str(partial) + ".zip", partial)
    logger.info("wrote %s (tile %d, halo %d)", out, settings["roi_size"], round(settings["roi_size"] * settings["overlap"] / 2))
    if check:
        summary = validate(out)
        if summary.status != "passed":
            from custom.errors import ConfigError

            failed = [d.name for d in summary.details if d.status == "failed"]
            raise ConfigError(f"{out}: bioimage.io test {summary.status}: {'; '.join(failed)[:300]}")
        logger.info("bioimage.io validation and test passed: %s", out)
    return str(out)


def main(bundle_dir: str, output: str, **kwargs: Any) -> str:
    from custom.errors import report_errors

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    report_errors("export_bioimageio")
    return export(bundle_dir, output, **kwargs)


if __name__ == "__main__":
    fire.Fire(main)
