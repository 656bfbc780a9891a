"""CromSS models in the MLflow registry: register a version, pull one back, point an alias at a version.

Model URIs (:mod:`cromss_ray.tracking.model_uris` resolves them): ``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, ``models:/<logged model id>`` and ``runs:/<run id>/model``.
What is pulled is the pyfunc's artifacts (``model.pt``,
``config.yaml``, ...); the network is rebuilt from them by :mod:`cromss_ray.models.stored`.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from cromss_ray.models.segmenter import BranchName, Segmenter
from cromss_ray.models.stored import (
    CONFIG_FILE,
    INPUTS_FILE,
    SHARDS_FILE,
    WEIGHTS_FILE,
    FinetunedModel,
    PretrainedModel,
    StoredModel,
    load_stored,
)
from cromss_ray.tracking.model_uris import (
    LATEST_ALIAS,
    MODELS_SCHEME,
    ModelLocation,
    registry_client,
    resolve_model_uri,
    store_uri,
)

EPOCH_TAG = "epoch"
"""The model-version tag holding the epoch a run registered it at."""
PYFUNC_FLAVOR = "python_function"
MLMODEL_FILE = "MLmodel"
WEIGHTS_ARTIFACT = "weights"
CONFIG_ARTIFACT = "config"
SHARDS_ARTIFACT = "shard_metadata"
INPUTS_ARTIFACT = "inputs"
"""The artifact only fine-tuned models have: their training shards' metadata."""
ARTIFACT_FILES = {
    WEIGHTS_ARTIFACT: WEIGHTS_FILE,
    CONFIG_ARTIFACT: CONFIG_FILE,
    SHARDS_ARTIFACT: SHARDS_FILE,
    INPUTS_ARTIFACT: INPUTS_FILE,
}
"""The pyfunc's artifact keys and the stored-network files they hold."""


def set_alias(name: str, alias: str, version: int, *, tracking_uri: str | None = None) -> None:
    """Point ``models:/name@alias`` at ``version`` (e.g. ``@best`` after a better validation score)."""
    if alias.lower() == LATEST_ALIAS:
        raise ValueError("'latest' is MLflow's built-in alias of the newest version and cannot be assigned")
    registry_client(tracking_uri).set_registered_model_alias(name, alias, str(version))


@contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at ``uri`` for the block, then restore the previous one.

    ``Model.log`` and the registry's resolution of a ``models:/<model id>`` source read
    the process-wide URI, not a client's, so logging a model to a given store needs this.
    """
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def register_model_version(
    client: MlflowClient, name: str, model_id: str, description: str, **version_fields: Any
) -> int:
    """Register logged model ``model_id`` as a new version of ``name`` (created on first use); its number.

    ``version_fields`` go to ``MlflowClient.create_model_version`` (``run_id``, ``tags``).
    Call it inside :func:`using_tracking_uri` of the client's store: MLflow resolves the
    ``models:/<model id>`` source through the process-wide URI.
    """
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    version = client.create_model_version(
        name, source=f"models:/{model_id}", model_id=model_id, description=description, **version_fields
    )
    return int(version.version)


def filter_literal(value: str) -> str:
    """``value`` as a quoted string of an MLflow search filter."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def version_of_run(client: MlflowClient, name: str, run_id: str, epoch: int) -> int | None:
    """The version of ``name`` that run ``run_id`` registered for ``epoch`` (its :data:`EPOCH_TAG`), if any.

    Registration is idempotent on (run, epoch): a finished run started again finds its
    version here instead of registering a duplicate and moving the aliases.
    """
    query = f"name = {filter_literal(name)} and run_id = {filter_literal(run_id)}"
    found = [
        int(version.version)
        for version in client.search_model_versions(query)
        if version.tags.get(EPOCH_TAG) == str(epoch)
    ]
    return min(found, default=None)


def logged_model_id(version: ModelVersion) -> str:
    """The logged model a version registers (its source is ``models:/<logged model id>``,
    :func:`register_model_version`; the store does not fill the version's ``model_id``)."""
    return version.source.removeprefix(MODELS_SCHEME)


