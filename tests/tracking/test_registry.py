"""load_pretrained: every kind of model URI gives back the logged network; missing things are named."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient
from mlflow.models import Model
from tracking_helpers import unique

from cromss_ray.tracking import ModelNotFoundError, load_pretrained
from cromss_ray.tracking.runs import RunTracker


def _same_weights(left: torch.nn.Module, right: torch.nn.Module) -> bool:
    ours, theirs = left.state_dict(), right.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_every_uri_form_gives_back_the_logged_network(registered):
    client = MlflowClient(tracking_uri=registered.store, registry_uri=registered.store)
    model_id = client.get_model_version(registered.name, str(registered.version)).source.removeprefix("models:/")
    uris = {
        f"models:/{registered.name}@best": (registered.name, registered.version),
        f"models:/{registered.name}@latest": (registered.name, registered.version),
        f"models:/{registered.name}/{registered.version}": (registered.name, registered.version),
        f"models:/{registered.name}/latest": (registered.name, registered.version),
        f"models:/{model_id}": (None, None),
        f"runs:/{registered.run_id}/model": (None, None),
    }
    for uri, (name, version) in uris.items():
        pulled = load_pretrained(uri, tracking_uri=registered.store)
        assert (pulled.name, pulled.version, pulled.run_id) == (name, version, registered.run_id), uri
        assert pulled.config == registered.config
        assert not pulled.model.training and _same_weights(pulled.model, registered.model), uri


def test_the_store_defaults_to_the_environment(registered, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.store)
    assert load_pretrained(f"models:/{registered.name}@best").version == registered.version


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("models:/no-such-model@best", "no registered model 'no-such-model'"),
        ("models:/{name}@champion", r"has no alias '@champion' \(its aliases: @best\)"),
        ("models:/{name}/7", "has no version 7"),
        ("models:/m-0123456789abcdef", "no logged model 'm-0123456789abcdef'"),
        ("runs:/0123456789abcdef/model", "no run '0123456789abcdef'"),
        ("runs:/{run_id}/encoder", "logged no model named 'encoder'"),
    ],
)
def test_missing_models_aliases_versions_and_runs_are_named(registered, uri, message):
    with pytest.raises(ModelNotFoundError, match=message):
        load_pretrained(uri.format(name=registered.name, run_id=registered.run_id), tracking_uri=registered.store)


@pytest.mark.parametrize("uri", ["s3://bucket/model.pt", "models:/name/Production", "models:/"])
def test_uris_of_other_forms_are_refused(registered, uri):
    with pytest.raises(ValueError, match="must be models:/NAME@ALIAS"):
        load_pretrained(uri, tracking_uri=registered.store)


def test_a_registered_model_without_cromss_artifacts_is_refused(registered, tmp_path):
    with RunTracker.start(
        registered.config, tracking_uri=registered.store, experiment=unique("p"), run_name="foreign"
    ) as tracker:
        logged = tracker.client.create_logged_model(tracker.experiment_id, name="model", source_run_id=tracker.run_id)
        Model(model_id=logged.model_id).save(tmp_path / "MLmodel")
        tracker.client.log_model_artifacts(logged.model_id, str(tmp_path))
    name = unique("foreign")
    tracker.client.create_registered_model(name)
    tracker.client.create_model_version(name, source=logged.artifact_location, run_id=tracker.run_id)
    with pytest.raises(ValueError, match=f"models:/{name}/1 is not a CromSS pretrained model"):
        load_pretrained(f"models:/{name}/1", tracking_uri=registered.store)
