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
``"s2"`` ``(N, B, H, W)``, any N, H and W (padded to the encoder stride, the outputs
cropped back). Output: ``"classes"`` ``(N, H, W)`` int64 and ``"probabilities"``
``(N, C, H, W)`` float32 of the fused prediction (spec 1), and the same with ``s1_`` /
``s2_`` prefixes for each branch alone. Param ``batch_size`` (8).

A fine-tuned network, and the single-modality pretrained baseline (spec 11), take their
one modality's image only (``{"s2": (N, B, H, W)}``), tiled and blended above ``tile``
pixels (:func:`~cromss_ray.models.segmenter.predict_array`); output ``"classes"`` and
``"probabilities"``. Params ``batch_size``, ``tile``, ``overlap``.

Band names travel as params, a list of strings per modality: ``s2_bands`` (e.g.
``["B2", "B3", ..., "B12"]``, 'B02' spellings too) and ``s1_bands`` (``["VV", "VH"]``), one
name per band of the array in its order; the model's bands are picked by name and the
others dropped, so a 12-band L2A stack feeds a model of any S2 band subset it holds.
Unnamed (the default, ``[]``), the S2 array holds the model's B bands in its order (spec
9) or all 13 L1C bands. A pixel with a NaN or infinite value in any band is masked:
class 255 and NaN probabilities in every output.

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
from cromss_ray.data.scaling import convert_storage
from cromss_ray.data.schema import S1_BAND_NAMES, ModalitySpec, ShardMetadata, s2_subset_names
from cromss_ray.method import CromSSNet, PretrainNet, SingleModalityNet
from cromss_ray.models import MODEL_TILE
from cromss_ray.models.segmenter import (
    DEFAULT_BATCH_SIZE,
    MAPS_BATCH_SIZE,
    S1_BANDS,
    Segmenter,
    predict_array,
    predict_maps,
)
from cromss_ray.models.stored import (
    ModelInputs,
    check_finite,
    check_matches_config,
    load_stored,
    pretrain_part,
    save_stored,
)
from cromss_ray.tracking.model_uris import LATEST_ALIAS, MODEL_NAME
from cromss_ray.tracking.registry import (
    ARTIFACT_FILES,
    EPOCH_TAG,
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
        if isinstance(self.stored.model, CromSSNet):
            batch_size = int(params.get("batch_size", MAPS_BATCH_SIZE))
            s1, s2 = (
                segmenter.network_input(modality, network_bands(segmenter, modality, model_input[modality], params))
                for modality in ("s1", "s2")
            )
            return predict_maps(self.stored.model, s1, s2, batch_size)
        band_names = {segmenter.branch: params.get(f"{segmenter.branch}_bands")}
        predictions = [
            predict_array(
                segmenter,
                **{segmenter.branch: image},
                tile=int(params.get("tile", MODEL_TILE)),
                overlap=int(params.get("overlap", MODEL_OVERLAP)),
                batch_size=int(params.get("batch_size", DEFAULT_BATCH_SIZE)),
                stored=True,
                band_names=band_names,
            )
            for image in model_input[segmenter.branch]
        ]
        return {
            "classes": np.stack([prediction.classes for prediction in predictions]),
            "probabilities": np.stack([prediction.probabilities for prediction in predictions]),
        }


def network_bands(segmenter: Segmenter, modality: str, images: Any, params: Mapping[str, Any]) -> np.ndarray:
    """``images`` (N, bands, H, W) cut to the network's bands, picked by the ``<modality>_bands`` param when given."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"input '{modality}' must be (N, bands, H, W), got {images.shape}")
    names = params.get(f"{modality}_bands")
    indexes = segmenter.band_indexes(modality, images.shape[1], names, f"input '{modality}'")
    return images if indexes == list(range(images.shape[1])) else images[:, indexes]


def image_spec(modality: str) -> TensorSpec:
    """A float32 input (N, bands, H, W), -1 for the free axes: S1 has its 2 bands, S2 any (picked by name)."""
    return TensorSpec(np.dtype(np.float32), (-1, S1_BANDS if modality == "s1" else -1, -1, -1), modality)


def band_params(modalities: Sequence[str]) -> list[ParamSpec]:
    """The ``<modality>_bands`` params: the input's band names in its order, ``[]`` (unnamed) by default."""
    return [ParamSpec(f"{modality}_bands", "string", [], (-1,)) for modality in modalities]


def model_signature(classes: int) -> ModelSignature:
    """Named tensor inputs and outputs with -1 for N, H, W and the S2 bands (picked by name or count, the
    version description names the model's), plus the ``batch_size`` and band-name params."""
    images = np.dtype(np.float32)
    outputs = []
    for prefix in ("", "s1_", "s2_"):
        outputs.append(TensorSpec(np.dtype(np.int64), (-1, -1, -1), f"{prefix}classes"))
        outputs.append(TensorSpec(images, (-1, classes, -1, -1), f"{prefix}probabilities"))
    params = ParamSchema([ParamSpec("batch_size", "long", MAPS_BATCH_SIZE), *band_params(("s1", "s2"))])
    return ModelSignature(inputs=Schema([image_spec("s1"), image_spec("s2")]), outputs=Schema(outputs), params=params)


def branch_signature(modality: str, classes: int) -> ModelSignature:
    """One modality's named tensor input and the two outputs, -1 for N, H, W (and S2 bands), plus the
    tiling and band-name params."""
    images = np.dtype(np.float32)
    outputs = Schema(
        [
            TensorSpec(np.dtype(np.int64), (-1, -1, -1), "classes"),
            TensorSpec(images, (-1, classes, -1, -1), "probabilities"),
        ]
    )
    params = ParamSchema(
        [
            ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE),
            ParamSpec("tile", "long", MODEL_TILE),
            ParamSpec("overlap", "long", MODEL_OVERLAP),
            *band_params((modality,)),
        ]
    )
    return ModelSignature(inputs=Schema([image_spec(modality)]), outputs=outputs, params=params)


