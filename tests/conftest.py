"""Shared pytest fixtures (the plain helpers they use are in tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import (
    REPO,
    SHARED,
    run_workflow,
    write_labelled,
    write_tiny_checkpoint,
)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding ``custom/`` and ``bundles/``)."""
    return REPO


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` next to the repository (developers' data and reference facts); tests that
    use it are skipped where it is absent, e.g. in a user's clone."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present (developer-only sample data); skipping")
    return SHARED


@pytest.fixture
def labelled_data(tmp_path) -> Path:
    """``tmp/ds``: the fine-tuning layout ``{train,val}/{images,labels}/vol0.tif``, (3, 64, 64) volumes
    with binary labels (:func:`tests.helpers.write_labelled`)."""
    return write_labelled(tmp_path / "ds")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """``make(name="tiny.pt", head="segmentation", out_channels=1, **overrides) -> Path``: a seeded
    tiny-preset state dict (64 px grid) under ``tmp`` (:func:`tests.helpers.write_tiny_checkpoint`)."""

    def make(name: str = "tiny.pt", head: str = "segmentation", out_channels: int = 1, **overrides) -> Path:
        return write_tiny_checkpoint(tmp_path / name, head=head, out_channels=out_channels, **overrides)

    return make


@pytest.fixture
def bundle_workflow(tmp_path):
    """``run(bundle, names, **overrides) -> ConfigWorkflow``: the bundle's ``configs/<name>.json`` run
    in-process (initialise, run, finalise) with ``bundle_root`` = ``tmp/root`` unless given."""

    def run(bundle: Path, names: list[str], bundle_root: Path | None = None, **overrides):
        return run_workflow(bundle, names, bundle_root or tmp_path / "root", **overrides)

    return run
