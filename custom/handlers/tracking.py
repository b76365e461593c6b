"""MLflow tracking beyond what MONAI's ``MLFlowHandler`` logs: the run's parameters and tags, files.

``python -m monai.bundle run ... --tracking mlflow`` appends MONAI's ``MLFlowHandler`` to the
config's handler lists (``train#handlers``, ``validate#handlers``, ``handlers``). Our handlers that
also log (:class:`MLflowExtras`, the image and table savers) each carry an :class:`MLflowRun`;
:func:`connect_tracking`, called by the config with those lists before the engines run, hands
each of them the ``MLFlowHandler`` of its own list. They then log to that handler's run through
its public ``client`` and ``cur_run``, and do nothing when there is none (no ``--tracking``).

:func:`local_tracking_uri`: the bundles' default store, a SQLite file under the bundle (MLflow 3
refuses plain file stores).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler
from monai.utils import path_to_sqlite_uri

__all__ = ["MLflowExtras", "MLflowRun", "connect_tracking", "local_tracking_uri"]

logger = logging.getLogger(__name__)


def local_tracking_uri(folder: str | os.PathLike, db_name: str = "mlflow.db") -> str:
    """``sqlite:///`` URI of an MLflow store ``folder/db_name`` (``db_name`` may hold a sub-folder, e.g.
    ``mlruns/mlflow.db``; the database's folder is created); artifacts go to ``mlruns`` beside the database."""
    db = Path(folder) / db_name
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # reported in one line by custom.preflight (check_output_dirs, check_tracking_uri) before use
        pass
    return path_to_sqlite_uri(db)


class MLflowRun:
    """The MLflow run a handler of ours logs to: the current run of the ``MLFlowHandler`` it is connected to.

    Unconnected (no ``--tracking mlflow``), or before that handler opened its run (the engine's
    ``STARTED``) and after it closed it, every method does nothing and returns False. Logging
    problems are warnings: tracking never stops a training.
    """

    def __init__(self) -> None:
        self.handler: MLFlowHandler | None = None

    def connect(self, handler: MLFlowHandler | None) -> None:
        """Log to ``handler``'s run from now on (None: disconnect)."""
        self.handler = handler

    @property
    def run_id(self) -> str | None:
        """The id of the open run, or None."""
        h = self.handler
        return h.cur_run.info.run_id if h is not None and h.cur_run is not None else None

    def _log(self, what: str, log: Any, *args: Any, **kwargs: Any) -> bool:
        run_id = self.run_id
        if run_id is None:
            return False
        try:
            log(run_id, *args, **kwargs)
        except Exception as err:  # tracking must never break training
            logger.warning("could not log %s to MLflow: %s", what, err)
            return False
        return True

    def log_artifacts(self, paths: Iterable[str | os.PathLike], artifact_path: str | None = None) -> bool:
        """Log files (or folders) under ``artifact_path``; True when the run took all of them."""
        paths = [os.fspath(p) for p in paths]
        if self.run_id is None or not paths:
            return False
        return all([self._log(p, self.handler.client.log_artifact, p, artifact_path=artifact_path) for p in paths])

    def log_text(self, text: str, name: str) -> bool:
        """Log ``text`` as the artifact file ``name`` (e.g. ``outputs.tsv``)."""
        return self.run_id is not None and self._log(name, self.handler.client.log_text, text, name)

    def log_params(self, params: Mapping[str, Any]) -> bool:
        """Log parameters the run does not have yet (a resumed run keeps its original ones)."""
        run_id = self.run_id
        if run_id is None:
            return False
        client = self.handler.client
        existing = client.get_run(run_id).data.params
        return all([self._log(k, client.log_param, k, v) for k, v in params.items() if k not in existing])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> bool:
        """Log metric values (at ``step``, default 0)."""
        if self.run_id is None:
            return False
        log = self.handler.client.log_metric
        return all([self._log(k, log, k, float(v), step=step or 0) for k, v in metrics.items()])

    def set_tags(self, tags: Mapping[str, Any]) -> bool:
        """Set run tags (unlike parameters, tags may change: e.g. ``resumed_from`` on a continued run)."""
        if self.run_id is None:
            return False
        return all([self._log(k, self.handler.client.set_tag, k, v) for k, v in tags.items()])


