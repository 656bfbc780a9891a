"""One MLflow run per training, written from rank 0 (architecture: tracking layer).

:class:`RunTracker` talks to the store through an explicit :class:`mlflow.MlflowClient`
and run id, never through MLflow's process-wide active run, so a Ray worker, a Tune
trial and a test can each hold their own run. Credentials are stripped from everything
it logs (:func:`~cromss_ray.tracking.uris.redact_uri`). What a run logs once it has started
goes through a :class:`~cromss_ray.tracking.delivery.DeliveryQueue`, so a tracking-server
outage delays it instead of failing the training.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.entities.lifecycle_stage import LifecycleStage
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH
from pydantic import BaseModel

from cromss_ray import __version__
from cromss_ray.config import describe_changes, flatten, to_yaml
from cromss_ray.models.stored import CONFIG_FILE
from cromss_ray.tracking.delivery import MAX_BACKOFF_S, DeliveryQueue, is_transient
from cromss_ray.tracking.figures import confusion_matrix_figure, validation_sample_figure
from cromss_ray.tracking.uris import absolute_tracking_uri, is_local_sqlite, redact_uri, sqlite_database_path

logger = logging.getLogger(__name__)

ARTIFACTS_DIR_NAME = "mlartifacts"
CONFIG_CHANGE_TAG = "cromss.config_change"

TRUNCATION_MARK = "..."
SAMPLE_KEYS = ("s2_rgb", "label", "clean_label", "prediction", "weights_s1", "weights_s2")
DEFAULT_FLUSH_TIMEOUT_S = 300.0
RunEndStatus = Literal["FINISHED", "FAILED", "KILLED"]


def _redact_strings(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _redact_strings(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_redact_strings(value) for value in node]
    return redact_uri(node) if isinstance(node, str) else node


def redacted_config(config: BaseModel) -> BaseModel:
    """A copy of ``config`` with credentials removed from every URI-like string."""
    return type(config).model_validate(_redact_strings(config.model_dump(mode="json")))


def _truncated(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def _param_key(key: str) -> str:
    """MLflow keys allow alphanumerics, ``_ - . / :`` and spaces, at most 250 characters."""
    return re.sub(r"[^\w.\-/: ]", "_", key)[:MAX_ENTITY_KEY_LENGTH]


def config_params(config: BaseModel) -> dict[str, str]:
    """The flattened, redacted config as MLflow params (values cut to MLflow's 6000 characters;
    ``config.yaml`` holds them whole)."""
    return {
        _param_key(key): _truncated(str(value), MAX_PARAM_VAL_LENGTH)
        for key, value in flatten(redacted_config(config)).items()
    }


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _jsonable(value: Any) -> Any:
    """Tensors, arrays and numpy scalars as plain JSON values; NaN and infinities as null."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    array = _to_numpy(value)
    if array.ndim > 0:
        return [_jsonable(item) for item in array]
    scalar = array.item()
    if isinstance(scalar, float) and not math.isfinite(scalar):
        return None
    return scalar


def experiment_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """``<database dir>/mlartifacts/<experiment>`` for a local sqlite store; None lets the
    store pick (servers proxy artifacts, file stores keep them beside the runs)."""
    if not is_local_sqlite(tracking_uri):
        return None
    folder = re.sub(r"[^\w.\-]", "_", experiment)
    return (sqlite_database_path(tracking_uri).parent / ARTIFACTS_DIR_NAME / folder).as_uri()


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created on first use (safe when trials race to create it)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=experiment_artifact_location(tracking_uri, name))
        except MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == LifecycleStage.DELETED:
        raise ValueError(
            f"MLflow experiment '{name}' is deleted in {redact_uri(tracking_uri)}; "
            "restore it (`mlflow experiments restore`) or choose another tracking.experiment"
        )
    return experiment.experiment_id


