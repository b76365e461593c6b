"""``custom/`` uses only the public APIs of MONAI, Ignite, PyTorch and MLflow, and of its own modules.

A private attribute (``obj._name``) of another library's object is not part of its API: it changes
without notice (MONAI's ``CheckpointSaver._final_checkpoint``, Ignite's ``engine._event_handlers``
and ``DiskSaver._atomic`` did). The check reads every module of ``custom/`` (its syntax tree, not
its text, so strings and comments do not count) and allows ``_name`` only

- on ``self``/``cls`` in a class of ours, unless the name belongs to a library base class (an
  attribute of it, or one its source assigns as ``self._name``) whose documentation does not
  offer it to subclasses (MONAI's ``RandomizableTransform`` documents its ``_do_transform`` flag), or
- on an object of ours: a class or function of ``custom`` (our own private helpers).

``getattr``/``hasattr``/``setattr`` with a ``"_name"`` string count as attribute access too.

Between the modules of ``custom`` a ``_name`` stays where it is defined: a module never imports
another module's private name (``from custom.overlays import _literal``, ``from .inputs import
_short``) nor reads one through the module (``overlays._literal``); a helper two modules share is
public (``custom.utils``) and documented there.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

CUSTOM = REPO / "custom"
PRIVATE = re.compile(r"^_[a-z]")
LIBRARIES = ("monai", "ignite", "torch", "mlflow")


def _modules() -> list[Path]:
    return sorted(p for p in CUSTOM.rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    """``custom/handlers/images.py`` -> ``custom.handlers.images`` (from the last ``custom`` folder up)."""
    parts = path.with_suffix("").parts
    parts = parts[len(parts) - 1 - parts[::-1].index("custom"):]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` of a name or attribute chain, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _ours(tree: ast.Module, module: str) -> set[str]:
    """Names bound in ``module`` to objects of ``custom``: its own classes and functions, and imports from ``custom``."""
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").split(".")[0] == "custom"):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] == "custom"}
    return names


def _library_bases(module: str, class_name: str) -> list[type]:
    cls = getattr(importlib.import_module(module), class_name, None)
    if not inspect.isclass(cls):
        return []
    return [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] in LIBRARIES]


def _belongs_to(name: str, bases: list[type]) -> bool:
    """True when ``name`` is an undocumented attribute of one of ``bases`` (library classes)."""
    if any(f"`{name}`" in (inspect.getdoc(b) or "") for b in bases):  # offered to subclasses by the docs
        return False
    for base in bases:
        if any(name in vars(b) for b in base.__mro__):
            return True
        try:
            source = inspect.getsource(base)
        except (OSError, TypeError):
            continue
        if re.search(rf"\bself\.{re.escape(name)}\b", source):
            return True
    return False


def _imported_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute name of the module ``node`` imports from (relative imports resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    package = module if is_package else module.rpartition(".")[0]
    return importlib.util.resolve_name("." * node.level + (node.module or ""), package)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _custom_modules(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Local names bound to modules of ``custom`` (``import custom.x as m``, ``from custom import io``, ``from . import x``)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "custom"}
        elif isinstance(node, ast.ImportFrom):
            base = _imported_from(node, module, is_package)
            if base.split(".")[0] == "custom":
                names |= {a.asname or a.name for a in node.names if _is_module(f"{base}.{a.name}")}
    return names


class _Finder(ast.NodeVisitor):
    def __init__(self, path: Path, tree: ast.Module) -> None:
        self.path, self.module = path, _module_name(path)
        self.is_package = path.name == "__init__.py"
        self.ours = _ours(tree, self.module)
        self.modules = _custom_modules(tree, self.module, self.is_package)
        self.classes: list[ast.ClassDef] = []
        self.found: list[str] = []

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.classes.append(node)
        self.generic_visit(node)
        self.classes.pop()

    def _allowed(self, owner: ast.AST, name: str) -> bool:
        dotted = _dotted(owner)
        if dotted in ("self", "cls"):
            if not self.classes:
                return True
            bases = _library_bases(self.module, self.classes[-1].name) if len(self.classes) == 1 else []
            return not _belongs_to(name, bases)
        if dotted is None or dotted.split(".")[0] in self.modules or dotted.startswith("custom."):
            return False  # a module of custom: its private names stay inside it
        return dotted.split(".")[0] in self.ours

    def _flag(self, node: ast.AST, what: str) -> None:
        line = ast.get_source_segment(self.path.read_text(), node) or what
        self.found.append(f"{self.module}:{node.lineno}: {line.splitlines()[0][:100]}")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if PRIVATE.match(node.attr) and not self._allowed(node.value, node.attr):
            self._flag(node, node.attr)
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _imported_from(node, self.module, self.is_package)
        if base.split(".")[0] == "custom" and base != self.module:
            for alias in node.names:
                if PRIVATE.match(alias.name):
                    self._flag(node, alias.name)

    def visit_Call(self, node: ast.Call) -> None:
        fn = _dotted(node.func)
        if fn in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2:
            name = node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and PRIVATE.match(name.value):
                if not self._allowed(node.args[0], name.value):
                    self._flag(node, name.value)
        self.generic_visit(node)


def private_accesses(paths: list[Path]) -> list[str]:
    found: list[str] = []
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        finder = _Finder(path, tree)
        finder.visit(tree)
        found += finder.found
    return found


def test_custom_touches_no_private_attribute_of_monai_ignite_torch_or_mlflow():
    found = private_accesses(_modules())
    assert not found, "private names of library objects or of other custom modules:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "code,flagged",
    [
        ("def f(engine):\n    return engine._event_handlers\n", True),
        ("def f(h):\n    return getattr(h, '_atomic', None)\n", True),
        ("from monai.handlers import CheckpointSaver\nclass S(CheckpointSaver):\n    def f(self):\n"
         "        return self._final_checkpoint\n", True),  # MONAI's, through our subclass
        ("from monai.handlers import CheckpointSaver\nclass S(CheckpointSaver):\n    def f(self):\n"
         "        return self.final_checkpoint\n", False),
        ("class Ours:\n    def f(self):\n        return self._rows\n", False),
        ("from monai.transforms import RandomizableTransform\nclass T(RandomizableTransform):\n    def f(self):\n"
         "        return self._do_transform\n", False),  # documented for subclasses
        ("def _helper():\n    pass\n\nclass A:\n    @staticmethod\n    def g():\n        return A._x\n", False),
        # another module's private name: imported, relatively imported, or read through the module
        ("from custom.overlays import _literal\n", True),
        ("from .probe_helpers import _short\n", True),
        ("from custom.probe_helpers import short_list, _short as short\n", True),
        ("from custom import probe_helpers\ndef f():\n    return probe_helpers._short\n", True),
        ("import custom.probe_helpers as h\ndef f():\n    return h._short\n", True),
        ("import custom.probe_helpers\ndef f():\n    return custom.probe_helpers._short\n", True),
        ("from custom.probe_helpers import short_list\nfrom . import probe_helpers\ndef f():\n"
         "    return short_list, probe_helpers.short_list\n", False),  # public names
        ("def _helper():\n    pass\n\ndef f():\n    return _helper()\n", False),  # its own private helper
    ],
)
def test_the_check_tells_library_internals_from_our_own(tmp_path, code, flagged, monkeypatch):
    pkg = tmp_path / "custom"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "probe_helpers.py").write_text("def _short():\n    pass\n\ndef short_list():\n    pass\n")
    (pkg / "probe_public_apis.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))  # the probe's classes are imported as custom.probe_public_apis
    for name in [m for m in list(sys.modules) if m == "custom" or m.startswith("custom.")]:
        monkeypatch.delitem(sys.modules, name)
    assert bool(private_accesses([pkg / "probe_public_apis.py"])) == flagged


def test_one_error_base_class_whose_kind_names_the_report():
    from custom import errors
    from custom.checkpoints import CheckpointError
    from custom.inference import InferenceError
    from custom.io import DatasetError
    from custom.networks import HeadMismatchError
    from custom.overlays import OverlayError

    kinds = {errors.ConfigError: "config", OverlayError: "config", errors.OutputError: "output",
             errors.TrackingError: "tracking", DatasetError: "dataset", CheckpointError: "checkpoint",
             HeadMismatchError: "checkpoint", InferenceError: "inference"}
    for cls, kind in kinds.items():
        assert issubclass(cls, errors.RetinaError) and cls.__module__ == "custom.errors", cls
        assert errors.kind_of(cls("x: y")) == kind
        try:
            raise RuntimeError("Failed to evaluate") from cls("x: y")
        except RuntimeError as e:
            assert errors.one_line_error(e, "b") == f"b: {kind} error: x: y"
    assert issubclass(InferenceError, RuntimeError)  # what it was before the common base
    assert errors.kind_of(OSError(28, "No space left on device", "/out/a.tif")) == "file"
    assert errors.kind_of(KeyError("k")) is None and errors.one_line_error(RuntimeError("a bug"), "b") is None
