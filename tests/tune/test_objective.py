"""The sweep metric each ``tune.objective`` gives, and the transfer probe's checks before a sweep starts (no Ray)."""

from __future__ import annotations

import pytest

from cromss_ray.config import ConfigError, TuneConfig, build_config
from cromss_ray.data.synth import synthesize
from cromss_ray.tune.sweep import sweep_metric, sweep_probe


@pytest.fixture(scope="module")
def noisy_only(tmp_path_factory: pytest.TempPathFactory):
    """Downstream tiles: one noisy label per pixel and no clean one, as real pretraining data has."""
    out = tmp_path_factory.mktemp("objective-dw")
    synthesize(out, "dw", locations=4, size=32, seed=1)
    return out


def tune_config(uri, *overrides: str) -> TuneConfig:
    return build_config(TuneConfig, {"data": {"uri": str(uri)}}, list(overrides))


def test_each_objective_names_its_metric_and_tune_metric_still_wins(sweep_locations, noisy_only):
    assert sweep_metric(tune_config(sweep_locations)) == "val_clean/s2/miou"
    assert sweep_metric(tune_config(noisy_only)) == "val/s2/miou"
    assert sweep_metric(tune_config(sweep_locations, "tune.objective=noisy_validation")) == "val/s2/miou"
    assert sweep_metric(tune_config(sweep_locations, "tune.objective=clean_validation")) == "val_clean/s2/miou"
    with pytest.raises(ConfigError, match=r"tune.objective: 'clean_validation', but .* has no clean labels"):
        sweep_metric(tune_config(noisy_only, "tune.objective=clean_validation"))
    transfer = ["tune.objective=transfer", f"tune.transfer.data={noisy_only}"]
    assert sweep_metric(tune_config(sweep_locations, *transfer)) == "transfer/s2/miou"
    assert sweep_metric(tune_config(sweep_locations, *transfer, "tune.transfer.branch=s1")) == "transfer/s1/miou"
    named = tune_config(sweep_locations, *transfer, "tune.metric=transfer/s2/miou_ref")
    assert sweep_metric(named) == "transfer/s2/miou_ref"
    assert sweep_metric(tune_config(sweep_locations, "tune.metric=val/s1/miou")) == "val/s1/miou"


def test_the_probe_data_is_checked_before_the_sweep_starts(sweep_locations, noisy_only):
    assert sweep_probe(tune_config(sweep_locations)) is None
    transfer = ["tune.objective=transfer", f"tune.transfer.data={noisy_only}", "tune.transfer.crop=32"]
    probe = sweep_probe(tune_config(sweep_locations, *transfer, "tune.transfer.batch_size=2"))
    assert probe is not None and probe.settings.data == str(noisy_only)
    with pytest.raises(ConfigError, match=r"tune.transfer.data: .*4 dates per row"):
        sweep_probe(tune_config(sweep_locations, "tune.objective=transfer", f"tune.transfer.data={sweep_locations}"))
