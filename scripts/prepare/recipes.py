"""The fine-tuning set-up of each benchmark: :class:`Recipe`, with the recipes themselves read from
the plain-data table ``recipes.yaml`` next to this file (:data:`RECIPES`, :data:`PEREZ_TASKS`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: the table of recipes (plain YAML data, no code)
RECIPES_FILE = Path(__file__).with_name("recipes.yaml")


@dataclass(frozen=True)
class Recipe:
    """The fine-tuning set-up of one benchmark (RETINA paper, Table 1 and methods).

    Attributes:
        key: short name, used in output file names.
        title: human-readable name.
        label_names: one name per class index, background first.
        class_weights: cross-entropy class weights (multi-class tasks), or None.
        eval_classes: class indices whose IoU is averaged.
        planes: ``"xy"`` (anisotropic data, 2D images) or ``"orthoplane"`` (isotropic volumes).
        iterations: the paper's number of fine-tuning iterations, None where it gives none.
        extra: further bundle config entries (augmentation switches).
        notes: remarks recorded in ``dataset_info``.
    """

    key: str
    title: str
    label_names: tuple[str, ...]
    class_weights: tuple[float, ...] | None = None
    eval_classes: tuple[int, ...] | None = None
    planes: str = "xy"
    iterations: int | None = None
    extra: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def label_classes(self) -> int:
        """Number of class indices a label may hold (at least 2)."""
        return len(self.label_names)

    @property
    def num_classes(self) -> int:
        """Network output channels in the bundle's convention (1 for a binary task)."""
        return 1 if self.label_classes == 2 else self.label_classes

    def config(self) -> dict:
        """The bundle config entries this recipe sets (without dataset-dependent ones)."""
        out: dict[str, Any] = {
            "num_classes": self.num_classes,
            "label_names": {str(i): n for i, n in enumerate(self.label_names)},
            "eval_classes": list(self.eval_classes or range(1, self.label_classes)),
            "class_weights": None if self.class_weights is None else [float(w) for w in self.class_weights],
            "planes": self.planes,
        }
        if self.iterations:
            out["iterations"] = int(self.iterations)
        out.update(self.extra)
        return out


def load_recipes(path: str | Path = RECIPES_FILE) -> tuple[dict[str, Recipe], dict[str, tuple[str, tuple[str, ...]]]]:  # noqa: E501
    """``(recipes by key, Perez tasks)`` from a recipe table (see ``recipes.yaml`` for its fields).

    Perez tasks: canonical name -> (singular label name, other folder names); the singular is the
    foreground name of the task's recipe ``perez_<task>``.
    """
    table = yaml.safe_load(Path(path).read_text())
    recipes = {}
    for key, entry in table["recipes"].items():
        entry = dict(entry)
        for name in ("label_names", "class_weights", "eval_classes", "notes"):
            if entry.get(name) is not None:
                entry[name] = tuple(entry[name])
        recipes[key] = Recipe(key=key, **entry)
    tasks = {task: (recipes[f"perez_{task}"].label_names[1], tuple(aliases)) for task, aliases in table["perez_tasks"].items()}
    return recipes, tasks


RECIPES, PEREZ_TASKS = load_recipes()
