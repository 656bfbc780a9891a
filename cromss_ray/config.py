"""Typed run configuration: one object per task, loaded from YAML and overridden on the CLI.

Every section forbids unknown keys, so a typo in a YAML file or a ``--set`` override fails
with the dotted key it names instead of being silently ignored. The validated object is
what a training loop receives, what MLflow logs and what a checkpoint stores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


class Section(BaseModel):
    """Base of every config section: strict keys, validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ShardReadChecks(Section):
    """What the training read path does with shards that fail its checks (``docs/reliability.md``)."""

    on_bad_row: Literal["raise", "skip"] = Field(
        default="raise",
        description="Rows with out-of-class labels or non-finite imagery: raise naming the row, or skip and count them.",
    )
    allow_incomplete: bool = Field(
        default=False,
        description="Read a shard set whose manifest.json is missing, incomplete or disagrees with its files.",
    )


class DataConfig(ShardReadChecks):
    """Where the shards are and how samples are cut from them (spec 9)."""

    uri: str = "data/noldo-synth"
    val_uri: str | None = Field(
        default=None,
        description="Separate validation shards; when empty, a stable hash of the id picks val_fraction of locations.",
    )
    s3_endpoint: str | None = Field(default=None, description="Endpoint override for S3-compatible stores.")
    s2_bands: Literal[13, 12, 9, 3] = 13
    crop: int = Field(default=256, ge=8)
    val_fraction: float = Field(default=0.01, ge=0.0, lt=1.0)
    rotation_probability: float = Field(default=0.2, ge=0.0, le=1.0)
    prior_on_device: bool = Field(default=True, description="Compute the smoothing prior after transfer (fast path).")
    prefetch_batches: int = Field(default=2, ge=0)


class ModelConfig(Section):
    """The multimodal network (spec 1), or the single-modality baseline (spec 11)."""

    fusion: Literal["mid", "late", "single"] = Field(
        default="mid",
        description="'single': the baseline, one U-Net on model.modality trained on the one-hot noisy labels "
        "(no selection, smoothing or consistency; the cromss section's other keys are unused).",
    )
    modality: Literal["s1", "s2"] = Field(default="s2", description="The one modality of fusion 'single'.")
    encoder: str = "resnet50"
    classes: int = Field(default=9, ge=2)


class CromSSConfig(Section):
    """The CromSS objective (spec 2-8)."""

    loss_terms: str = "cd"
    consistency: Literal["ce", "kl", "mse", "none"] = "ce"
    consistency_weight: float = Field(default=1.0, ge=0.0)
    smoothing: bool = Field(
        default=True,
        description="Off: training targets are the one-hot noisy labels; smoothing_factors and prior are unused.",
    )
    smoothing_factors: list[float] = Field(default_factory=lambda: [0.15, 0.05])
    prior: Literal["t", "s", "ts", "none"] = Field(
        default="ts", description="'none': the uniform prior 1 / C (smoothing still on, with weight a + b)."
    )
    selection: bool = True
    final_ratio: float = Field(default=0.5, ge=0.0, le=1.0)
    ramp: Literal["exp", "linear", "none"] = "exp"
    ramp_length: int = Field(default=80, ge=0)
    confidence: Literal["ce", "gini"] = "ce"
    class_balanced: bool = True
    prior_sigma: float = Field(default=3.0, gt=0.0)

    @field_validator("loss_terms")
    @classmethod
    def _known_terms(cls, value: str) -> str:
        if not value or set(value) - set("cdf"):
            raise ValueError("must be a non-empty combination of 'c' (cross-entropy), 'd' (Dice), 'f' (focal)")
        return value

    @field_validator("smoothing_factors")
    @classmethod
    def _factors(cls, value: list[float]) -> list[float]:
        if len(value) > 2 or any(f < 0 for f in value) or sum(value) > 1:
            raise ValueError("takes at most two non-negative factors whose sum is at most 1")
        return value


