"""Checks before a run starts (issue 6, ``custom.preflight``): output folders that cannot be
written or whose disk is too full, and MLflow tracking stores that cannot be reached or created.
"""

from __future__ import annotations

import time

import pytest

from tests.helpers import IS_ROOT, UNREACHABLE


def test_check_output_dirs_and_tracking_uri(tmp_path):
    from custom.errors import OutputError, TrackingError
    from custom.preflight import check_output_dirs, check_tracking_uri

    assert check_output_dirs([tmp_path / "a" / "b", None, ""]) is True and (tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe file is gone
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="output folder cannot be written: Not a directory"):
        check_output_dirs(tmp_path / "f" / "out")
    with pytest.raises(OutputError, match=r"MiB free on its disk, 1e\+12 MiB needed"):
        check_output_dirs(tmp_path, min_free_mb=1e12)
    if not IS_ROOT:
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(OutputError, match="Permission denied"):
            check_output_dirs(tmp_path / "ro" / "out")
    start = time.time()
    with pytest.raises(TrackingError, match=r"unreachable \(connection refused\)"):
        check_tracking_uri(UNREACHABLE)
    assert time.time() - start < 10
    assert check_tracking_uri(f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}") and (tmp_path / "db").is_dir()
    with pytest.raises(OutputError):
        check_tracking_uri(f"sqlite:///{tmp_path / 'f' / 'mlflow.db'}")
    assert check_tracking_uri(None) and check_tracking_uri("databricks")
