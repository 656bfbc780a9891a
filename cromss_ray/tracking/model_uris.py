"""Model URIs resolved in an MLflow store, without loading any model: what a command checks before it starts Ray.

``models:/NAME@ALIAS`` (``@latest`` is MLflow's built-in alias of the newest version),
``models:/NAME/VERSION``, ``models:/<logged model id>`` and ``runs:/<run id>/model``.
Only MLflow is imported here; :mod:`cromss_ray.tracking.registry` downloads and rebuilds
the networks the URIs point at.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from cromss_ray.config import TrackingConfig
from cromss_ray.tracking.uris import absolute_tracking_uri, redact_uri

LATEST_ALIAS = "latest"
MODELS_SCHEME = "models:/"
RUNS_SCHEME = "runs:/"
MODEL_URI_SCHEMES = (MODELS_SCHEME, RUNS_SCHEME)
MODEL_NAME = "model"
"""The name a run logs its pyfunc model under (``runs:/<run id>/model``)."""


class ModelNotFoundError(LookupError):
    """The store has no such registered model, version, alias, logged model or run."""


def store_uri(tracking_uri: str | None = None) -> str:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``; made absolute."""
    return absolute_tracking_uri(tracking_uri or TrackingConfig().resolved_uri())


def registry_client(tracking_uri: str | None = None) -> MlflowClient:
    """A client of the tracking store and model registry at :func:`store_uri`."""
    uri = store_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def _missing_as(message: str) -> Iterator[None]:
    """MLflow's "does not exist" inside the block becomes a :class:`ModelNotFoundError` saying ``message``."""
    try:
        yield
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise ModelNotFoundError(message) from None
        raise


def _registered_version(client: MlflowClient, name: str, alias: str | None, version: str | None) -> ModelVersion:
    """The version ``models:/name@alias`` or ``models:/name/version`` names; errors say what is missing."""
    with _missing_as(f"no registered model '{name}' in {redact_uri(client.tracking_uri)}"):
        registered = client.get_registered_model(name)
    if alias is not None and alias.lower() != LATEST_ALIAS and alias not in registered.aliases:
        known = ", ".join(f"@{key}" for key in sorted(registered.aliases)) or "none besides @latest"
        raise ModelNotFoundError(f"registered model '{name}' has no alias '@{alias}' (its aliases: {known})")
    wanted = f"alias '@{alias}'" if alias is not None else f"version {version}"
    with _missing_as(f"registered model '{name}' has no {wanted}"):
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)


def _logged_model_location(client: MlflowClient, model_id: str) -> tuple[str, str | None]:
    """Artifact location and source run of logged model ``model_id``."""
    with _missing_as(f"no logged model '{model_id}' in {redact_uri(client.tracking_uri)}"):
        logged = client.get_logged_model(model_id)
    return logged.artifact_location, logged.source_run_id


def _run_model_id(client: MlflowClient, run_id: str, name: str) -> str:
    """The model named ``name`` that run ``run_id`` logged last (highest step, then newest)."""
    with _missing_as(f"no run '{run_id}' in {redact_uri(client.tracking_uri)}"):
        run = client.get_run(run_id)
    candidates = [
        (output.step, logged.creation_timestamp, logged.model_id)
        for output in (run.outputs.model_outputs if run.outputs else [])
        if (logged := client.get_logged_model(output.model_id)).name == name
    ]
    if not candidates:
        raise ModelNotFoundError(f"run '{run_id}' logged no model named '{name}'")
    return max(candidates)[2]


@dataclass(frozen=True)
class ModelLocation:
    """Where a model URI points: the artifact location to download and, when known, its registry entry.

    ``name`` and ``version`` are set for ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION``;
    ``run_id`` is the run that logged the model (None when MLflow does not know it).
    """

    artifacts: str
    name: str | None
    version: int | None
    run_id: str | None


def resolve_model_uri(client: MlflowClient, model_uri: str) -> ModelLocation:
    """Where ``model_uri`` (module docstring) points in ``client``'s store.

    Locations are looked up with ``client`` rather than left to MLflow's ``models:/``
    resolution, which reads the process-wide registry URI instead of the one given.
    Raises :class:`ModelNotFoundError` naming a missing model, alias, version, logged
    model or run, and a ValueError for a URI of another form.
    """
    if model_uri.startswith(MODELS_SCHEME):
        reference = model_uri[len(MODELS_SCHEME) :]
        name, slash, suffix = reference.partition("/")
        base, at, alias = reference.partition("@")
        if at and not slash:
            model_version = _registered_version(client, base, alias, None)
        elif slash and suffix.isdigit():
            model_version = _registered_version(client, name, None, suffix)
        elif slash and suffix.lower() == LATEST_ALIAS:
            model_version = _registered_version(client, name, LATEST_ALIAS, None)
        elif reference and not slash:
            location, run_id = _logged_model_location(client, reference)
            return ModelLocation(location, None, None, run_id)
        else:
            raise ValueError(f"model URI '{model_uri}' must be models:/NAME@ALIAS or models:/NAME/VERSION")
        location = client.get_model_version_download_uri(model_version.name, model_version.version)
        return ModelLocation(location, model_version.name, int(model_version.version), model_version.run_id)
    if model_uri.startswith(RUNS_SCHEME):
        run_id, _, name = model_uri[len(RUNS_SCHEME) :].partition("/")
        location, _ = _logged_model_location(client, _run_model_id(client, run_id, name or MODEL_NAME))
        return ModelLocation(location, None, None, run_id)
    raise ValueError(
        f"model URI '{model_uri}' must be models:/NAME@ALIAS, models:/NAME/VERSION, "
        "models:/MODEL_ID or runs:/RUN_ID/model"
    )