def connect_tracking(*handler_lists: Sequence[Any] | None) -> bool:
    """Connect the :class:`MLflowRun` of each of our handlers to the ``MLFlowHandler`` of the same list.

    Call it from a config, before the engines run, with the handler lists that ``--tracking mlflow``
    patches, e.g. ``"$custom.handlers.connect_tracking(@train#handlers, @validate#handlers)"``.
    Lists without an ``MLFlowHandler`` (no ``--tracking``; ranks > 0 of a distributed run) leave
    their handlers unconnected. Returns True when some list has an ``MLFlowHandler``.
    """
    tracked = False
    for handlers in handler_lists:
        present = [h for h in (handlers or []) if h is not None]
        mlflow = next((h for h in present if isinstance(h, MLFlowHandler)), None)
        if mlflow is None:
            continue
        tracked = True
        for h in present:
            run = getattr(h, "mlflow", None)
            if isinstance(run, MLflowRun):
                run.connect(mlflow)
    return tracked


def close_tracking(*handler_lists: Sequence[Any] | None) -> int:
    """End the MLflow runs of the ``MLFlowHandler`` s in these handler lists (an evaluator's run is not ended by
    its engine completing, as a trainer's is); returns how many were closed."""
    closed = 0
    for handlers in handler_lists:
        for h in handlers or []:
            if isinstance(h, MLFlowHandler):
                h.close()
                closed += 1
    return closed


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts flattened with ``.`` (``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``), values as strings of
    at most 500 characters (MLflow's limit)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_params(v, name + "."))
        else:
            out[name] = str(v)[:500]
    return out


def _param_dict(params: Any) -> dict:
    """One name -> value dict from a mapping, an object with ``settings`` (``custom.runs.RunSettings``) or a
    list of those (later entries win)."""
    if params is None:
        return {}
    if isinstance(params, Mapping):
        return dict(params)
    if hasattr(params, "settings"):
        return dict(params.settings)
    out: dict = {}
    for part in params:
        out.update(_param_dict(part))
    return out


class MLflowExtras:
    """Log parameters, tags, final files and the peak memory to the MLflow run of MONAI's ``MLFlowHandler``.

    MONAI's handler logs losses, metrics and ``max_epochs``/``epoch_length``; this adds the
    recipe's parameters (once its run is open, at the first completed iteration) and, when the
    engine completes, the given files or folders (e.g. the final ``model.pt``) as artifacts and the
    metric ``peak_memory_mb`` of ``device``. Put it in ``train#handlers`` after the handler that
    writes those files (handlers run in order) and pass that list to :func:`connect_tracking`.
    Does nothing without ``--tracking mlflow``.

    Args:
        params: name -> value (nested dicts are flattened with ``.``; values logged as strings), a
            ``custom.runs.RunSettings`` (its recorded settings), or a list of those merged.
        artifacts: paths logged when training completes (missing ones skipped).
        artifact_path: MLflow artifact folder of ``artifacts``.
        tags: name -> value set as run tags with the parameters (tags, unlike parameters, may
            change: e.g. ``resumed_from``, the checkpoint a restarted run continued from; empty
            values are not set).
        device: the training's device, whose peak memory (``custom.devices.peak_memory_mb``) is logged
            at the end; None: not logged.
    """

    def __init__(
        self,
        params: Any = None,
        artifacts: Sequence[str] | str | None = None,
        artifact_path: str | None = "model",
        tags: Mapping[str, Any] | None = None,
        device: Any = None,
    ) -> None:
        self.params = _param_dict(params)
        self.tags = {k: str(v) for k, v in (tags or {}).items() if v not in (None, "")}
        self.artifacts = [artifacts] if isinstance(artifacts, (str, os.PathLike)) else list(artifacts or [])
        self.artifact_path = artifact_path
        self.device = device
        self.mlflow = MLflowRun()
        self.params_logged = False

    def attach(self, engine: Engine) -> None:
        """Register on ``ITERATION_COMPLETED`` (parameters and tags, once) and ``COMPLETED`` (artifacts, memory)."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.log_params)
        engine.add_event_handler(Events.COMPLETED, self.log_artifacts)

    def log_params(self, engine: Engine) -> None:
        if self.params_logged or self.mlflow.run_id is None:
            return
        self.mlflow.log_params(flatten_params(self.params))
        self.mlflow.set_tags(self.tags)
        self.params_logged = True

    def log_artifacts(self, engine: Engine) -> None:
        for path in self.artifacts:
            if os.path.exists(path) and self.mlflow.log_artifacts([path], self.artifact_path):
                logger.info(f"logged {path} to MLflow")
        if self.device is not None and self.mlflow.run_id is not None:
            from custom.devices import peak_memory_mb

            self.mlflow.log_metrics({"peak_memory_mb": peak_memory_mb(self.device)}, step=engine.state.iteration)
