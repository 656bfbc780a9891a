"""A stored network: its weights and config (and, for a fine-tuned one, its training shards' metadata).

Both kinds are kept as the same files: ``model.pt`` (the state dict) and ``config.yaml``
(a :class:`~cromss_ray.config.PretrainConfig` or :class:`~cromss_ray.config.FinetuneConfig`),
plus the storage of the images it takes, so raw input is scaled by the model itself with
the rule of spec 9: ``shard_metadata.json`` for a fine-tuned network (the classes, ignore
value and image storage of the shards it learnt from), ``inputs.json`` for a pretrained
one (:class:`ModelInputs`, the raw products unless given). :func:`load_stored` rebuilds either from them with
the one builder per kind (:func:`network_from_config`, :func:`transfer_network`), so no
module is pickled; the MLflow pyfunc models and the registry keep and pull these files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from torch import nn

from cromss_ray.config import ConfigError, FinetuneConfig, PretrainConfig, build_config, to_yaml
from cromss_ray.data.schema import CLASS_SCHEMES, ModalitySpec, ShardMetadata
from cromss_ray.method import PretrainNet, SingleModalityNet, build_model, build_segmentation_model, build_single_model
from cromss_ray.models.segmenter import PRODUCT_INPUTS, S1_BANDS, BranchName, Segmenter

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
SHARDS_FILE = "shard_metadata.json"
INPUTS_FILE = "inputs.json"

Config = TypeVar("Config", PretrainConfig, FinetuneConfig)


def pretrain_part(config: PretrainConfig) -> PretrainConfig:
    """The :class:`PretrainConfig` fields of ``config`` (a Tune trial's config drops its sweep)."""
    dump = config.model_dump()
    return PretrainConfig.model_validate({key: dump[key] for key in PretrainConfig.model_fields})


def read_config(path: Path, kind: type[Config]) -> Config:
    """A stored ``config.yaml`` as a ``kind`` config; errors name the file and key."""
    try:
        return build_config(kind, yaml.safe_load(path.read_text()) or {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def modality_bands(config: PretrainConfig, modality: str) -> int:
    """The band count a pretrained network takes for ``modality``: 2 for S1 (VV, VH), ``data.s2_bands`` for S2."""
    return S1_BANDS if modality == "s1" else config.data.s2_bands


def network_from_config(config: PretrainConfig) -> PretrainNet:
    """An untrained network with the architecture ``config`` describes: two branches (spec 1) or the
    single-modality baseline (spec 11)."""
    if config.model.fusion == "single":
        modality = config.model.modality
        return build_single_model(
            modality, config.model.encoder, modality_bands(config, modality), config.model.classes
        )
    return build_model(
        config.model.fusion,
        encoder=config.model.encoder,
        s1_bands=S1_BANDS,
        s2_bands=config.data.s2_bands,
        classes=config.model.classes,
    )


def input_bands(config: FinetuneConfig) -> int:
    """Input channels of the transfer network: 2 for S1 (VV, VH), the S2 band count for S2."""
    return S1_BANDS if config.model.branch == "s1" else config.data.s2_bands


def transfer_network(config: FinetuneConfig, classes: int) -> nn.Module:
    """The untrained single-modality network ``config`` describes (spec 11)."""
    return build_segmentation_model(config.model.decoder, config.model.encoder, input_bands(config), classes)


class ModelInputs(BaseModel):
    """How the images a pretrained model takes are stored, per modality (``inputs.json``, spec 9)."""

    model_config = ConfigDict(extra="forbid")

    s1: ModalitySpec = PRODUCT_INPUTS["s1"]
    s2: ModalitySpec = PRODUCT_INPUTS["s2"]

    @model_validator(mode="after")
    def _declared(self) -> ModelInputs:
        for modality in ("s1", "s2"):
            if getattr(self, modality).representation is None:
                raise ValueError(f"{modality} does not say which representation it holds ('physical' or 'v8')")
        return self

    def by_modality(self) -> dict[str, ModalitySpec]:
        return {"s1": self.s1, "s2": self.s2}


def transfer_segmenter(network: nn.Module, config: FinetuneConfig, meta: ShardMetadata) -> Segmenter:
    """A transfer network as a segmenter: its branch and bands, the shards' classes and image storage."""
    inputs = {"s1": meta.s1, "s2": meta.s2}
    return Segmenter(network, config.model.branch, config.data.s2_bands, tuple(meta.classes), inputs)


@dataclass(frozen=True)
class PretrainedModel:
    """A stored pretrained network (CPU, eval mode), its config, the storage of its input images and,
    when pulled from a registry, its origin."""

    model: PretrainNet
    config: PretrainConfig
    inputs: ModelInputs
    name: str | None = None
    version: int | None = None
    run_id: str | None = None

    def default_branch(self) -> BranchName:
        """What the model predicts from unless told: fused for CromSS, the baseline's one modality."""
        return "fused" if self.config.model.fusion != "single" else self.config.model.modality

    def segmenter(self, branch: BranchName | None = None) -> Segmenter:
        """The prediction of :meth:`default_branch` or of ``branch``, of images stored as :attr:`inputs` say."""
        classes = self.config.model.classes
        pretrain_classes = CLASS_SCHEMES["pretrain"]
        names = pretrain_classes if classes == len(pretrain_classes) else tuple(map(str, range(classes)))
        inputs = self.inputs.by_modality()
        return Segmenter(self.model, branch or self.default_branch(), self.config.data.s2_bands, tuple(names), inputs)


@dataclass(frozen=True)
class FinetunedModel:
    """A stored fine-tuned network (CPU, eval mode), its run config, training-shard metadata and origin."""

    model: nn.Module
    config: FinetuneConfig
    meta: ShardMetadata
    name: str | None = None
    version: int | None = None
    run_id: str | None = None

    def segmenter(self) -> Segmenter:
        """The network reading inputs stored like its training shards."""
        return transfer_segmenter(self.model, self.config, self.meta)


StoredModel = PretrainedModel | FinetunedModel


def read_inputs(path: Path | None) -> ModelInputs:
    """A pretrained model's ``inputs.json``; errors name the file (a model stored without one predates
    spec 9's rule)."""
    if path is None:
        raise ValueError(
            f"the pretrained model has no {INPUTS_FILE}: it was stored before its inputs followed the rule of spec 9; "
            "store it again"
        )
    try:
        return ModelInputs.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise ValueError(f"{path}: {exc}") from None


def load_stored(
    weights: Path, config_file: Path, shards_file: Path | None = None, inputs_file: Path | None = None
) -> StoredModel:
    """The network stored as ``model.pt`` + ``config.yaml`` + ``shard_metadata.json`` (fine-tuned) or
    ``inputs.json`` (pretrained), on the CPU, in eval mode."""
    if shards_file is None:
        config = read_config(config_file, PretrainConfig)
        inputs = read_inputs(inputs_file)
        network = network_from_config(config)
    else:
        config = read_config(config_file, FinetuneConfig)
        meta = ShardMetadata.model_validate_json(shards_file.read_text())
        network = transfer_network(config, meta.num_classes)
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    network.eval()
    if shards_file is None:
        return PretrainedModel(network, config, inputs)
    return FinetunedModel(network, config, meta)


def save_weights(network: nn.Module, path: Path) -> Path:
    """``network``'s state dict, detached and on the CPU, saved to ``path``."""
    torch.save({key: value.detach().cpu() for key, value in network.state_dict().items()}, path)
    return path


class NonFiniteModelError(ValueError):
    """A network holds NaN or infinite parameters or buffers; it is neither checkpointed nor registered."""


NON_FINITE_LISTED = 5
"""How many non-finite tensors a :class:`NonFiniteModelError` names (all are counted)."""


def check_finite(network: nn.Module, what: str) -> None:
    """Raise :class:`NonFiniteModelError` (``what`` leads its message) when any floating-point parameter
    or buffer of ``network`` holds a NaN or an infinity."""
    bad = [
        name
        for name, tensor in (*network.named_parameters(), *network.named_buffers())
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        listed = ", ".join(bad[:NON_FINITE_LISTED]) + (", ..." if len(bad) > NON_FINITE_LISTED else "")
        raise NonFiniteModelError(f"{what}: {len(bad)} tensor(s) of the network are not finite ({listed})")


def save_stored(
    folder: Path,
    network: nn.Module,
    config: BaseModel,
    meta: ShardMetadata | None = None,
    inputs: ModelInputs | None = None,
) -> dict[str, Path]:
    """Write ``model.pt``, ``config.yaml`` and ``shard_metadata.json`` (``meta``, fine-tuned) or
    ``inputs.json`` (``inputs``, default the raw products; pretrained) into ``folder``; the paths by
    file name. ``config`` is stored as given (redact credentials before)."""
    files = {WEIGHTS_FILE: save_weights(network, folder / WEIGHTS_FILE), CONFIG_FILE: folder / CONFIG_FILE}
    files[CONFIG_FILE].write_text(to_yaml(config))
    if meta is not None:
        files[SHARDS_FILE] = folder / SHARDS_FILE
        files[SHARDS_FILE].write_text(meta.model_dump_json(indent=2))
    else:
        files[INPUTS_FILE] = folder / INPUTS_FILE
        files[INPUTS_FILE].write_text((inputs or ModelInputs()).model_dump_json(indent=2))
    return files


def check_matches_config(model: PretrainNet, config: PretrainConfig) -> None:
    """Raise a ValueError unless ``config`` rebuilds ``model``'s architecture."""
    stored = {
        "model.fusion": config.model.fusion,
        "model.encoder": config.model.encoder,
        "model.classes": config.model.classes,
    }
    actual = {"model.fusion": model.fusion, "model.encoder": model.encoder_name, "model.classes": model.classes}
    if isinstance(model, SingleModalityNet):
        stored["model.modality"], actual["model.modality"] = config.model.modality, model.modality
        stored["bands"], actual["bands"] = modality_bands(config, config.model.modality), model.bands
    else:
        stored["S1 bands"], actual["S1 bands"] = S1_BANDS, model.s1_bands
        stored["data.s2_bands"], actual["data.s2_bands"] = config.data.s2_bands, model.s2_bands
    differing = [
        f"{key}: config {stored[key]!r}, model {actual[key]!r}" for key in stored if stored[key] != actual[key]
    ]
    if differing:
        raise ValueError("the model does not match its config: " + "; ".join(differing))