def download_cromss_model(
    model_uri: str, folder: Path, *, tracking_uri: str | None = None, kind: str = "CromSS"
) -> tuple[ModelLocation, dict[str, Path]]:
    """Resolve ``model_uri`` and download its pyfunc artifacts into ``folder``.

    Returns where the URI points and the artifacts' local paths by key.

    Only the ``MLmodel`` file and the folders of the pyfunc's artifacts are fetched, not
    the code logged with the model. Every CromSS model stores at least
    ``WEIGHTS_ARTIFACT`` and ``CONFIG_ARTIFACT``; a ValueError says "``model_uri`` is
    not a ``kind`` model" when they are missing.
    """
    uri = store_uri(tracking_uri)
    location = resolve_model_uri(MlflowClient(tracking_uri=uri, registry_uri=uri), model_uri)
    root = location.artifacts.rstrip("/")

    def download(path: str) -> Path:
        return Path(mlflow.artifacts.download_artifacts(f"{root}/{path}", dst_path=str(folder), tracking_uri=uri))

    stored = Model.load(download(MLMODEL_FILE)).flavors.get(PYFUNC_FLAVOR, {}).get("artifacts", {})
    if WEIGHTS_ARTIFACT not in stored or CONFIG_ARTIFACT not in stored:
        raise ValueError(f"{model_uri} is not a {kind} model: its pyfunc has no weights or config")
    folders: dict[str, Path] = {}
    files: dict[str, Path] = {}
    for key, entry in stored.items():
        parent, name = posixpath.split(entry["path"])
        if not parent:
            files[key] = download(name)
            continue
        if parent not in folders:
            folders[parent] = download(parent)
        files[key] = folders[parent] / name
    return location, files


def stored_files(artifacts: Mapping[str, str | Path]) -> tuple[Path, Path, Path | None, Path | None]:
    """The weights, config, shard-metadata (fine-tuned) and inputs (pretrained) files of a pyfunc's artifacts."""
    shards, inputs = artifacts.get(SHARDS_ARTIFACT), artifacts.get(INPUTS_ARTIFACT)
    return (
        Path(artifacts[WEIGHTS_ARTIFACT]),
        Path(artifacts[CONFIG_ARTIFACT]),
        Path(shards) if shards else None,
        Path(inputs) if inputs else None,
    )


def load_cromss_model(
    model_uri: str, *, tracking_uri: str | None = None, kind: str = "CromSS"
) -> StoredModel:
    """The fine-tuned or pretrained CromSS network behind ``model_uri``, rebuilt on the CPU.

    A :class:`ModelNotFoundError` names the missing model, version, alias or run; a
    ValueError says when the URI holds no CromSS model.
    """
    with TemporaryDirectory() as folder:
        location, files = download_cromss_model(model_uri, Path(folder), tracking_uri=tracking_uri, kind=kind)
        stored = load_stored(*stored_files(files))
    return replace(stored, name=location.name, version=location.version, run_id=location.run_id)


def load_pretrained(model_uri: str, *, tracking_uri: str | None = None) -> PretrainedModel:
    """The pretrained network behind ``model_uri`` (module docstring), rebuilt on the CPU.

    Used to pull encoders for transfer (spec 11). A :class:`ModelNotFoundError` names the
    missing model, version, alias or run; a ValueError says when the URI holds no CromSS
    pretrained model.
    """
    stored = load_cromss_model(model_uri, tracking_uri=tracking_uri, kind="CromSS pretrained")
    if isinstance(stored, FinetunedModel):
        raise ValueError(
            f"{model_uri} is a fine-tuned single-modality model, not a CromSS pretrained model "
            "(its encoder cannot initialise a transfer run or be exported)"
        )
    return stored


def load_segmenter(
    model_uri: str, *, branch: BranchName | None = None, tracking_uri: str | None = None
) -> Segmenter:
    """The network behind ``model_uri`` as a segmenter.

    A fine-tuned model predicts from its own branch (``branch``, when given, must name
    it) and reads inputs stored like its training shards. A pretrained CromSS model
    predicts fused (default) or from ``branch`` 's1' / 's2', the single-modality baseline
    from its own modality, and both read images stored as their ``inputs.json`` says (by
    default the raw products, S1 in dB and S2 L1C digital numbers).
    """
    stored = load_cromss_model(model_uri, tracking_uri=tracking_uri)
    if isinstance(stored, FinetunedModel):
        if branch is not None and branch != stored.config.model.branch:
            raise ValueError(
                f"{model_uri} is a fine-tuned {stored.config.model.branch.upper()} model; it cannot predict '{branch}'"
            )
        return stored.segmenter()
    return stored.segmenter(branch)