class RunTracker:
    """An MLflow run: config as params, per-epoch metrics, confusion matrices, sample figures.

    Create one with :meth:`start`; use it as a context manager so the run ends FINISHED,
    FAILED (an exception) or KILLED (an interrupt). Metrics, tags and artifact files are
    queued in ``writes`` and sent in order; while the server is away they wait (module
    docstring), and :meth:`flush` (also before the run ends FINISHED) waits at most
    ``flush_timeout_s`` for them, trying again after pauses of at most ``max_backoff_s``.
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        experiment_id: str,
        tracking_uri: str,
        flush_timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S,
        max_backoff_s: float = MAX_BACKOFF_S,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = tracking_uri
        self.flush_timeout_s = flush_timeout_s
        self.writes = DeliveryQueue(f"MLflow run {run_id} at {redact_uri(tracking_uri)}", max_backoff_s=max_backoff_s)
        self._finished = False

    @classmethod
    def start(
        cls,
        config: BaseModel,
        *,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        flush_timeout_s: float = DEFAULT_FLUSH_TIMEOUT_S,
        max_backoff_s: float = MAX_BACKOFF_S,
    ) -> RunTracker:
        """Open a new run in ``experiment`` (created if needed), or resume ``run_id``.

        A new run logs ``config`` flattened as params and whole as ``config.yaml``; a
        resumed run is set RUNNING again and keeps its params (MLflow refuses to change
        them). ``parent_run_id`` nests the new run (Tune trials under their sweep).
        """
        uri = absolute_tracking_uri(tracking_uri)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment_id = ensure_experiment(client, experiment, uri)
        if run_id is None:
            run_tags = {MLFLOW_PARENT_RUN_ID: parent_run_id} if parent_run_id else {}
            run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
            tracker = cls(client, run.info.run_id, experiment_id, uri, flush_timeout_s, max_backoff_s)
            try:
                params = config_params(config)
                client.log_batch(tracker.run_id, params=[Param(key, value) for key, value in params.items()])
                client.log_text(tracker.run_id, to_yaml(redacted_config(config)), CONFIG_FILE)
            except Exception:
                tracker.finish("FAILED")
                raise
        else:
            try:
                run = client.get_run(run_id)
            except MlflowException as exc:
                raise ValueError(f"cannot resume MLflow run '{run_id}' in {redact_uri(uri)}: {exc.message}") from None
            if run.info.lifecycle_stage == LifecycleStage.DELETED:
                raise ValueError(f"cannot resume MLflow run '{run_id}': it is deleted")
            client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            tracker = cls(client, run_id, run.info.experiment_id, uri, flush_timeout_s, max_backoff_s)
        tracker.set_tags({"cromss_ray.version": __version__, **(tags or {})})
        return tracker

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is None:
            self.finish("FINISHED")
        elif issubclass(kind, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")

    def log_metrics(self, metrics: Mapping[str, float], epoch: int) -> None:
        """Each metric at step ``epoch``, plus the ``epoch`` metric itself (architecture: metric keys)."""
        timestamp = int(time.time() * 1000)
        values = {**{key: float(value) for key, value in metrics.items()}, "epoch": float(epoch)}
        batch = [Metric(key, value, timestamp, epoch) for key, value in values.items()]
        self._write(f"metrics of epoch {epoch} ({', '.join(values)})", self.client.log_batch, metrics=batch)

    def log_confusion_matrix(self, name: str, result: Mapping[str, Any], class_names: Sequence[str]) -> None:
        """``confusion/<name>.json`` (every entry of ``result``) and ``confusion/<name>.png``.

        ``result`` is what ``ConfusionMatrix.compute()`` returns (spec 11): ``matrix``
        (C x C counts, rows reference), ``oa``, ``miou``, ``mf1`` and per-class lists.
        """
        matrix = _to_numpy(result["matrix"])
        if matrix.shape != (len(class_names), len(class_names)):
            raise ValueError(
                f"confusion matrix '{name}' has shape {matrix.shape} but {len(class_names)} class names were given"
            )
        self.log_dict({"class_names": list(class_names), **_jsonable(result)}, f"confusion/{name}.json")
        title = f"{name}: OA {float(result['oa']):.1%}, mIoU {float(result['miou']):.1%}"
        figure = confusion_matrix_figure(matrix, class_names, title)
        self._write(f"confusion/{name}.png", self.client.log_figure, figure, f"confusion/{name}.png")

    def log_validation_samples(
        self, samples: Sequence[Mapping[str, Any]], class_names: Sequence[str], epoch: int
    ) -> None:
        """One figure per sample, ``samples/epoch_<epoch>/sample_<i>.png``.

        Each sample maps ``s2_rgb`` (H, W, 3, floats in [0, 1]) and ``label`` (H, W), and
        optionally ``clean_label``, ``prediction``, ``weights_s1``, ``weights_s2`` (H, W),
        to arrays or tensors; an optional ``id`` names the sample in the title.
        """
        for index, sample in enumerate(samples):
            arrays = _sample_arrays(index, sample)
            title = f"epoch {epoch}, sample {sample.get('id', index)}"
            figure = validation_sample_figure(arrays, class_names, title)
            path = f"samples/epoch_{epoch:04d}/sample_{index:02d}.png"
            self._write(path, self.client.log_figure, figure, path)

    def log_text(self, text: str, path: str) -> None:
        """``text`` as the artifact file ``path``."""
        self._write(path, self.client.log_text, text, path)

    def log_dict(self, dictionary: Mapping[str, Any], path: str) -> None:
        """``dictionary`` as a JSON (``.json``) or YAML (``.yaml``) artifact file ``path``."""
        self._write(path, self.client.log_dict, _jsonable(dictionary), path)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """A local file or folder under ``artifact_path`` of the run, sent now (the files may not outlive
        the call, so it is not queued)."""
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags on the run; values are redacted and cut to MLflow's 8000 characters."""
        for key, value in tags.items():
            self._write(f"tag {key}", self.client.set_tag, key, _truncated(redact_uri(str(value)), MAX_TAG_VAL_LENGTH))

    def _write(self, description: str, method: Any, *args: Any, **kwargs: Any) -> None:
        """Queue ``method(run_id, *args, **kwargs)`` (an :class:`MlflowClient` write) as one write."""
        self.writes.put(description, partial(_without_http_retries, method, self.run_id, *args, **kwargs))

    def flush(self) -> None:
        """Deliver every queued write, waiting at most ``flush_timeout_s`` for the server;
        :class:`~cromss_ray.tracking.delivery.UndeliveredError` names what is left."""
        self.writes.flush(self.flush_timeout_s)

    def record_config_change(self, changes: Mapping[str, tuple[Any, Any]], epoch: int) -> None:
        """The config keys a resumed run changed (``key -> (old, new)``), from completed ``epoch`` on: the
        tag ``cromss.config_change.epoch_<E>`` (``key: old -> new; ...``) and the artifact
        ``config_changes/epoch_<E>.yaml``, values redacted (the run's params keep the first values)."""
        redacted = {key: (_redact_strings(old), _redact_strings(new)) for key, (old, new) in changes.items()}
        self.set_tags({f"{CONFIG_CHANGE_TAG}.epoch_{epoch}": describe_changes(redacted)})
        listed = {key: {"old": old, "new": new} for key, (old, new) in redacted.items()}
        self.log_text(yaml.safe_dump(listed, sort_keys=True), f"config_changes/epoch_{epoch:04d}.yaml")

    def finish(self, status: RunEndStatus = "FINISHED") -> None:
        """End the run with ``status``; later calls do nothing.

        FINISHED first delivers every queued write (:meth:`flush`); a failed or killed run
        sends what the server takes at once and, with the server away, leaves its status to
        the server rather than hide the error that ended it.
        """
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"run status must be FINISHED, FAILED or KILLED, not '{status}'")
        if self._finished:
            return
        if status == "FINISHED":
            self.flush()
            self.client.set_terminated(self.run_id, status)
        else:
            try:
                self.writes.deliver()
                _without_http_retries(self.client.set_terminated, self.run_id, status)
            except Exception as error:
                if not is_transient(error):
                    raise
                logger.warning("MLflow run %s not marked %s: %s", self.run_id, status, error)
        self._finished = True