class OptimConfig(Section):
    """Optimiser and learning-rate schedule (spec 9 reference: Adam 5e-3, plateau)."""

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=5e-3, gt=0.0)
    weight_decay: float = Field(default=1e-8, ge=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    scheduler: Literal["plateau", "exponential", "cosine", "step", "none"] = "plateau"
    plateau_factor: float = Field(default=0.5, gt=0.0, lt=1.0)
    plateau_patience: int = Field(default=30, ge=0)
    gamma: float = Field(default=0.98, gt=0.0, le=1.0, description="Decay of the exponential and step schedules.")
    step_size: int = Field(default=30, ge=1)
    epochs: int = Field(default=200, ge=1)
    batch_size: int = Field(default=128, ge=1, description="Samples per worker per step.")
    lr_floor: float = Field(default=0.0, ge=0.0, description="Where the cosine schedule ends (spec 11: 1e-5).")
    cosine_epochs: int | None = Field(
        default=None, ge=1, description="Epochs of the cosine decay, then held at lr_floor; empty: all epochs."
    )
    max_nonfinite_steps: int = Field(
        default=10,
        ge=0,
        description="Steps per epoch whose loss or gradients are non-finite that are skipped (and counted) "
        "before the run fails.",
    )

    @model_validator(mode="after")
    def _cosine_within_run(self) -> OptimConfig:
        if self.lr_floor >= self.lr:
            raise ValueError(f"lr_floor ({self.lr_floor}) must be below lr ({self.lr})")
        if self.cosine_epochs is not None and self.cosine_epochs > self.epochs:
            raise ValueError(f"cosine_epochs ({self.cosine_epochs}) exceeds epochs ({self.epochs})")
        return self


class ScalingConfig(Section):
    """Ray Train workers and their resources; GPUs are used when present unless use_gpu is false."""

    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    gpus_per_worker: float = Field(default=1.0, ge=0.0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"


class RunConfig(Section):
    """Run identity, storage, checkpointing and fault tolerance."""

    name: str = "cromss-pretrain"
    storage_path: str = "runs"
    seed: int = 0
    checkpoint_frequency: int = Field(default=1, ge=1)
    checkpoints_to_keep: int = Field(default=2, ge=1)
    max_failures: int = Field(
        default=1, description="Restarts from the latest checkpoint after a worker, node or storage failure."
    )
    validation_figures: int = Field(default=4, ge=0)
    allow_config_change: bool = Field(
        default=False,
        description="Resume a checkpoint whose config differs beyond the changeable keys; the change is "
        "recorded in the MLflow run.",
    )

    @field_validator("max_failures")
    @classmethod
    def _bounded_restarts(cls, value: int) -> int:
        """-1 (Ray's "without limit") is refused: a lasting fault would restart the run forever."""
        if value < 0:
            raise ValueError(
                f"{value} is not a number of restarts: give 0 (none) or more; restarting without limit (-1) "
                "is refused, since a fault that lasts would restart the run forever"
            )
        return value


class TrackingConfig(Section):
    """MLflow store, experiment and registry names (architecture: names that stay fixed)."""

    uri: str | None = Field(default=None, description="Empty: $MLFLOW_TRACKING_URI, else a local sqlite store.")
    experiment: str = "cromss-pretrain"
    registry_name: str | None = None
    aliases: list[str] = Field(default_factory=lambda: ["latest"])
    log_model: bool = True
    flush_timeout_s: float = Field(
        default=300.0,
        gt=0.0,
        description="How long a run waits at its end for an unreachable tracking server before it fails.",
    )
    max_backoff_s: float = Field(
        default=30.0,
        gt=0.0,
        description="The longest pause between two tries to reach an unreachable tracking server (the pause "
        "doubles from 1 s up to this).",
    )

    def resolved_uri(self) -> str:
        """The tracking URI this run uses: the config, then the environment, then local sqlite."""
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


CROP_MULTIPLE = 32
"""Training crops are a multiple of the encoders' output stride (5 halvings), checked on the driver."""


def check_crop(data: DataConfig) -> DataConfig:
    """A pretraining crop must be a multiple of :data:`CROP_MULTIPLE` (the network halves it 5 times).

    Fine-tuning crops are checked against the decoder's own output stride instead (spec 11:
    DeepLabV3+ and PSPNet take 496 px), before any data is read.
    """
    if data.crop % CROP_MULTIPLE:
        raise ValueError(
            f"data.crop: {data.crop} is not a multiple of {CROP_MULTIPLE} (the network's output stride); "
            f"use e.g. {max(CROP_MULTIPLE, data.crop // CROP_MULTIPLE * CROP_MULTIPLE)}"
        )
    return data


class PretrainConfig(Section):
    """Everything a CromSS pretraining run needs."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    cromss: CromSSConfig = Field(default_factory=CromSSConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    _crop = field_validator("data")(check_crop)

    def registry_name(self) -> str:
        """``cromss-<fusion>-<bands>b`` (``cromss-single-s2-<bands>b``, ``cromss-single-s1`` for the
        baseline) unless the config names one."""
        if self.tracking.registry_name:
            return self.tracking.registry_name
        if self.model.fusion != "single":
            return f"cromss-{self.model.fusion}-{self.data.s2_bands}b"
        return "cromss-single-s1" if self.model.modality == "s1" else f"cromss-single-s2-{self.data.s2_bands}b"

    def smoothing_factors(self) -> tuple[float, ...]:
        """The factors of the training targets (spec 2): none when ``cromss.smoothing`` is off or for the
        single-modality baseline."""
        if not self.cromss.smoothing or self.model.fusion == "single":
            return ()
        return tuple(self.cromss.smoothing_factors)

    def training_prior(self) -> str:
        """The prior kind the training batches need: ``cromss.prior``, or 'none' when nothing is smoothed."""
        return self.cromss.prior if self.smoothing_factors() else "none"


class DownstreamDataConfig(ShardReadChecks):
    """Downstream shards (SSL4EO-S12@DW, @OSM, DFC2020 or any shard set; spec 10)."""

    uri: str = "data/dw-synth"
    test_uri: str | None = Field(default=None, description="Test split; without it the val split is the test split.")
    s3_endpoint: str | None = None
    s2_bands: Literal[13, 12, 9, 3] = 13
    crop: int | None = Field(
        default=None, ge=8, description="Training crop; empty: from the decoder's output stride (spec 11: 480 or 496)."
    )
    val_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Tiles held out for validation; 0: all train (spec 11)."
    )
    train_fraction: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Train on this share of the training tiles, drawn by run.seed."
    )
    train_count: int | None = Field(
        default=None, ge=1, description="Train on this many of the training tiles, drawn by run.seed."
    )
    prefetch_batches: int = Field(default=2, ge=0)

    @model_validator(mode="after")
    def _one_subset_size(self) -> DownstreamDataConfig:
        if self.train_fraction is not None and self.train_count is not None:
            raise ValueError("set at most one of train_fraction and train_count")
        return self


class TransferModelConfig(Section):
    """A single-modality network initialised from a pretrained branch (spec 11)."""

    init: str = Field(
        default="random",
        description="models:/NAME@ALIAS, models:/NAME/VERSION, a paper checkpoint path, or 'random'.",
    )
    init_fusion: Literal["mid", "late"] | None = Field(
        default=None, description="Fusion of an imported paper checkpoint (read from the registry otherwise)."
    )
    branch: Literal["s1", "s2"] = "s2"
    decoder: str = Field(default="Unet", description="Any segmentation-models-pytorch architecture name.")
    encoder: str = Field(default="resnet50", description="Used with init 'random'; else taken from the source.")
    encoder_mode: Literal["frozen", "finetune"] = "finetune"
    frozen_batch_norm: Literal["adapt", "fixed"] = Field(
        default="adapt",
        description="While frozen, 'adapt' keeps the encoder's batch norm training (the reference, spec 11), "
        "'fixed' keeps its statistics.",
    )
    unfreeze_epoch: int | None = Field(default=None, ge=0, description="Frozen warm-up, then fine-tuned from here.")


class FinetuneOptimConfig(OptimConfig):
    """Fine-tuning's optimisation: the shared options plus the segmentation loss (spec 11: 'ce+dice')."""

    loss: Literal["ce", "dice", "ce+dice", "focal"] = "ce"


class FinetuneConfig(Section):
    """Everything a transfer-learning run needs."""

    data: DownstreamDataConfig = Field(default_factory=DownstreamDataConfig)
    model: TransferModelConfig = Field(default_factory=TransferModelConfig)
    optim: FinetuneOptimConfig = Field(
        default_factory=lambda: FinetuneOptimConfig(scheduler="cosine", lr=1e-3, epochs=50, batch_size=16)
    )
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    run: RunConfig = Field(default_factory=lambda: RunConfig(name="cromss-finetune"))
    tracking: TrackingConfig = Field(default_factory=lambda: TrackingConfig(experiment="cromss-finetune"))


class SearchDomain(Section):
    """One searched leaf: exactly one of choice, grid, uniform, loguniform, randint."""

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchDomain:
        given = [name for name in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"needs exactly one of choice, grid, uniform, loguniform, randint (got {given or 'none'})")
        return self


class TransferProbeConfig(Section):
    """The short frozen-encoder transfer that ``tune.objective: transfer`` scores each trial by (spec 11).

    After every ``every`` pretraining epochs (and the last), rank 0 trains a fresh ``decoder``
    on the frozen ``branch`` encoder for ``epochs`` epochs on ``data``'s training tiles and
    scores it on its held-out tiles (``val_fraction``) or on ``test_data``.
    """

    data: str | None = Field(default=None, description="URI of a small clean downstream shard set (required).")
    test_data: str | None = Field(default=None, description="Tiles to score on; empty: hold out val_fraction of data.")
    val_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    branch: Literal["s1", "s2"] = "s2"
    every: int = Field(default=1, ge=1, description="Pretraining epochs between probes (the last epoch always probes).")
    decoder: str = Field(default="Unet", description="Any segmentation-models-pytorch architecture name.")
    epochs: int = Field(default=3, ge=1)
    lr: float = Field(default=1e-3, gt=0.0)
    batch_size: int = Field(default=8, ge=1)
    crop: int = Field(default=64, ge=1, description="Training crop (px); a multiple of the decoder's output stride.")
    loss: Literal["ce", "dice", "ce+dice", "focal"] = "ce"
    frozen_batch_norm: Literal["adapt", "fixed"] = Field(
        default="fixed", description="'fixed' scores the pretrained encoder as it is; 'adapt' as fine-tuning does."
    )
    seed: int = 0
    s3_endpoint: str | None = None


class TuneSection(Section):
    """The sweep: search space over PretrainConfig leaves, algorithm and scheduler."""

    search_space: dict[str, SearchDomain] = Field(default_factory=dict)
    search_alg: Literal["random", "grid", "optuna"] = "random"
    num_samples: int = Field(default=4, ge=1)
    objective: Literal["noisy_validation", "clean_validation", "transfer"] | None = Field(
        default=None,
        description="What trials are judged by: empty, clean validation labels where the data has them, else "
        "noisy ones; 'transfer': the mIoU of tune.transfer's probe.",
    )
    metric: str | None = Field(
        default=None, description="Empty: the objective's metric (val_clean/s2/miou, val/s2/miou, transfer/s2/miou)."
    )
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(default=1, ge=1)
    reduction_factor: float = Field(default=2.0, gt=1.0)
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    experiment: str = "cromss-tune"
    transfer: TransferProbeConfig = Field(default_factory=TransferProbeConfig)

    @model_validator(mode="after")
    def _transfer_has_data(self) -> TuneSection:
        if self.objective == "transfer" and self.transfer.data is None:
            raise ValueError("transfer.data: tune.objective 'transfer' needs a downstream shard set to probe with")
        return self


class TuneConfig(PretrainConfig):
    """A pretraining config plus the sweep that varies it."""

    tune: TuneSection = Field(default_factory=TuneSection)

    @model_validator(mode="after")
    def _space_names_leaves(self) -> TuneConfig:
        base = flatten(PretrainConfig.model_validate(self.model_dump(exclude={"tune"})))
        for key in self.tune.search_space:
            leaf, _, index = key.rpartition(".")
            element = index.isdigit() and isinstance(base.get(leaf), list) and int(index) < len(base[leaf])
            if key not in base and not element:
                raise ValueError(
                    f"search_space key '{key}' is not a pretraining config key (nor an element 'key.N' of a list)"
                )
        return self

    @model_validator(mode="after")
    def _metric_every_trial_logs(self) -> TuneConfig:
        """The default metric is an S2 score, which a single-modality S1 trial does not log."""
        single_s1 = "single" in self._values("model.fusion") and "s1" in self._values("model.modality")
        if self.tune.objective == "transfer":
            branch = self.tune.transfer.branch
            other = "s2" if branch == "s1" else "s1"
            if "single" in self._values("model.fusion") and other in self._values("model.modality"):
                raise ValueError(
                    f"tune.transfer.branch: '{branch}', but a trial may train the single-modality "
                    f"{other.upper()} baseline, which has no {branch.upper()} encoder"
                )
            return self
        if self.tune.metric is None and single_s1:
            raise ValueError(
                "tune.metric: a trial may train the single-modality S1 baseline, which logs no S2 scores; "
                "name a metric every trial logs (e.g. val/s1/miou)"
            )
        return self

    def _values(self, key: str) -> list[Any]:
        """The values a trial may take for ``key``: its search domain's listed values, else the base config's."""
        domain = self.tune.search_space.get(key)
        listed = domain and (domain.choice or domain.grid)
        if listed:
            return list(listed)
        section, _, leaf = key.partition(".")
        return [getattr(getattr(self, section), leaf)]


C = TypeVar("C", bound=BaseModel)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` into ``("a.b", value)``, the value read as YAML (numbers, lists, booleans)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot read value '{raw}': {exc}") from exc
    return key.strip(), value


def describe_errors(exc: ValidationError) -> str:
    """One line per invalid field, each led by its dotted key."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        else:
            lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def build_config(cls: type[C], tree: dict[str, Any], overrides: list[str] | None = None) -> C:
    """Validate a plain dict (plus ``key=value`` overrides) into ``cls``; errors name the key."""
    tree = dict(tree)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"invalid {cls.__name__}:\n{describe_errors(exc)}") from None


def load_config(
    cls: type[C],
    path: str | Path | None,
    overrides: list[str] | None = None,
    *,
    data: str | None = None,
    tracking_uri: str | None = None,
) -> C:
    """Load ``cls`` from a YAML file, then apply ``--data``, ``--tracking-uri`` and ``--set``."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
    extra = list(overrides or [])
    if data is not None:
        extra.append(f"data.uri={data}")
    if tracking_uri is not None:
        extra.append(f"tracking.uri={tracking_uri}")
    try:
        return build_config(cls, tree, extra)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


def to_yaml(config: BaseModel) -> str:
    """The whole config as YAML, as logged to MLflow and stored in checkpoints."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


ConfigChanges = dict[str, tuple[Any, Any]]
"""Changed dotted config keys: ``key -> (old value, new value)``."""


def describe_changes(changes: ConfigChanges) -> str:
    """``key: old -> new`` for each changed key, joined by ``; ``."""
    return "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())


def flatten(config: BaseModel) -> dict[str, Any]:
    """Dotted-key view of a config (``cromss.final_ratio`` ...), for MLflow params."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node

    walk("", config.model_dump(mode="json"))
    return flat
