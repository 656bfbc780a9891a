"""Registration rules on a real MLflow store: one version per run and epoch, nothing non-finite, and sweep
trials kept apart from the standalone models (only the winner is promoted, as ``@best``)."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow import MlflowClient
from tracking_helpers import ENCODER, S2_BANDS, tiny_config, unique

from cromss_ray.method import build_model
from cromss_ray.models.stored import NonFiniteModelError
from cromss_ray.tracking.pyfunc import log_pretrained_model
from cromss_ray.tracking.registry import EPOCH_TAG, logged_model_id, register_model_version, using_tracking_uri
from cromss_ray.tracking.runs import RunTracker
from cromss_ray.tune.trial_runs import SWEEP_TAG, TRIAL_TAG, promote_trial_model, trial_registry_name


def client_of(store: str) -> MlflowClient:
    return MlflowClient(tracking_uri=store, registry_uri=store)


def versions(client: MlflowClient, name: str) -> list[int]:
    return sorted(int(version.version) for version in client.search_model_versions(f"name = '{name}'"))


def alias_version(client: MlflowClient, name: str, alias: str) -> int:
    return int(client.get_model_version_by_alias(name, alias).version)


def another_version(client: MlflowClient, store: str, name: str, model_id: str, run_id: str, **tags: str) -> int:
    """A version of ``name`` for an already logged model (no artifacts written)."""
    with using_tracking_uri(store):
        return register_model_version(client, name, model_id, "another version", run_id=run_id, tags=tags)


def test_registering_a_run_and_epoch_again_returns_its_version_and_moves_no_alias(store: str) -> None:
    client, name, experiment = client_of(store), unique("cromss-mid-13b"), unique("pretrain")
    torch.manual_seed(0)
    model, config = build_model("mid", ENCODER, s2_bands=S2_BANDS).eval(), tiny_config()
    with RunTracker.start(config, tracking_uri=store, experiment=experiment, run_name="finished") as tracker:
        first = log_pretrained_model(model, config, tracker=tracker, registry_name=name, aliases=["champion"], epoch=2)
    model_id = logged_model_id(client.get_model_version(name, str(first)))
    with RunTracker.start(config, tracking_uri=store, experiment=experiment, run_name="other") as other:
        newer = another_version(client, store, name, model_id, other.run_id, **{EPOCH_TAG: "2"})
    client.set_registered_model_alias(name, "champion", str(newer))

    with RunTracker.start(config, tracking_uri=store, experiment=experiment, run_name="finished", run_id=tracker.run_id) as again:
        repeated = log_pretrained_model(model, config, tracker=again, registry_name=name, aliases=["champion"], epoch=2)

    assert client.get_model_version(name, str(first)).tags[EPOCH_TAG] == "2"
    assert repeated == first and versions(client, name) == [first, newer]
    assert alias_version(client, name, "champion") == newer and alias_version(client, name, "latest") == newer


def test_a_network_with_a_nan_parameter_is_not_registered(store: str) -> None:
    client, name = client_of(store), unique("cromss-mid-13b")
    model, config = build_model("mid", ENCODER, s2_bands=S2_BANDS).eval(), tiny_config()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = math.nan
    with RunTracker.start(config, tracking_uri=store, experiment=unique("pretrain"), run_name="diverged") as tracker:
        with pytest.raises(NonFiniteModelError, match=rf"run 'diverged' \(MLflow run {tracker.run_id}\): not registered"):
            log_pretrained_model(model, config, tracker=tracker, registry_name=name, aliases=["latest"], epoch=1)
    assert client.search_registered_models(f"name = '{name}'") == []
    assert not client.get_run(tracker.run_id).outputs.model_outputs


def test_trials_never_touch_the_standalone_aliases_and_only_the_winner_gets_best(store: str, registered) -> None:
    client, standalone = client_of(store), unique("cromss-mid-13b")
    experiment, sweep = unique("tune"), unique("sweep")
    model_id = logged_model_id(client.get_model_version(registered.name, str(registered.version)))
    config = tiny_config()
    with RunTracker.start(config, tracking_uri=store, experiment=unique("pretrain"), run_name="standalone") as alone:
        own = another_version(client, store, standalone, model_id, alone.run_id)
    trial_tags = {SWEEP_TAG: sweep, TRIAL_TAG: "t00001"}
    with RunTracker.start(config, tracking_uri=store, experiment=experiment, run_name="trial", tags=trial_tags) as trial:
        another_version(client, store, trial_registry_name(standalone), model_id, trial.run_id, **{EPOCH_TAG: "2"})
    assert versions(client, standalone) == [own] and alias_version(client, standalone, "latest") == own

    uri = promote_trial_model(store, experiment, sweep, "t00001", "best")
    again = promote_trial_model(store, experiment, sweep, "t00001", "best")

    assert uri == again == f"models:/{standalone}@best"
    best = client.get_model_version_by_alias(standalone, "best")
    assert best.run_id == trial.run_id and logged_model_id(best) == model_id
    assert best.tags[TRIAL_TAG] == "t00001" and best.tags[SWEEP_TAG] == sweep and best.tags[EPOCH_TAG] == "2"
    assert versions(client, standalone) == [own, int(best.version)], "promoting again adds no version"
    assert promote_trial_model(store, experiment, sweep, "t-none", "best") is None
