"""Issue 16, one shape: each bundle's train.json stays a recipe read top to bottom, not a program.

Limits: at most 350 lines and 30 ``$`` expressions (every JSON string value starting with ``$``,
imports included), none over 100 characters, none using ``and``/``or`` for control flow; and the
training overlays (multi-GPU, demo) change only what differs: none replaces ``initialize``,
``run`` or ``finalize`` (they append with MONAI's ``+`` merge).
"""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import REPO

BUNDLES = ("retina_finetune", "retina_pretrain")
MAX_LINES, MAX_EXPRESSIONS, MAX_LENGTH = 350, 30, 100


def expressions(value) -> list[str]:
    """Every string value of a config that starts with ``$``, in document order."""
    if isinstance(value, dict):
        return [e for v in value.values() for e in expressions(v)]
    if isinstance(value, list):
        return [e for v in value for e in expressions(v)]
    return [value] if isinstance(value, str) and value.startswith("$") else []


def test_expressions_are_found_everywhere():
    config = {"imports": ["$import os"], "a": {"b": [1, "$x + 1", {"c": "$y"}]}, "d": "@a", "e": "x $"}
    assert expressions(config) == ["$import os", "$x + 1", "$y"]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_train_json_is_short(bundle):
    path = REPO / "bundles" / bundle / "configs" / "train.json"
    text = path.read_text()
    found = expressions(json.loads(text))
    lines = text.count("\n")
    print(f"{bundle}/configs/train.json: {lines} lines, {len(found)} $ expressions, longest {max(map(len, found))}")
    assert lines <= MAX_LINES, f"{path}: {lines} lines (at most {MAX_LINES})"
    assert len(found) <= MAX_EXPRESSIONS, f"{path}: {len(found)} $ expressions (at most {MAX_EXPRESSIONS})"
    long = [e for e in found if len(e) > MAX_LENGTH]
    assert not long, f"{path}: $ expressions over {MAX_LENGTH} characters: {long}"


@pytest.mark.parametrize("config", [
    "retina_finetune/configs/train.json", "retina_finetune/configs/multi_gpu_train.json",
    "retina_finetune/configs/demo.json", "retina_finetune/configs/evaluate.json",
    "retina_pretrain/configs/train.json", "retina_pretrain/configs/multi_gpu_train.json",
    "retina_pretrain/configs/demo.json",
])
def test_no_and_or_control_flow(config):
    path = REPO / "bundles" / config
    flow = [e for e in expressions(json.loads(path.read_text())) if re.search(r"\s(and|or)\s", e)]
    assert not flow, f"{path}: $ expressions with and/or: {flow}"


@pytest.mark.parametrize("name", ["multi_gpu_train", "demo"])
@pytest.mark.parametrize("bundle", BUNDLES)
def test_training_overlays_append_instead_of_replacing_the_steps(bundle, name):
    """(evaluate.json is another workflow on train.json's pieces: its steps are its own, not a training's.)"""
    path = REPO / "bundles" / bundle / "configs" / f"{name}.json"
    overlay = json.loads(path.read_text())
    replaced = {"initialize", "run", "finalize"} & set(overlay)
    assert not replaced, f"{path} replaces {sorted(replaced)} instead of appending (use +{min(replaced)})"
