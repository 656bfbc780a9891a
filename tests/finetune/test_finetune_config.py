"""Initialisation, encoder modes and config errors of transfer runs, caught on the driver (spec 11)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from finetune_helpers import ENCODER, PRETRAINED_BANDS, TINY_CONFIG, Pretrained, Shards, tiny_config

from cromss_ray.cli import main
from cromss_ray.config import ConfigError, FinetuneConfig, build_config, load_config
from cromss_ray.method import build_segmentation_model
from cromss_ray.tracking.finetuned import TransferSource
from cromss_ray.tracking.model_uris import ModelNotFoundError
from cromss_ray.train.finetune import (
    build_trainer,
    check_finetune_config,
    check_network,
    default_crop,
    effective_config,
    encoder_frozen,
    freeze_encoder,
    is_frozen,
    metric_slug,
    resolve_init,
    training_config,
    with_training_crop,
)


def _config(**model: object) -> FinetuneConfig:
    return build_config(FinetuneConfig, {"model": model, "optim": {"epochs": 4}})


def test_encoder_modes_by_epoch():
    frozen = _config(encoder_mode="frozen")
    assert [encoder_frozen(frozen, epoch) for epoch in range(4)] == [True] * 4
    warm_up = _config(encoder_mode="finetune", unfreeze_epoch=2)
    assert [encoder_frozen(warm_up, epoch) for epoch in range(4)] == [True, True, False, False]
    fine_tuned = _config(encoder_mode="finetune")
    assert [encoder_frozen(fine_tuned, epoch) for epoch in range(4)] == [False] * 4


@pytest.mark.parametrize("batch_norm", ["adapt", "fixed"])
def test_frozen_encoder_keeps_its_weights_and_its_batchnorm_statistics_only_when_fixed(batch_norm: str):
    """Spec 11: a frozen encoder never changes its weights; 'adapt' (the reference) lets its batch-norm
    running statistics follow the data, 'fixed' keeps them."""
    torch.manual_seed(0)
    network = build_segmentation_model("FPN", ENCODER, 4, 3)
    freeze_encoder(network, batch_norm)
    before = {key: value.clone() for key, value in network.encoder.state_dict().items()}
    decoder_before = next(network.decoder.parameters()).clone()
    optimizer = torch.optim.Adam(network.parameters(), lr=0.1, weight_decay=0.1)
    network.train()
    norms = [module for module in network.encoder.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    assert all(module.training == (batch_norm == "adapt") for module in norms)
    loss = network(torch.randn(2, 4, 64, 64)).square().mean()
    loss.backward()
    optimizer.step()
    after = network.encoder.state_dict()
    statistics = {key for key in after if key.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert statistics and is_frozen(network)
    for key, value in after.items():
        if key in statistics and batch_norm == "adapt":
            assert not torch.equal(value, before[key]), key
        else:
            assert torch.equal(value, before[key]), key
    assert not torch.equal(next(network.decoder.parameters()), decoder_before)


def test_metric_slug_by_hand():
    assert metric_slug("industrial, commercial and transport") == "industrial_commercial_and_transport"
    assert metric_slug("Snow and ice") == "snow_and_ice"


def test_effective_config_takes_encoder_and_bands_from_the_source():
    source = TransferSource("models:/m@best", "registry", "resnet34", s2_bands=9, fusion="late", name="m", version=2)
    config = build_config(FinetuneConfig, {"model": {"init": "models:/m@best"}})
    effective = effective_config(config, source)
    assert effective.model.encoder == "resnet34" and effective.data.s2_bands == 9
    s1 = build_config(FinetuneConfig, {"model": {"init": "models:/m@best", "branch": "s1"}, "data": {"s2_bands": 3}})
    assert effective_config(s1, source).data.s2_bands == 3
    with pytest.raises(ConfigError, match=r"data.s2_bands: 13 is set, but m/2 was pretrained on 9 S2 bands"):
        effective_config(build_config(FinetuneConfig, {"model": {"init": "x"}, "data": {"s2_bands": 13}}), source)
    with pytest.raises(ConfigError, match=r"model.encoder: 'resnet50' is set, but m/2 has a 'resnet34' encoder"):
        effective_config(build_config(FinetuneConfig, {"model": {"init": "x", "encoder": "resnet50"}}), source)


def test_transfer_source_tags_and_labels():
    registry = TransferSource("models:/m@best", "registry", "resnet18", 9, "mid", "m", 3, "abc")
    assert registry.label == "m/3"
    assert registry.tags() == {
        "cromss.init": "m/3",
        "cromss.init_uri": "models:/m@best",
        "cromss.source_model": "m",
        "cromss.source_version": "3",
        "cromss.source_run_id": "abc",
        "cromss.source_fusion": "mid",
    }
    assert TransferSource("/x/paper.ckpt", "checkpoint", "resnet50", 13, "late").label == "checkpoint paper.ckpt"
    assert TransferSource("random", "random", "resnet50").tags() == {
        "cromss.init": "random",
        "cromss.init_uri": "random",
    }


@pytest.mark.parametrize(
    ("decoder", "stride", "crop"),
    [("Unet", 32, 480), ("FPN", 32, 480), ("DeepLabV3Plus", 16, 496), ("PSPNet", 8, 496)],
)
def test_the_crop_follows_the_decoder_when_not_given(decoder: str, stride: int, crop: int):
    """Spec 11: 480 px for stride-32 decoders, 496 px for DeepLabV3+ / PSPNet (the largest multiple of
    max(stride, 16) within a 510 px DW / OSM tile)."""
    config = build_config(FinetuneConfig, {"model": {"decoder": decoder, "encoder": ENCODER}})
    assert config.data.crop is None
    assert check_network(config, None) == stride
    assert with_training_crop(config, stride).data.crop == crop
    assert default_crop(64) == 448


def test_a_crop_the_decoder_cannot_take_is_named():
    def fpn(crop: int) -> FinetuneConfig:
        return build_config(FinetuneConfig, {"model": {"decoder": "FPN", "encoder": ENCODER}, "data": {"crop": crop}})

    message = (
        r"data.crop: 500 is not a multiple of 32, the output stride of FPN with resnet18; "
        r"use 480 or 512, or leave data.crop out \(480 from the decoder\)"
    )
    with pytest.raises(ConfigError, match=message):
        with_training_crop(fpn(500), 32)
    assert with_training_crop(fpn(512), 32).data.crop == 512
    with pytest.raises(ConfigError, match=r"data.crop: 24 is not a multiple of 32, .*; use 32, or leave"):
        with_training_crop(fpn(24), 32)


PAPER_CONFIGS = Path(__file__).parents[2] / "jobs" / "configs"


@pytest.mark.parametrize(
    ("dataset", "decoder", "source", "crop"),
    [
        ("dw", "DeepLabV3Plus", "models:/cromss-late-9b@latest", 496),
        ("osm", "FPN", "models:/cromss-mid-13b@latest", 480),
        ("dfc2020", "PSPNet", "models:/cromss-mid-13b@latest", 496),
    ],
)
def test_the_paper_configs_hold_spec_11s_recipe_for_each_cell(dataset: str, decoder: str, source: str, crop: int):
    path = PAPER_CONFIGS / f"finetune_paper_{dataset}.yaml"
    config = load_config(FinetuneConfig, path)
    optim, data, model = config.optim, config.data, config.model
    assert (optim.loss, optim.optimizer, optim.lr, optim.batch_size, optim.epochs) == ("ce+dice", "adam", 5e-4, 32, 50)
    assert (optim.scheduler, optim.lr_floor, optim.cosine_epochs) == ("cosine", 1e-5, 40)
    assert data.val_fraction == 0 and data.test_uri and data.crop is None
    assert (model.init, model.decoder, model.encoder, model.frozen_batch_norm) == (source, decoder, "resnet50", "adapt")
    assert (model.branch, model.encoder_mode) == ("s2", "frozen")
    check_finetune_config(config)
    assert with_training_crop(config, check_network(config, None)).data.crop == crop
    for branch, mode in (("s1", "finetune"), ("s1", "frozen"), ("s2", "finetune")):
        cell = load_config(FinetuneConfig, path, [f"model.branch={branch}", f"model.encoder_mode={mode}"])
        check_finetune_config(cell)
        assert (cell.model.branch, cell.model.encoder_mode) == (branch, mode)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.loss=bce", r"optim.loss: Input should be 'ce', 'dice', 'ce\+dice' or 'focal'"),
        ("model.frozen_batch_norm=frozen", r"model.frozen_batch_norm: Input should be 'adapt' or 'fixed'"),
        ("data.train_fraction=0", r"data.train_fraction: Input should be greater than 0"),
        ("data.train_count=0", r"data.train_count: Input should be greater than or equal to 1"),
        ("data.crop=4", r"data.crop: Input should be greater than or equal to 8"),
    ],
)
def test_bad_recipe_options_are_named(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        build_config(FinetuneConfig, {}, [override])
    with pytest.raises(ConfigError, match=r"data: Value error, set at most one of train_fraction and train_count"):
        build_config(FinetuneConfig, {}, ["data.train_fraction=0.5", "data.train_count=3"])


def test_encoder_mode_rules():
    with pytest.raises(ConfigError, match=r"model.unfreeze_epoch: a frozen warm-up needs"):
        check_finetune_config(_config(encoder_mode="frozen", unfreeze_epoch=1))
    with pytest.raises(ConfigError, match=r"model.unfreeze_epoch: 4 is not below optim.epochs \(4\)"):
        check_finetune_config(_config(encoder_mode="finetune", unfreeze_epoch=4))


def test_the_random_baseline_has_no_source_encoder():
    """``--init random`` (the baseline, spec 11): nothing to pull, the configured encoder built untrained with
    the crop from the decoder, and the run and its registered version tagged and labelled 'random'."""
    overrides = ["model.decoder=FPN", f"model.encoder={ENCODER}", "data.crop=null", "model.init=random"]
    config = load_config(FinetuneConfig, TINY_CONFIG, overrides)
    initialisation = resolve_init(config)
    assert initialisation.encoder_state is None
    source = initialisation.source
    assert (source.kind, source.label, source.encoder) == ("random", "random", ENCODER)
    assert source.tags()["cromss.init"] == "random"
    trained = training_config(config, initialisation)
    assert trained.model.init == "random" and trained.model.encoder == ENCODER and trained.data.crop == 480


def test_bad_initialisations_are_named(tmp_path: Path, pretrained: Pretrained, store: str):
    with pytest.raises(ConfigError, match=r"model.init: '.*missing.ckpt' is neither"):
        resolve_init(_config(init=str(tmp_path / "missing.ckpt")))
    checkpoint = tmp_path / "paper.ckpt"
    checkpoint.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"model.init_fusion: the checkpoint .*paper.ckpt needs its fusion"):
        resolve_init(_config(init=str(checkpoint)))
    missing = build_config(FinetuneConfig, {"model": {"init": "models:/cromss-nope@best"}, "tracking": {"uri": store}})
    with pytest.raises(ModelNotFoundError, match=r"no registered model 'cromss-nope'"):
        resolve_init(missing)
    resolved = resolve_init(
        build_config(FinetuneConfig, {"model": {"init": f"models:/{pretrained.name}@best"}, "tracking": {"uri": store}})
    )
    assert resolved.source.version == pretrained.version and resolved.source.s2_bands == PRETRAINED_BANDS
    assert resolved.encoder_state["conv1.weight"].shape[1] == PRETRAINED_BANDS


@pytest.mark.ray
def test_data_dependent_errors_name_the_key(ray_cluster, store: str, tmp_path: Path, dw_shards: Shards):
    with pytest.raises(ConfigError, match=r"model.decoder / model.encoder: cannot build the network"):
        build_trainer(tiny_config(dw_shards, store, tmp_path, "model.decoder=NoSuchNet"))
    with pytest.raises(ConfigError, match=r"optim.scheduler: 'plateau' follows the validation loss"):
        build_trainer(tiny_config(dw_shards, store, tmp_path, "data.val_fraction=0", "optim.scheduler=plateau"))
    with pytest.raises(ConfigError, match=r"optim.batch_size: .* fewer than one full batch of 4 each"):
        build_trainer(tiny_config(dw_shards, store, tmp_path, "scaling.num_workers=20", "optim.batch_size=4"))


@pytest.mark.ray
def test_command_line_errors(ray_cluster, store: str, dw_shards: Shards, capsys: pytest.CaptureFixture[str]):
    common = ["finetune", "--config", str(TINY_CONFIG), "--data", str(dw_shards.train), "--tracking-uri", store]
    assert main([*common, "--set", "model.encoder_mode=sideways"]) == 2
    assert "model.encoder_mode" in capsys.readouterr().err
    assert main([*common, "--init", "models:/cromss-nope@best"]) == 1
    assert "no registered model 'cromss-nope'" in capsys.readouterr().err


def test_a_missing_source_model_fails_before_ray_or_torch_load(store: str, dw_shards: Shards):
    """The source model is looked up before a Ray cluster is started or joined, and before Ray
    and torch are imported: a wrong ``--init`` fails in seconds (``-X importtime`` lists the imports)."""
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = [sys.executable, "-X", "importtime", "-m", "cromss_ray.cli", "finetune", "--config", str(TINY_CONFIG)]
    command += ["--data", str(dw_shards.train), "--tracking-uri", store, "--init", "models:/cromss-nope@best"]
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300, check=False)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "no registered model 'cromss-nope'" in done.stderr
    assert "Ray instance" not in done.stdout + done.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "mlflow" in imported and imported.isdisjoint({"torch", "ray"})
