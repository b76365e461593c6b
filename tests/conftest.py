"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding ``custom/`` and ``bundles/``)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` next to the repository (developers' data and reference facts); tests that
    use it are skipped where it is absent, e.g. in a user's clone."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} not present (developer-only sample data); skipping")
    return SHARED_DIR
