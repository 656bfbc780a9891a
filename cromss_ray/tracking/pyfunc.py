"""CromSS networks as MLflow pyfunc models: one pyfunc for both kinds, logged with their run and registered.

A logged model keeps the files of a stored network (:mod:`cromss_ray.models.stored`) as
its artifacts; what kind it is, and so what it predicts, follows from those files.

Both take images as they are stored, not scaled: the model scales them itself by the
one rule of spec 9 (:mod:`cromss_ray.data.scaling`), with the storage kept among its
files (``inputs.json`` for a pretrained model, by default the raw products: S1 backscatter
in dB, S2 L1C digital numbers; the training shards' ``shard_metadata.json`` for a
fine-tuned one). The arrays are float32 whatever the storage (digital numbers and v8
codes are exact in float32).

A pretrained network takes a dict of two arrays: ``"s1"`` ``(N, 2, H, W)`` (VV, VH) and
``"s2"`` ``(N, B, H, W)``, the model's B Sentinel-2 bands (spec 9), any N, H and W
(padded to the encoder stride, the outputs cropped back). Output: ``"classes"``
``(N, H, W)`` int64 and ``"probabilities"`` ``(N, C, H, W)`` float32 of the fused
prediction (spec 1), and the same with ``s1_`` / ``s2_`` prefixes for each branch alone.
Param ``batch_size`` (8).

A fine-tuned network takes its branch's image only (``{"s2": (N, B, H, W)}``), tiled and
blended above ``tile`` pixels (:func:`~cromss_ray.models.segmenter.predict_array`);
output ``"classes"`` and ``"probabilities"``. Params ``batch_size``, ``tile``, ``overlap``.

Nothing is pickled and nothing is downloaded at load time: the stateless
:class:`CromSSPyfunc` is stored as source (``pyfunc_code.py``, an MLflow "model from
code", with the ``cromss_ray`` package as its code path).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.metadata import version as installed_version
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import Model, ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec
from pydantic import BaseModel

import cromss_ray
from cromss_ray.config import PretrainConfig
from cromss_ray.data.schema import ShardMetadata
from cromss_ray.method import CromSSNet
from cromss_ray.models import MODEL_TILE
from cromss_ray.models.segmenter import (
    DEFAULT_BATCH_SIZE,
    MAPS_BATCH_SIZE,
    S1_BANDS,
    predict_array,
    predict_maps,
)
from cromss_ray.models.stored import (
    FinetunedModel,
    ModelInputs,
    check_finite,
    check_matches_config,
    load_stored,
    pretrain_part,
    save_stored,
)
from cromss_ray.tracking.registry import (
    ARTIFACT_FILES,
    EPOCH_TAG,
    LATEST_ALIAS,
    MODEL_NAME,
    stored_files,
    register_model_version,
    set_alias,
    using_tracking_uri,
    version_of_run,
)
from cromss_ray.tracking.runs import RunTracker, config_params, redacted_config

PYFUNC_CODE = Path(__file__).with_name("pyfunc_code.py")
EXAMPLE_SIZE = 32
MODEL_OVERLAP = 128
"""Overlap of a fine-tuned pyfunc's windows unless the caller sets ``overlap``."""
INFERENCE_DISTRIBUTIONS = (
    "mlflow",
    "torch",
    "torchvision",
    "segmentation-models-pytorch",
    "timm",
    "numpy",
    "scipy",
    "pydantic",
    "pyyaml",
    "matplotlib",
)
"""What loading and running the pyfunc imports; pinned to the installed versions when logged."""


