"""The settings schema of each bundle (configs/settings_schema.json, checked with jsonschema):
it describes the defaults, the code's own choices, and refuses bad values in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from custom.checkpoints import FREEZE_MODES, TRANSFER_MODES
from custom.errors import ConfigError
from custom.intensity import MAPPINGS
from custom.networks import PRESETS
from custom.settings import check_values, given_values, load_schema
from tests.helpers import REPO

BUNDLES = {"retina_finetune": ("train", "evaluate", "inference", "demo"), "retina_pretrain": ("train", "inference", "demo")}


def _plain_values(path: Path) -> dict:
    config = json.loads(path.read_text())
    return {k: v for k, v in config.items() if not (isinstance(v, str) and v[:1] in "$@%")}


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_every_default_fits_the_schema(bundle):
    configs = REPO / "bundles" / bundle / "configs"
    schema = load_schema(str(configs))
    assert len(schema["properties"]) > 30
    described = set()
    for name in BUNDLES[bundle]:
        values = _plain_values(configs / f"{name}.json")
        check_values(values, schema)
        described |= set(values) & set(schema["properties"])
    # every schema entry is a setting of some config of the bundle (no stale names)
    every = set()
    for f in configs.glob("*.json"):
        every |= set(json.loads(f.read_text()))
    assert set(schema["properties"]) <= every, set(schema["properties"]) - every


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_schema_choices_are_the_codes_own(bundle):
    props = load_schema(str(REPO / "bundles" / bundle / "configs"))["properties"]
    assert sorted(props["preset"]["enum"]) == sorted(PRESETS)
    assert props["intensity_mapping"]["anyOf"][0]["enum"] == list(MAPPINGS)
    if bundle == "retina_finetune":
        assert props["transfer"]["enum"] == list(TRANSFER_MODES) and props["freeze"]["enum"] == list(FREEZE_MODES)


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("num_classes", "abc", "num_classes: expected an integer >= 1, got 'abc' (str)"),
        ("num_classes", 0, "expected an integer >= 1, got 0 (int)"),
        ("num_classes", True, "expected an integer >= 1, got True (bool)"),
        ("crop_size", 100, "expected a positive multiple of 16, got 100"),
        ("val_overlap", 1.0, "expected a number in [0, 1), got 1.0"),
        ("class_weights", [], "expected a list of numbers such as [1.0, 2.0] or None"),
        ("planes", "xyz", "expected one of 'xy', 'xz', 'yz', 'orthoplane'"),
        ("preset", "huge", "expected one of "),
        ("save_probabilities", "false", "write --save_probabilities True or --save_probabilities False"),
        ("intensity_mapping", "log", "expected one of 'auto', 'dtype', 'range', 'percentile' or [low, high]"),
        ("intensity_mapping", [1, 2, 3], "or [low, high]"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_setting(name, value, expected):
    schema = load_schema(str(REPO / "bundles" / "retina_finetune" / "configs"))
    with pytest.raises(ConfigError) as info:
        check_values({name: value}, schema)
    msg = str(info.value)
    assert expected in msg and f"(--{name} ...)" in msg and "\n" not in msg


def test_good_values_expressions_and_unknown_names_pass():
    schema = load_schema(str(REPO / "bundles" / "retina_finetune" / "configs"))
    check_values({"num_classes": 3, "class_weights": None, "intensity_mapping": [0, 4095], "crop_size": 256,
                  "val_roi_size": "@crop_size", "device": "$torch.device('cpu')", "not_in_schema": object()}, schema)


def test_given_values_merge_overlays_then_the_command_line(tmp_path):
    configs = REPO / "bundles" / "retina_finetune" / "configs"
    overlay = tmp_path / "dataset.json"
    overlay.write_text(json.dumps({"num_classes": 3, "iterations": 100}))
    argv = ["monai.bundle", "run", "--config_file", str([str(configs / "train.json"), str(overlay)]),
            "--iterations", "20", "--planes=orthoplane", "--dataset_dir", "/data/x"]
    got = given_values(argv, str(configs))
    assert got["num_classes"] == 3 and got["iterations"] == 20 and got["planes"] == "orthoplane"
    assert got["dataset_dir"] == "/data/x" and "crop_size" not in got  # the bundle's own defaults are not "given"
