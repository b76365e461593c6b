"""User errors are one line (issue 6), in-process: the settings checks' messages, the user error
found in an exception chain (``custom.errors.one_line_error``), and the process-wide reporter
(``custom.errors.report_errors``) that prints it instead of a traceback.
"""

from __future__ import annotations

import re
import sys

import pytest

from tests.helpers import FT

# ------------------------------------------------------------------------------------------
# custom.errors, in-process


def test_settings_schema_specs():
    """The settings checks (now the bundle's JSON Schema, custom.settings) keep the old specs' strictness."""
    from custom.errors import ConfigError
    from custom.settings import check_values, load_schema

    schema = load_schema(str(FT / "configs"))
    good = {"num_classes": 3, "num_workers": 0, "crop_size": 224, "cache_rate": 0.5, "class_weights": None,
            "resume": True, "planes": "orthoplane", "learning_rate": 1e-3}
    assert check_values(good, schema) is True
    for name, value, expected in [
        ("num_classes", "abc", "expected an integer >= 1, got 'abc' (str)"),
        ("seed", True, "expected an integer, got True (bool)"),
        ("num_classes", 100.0, "expected an integer >= 1, got 100.0 (float)"),
        ("crop_size", 200, "expected a positive multiple of 16, got 200"),
        ("cache_rate", 1.5, "expected a number in [0, 1], got 1.5"),
        ("resume", "false", "expected True or False, got 'false' (str)"),
        ("planes", "z", "expected one of 'xy', 'xz', 'yz', 'orthoplane', got 'z'"),
        ("learning_rate", float("nan"), "expected a number > 0, got nan"),
        ("class_weights", [], "expected a list of numbers such as [1.0, 2.0] or None, got []"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(f"{name}: {expected}")):
            check_values({name: value}, schema)


def test_one_line_error_finds_the_user_error_in_the_chain(tmp_path):
    from custom.checkpoints import CheckpointError
    from custom.errors import ConfigError, OutputError, describe, one_line_error
    from custom.io import DatasetError

    def wrapped(err):
        try:
            try:
                raise err
            except Exception as e:
                raise RuntimeError("Failed to evaluate ConfigExpression: ...") from e
        except RuntimeError as outer:
            return outer

    assert one_line_error(wrapped(DatasetError("/d/a.tif: bad\nthing")), "b") == "b: dataset error: /d/a.tif: bad; thing"
    assert one_line_error(wrapped(CheckpointError("/m.pt: no")), "b") == "b: checkpoint error: /m.pt: no"
    assert one_line_error(wrapped(OutputError("/o: ro")), "b") == "b: output error: /o: ro"
    assert one_line_error(ConfigError("lr: bad"), "b") == "b: config error: lr: bad"
    err = OSError(28, "No space left on device", str(tmp_path / "x.pt"))
    assert one_line_error(wrapped(err), "b") == f"b: file error: {tmp_path / 'x.pt'}: No space left on device"
    # re-raised from a DataLoader worker: the message holds the worker's traceback
    worker = DatasetError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                          '  File "x.py", line 1\ncustom.io.DatasetError: /d/b.png: empty file (0 bytes)\n')
    assert one_line_error(worker, "b") == "b: dataset error: /d/b.png: empty file (0 bytes)"
    assert one_line_error(wrapped(KeyError("k")), "b") is None  # a bug, not a user error: traceback as usual
    assert describe(wrapped(DatasetError("/d/a.tif: bad"))) == "/d/a.tif: bad"
    assert describe(KeyError("k")) == "KeyError: 'k'"


def test_report_errors_prints_one_line_and_delegates_the_rest(capsys, monkeypatch):
    import logging

    from custom.errors import report_errors
    from custom.io import DatasetError

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    factory = logging.getLogRecordFactory()
    try:
        _report_errors_checks(report_errors, DatasetError, capsys, monkeypatch)
    finally:
        logging.setLogRecordFactory(factory)  # the reporter's record factory stays out of other tests


def _report_errors_checks(report_errors, DatasetError, capsys, monkeypatch):
    import logging

    report_errors("retina_x")
    report_errors("retina_x")  # idempotent: one line, not two

    def fire(exc):
        try:
            raise exc
        except BaseException:
            sys.excepthook(*sys.exc_info())
        return capsys.readouterr().err

    assert fire(RuntimeError("wrapper")) .count("Traceback") == 1  # unknown: the usual traceback
    try:
        raise RuntimeError("Failed to evaluate") from DatasetError("/d/a.tif: bad")
    except RuntimeError as e:
        err = fire(e)
    assert err == "retina_x: dataset error: /d/a.tif: bad\n"
    # the log keeps a record of a known error but not its traceback (MONAI's StatsHandler logs one)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("retina_test_report_errors")
    log.addHandler(handler)
    try:
        for exc in (DatasetError("/d/a.tif: bad"), KeyError("k")):
            try:
                raise exc
            except Exception:
                log.exception("Exception: %s", exc)
    finally:
        log.removeHandler(handler)
    assert records[0].exc_info is None and records[0].getMessage() == "Exception: /d/a.tif: bad"
    assert records[1].exc_info is not None  # a bug keeps its traceback
    monkeypatch.setenv("RETINA_TRACEBACK", "1")
    err = fire(DatasetError("/d/a.tif: bad"))
    assert "Traceback" in err and err.endswith("retina_x: dataset error: /d/a.tif: bad\n")