def example_input(
    s2_bands: int,
    given: Mapping[str, Any] | None = None,
    inputs: ModelInputs | None = None,
    storage: Mapping[str, ModalitySpec] | None = None,
    modalities: Sequence[str] = ("s1", "s2"),
) -> dict[str, np.ndarray]:
    """The stored input example of ``modalities``: the first image of ``given`` cut to 32 x 32 px, stored as
    ``inputs`` (the model's, default the raw products) declare; zeros without one.

    ``storage`` says how ``given`` is stored when not as ``inputs`` (a pretraining run's shards):
    its values are converted (:func:`~cromss_ray.data.scaling.convert_storage`), so the example
    is what the pyfunc takes and gives the network the input of the images it came from.
    """
    band_names = {"s1": S1_BAND_NAMES, "s2": s2_subset_names(s2_bands)}
    if given is None:
        return {key: np.zeros((1, len(band_names[key]), EXAMPLE_SIZE, EXAMPLE_SIZE), np.float32) for key in modalities}
    missing = set(modalities) - set(given)
    if missing:
        raise ValueError(f"input_example needs arrays {' and '.join(map(repr, modalities))}; missing {sorted(missing)}")
    declared = (inputs or ModelInputs()).by_modality()
    example = {}
    for key in modalities:
        bands = band_names[key]
        value = given[key]
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if array.ndim != 4 or array.shape[1] != len(bands):
            raise ValueError(f"input_example '{key}' must be (N, bands, H, W) with {len(bands)} bands, got {array.shape}")
        array = array[:1, :, :EXAMPLE_SIZE, :EXAMPLE_SIZE]
        if storage is not None:
            array = convert_storage(array, storage[key].with_bands(bands), declared[key].with_bands(bands))
        example[key] = np.ascontiguousarray(array, dtype=np.float32)
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
    model: PretrainNet,
    config: PretrainConfig,
    *,
    tracker: RunTracker,
    registry_name: str,
    aliases: Sequence[str],
    inputs: ModelInputs | None = None,
    input_example: Mapping[str, Any] | None = None,
    example_storage: Mapping[str, ModalitySpec] | None = None,
    epoch: int | None = None,
    version_tags: Mapping[str, Any] | None = None,
) -> int:
    """Log ``model`` as the pyfunc of the tracker's run, register it, point ``aliases`` at it.

    Returns the new version of ``registry_name``. ``@latest`` is MLflow's built-in
    alias for the newest version, so ``"latest"`` in ``aliases`` needs (and gets) no
    assignment. ``inputs`` is how the images the pyfunc takes are stored (default the
    raw products, :class:`~cromss_ray.models.stored.ModelInputs`). ``input_example``
    (``{"s1": ..., "s2": ...}``, only the modality of the single-modality baseline; stored as
    ``inputs`` say or, when given, as ``example_storage`` says, then converted) is stored cut
    to one 32 x 32 px image (:func:`example_input`). ``epoch`` is the step the model is
    logged at (the run's metrics of that step are copied to the logged model);
    ``version_tags`` go on the model version (e.g. its validation scores).
    """
    config = pretrain_part(config)
    check_matches_config(model, config)
    inputs = inputs or ModelInputs()
    classes = config.model.classes
    if isinstance(model, SingleModalityNet):
        modality = model.modality
        signature = branch_signature(modality, classes)
        modalities: tuple[str, ...] = (modality,)
        description = (
            f"single-modality baseline {config.model.encoder} U-Net: {modality.upper()} ({model.bands} bands) to "
            f"{classes} classes, trained on the noisy labels without selection or smoothing"
        )
    else:
        signature = model_signature(classes)
        modalities = ("s1", "s2")
        description = (
            f"CromSS {config.model.fusion}-fusion {config.model.encoder}: S1 ({S1_BANDS} bands) and "
            f"S2 ({config.data.s2_bands} bands) to {classes} classes"
        )
    example = example_input(config.data.s2_bands, input_example, inputs, example_storage, modalities)
    return log_registered_model(
        tracker,
        config,
        network=model,
        inputs=inputs,
        signature=signature,
        input_example=example,
        registry_name=registry_name,
        description=description,
        aliases=aliases,
        epoch=epoch,
        version_tags=version_tags,
    )
