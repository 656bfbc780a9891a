"""Fine-tuned single-modality networks in MLflow: run tags, registry names, descriptions, logging (spec 11).

A transfer run (:mod:`cromss_ray.train.finetune`) trains one smp network on one
modality's image. Its model is logged like a pretrained one (the one pyfunc,
:mod:`cromss_ray.tracking.pyfunc`; registered as ``cromss-ft-<dataset>-<decoder>``
unless configured) and records its origin: the run and the model version carry the tags
of :meth:`TransferSource.tags` (source model, version, run, fusion) and the version's
description names them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from cromss_ray.config import FinetuneConfig, TransferModelConfig
from cromss_ray.data.schema import DATASET_NAMES, ShardMetadata
from cromss_ray.models.stored import input_bands
from cromss_ray.tracking.pyfunc import branch_signature, example_input, log_registered_model
from cromss_ray.tracking.runs import RunTracker

TASK_TAG = "cromss.task"
FINETUNE_TASK = "finetune"
DATASET_TAG = "cromss.dataset"
INIT_TAG = "cromss.init"
DECODER_TAG = "cromss.decoder"
ENCODER_MODE_TAG = "cromss.encoder_mode"
BRANCH_TAG = "cromss.branch"
SOURCE_FUSION_TAG = "cromss.source_fusion"
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
            SOURCE_FUSION_TAG: self.fusion,
        }
        return {key: str(value) for key, value in tags.items() if value is not None}


def encoder_mode_label(model: TransferModelConfig) -> str:
    """'frozen', 'fine-tuned', or 'fine-tuned after a N-epoch frozen warm-up' (spec 11)."""
    if model.encoder_mode == "frozen":
        return "frozen"
    if model.unfreeze_epoch:
        return f"fine-tuned after a {model.unfreeze_epoch}-epoch frozen warm-up"
    return "fine-tuned"


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

    return log_registered_model(
        tracker,
        config,
        network=model,
        meta=meta,
        signature=branch_signature(config.model.branch, meta.num_classes),
        input_example=example_input(
            config.data.s2_bands,
            None if input_example is None else {config.model.branch: input_example},
            modalities=(config.model.branch,),
        ),
        registry_name=registry_name,
        description=describe(config, meta, source),
        aliases=aliases,
        epoch=epoch,
        version_tags={**source.tags(), **(version_tags or {})},
    )