def _without_http_retries(method: Any, *args: Any, **kwargs: Any) -> Any:
    """``method(*args, **kwargs)`` with MLflow's own HTTP retries off (unless the environment sets them):
    they would hold the training for minutes on every write while the server is away, and the
    delivery queue retries instead."""
    if MLFLOW_HTTP_REQUEST_MAX_RETRIES.is_set():
        return method(*args, **kwargs)
    os.environ[MLFLOW_HTTP_REQUEST_MAX_RETRIES.name] = "0"
    try:
        return method(*args, **kwargs)
    finally:
        os.environ.pop(MLFLOW_HTTP_REQUEST_MAX_RETRIES.name, None)


def _sample_arrays(index: int, sample: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The sample's arrays as numpy, checked: known keys, ``s2_rgb`` (H, W, 3), maps (H, W)."""
    unknown = set(sample) - set(SAMPLE_KEYS) - {"id"}
    if unknown:
        raise ValueError(f"validation sample {index}: unknown keys {sorted(unknown)} (expected {SAMPLE_KEYS})")
    for required in ("s2_rgb", "label"):
        if required not in sample:
            raise ValueError(f"validation sample {index}: missing '{required}'")
    arrays = {key: _to_numpy(value) for key, value in sample.items() if key != "id"}
    rgb = arrays["s2_rgb"]
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"validation sample {index}: 's2_rgb' must be (H, W, 3), got {rgb.shape}")
    for key, array in arrays.items():
        if key != "s2_rgb" and array.shape != rgb.shape[:2]:
            raise ValueError(f"validation sample {index}: '{key}' has shape {array.shape}, expected {rgb.shape[:2]}")
    return arrays
