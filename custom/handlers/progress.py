"""A progress bar on an Ignite engine (training epochs, evaluation): Ignite's own ``ProgressBar``.

MONAI has no progress-bar handler; Ignite's ``ProgressBar`` (tqdm) is the public one. This wraps it as
a MONAI-style handler (``attach(engine)``, usable as a config ``_target_`` in a handler list) that shows
the training loss, and that is silent when its stream (stderr) is not a terminal: logs, CI, MONAI Label
and ``nohup`` runs keep clean output (tqdm's ``disable=None``, as ``custom.utils.progress``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

from ignite.engine import Engine
from ignite.handlers import ProgressBar

__all__ = ["EngineProgress", "loss_postfix"]


def loss_postfix(output: Any, key: str = "loss") -> dict[str, float]:
    """``{"loss": value}`` of a MONAI engine's output (a dict, or a list of decollated dicts); ``{}`` without one."""
    item = output[0] if isinstance(output, (list, tuple)) and output else output
    if not isinstance(item, dict) or key not in item:
        return {}
    value = item[key]
    return {key: float(value.item() if hasattr(value, "item") else value)}


class EngineProgress:
    """Ignite's ``ProgressBar`` over each epoch of an engine, with the loss (trainers) and metrics shown.

    Args:
        desc: text before the bar (default: Ignite's ``Epoch [e/E]`` for several epochs).
        loss_key: output key shown after the bar (None: none); evaluators have none and show only counts.
        metric_names: ``engine.state.metrics`` names to show, or ``"all"``.
        persist: keep each finished bar on screen.
        tqdm_kwargs: more tqdm arguments (``file=``, ``disable=``: None, the default, is silent when the
            stream is not a terminal; False always shows it).
    """

    def __init__(
        self,
        desc: str | None = None,
        loss_key: str | None = "loss",
        metric_names: Sequence[str] | str | None = None,
        persist: bool = False,
        **tqdm_kwargs: Any,
    ) -> None:
        tqdm_kwargs.setdefault("disable", None)
        tqdm_kwargs.setdefault("dynamic_ncols", True)
        if desc is not None:
            tqdm_kwargs["desc"] = desc
        self.bar = ProgressBar(persist=persist, **tqdm_kwargs)
        self.loss_key = loss_key
        self.metric_names = metric_names if isinstance(metric_names, str) or metric_names is None else list(metric_names)

    def _postfix(self) -> Callable[[Any], dict] | None:
        key = self.loss_key
        return None if key is None else (lambda output: loss_postfix(output, key))

    def attach(self, engine: Engine) -> None:
        """Show the bar on ``engine`` (updated every iteration, closed at each epoch's end)."""
        self.bar.attach(engine, metric_names=self.metric_names, output_transform=self._postfix())
