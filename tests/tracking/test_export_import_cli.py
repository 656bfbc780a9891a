"""``cromss export`` (encoders for smp and timm) and ``cromss import-checkpoint`` (paper weights, spec 12)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from mlflow import MlflowClient
from tracking_helpers import ENCODER, unique

from cromss_ray.cli import main
from cromss_ray.method import CromSSNet, build_model
from cromss_ray.tracking import load_pretrained


@pytest.mark.parametrize(("branch", "bands"), [("s1", 2), ("s2", 13)])
def test_exported_encoders_load_into_smp_and_timm(registered, tmp_path, capsys, branch, bands):
    out = tmp_path / "encoders" / f"{branch}.pt"
    model = f"models:/{registered.name}@best"
    code = main(["export", "--model", model, "--branch", branch, "--out", str(out), "--tracking-uri", registered.store])
    assert code == 0 and f"{bands} input bands" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    expected = registered.model.encoder_for(branch).state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[key], expected[key]) for key in state)

    unet = smp.Unet(ENCODER, in_channels=bands, encoder_weights=None)
    unet.encoder.load_state_dict(state)
    assert torch.equal(unet.encoder.conv1.weight, expected["conv1.weight"])

    resnet = timm.create_model(ENCODER, in_chans=bands, pretrained=False)
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert torch.equal(resnet.layer4[1].bn2.running_mean, expected["layer4.1.bn2.running_mean"])


def test_export_of_a_missing_alias_names_it_and_writes_nothing(registered, tmp_path, capsys):
    out = tmp_path / "s2.pt"
    model = f"models:/{registered.name}@champion"
    code = main(["export", "--model", model, "--branch", "s2", "--out", str(out), "--tracking-uri", registered.store])
    assert code == 1 and "has no alias '@champion'" in capsys.readouterr().err
    assert not out.exists()


def _lightning_checkpoint(path: Path, fusion: str, s2_bands: int, seed: int) -> CromSSNet:
    """A checkpoint laid out like the paper's releases: ``state_dict`` with ``net.`` keys, plus Lightning extras."""
    torch.manual_seed(seed)
    network = build_model(fusion, ENCODER, s2_bands=s2_bands)
    state = {f"net.{key}": value for key, value in network.state_dict().items()}
    state["criterion.class_weights"] = torch.ones(9)
    torch.save(
        {
            "epoch": 99,
            "global_step": 1234,
            "pytorch-lightning_version": "1.9.0",
            "state_dict": state,
            "hyper_parameters": argparse.Namespace(lr=5e-3, fusion=fusion),
        },
        path,
    )
    return network


SPEC_12_PREFIXES = {
    "mid": ("net.encoder1.conv1.", "net.encoder.layer4.", "net.decoder.", "net.segmentation_head."),
    "late": (
        "net.model1.encoder.conv1.",
        "net.model1.decoder.",
        "net.model2.encoder.layer1.",
        "net.model2.segmentation_head.",
    ),
}


@pytest.mark.parametrize(("fusion", "s2_bands"), [("mid", 13), ("late", 9)])
def test_paper_checkpoints_are_registered_from_a_tagged_run(store, tmp_path, capsys, fusion, s2_bands):
    checkpoint = tmp_path / f"cromss_{fusion}.ckpt"
    network = _lightning_checkpoint(checkpoint, fusion, s2_bands, seed=3)
    keys = torch.load(checkpoint, weights_only=False)["state_dict"].keys()
    assert all(any(key.startswith(prefix) for key in keys) for prefix in SPEC_12_PREFIXES[fusion])
    name = unique(f"paper-{fusion}")
    arguments = ["--fusion", fusion, "--register", name, "--encoder", ENCODER, "--alias", "paper"]
    code = main(["import-checkpoint", str(checkpoint), *arguments, "--tracking-uri", store])
    assert code == 0 and f"models:/{name}/1" in capsys.readouterr().out
    pulled = load_pretrained(f"models:/{name}@paper", tracking_uri=store)
    ours, theirs = pulled.model.state_dict(), network.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert (pulled.config.model.fusion, pulled.config.data.s2_bands, pulled.model.classes) == (fusion, s2_bands, 9)
    run = MlflowClient(tracking_uri=store).get_run(pulled.run_id)
    assert run.data.tags["source"] == "paper-checkpoint" and run.data.tags["checkpoint"] == checkpoint.name
    assert len(run.data.tags["checkpoint_sha256"]) == 64 and run.info.status == "FINISHED"
    experiment = MlflowClient(tracking_uri=store).get_experiment(run.info.experiment_id)
    assert experiment.name == "cromss-pretrain"


def test_import_of_a_missing_file_is_refused(store, tmp_path, capsys):
    absent = str(tmp_path / "absent.ckpt")
    code = main(["import-checkpoint", absent, "--fusion", "mid", "--register", "x", "--tracking-uri", store])
    assert code == 1 and "absent.ckpt: no such checkpoint file" in capsys.readouterr().err


def test_import_with_the_wrong_fusion_names_the_likely_one(store, tmp_path, capsys):
    checkpoint = tmp_path / "mid.ckpt"
    _lightning_checkpoint(checkpoint, "mid", 13, seed=4)
    name = unique("wrong")
    arguments = ["--fusion", "late", "--register", name, "--encoder", ENCODER, "--tracking-uri", store]
    code = main(["import-checkpoint", str(checkpoint), *arguments])
    assert code == 1 and "look like a mid-fusion checkpoint" in capsys.readouterr().err
    assert not MlflowClient(tracking_uri=store, registry_uri=store).search_registered_models(f"name = '{name}'")
