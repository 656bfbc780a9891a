"""Fine-tuned single-modality networks as MLflow pyfunc models, and where their encoders came from (spec 11).

A transfer run (:mod:`cromss_ray.train.finetune`) trains one smp network on one
modality's image. Its model is logged like a pretrained one (a logged model of the run,
registered as ``cromss-ft-<dataset>-<decoder>`` unless configured) and records its
origin: the run and the model version carry the tags of :meth:`TransferSource.tags`
(source model, version, run, fusion) and the version's description names them.

Pyfunc input: ``{"s1": (N, 2, H, W)}`` or ``{"s2": (N, B, H, W)}`` float32, the model's
branch only, scaled like the training batches (:func:`~cromss_ray.data.schema.network_affine`);
any H and W (tiled and blended above ``tile`` pixels). Output: ``"classes"`` (N, H, W)
int64 and ``"probabilities"`` (N, C, H, W) float32. Inference params: ``batch_size``,
``tile``, ``overlap``.

Stored: ``model.pt`` (the state dict), ``config.yaml`` (the run's
:class:`~cromss_ray.config.FinetuneConfig`, encoder and band count as resolved from the
source) and ``shard_metadata.json`` (the training shards' classes, ignore value and
pixel scaling); the network is rebuilt with
:func:`cromss_ray.method.build_segmentation_model`. Nothing is pickled: the stateless
:class:`FinetunedPyfunc` wrapper is stored as source, an MLflow "model from code"
(``finetuned_pyfunc_code.py``), with the ``cromss_ray`` package as its code path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, Literal

import mlflow
import numpy as np
import torch
import yaml
from mlflow.models import ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec
from torch import nn

from cromss_ray.config import ConfigError, FinetuneConfig, TransferModelConfig, build_config, to_yaml
from cromss_ray.data.schema import CLASS_SCHEMES, ShardMetadata, network_affine
from cromss_ray.method import build_segmentation_model
from cromss_ray.predict import (
    DEFAULT_BATCH_SIZE,
    PRODUCT_SCALING,
    Branch,
    Scaling,
    Segmenter,
    predict_array,
)
from cromss_ray.tracking.models import log_registered_model, save_weights
from cromss_ray.tracking.registry import PretrainedModel, download_cromss_model
from cromss_ray.tracking.runs import RunTracker, redacted_config
from cromss_ray.tracking.storage import CONFIG_ARTIFACT, S1_BANDS, SHARDS_ARTIFACT, WEIGHTS_ARTIFACT, load_network

PYFUNC_CODE = Path(__file__).with_name("finetuned_pyfunc_code.py")
DEFAULT_TILE = 512
"""Pyfunc and evaluation tile: whole SSL4EO-S12 tiles (510 / 512 px) in one window."""
DEFAULT_OVERLAP = 128
EXAMPLE_SIZE = 32
DATASET_NAMES = {
    "pretrain": "SSL4EO-S12@NoL",
    "dw": "SSL4EO-S12@DW",
    "osm": "SSL4EO-S12@OSM",
    "dfc2020": "DFC2020",
    "custom": "custom shards",
}
"""Display names of the shard kinds (spec 10)."""

TASK_TAG = "cromss.task"
FINETUNE_TASK = "finetune"
DATASET_TAG = "cromss.dataset"
INIT_TAG = "cromss.init"
DECODER_TAG = "cromss.decoder"
ENCODER_MODE_TAG = "cromss.encoder_mode"
BRANCH_TAG = "cromss.branch"
"""Run tags of a transfer run, read back by ``cromss compare`` (:mod:`cromss_ray.tracking.compare`)."""


@dataclass(frozen=True)
class TransferSource:
    """Where a transfer network's encoder came from (spec 11-12).

    ``kind`` 'registry' (``models:/...``: ``name``, ``version``, ``run_id`` of the
    pretrained model), 'checkpoint' (a paper checkpoint file, spec 12) or 'random'.
    ``encoder`` and ``s2_bands`` are the source's (None for 'random': the config's).
    """

    init: str
    kind: Literal["registry", "checkpoint", "random"]
    encoder: str
    s2_bands: int | None = None
    fusion: str | None = None
    name: str | None = None
    version: int | None = None
    run_id: str | None = None

    @property
    def label(self) -> str:
        """Short name of the initialisation: ``NAME/VERSION``, ``checkpoint FILE`` or ``random``."""
        if self.kind == "registry":
            return f"{self.name}/{self.version}" if self.name else self.init
        if self.kind == "checkpoint":
            return f"checkpoint {Path(self.init).name}"
        return "random"

    def tags(self) -> dict[str, str]:
        """Run and model-version tags naming the source (empty values left out)."""
        tags = {
            INIT_TAG: self.label,
            "cromss.init_uri": self.init,
            "cromss.source_model": self.name,
            "cromss.source_version": self.version,
            "cromss.source_run_id": self.run_id,
            "cromss.source_fusion": self.fusion,
        }
        return {key: str(value) for key, value in tags.items() if value is not None}


def encoder_mode_label(model: TransferModelConfig) -> str:
    """'frozen', 'fine-tuned', or 'fine-tuned after a N-epoch frozen warm-up' (spec 11)."""
    if model.encoder_mode == "frozen":
        return "frozen"
    if model.unfreeze_epoch:
        return f"fine-tuned after a {model.unfreeze_epoch}-epoch frozen warm-up"
    return "fine-tuned"


def input_bands(config: FinetuneConfig) -> int:
    """Input channels of the transfer network: 2 for S1 (VV, VH), the S2 band count for S2."""
    return S1_BANDS if config.model.branch == "s1" else config.data.s2_bands


def transfer_network(config: FinetuneConfig, classes: int) -> nn.Module:
    """The untrained single-modality network ``config`` describes (spec 11)."""
    return build_segmentation_model(config.model.decoder, config.model.encoder, input_bands(config), classes)


def default_registry_name(config: FinetuneConfig, meta: ShardMetadata) -> str:
    """``tracking.registry_name``, else ``cromss-ft-<dataset>-<decoder>`` in lower case."""
    return config.tracking.registry_name or f"cromss-ft-{meta.kind}-{config.model.decoder}".lower()


def run_tags(config: FinetuneConfig, meta: ShardMetadata, source: TransferSource) -> dict[str, str]:
    """Tags of a transfer run: task, dataset, decoder, encoder mode, branch and the source."""
    return {
        TASK_TAG: FINETUNE_TASK,
        DATASET_TAG: meta.kind,
        DECODER_TAG: config.model.decoder,
        ENCODER_MODE_TAG: encoder_mode_label(config.model),
        BRANCH_TAG: config.model.branch,
        **source.tags(),
    }


def describe(config: FinetuneConfig, meta: ShardMetadata, source: TransferSource) -> str:
    """The model-version description: network, data, encoder mode and source."""
    model = config.model
    origin = (
        "random initialisation" if source.kind == "random" else f"the {model.branch.upper()} encoder of {source.label}"
    )
    if source.kind == "registry":
        origin += f" ({source.init}, run {source.run_id})"
    return (
        f"{model.decoder} with a {model.encoder} encoder on {model.branch.upper()} ({input_bands(config)} bands), "
        f"{DATASET_NAMES[meta.kind]} ({meta.num_classes} classes), encoder {encoder_mode_label(model)}, "
        f"initialised from {origin}"
    )


def scaling_of(meta: ShardMetadata) -> dict[str, Scaling]:
    """How the training shards' stored values became model inputs, per modality (:func:`network_affine`)."""
    return {modality: Scaling(*network_affine(spec)) for modality, spec in (("s1", meta.s1), ("s2", meta.s2))}