class CromSSPyfunc(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper of a stored CromSS network, pretrained or fine-tuned (input and output: module docstring)."""

    # The input is a dict of tensors, which MLflow's type-hint validation (list[...] inputs
    # only) cannot describe: model_input carries no hint, and MLflow's nag about that is
    # switched off. The input contract is the tensor signature, which MLflow enforces.
    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Rebuild the network from its artifacts, on a GPU when present."""
        self.stored = load_stored(*stored_files(context.artifacts))
        self.stored.model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input,
        params: dict[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """Stored images by modality -> class maps and probabilities (module docstring)."""
        params = params or {}
        segmenter = self.stored.segmenter()
        if not isinstance(self.stored, FinetunedModel):
            batch_size = int(params.get("batch_size", MAPS_BATCH_SIZE))
            s1, s2 = (segmenter.network_input(modality, model_input[modality]) for modality in ("s1", "s2"))
            return predict_maps(self.stored.model, s1, s2, batch_size)
        predictions = [
            predict_array(
                segmenter,
                **{segmenter.branch: image},
                tile=int(params.get("tile", MODEL_TILE)),
                overlap=int(params.get("overlap", MODEL_OVERLAP)),
                batch_size=int(params.get("batch_size", DEFAULT_BATCH_SIZE)),
                stored=True,
            )
            for image in model_input[segmenter.branch]
        ]
        return {
            "classes": np.stack([prediction.classes for prediction in predictions]),
            "probabilities": np.stack([prediction.probabilities for prediction in predictions]),
        }


def model_signature(s2_bands: int, classes: int) -> ModelSignature:
    """Named tensor inputs and outputs with -1 for N, H and W, plus the ``batch_size`` param."""
    images = np.dtype(np.float32)
    inputs = Schema(
        [TensorSpec(images, (-1, S1_BANDS, -1, -1), "s1"), TensorSpec(images, (-1, s2_bands, -1, -1), "s2")]
    )
    outputs = []
    for prefix in ("", "s1_", "s2_"):
        outputs.append(TensorSpec(np.dtype(np.int64), (-1, -1, -1), f"{prefix}classes"))
        outputs.append(TensorSpec(images, (-1, classes, -1, -1), f"{prefix}probabilities"))
    params = ParamSchema([ParamSpec("batch_size", "long", MAPS_BATCH_SIZE)])
    return ModelSignature(inputs=inputs, outputs=Schema(outputs), params=params)


def example_input(s2_bands: int, given: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The stored input example: the first image of ``given``, cut to 32 x 32 px; zeros without one."""
    if given is None:
        return {
            "s1": np.zeros((1, S1_BANDS, EXAMPLE_SIZE, EXAMPLE_SIZE), np.float32),
            "s2": np.zeros((1, s2_bands, EXAMPLE_SIZE, EXAMPLE_SIZE), np.float32),
        }
    missing = {"s1", "s2"} - set(given)
    if missing:
        raise ValueError(f"input_example needs arrays 's1' and 's2'; missing {sorted(missing)}")
    example = {}
    for key in ("s1", "s2"):
        value = given[key]
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if array.ndim != 4:
            raise ValueError(f"input_example '{key}' must be (N, bands, H, W), got {array.shape}")
        example[key] = np.ascontiguousarray(array[:1, :, :EXAMPLE_SIZE, :EXAMPLE_SIZE], dtype=np.float32)
    return example


def pinned_requirements() -> list[str]:
    """``INFERENCE_DISTRIBUTIONS`` at their installed versions (local labels such as ``+cu130`` dropped)."""
    return [f"{name}=={installed_version(name).split('+')[0]}" for name in INFERENCE_DISTRIBUTIONS]


def log_registered_model(
    tracker: RunTracker,
    config: BaseModel,
    *,
    network: torch.nn.Module,
    meta: ShardMetadata | None = None,
    inputs: ModelInputs | None = None,
    signature: ModelSignature,
    input_example: Mapping[str, np.ndarray],
    registry_name: str,
    description: str,
    aliases: Sequence[str],
    epoch: int | None = None,
    version_tags: Mapping[str, Any] | None = None,
) -> int:
    """Log a CromSS pyfunc model of the tracker's run, register it, point ``aliases`` at it; the new version.

    The logged model is named ``model`` and carries ``config``'s flattened params; its
    artifacts are the stored network (``network``, ``config`` with credentials redacted,
    and ``meta`` for a fine-tuned one or ``inputs`` for a pretrained one,
    :func:`~cromss_ray.models.stored.save_stored`).
    The pyfunc is :class:`CromSSPyfunc` from code; the ``cromss_ray`` package is logged
    as its code path and the inference packages are pinned (:func:`pinned_requirements`).
    ``epoch`` is the step the model is logged at; the version gets ``description``,
    ``version_tags`` and the tag ``epoch``. ``@latest`` is MLflow's built-in alias of the
    newest version, so ``"latest"`` in ``aliases`` needs (and gets) no assignment.

    Registration is idempotent on (run, ``epoch``): when the run registered a version
    of ``registry_name`` at ``epoch`` already (a finished run started again), that version
    is returned and nothing is logged, registered or aliased. A network with a NaN or
    infinite parameter or buffer is refused (:class:`~cromss_ray.models.stored.NonFiniteModelError`
    naming the run) before anything is logged.
    """
    if epoch is not None:
        existing = version_of_run(tracker.client, registry_name, tracker.run_id, epoch)
        if existing is not None:
            return existing
    run_name = tracker.client.get_run(tracker.run_id).info.run_name
    check_finite(network, f"run '{run_name}' (MLflow run {tracker.run_id}): not registered as {registry_name}")
    tags = {**(version_tags or {}), **({EPOCH_TAG: epoch} if epoch is not None else {})}
    logged = tracker.client.create_logged_model(
        experiment_id=tracker.experiment_id, name=MODEL_NAME, source_run_id=tracker.run_id, params=config_params(config)
    )
    with TemporaryDirectory() as folder, using_tracking_uri(tracker.tracking_uri):
        files = save_stored(Path(folder), network, redacted_config(config), meta, inputs)
        Model.log(
            artifact_path=None,
            name=MODEL_NAME,
            flavor=mlflow.pyfunc,
            run_id=tracker.run_id,
            model_id=logged.model_id,
            step=epoch or 0,
            python_model=str(PYFUNC_CODE),
            artifacts={key: str(files[name]) for key, name in ARTIFACT_FILES.items() if name in files},
            code_paths=[str(Path(cromss_ray.__file__).parent)],
            signature=signature,
            input_example=input_example,
            pip_requirements=pinned_requirements(),
        )
        version = register_model_version(
            tracker.client,
            registry_name,
            logged.model_id,
            description,
            run_id=tracker.run_id,
            tags={key: str(value) for key, value in tags.items()},
        )
    for alias in aliases:
        if alias.lower() != LATEST_ALIAS:
            set_alias(registry_name, alias, version, tracking_uri=tracker.tracking_uri)
    return version


def log_pretrained_model(
    model: CromSSNet,
    config: PretrainConfig,
    *,
    tracker: RunTracker,
    registry_name: str,
    aliases: Sequence[str],
    inputs: ModelInputs | None = None,
    input_example: Mapping[str, Any] | None = None,
    epoch: int | None = None,
    version_tags: Mapping[str, Any] | None = None,
) -> int:
    """Log ``model`` as the pyfunc of the tracker's run, register it, point ``aliases`` at it.

    Returns the new version of ``registry_name``. ``@latest`` is MLflow's built-in
    alias for the newest version, so ``"latest"`` in ``aliases`` needs (and gets) no
    assignment. ``inputs`` is how the images the pyfunc takes are stored (default the
    raw products, :class:`~cromss_ray.models.stored.ModelInputs`). ``input_example``
    (``{"s1": ..., "s2": ...}``, stored as ``inputs`` say) is stored cut to one 32 x 32 px
    image. ``epoch`` is the step the model is logged at (the run's metrics
    of that step are copied to the logged model); ``version_tags`` go on the model
    version (e.g. its validation scores).
    """
    config = pretrain_part(config)
    check_matches_config(model, config)

    return log_registered_model(
        tracker,
        config,
        network=model,
        inputs=inputs or ModelInputs(),
        signature=model_signature(config.data.s2_bands, config.model.classes),
        input_example=example_input(config.data.s2_bands, input_example),
        registry_name=registry_name,
        description=(
            f"CromSS {config.model.fusion}-fusion {config.model.encoder}: S1 ({S1_BANDS} bands) and "
            f"S2 ({config.data.s2_bands} bands) to {config.model.classes} classes"
        ),
        aliases=aliases,
        epoch=epoch,
        version_tags=version_tags,
    )
