"""Config overlays from outside a bundle carry settings, never code.

A MONAI bundle config runs code: a string starting with ``$`` is passed to Python's ``eval``, a
``"_target_"`` names any importable callable to call, and a ``%path::id`` macro pastes content from
another file. That is fine for the bundle's own ``configs/`` and for what a user types on the
command line, but not for a file that came with somebody else's data: a shared dataset's
``dataset.json`` (``--config_file "['configs/train.json','DST/dataset.json']"``) must not be able
to run a command on the machine of whoever trains on it.

The rule, checked by :func:`check_overlays` at the start of each bundle config's ``initialize``
(right after ``custom.errors.report_errors``, before any setting is evaluated):

- config files in the bundle's own ``configs/`` folder (MONAI's config root: the folder of the
  first ``--config_file``, where ``metadata.json`` and ``logging.conf`` are read from) may hold
  anything;
- every other config file (``--config_file`` overlays, an ``--args_file``, a ``--meta_file``)
  may hold plain values only: numbers, strings, lists, dicts and ``@id`` references. A ``$``
  expression, a ``_target_`` key (also as ``a#b#_target_``) or a ``%`` macro that reads another
  file outside ``configs/`` is refused with one line naming the file and the first such entries
  (``retina_finetune: config error: <file>: ...``) before anything in it is evaluated.

Command-line overrides (``--key value``) are the user's own and are not checked, and so are config
files in the folders listed in the environment variable ``RETINA_TRUSTED_CONFIGS`` (``os.pathsep``
separated): a user's own overlays with code kept outside the bundle (a dataset cannot set a
variable of the shell that runs the bundle). The
preparation scripts (``custom.prepare``) write their ``dataset.json`` through
:func:`check_plain_config`, so a prepared dataset always passes.

Limits: MONAI evaluates the ``$import ...`` statements of the whole merged config before the first
``initialize`` entry, so an overlay's import statement (importing an installed module, not running
an expression) happens before the check refuses the file; and an overlay that replaces
``initialize`` itself replaces this check with it. The check is a guard for data shared in good
faith that picked up code, and for users who cannot read every overlay, not a sandbox.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from custom.errors import ConfigError, OverlayError
from custom.utils import is_within, literal_value

__all__ = ["OverlayError", "config_code", "check_plain_config", "bundle_config_files", "check_overlays", "check_overrides"]

TRUSTED_ENV = "RETINA_TRUSTED_CONFIGS"
EXPRESSION = "$"
MACRO = "%"
CODE_KEYS = ("_target_",)
ID_SEP = "#"


def _short(value: Any, limit: int = 60) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key_parts(key: Any) -> list[str]:
    """The id components of a config key: ``"+train#handlers"`` -> ``["train", "handlers"]``."""
    text = str(key).replace("::", ID_SEP)
    return text.lstrip("+").split(ID_SEP)


def _macro_file(value: str) -> str:
    """The file a ``%`` macro reads (``""`` for a macro within the same config)."""
    from monai.bundle import ConfigParser

    return ConfigParser.split_path_id(value[len(MACRO):])[0]


def config_code(config: Any, trusted_dir: Optional[str] = None, _id: str = "") -> list[str]:
    """Where ``config`` (a parsed JSON/YAML config) holds code: ``["<id>: <what>", ...]``, empty for plain values.

    Code is a string starting with ``$`` (a Python expression), a ``_target_`` key (a callable to
    instantiate; also a ``a#b#_target_`` key that sets one in another file's component), and a
    ``%`` macro that reads another file (unless that file lies in ``trusted_dir``). ``@id``
    references, ``%id`` macros within the config and every other value are plain.
    """
    found: list[str] = []
    where = _id or "(top level)"
    if isinstance(config, Mapping):
        for key, value in config.items():
            sub = f"{_id}{ID_SEP}{key}" if _id else str(key)
            if any(part in CODE_KEYS for part in _key_parts(key)):
                found.append(f"{sub}: a {CODE_KEYS[0]} key ({_short(value)})")
                continue
            found += config_code(value, trusted_dir, sub)
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            found += config_code(value, trusted_dir, f"{_id}{ID_SEP}{i}" if _id else str(i))
    elif isinstance(config, str):
        if config.startswith(EXPRESSION):
            found.append(f"{where}: a $ expression ({_short(config)})")
        elif config.startswith(MACRO):
            path = _macro_file(config)
            if path and not (trusted_dir and is_within(path, trusted_dir)):
                found.append(f"{where}: a % macro reading another file ({_short(config)})")
    return found


def check_plain_config(config: Any, source: str, trusted_dir: Optional[str] = None) -> bool:
    """Raise :class:`OverlayError` (``"<source>: ..."``, one line) when ``config`` holds code (:func:`config_code`).

    ``custom.prepare`` calls it on every ``dataset.json`` before writing it. Returns True.
    """
    found = config_code(config, trusted_dir)
    if found:
        more = f" (+{len(found) - 3} more)" if len(found) > 3 else ""
        where = f"the bundle's configs folder {trusted_dir}" if trusted_dir else "a bundle's configs folder"
        raise OverlayError(
            f"{source}: a config file from outside {where} may hold plain values only (no $ expressions, "
            f"_target_ keys or macros reading other files), but it has {len(found)}: {'; '.join(found[:3])}{more}; "
            "remove them (settings are plain values), or, if you trust its author, copy the file into the "
            "bundle's configs folder"
        )
    return True


def _files(value: Any) -> list[str]:
    """Config file names as ``monai.bundle run`` reads them: a list, or a string (one file, or comma separated)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [os.fspath(v) for v in value]
    text = os.fspath(value)
    if not os.path.isfile(text) and "," in text:  # MONAI's ConfigParser.load_config_files does the same
        return [t.strip() for t in text.split(",") if t.strip()]
    return [text]


def _option(argv: Sequence[str], name: str) -> Any:
    """The value of ``--name value`` / ``--name=value`` in ``argv`` (last one wins), parsed like fire does; None if absent."""
    flag = f"--{name}"
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = literal_value(argv[i + 1])
        elif arg.startswith(flag + "="):
            value = literal_value(arg[len(flag) + 1:])
    return value


def bundle_config_files(argv: Optional[Sequence[str]] = None) -> dict[str, list[str]]:
    """The config files a ``python -m monai.bundle run`` command line names, by role.

    Returns ``{"config_file": [...], "args_file": [...], "meta_file": [...]}`` (paths as given;
    ``config_file`` also from the ``--args_file`` when the command line has none). Empty lists when
    ``argv`` (default ``sys.argv``) is not such a command line, e.g. inside MONAI Label's server,
    which passes its configs to ``monai.bundle.run`` in-process.
    """
    argv = list(sys.argv if argv is None else argv)
    out: dict[str, list[str]] = {
        "config_file": _files(_option(argv, "config_file")),
        "args_file": _files(_option(argv, "args_file")),
        "meta_file": _files(_option(argv, "meta_file")),
    }
    if not out["config_file"] and out["args_file"] and os.path.isfile(out["args_file"][0]):
        from monai.bundle import ConfigParser

        try:
            out["config_file"] = _files(ConfigParser.load_config_file(out["args_file"][0]).get("config_file"))
        except Exception:  # an unreadable args file: MONAI itself reports it
            pass
    return out


def check_overlays(argv: Optional[Sequence[str]] = None, configs_dir: Optional[str] = None) -> bool:
    """Refuse config files from outside the bundle's ``configs/`` folder that hold code (see the module docstring).

    Args:
        argv: the command line (default ``sys.argv``, as ``python -m monai.bundle run`` got it).
        configs_dir: the bundle's own configs folder; default MONAI's config root, the folder of
            the first ``--config_file``. Folders in ``$RETINA_TRUSTED_CONFIGS`` are trusted too.

    Returns:
        True (so that a config's ``initialize`` list can call it); also when ``argv`` names no
        config file (MONAI Label runs the bundle's own configs in-process).

    Raises:
        OverlayError: ``"<file>: a config file from outside ... may hold plain values only ..."``.
    """
    from monai.bundle import ConfigParser

    files = bundle_config_files(argv)
    if not files["config_file"]:
        return True
    trusted = os.path.realpath(configs_dir or os.path.dirname(os.path.abspath(files["config_file"][0])))
    also = [d for d in os.environ.get(TRUSTED_ENV, "").split(os.pathsep) if d]
    for role in ("config_file", "args_file", "meta_file"):
        for name in files[role]:
            if any(is_within(os.path.abspath(name), d) for d in (trusted, *also)) or not os.path.isfile(name):
                continue  # trusted, or a missing file (MONAI's to report)
            try:
                content = ConfigParser.load_config_file(name)
            except Exception as e:  # not JSON/YAML: MONAI reports it when it reads the file
                raise OverlayError(f"{os.path.abspath(name)}: cannot read this config file ({type(e).__name__}: {e})") from None
            if role == "args_file":  # its config_file/meta_file entries are file names, checked above
                content = {k: v for k, v in dict(content or {}).items() if k not in ("config_file", "meta_file", "logging_file")}
            check_plain_config(content, os.path.abspath(name), trusted)
    return True


#: options of ``python -m monai.bundle run`` itself (not settings of the config)
RUN_OPTIONS = frozenset(
    {"config_file", "meta_file", "logging_file", "args_file", "run_id", "init_id", "final_id", "tracking",
     "workflow_name", "workflow_type"}
)


def _override_names(argv: Sequence[str]) -> list[str]:
    """The ``--name`` keys of a command line, in order (``--a#b value`` and ``--a#b=value``)."""
    names = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            names.append(arg[2:].split("=", 1)[0])
    return names


def check_overrides(argv: Optional[Sequence[str]] = None) -> bool:
    """Refuse a command-line override that names no setting of the configs (a typo would be ignored).

    ``--num_clases 3`` is refused with the nearest valid names (``did you mean --num_classes?``);
    ``--a#b#c`` must name an existing entry. Settings named by ``--run_id``/``--init_id``/``--final_id``
    are new keys the command line may add. Returns True; also when ``argv`` (default ``sys.argv``)
    names no config file (MONAI Label runs the bundle in-process).

    Raises:
        custom.errors.ConfigError: ``"--<name>: no such setting in <files>; did you mean --<near>?"``.
    """
    import difflib

    from monai.bundle import ConfigParser

    argv = list(sys.argv if argv is None else argv)
    files = bundle_config_files(argv)["config_file"]
    if not files:
        return True
    parser = ConfigParser()
    parser.read_config(files)
    config = parser.get()
    added = {str(_option(argv, k)) for k in ("run_id", "init_id", "final_id") if _option(argv, k) is not None}
    for name in _override_names(argv):
        if name in RUN_OPTIONS or name in added:
            continue
        parts = _key_parts(name)
        node: Any = config
        for depth, part in enumerate(parts):
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                where = ID_SEP.join(parts[:depth])
                choices = [str(k) for k in node] if isinstance(node, Mapping) else []
                near = difflib.get_close_matches(part, choices, n=3, cutoff=0.6)
                prefix = f"{where}{ID_SEP}" if where else ""
                hint = f"; did you mean {', '.join('--' + prefix + n for n in near)}?" if near else ""
                shown = ", ".join(os.path.basename(f) for f in files)
                raise ConfigError(f"--{name}: no such setting in {shown}{hint} (a misspelt setting would be ignored)")
    return True