@dataclass(frozen=True)
class FinetunedModel:
    """A pulled fine-tuned network (CPU, eval mode), its run config, training-shard metadata and origin."""

    model: nn.Module
    config: FinetuneConfig
    meta: ShardMetadata
    name: str | None
    version: int | None
    run_id: str | None

    def segmenter(self) -> Segmenter:
        """The network for :mod:`cromss_ray.predict`, reading inputs stored like its training shards."""
        return transfer_segmenter(self.model, self.config, self.meta)


def transfer_segmenter(network: nn.Module, config: FinetuneConfig, meta: ShardMetadata) -> Segmenter:
    """A transfer network for :mod:`cromss_ray.predict`: its branch and bands, the shards' classes and scaling."""
    return Segmenter(network, config.model.branch, config.data.s2_bands, tuple(meta.classes), scaling_of(meta))


def read_transfer_config(path: Path) -> FinetuneConfig:
    """A stored fine-tuning ``config.yaml``; errors name the file and key."""
    try:
        return build_config(FinetuneConfig, yaml.safe_load(path.read_text()) or {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_transfer_network(weights: Path, config_file: Path, shards_file: Path) -> FinetunedModel:
    """The network stored as ``model.pt`` + ``config.yaml`` + ``shard_metadata.json``, on the CPU, in eval mode."""
    config = read_transfer_config(config_file)
    meta = ShardMetadata.model_validate_json(shards_file.read_text())
    network = transfer_network(config, meta.num_classes)
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return FinetunedModel(network.eval(), config, meta, None, None, None)


class FinetunedPyfunc(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper of a fine-tuned single-modality network (input and output: module docstring)."""

    # The input is a dict of tensors, which MLflow's type-hint validation cannot describe;
    # the input contract is the tensor signature, which MLflow enforces.
    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Rebuild the network from its artifacts, on a GPU when present."""
        files = (Path(context.artifacts[key]) for key in (WEIGHTS_ARTIFACT, CONFIG_ARTIFACT, SHARDS_ARTIFACT))
        loaded = load_transfer_network(*files)
        loaded.model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        self.segmenter = loaded.segmenter()

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input,
        params: dict[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """``{"<branch>": (N, B, H, W)}`` float32 -> ``classes`` (N, H, W) and ``probabilities`` (N, C, H, W)."""
        params = params or {}
        branch = self.segmenter.branch
        predictions = [
            predict_array(
                self.segmenter,
                **{branch: image},
                tile=int(params.get("tile", DEFAULT_TILE)),
                overlap=int(params.get("overlap", DEFAULT_OVERLAP)),
                batch_size=int(params.get("batch_size", DEFAULT_BATCH_SIZE)),
            )
            for image in model_input[branch]
        ]
        return {
            "classes": np.stack([prediction.classes for prediction in predictions]),
            "probabilities": np.stack([prediction.probabilities for prediction in predictions]),
        }


def model_signature(config: FinetuneConfig, classes: int) -> ModelSignature:
    """The branch's named tensor input and the two outputs, -1 for N, H and W, plus the inference params."""
    images = np.dtype(np.float32)
    inputs = Schema([TensorSpec(images, (-1, input_bands(config), -1, -1), config.model.branch)])
    outputs = Schema(
        [
            TensorSpec(np.dtype(np.int64), (-1, -1, -1), "classes"),
            TensorSpec(images, (-1, classes, -1, -1), "probabilities"),
        ]
    )
    params = ParamSchema(
        [
            ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE),
            ParamSpec("tile", "long", DEFAULT_TILE),
            ParamSpec("overlap", "long", DEFAULT_OVERLAP),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def example_input(config: FinetuneConfig, given: torch.Tensor | np.ndarray | None) -> dict[str, np.ndarray]:
    """The stored input example: the first image of ``given`` cut to 32 x 32 px; zeros without one."""
    if given is None:
        array = np.zeros((1, input_bands(config), EXAMPLE_SIZE, EXAMPLE_SIZE), np.float32)
    else:
        array = given.detach().cpu().numpy() if isinstance(given, torch.Tensor) else np.asarray(given)
        if array.ndim != 4 or array.shape[1] != input_bands(config):
            raise ValueError(f"input_example must be (N, {input_bands(config)}, H, W), got {array.shape}")
    return {config.model.branch: np.ascontiguousarray(array[:1, :, :EXAMPLE_SIZE, :EXAMPLE_SIZE], dtype=np.float32)}


def log_finetuned_model(
    model: nn.Module,
    config: FinetuneConfig,
    meta: ShardMetadata,
    source: TransferSource,
    *,
    tracker: RunTracker,
    registry_name: str,
    aliases: Sequence[str],
    input_example: torch.Tensor | np.ndarray | None = None,
    epoch: int | None = None,
    version_tags: Mapping[str, Any] | None = None,
) -> int:
    """Log ``model`` as the pyfunc of the tracker's run, register it, point ``aliases`` at it.

    Returns the new version of ``registry_name``. The version carries the source tags
    (:meth:`TransferSource.tags`) and ``version_tags`` (e.g. its test scores), and a
    description naming the data and the source model and version (:func:`describe`).
    ``@latest`` is MLflow's built-in alias of the newest version and needs no assignment.
    """

    def write_artifacts(folder: Path) -> dict[str, Path]:
        config_file, shards_file = folder / "config.yaml", folder / "shard_metadata.json"
        config_file.write_text(to_yaml(redacted_config(config)))
        shards_file.write_text(meta.model_dump_json(indent=2))
        return {
            WEIGHTS_ARTIFACT: save_weights(model, folder / "model.pt"),
            CONFIG_ARTIFACT: config_file,
            SHARDS_ARTIFACT: shards_file,
        }

    return log_registered_model(
        tracker,
        config,
        python_model=str(PYFUNC_CODE),
        write_artifacts=write_artifacts,
        signature=model_signature(config, meta.num_classes),
        input_example=example_input(config, input_example),
        registry_name=registry_name,
        description=describe(config, meta, source),
        aliases=aliases,
        epoch=epoch,
        version_tags={**source.tags(), **(version_tags or {})},
    )


def load_cromss_model(model_uri: str, *, tracking_uri: str | None = None) -> FinetunedModel | PretrainedModel:
    """The fine-tuned or pretrained CromSS network behind ``model_uri``, rebuilt on the CPU.

    URIs as :func:`~cromss_ray.tracking.load_pretrained` takes them; a
    ``ModelNotFoundError`` names what is missing, a ValueError says when the URI holds no
    CromSS model.
    """
    with TemporaryDirectory() as folder:
        location, files = download_cromss_model(model_uri, Path(folder), tracking_uri=tracking_uri)
        if SHARDS_ARTIFACT in files:
            loaded = load_transfer_network(files[WEIGHTS_ARTIFACT], files[CONFIG_ARTIFACT], files[SHARDS_ARTIFACT])
            return FinetunedModel(
                loaded.model, loaded.config, loaded.meta, location.name, location.version, location.run_id
            )
        network, config = load_network(files[WEIGHTS_ARTIFACT], files[CONFIG_ARTIFACT])
    return PretrainedModel(
        model=network, config=config, name=location.name, version=location.version, run_id=location.run_id
    )


def load_segmenter(model_uri: str, *, branch: Branch | None = None, tracking_uri: str | None = None) -> Segmenter:
    """The network behind ``model_uri`` ready for :mod:`cromss_ray.predict`.

    A fine-tuned model predicts from its own branch (``branch``, when given, must name
    it) and reads inputs stored like its training shards. A pretrained CromSS model
    predicts fused (default) or from ``branch`` 's1' / 's2' and reads the raw products
    (S1 in dB, S2 L1C digital numbers; :data:`~cromss_ray.predict.PRODUCT_SCALING`).
    """
    loaded = load_cromss_model(model_uri, tracking_uri=tracking_uri)
    if isinstance(loaded, FinetunedModel):
        if branch is not None and branch != loaded.config.model.branch:
            raise ValueError(
                f"{model_uri} is a fine-tuned {loaded.config.model.branch.upper()} model; it cannot predict '{branch}'"
            )
        return loaded.segmenter()
    classes = loaded.config.model.classes
    names = CLASS_SCHEMES["pretrain"] if classes == len(CLASS_SCHEMES["pretrain"]) else tuple(map(str, range(classes)))
    return Segmenter(loaded.model, branch or "fused", loaded.config.data.s2_bands, tuple(names), dict(PRODUCT_SCALING))
