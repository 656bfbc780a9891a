"""The transfer probe of ``tune.objective: transfer`` without Ray: its data checks, its scores and what it leaves alone."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cromss_ray.config import ConfigError, PretrainConfig, TransferProbeConfig, build_config
from cromss_ray.data.synth import synth_metadata, synthesize
from cromss_ray.method import build_model
from cromss_ray.train.optim import Precision
from cromss_ray.train import pretrain
from cromss_ray.train.probe import probe_data, probe_metric, transfer_probe

ENCODER = "resnet18"
S2_BANDS = 13
SIZE = 32
TILES = 6


@pytest.fixture(scope="module")
def dw_tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("probe-dw")
    synthesize(out, "dw", locations=TILES, size=SIZE, seed=3)
    return out


def settings(data: Path, **fields) -> TransferProbeConfig:
    return TransferProbeConfig(data=str(data), crop=SIZE, batch_size=2, epochs=1, **fields)


def pretrained(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mid", encoder=ENCODER, s1_bands=2, s2_bands=S2_BANDS, classes=9)


def test_the_probe_is_deterministic_scores_in_range_and_leaves_the_encoder_and_random_state_alone(dw_tiles):
    config = settings(dw_tiles)
    data = probe_data(config, ENCODER, S2_BANDS)
    rows = data.load()
    assert len(rows.train) + len(rows.evaluation) == TILES and rows.evaluation
    network = pretrained(0)
    before = {key: value.clone() for key, value in network.state_dict().items()}
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    scores = transfer_probe(network, ENCODER, S2_BANDS, rows, config, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected_draw)
    assert all(torch.equal(before[key], value) for key, value in network.state_dict().items())
    assert set(scores) == {f"transfer/s2/{name}" for name in ("oa", "miou", "mf1", "miou_ref", "mf1_ref")}
    assert all(0.0 <= value <= 1.0 for value in scores.values() if not math.isnan(value))
    assert 0.0 <= scores[probe_metric("s2")] <= 1.0
    assert transfer_probe(network, ENCODER, S2_BANDS, rows, config, torch.device("cpu")) == scores
    assert transfer_probe(pretrained(1), ENCODER, S2_BANDS, rows, config, torch.device("cpu")) != scores


def test_the_s1_probe_scores_the_s1_encoder(dw_tiles):
    config = settings(dw_tiles, branch="s1", test_data=str(dw_tiles))
    rows = probe_data(config, ENCODER, S2_BANDS).load()
    assert len(rows.train) == len(rows.evaluation) == TILES
    scores = transfer_probe(pretrained(0), ENCODER, S2_BANDS, rows, config, torch.device("cpu"))
    assert 0.0 <= scores[probe_metric("s1")] <= 1.0


def test_probe_data_errors_name_the_key(dw_tiles, tmp_path):
    with pytest.raises(ConfigError, match=r"tune.transfer.data: .*missing"):
        probe_data(settings(tmp_path / "missing"), ENCODER, S2_BANDS)
    locations = tmp_path / "locations"
    synthesize(locations, "pretrain", locations=2, size=SIZE, seed=0)
    with pytest.raises(ConfigError, match=r"tune.transfer.data: .* 4 dates per row"):
        probe_data(settings(locations), ENCODER, S2_BANDS)
    osm = tmp_path / "osm"
    synthesize(osm, "osm", locations=2, size=SIZE, seed=0)
    with pytest.raises(ConfigError, match=r"tune.transfer.test_data: classes"):
        probe_data(settings(dw_tiles, test_data=str(osm)), ENCODER, S2_BANDS)
    with pytest.raises(ConfigError, match=r"tune.transfer.batch_size: 64"):
        probe_data(settings(dw_tiles).model_copy(update={"batch_size": 64}), ENCODER, S2_BANDS)
    with pytest.raises(ConfigError, match=r"tune.transfer.crop: 40 is not a multiple of 32"):
        probe_data(settings(dw_tiles).model_copy(update={"crop": 40}), ENCODER, S2_BANDS)
    with pytest.raises(ConfigError, match=r"tune.transfer.decoder"):
        probe_data(settings(dw_tiles, decoder="NoSuchNet"), ENCODER, S2_BANDS)


def test_a_trial_reports_the_latest_probe_every_epoch_and_probes_when_due(dw_tiles, monkeypatch):
    """Tune needs the metric in every report: epochs between probes repeat the latest, marked by transfer/epoch."""
    config = settings(dw_tiles, every=2)
    data = probe_data(config, ENCODER, S2_BANDS)
    probed = []

    def recorded_probe(network, encoder, s2_bands, rows, probe_settings, device):
        probed.append(len(probed))
        assert (encoder, s2_bands, probe_settings) == ("resnet18", S2_BANDS, config) and rows.evaluation
        return {probe_metric("s2"): float(len(probed))}

    monkeypatch.setattr(pretrain, "transfer_probe", recorded_probe)
    config_overrides = [f"model.encoder={ENCODER}", "optim.epochs=5"]
    pretraining = build_config(PretrainConfig, {}, config_overrides)
    cpu = torch.device("cpu")
    meta = synth_metadata("pretrain")
    context = pretrain.WorkerContext(
        pretraining, meta, cpu, Precision.on(cpu, "fp32"), pretrain.build_criterion(pretraining, meta.nodata)
    )
    task = pretrain.PretrainTask(context, probe=data)
    state = SimpleNamespace(model=pretrained(0))
    reports = [task.transfer_scores(state, epoch) for epoch in range(5)]
    assert [report["transfer/epoch"] for report in reports] == [1.0, 2.0, 2.0, 4.0, 5.0]
    assert [report[probe_metric("s2")] for report in reports] == [1.0, 2.0, 2.0, 3.0, 4.0]
    resumed = pretrain.PretrainTask(context, probe=data)
    assert resumed.transfer_scores(state, 2)["transfer/epoch"] == 3.0
