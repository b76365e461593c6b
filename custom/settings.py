"""The settings a user gives a bundle, checked before anything is evaluated: names, values, no code.

``python -m monai.bundle run --config_file ... --num_classes abc`` hands the string ``"abc"`` on;
without a check it fails much later with a ``TypeError`` deep in MONAI. Each bundle's
``configs/settings_schema.json`` is a JSON Schema of the settings a user may set (types, ranges,
choices; each property's ``description`` says what is expected), checked with ``jsonschema``.
:func:`check_command_line`, the first call of every config's ``initialize`` after the error
reporter, checks in one go:

1. config overlays from outside the bundle's ``configs/`` hold plain values only
   (``custom.overlays.check_overlays``);
2. every ``--name`` names a setting (``custom.overlays.check_overrides``: misspellings are refused
   with the nearest names);
3. the values given on the command line or in those overlays fit the schema, e.g.
   ``num_classes: expected an integer >= 1, got 'abc' (str); fix it in the config or on the command
   line (--num_classes ...)``.

The bundle's own defaults are tested against the same schema (``tests/test_settings.py``).
``$`` expressions and ``@`` references a user passes are code of their choosing and are not type
checked. A run without such a command line (MONAI Label runs the bundle in-process) checks nothing.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from custom.errors import ConfigError
from custom.overlays import bundle_config_files, check_overlays, check_overrides
from custom.utils import is_within, literal_value

__all__ = ["SCHEMA_NAME", "load_schema", "check_values", "given_values", "check_command_line"]

SCHEMA_NAME = "settings_schema.json"


def load_schema(configs_dir: str) -> dict:
    """The bundle's settings schema (``<configs_dir>/settings_schema.json``); ``{}`` when there is none."""
    path = os.path.join(configs_dir, SCHEMA_NAME)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _is_code(value: Any) -> bool:
    return isinstance(value, str) and value[:1] in ("$", "@", "%")


def _hint(name: str, prop: Mapping[str, Any], value: Any) -> str:
    if prop.get("type") == "boolean" and isinstance(value, str):
        return f"write --{name} True or --{name} False (capitalised: Python's literals), "
    return ""


def _validator(prop: Mapping[str, Any]):
    """A draft 2020-12 validator whose integers exclude 1.0 and True, and whose numbers exclude NaN/inf
    and True (JSON Schema's own types admit them; a setting never means them)."""
    import math

    import jsonschema

    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine_many({
        "integer": lambda _, v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda _, v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    })
    return jsonschema.validators.extend(base, type_checker=checker)(prop)


def check_values(values: Mapping[str, Any], schema: Mapping[str, Any]) -> bool:
    """Raise :class:`~custom.errors.ConfigError` for the first value that does not fit its schema property.

    Args:
        values: setting name -> value (names the schema does not describe are not checked).
        schema: a JSON Schema object with ``properties``.
    """
    props = schema.get("properties", {})
    for name, value in values.items():
        prop = props.get(name)
        if prop is None or _is_code(value):
            continue
        if not _validator(prop).is_valid(value):
            raise ConfigError(
                f"{name}: expected {prop.get('description', 'a valid value')}, got {value!r} ({type(value).__name__}); "
                f"{_hint(name, prop, value)}fix it in the config or on the command line (--{name} ...)"
            )
    return True


def given_values(argv: Optional[Sequence[str]] = None, configs_dir: Optional[str] = None) -> dict[str, Any]:
    """Top-level settings given by the user: plain values of overlays from outside ``configs_dir``, then
    ``--name value`` overrides (read as ``fire`` reads them), the later winning."""
    from monai.bundle import ConfigParser

    argv = list(sys.argv if argv is None else argv)
    files = bundle_config_files(argv)["config_file"]
    out: dict[str, Any] = {}
    for name in files:
        if configs_dir and is_within(os.path.abspath(name), configs_dir) or not os.path.isfile(name):
            continue
        content = ConfigParser.load_config_file(name)
        if isinstance(content, Mapping):
            out.update({str(k): v for k, v in content.items()})
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or len(arg) <= 2:
            continue
        name, eq, text = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                continue
            text = argv[i + 1]
        out[name] = literal_value(text)
    return out


def check_command_line(
    bundle: Optional[str] = None, argv: Optional[Sequence[str]] = None, configs_dir: Optional[str] = None
) -> bool:
    """Overlays, names and values of a ``monai.bundle run`` command line (see the module docstring).

    Args:
        bundle: the bundle's name; given, the one-line error report (``custom.errors.report_errors``) is
            installed first, so a config's ``initialize`` starts with this one call.
        argv: the command line (default ``sys.argv``).
        configs_dir: the bundle's configs folder; default the folder of the first ``--config_file``.

    Returns:
        True (so that ``initialize`` can call it).
    """
    if bundle:
        from custom.errors import report_errors

        report_errors(bundle)
    argv = list(sys.argv if argv is None else argv)
    files = bundle_config_files(argv)["config_file"]
    if not files:
        return True
    configs_dir = os.path.realpath(configs_dir or os.path.dirname(os.path.abspath(files[0])))
    check_overlays(argv, configs_dir)
    check_overrides(argv)
    check_values(given_values(argv, configs_dir), load_schema(configs_dir))
    return True
