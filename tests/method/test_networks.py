"""Networks, transfer state dicts and the paper's checkpoint format (spec 1, 11, 12)."""

import argparse

import pytest
import segmentation_models_pytorch as smp
import timm
import torch

from cromss_ray.method import (
    CromSSLoss,
    build_model,
    build_segmentation_model,
    build_single_model,
    encoder_state_dict,
    fused_probabilities,
    load_encoder_state,
    load_reference_checkpoint,
    smoothing_prior,
)

ENCODER = "resnet18"
SIZE = 32


@pytest.fixture(scope="module")
def mid():
    torch.manual_seed(0)
    return build_model("mid", ENCODER, s1_bands=2, s2_bands=9, classes=5).eval()


@pytest.fixture(scope="module")
def late():
    torch.manual_seed(1)
    return build_model("late", ENCODER, s1_bands=2, s2_bands=3, classes=4).eval()


def _images(s2_bands: int, samples: int = 2, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return (
        torch.randn(samples, 2, size, size, generator=generator),
        torch.randn(samples, s2_bands, size, size, generator=generator),
    )


def test_mid_fusion_shares_one_decoder_and_head_with_checkpoint_names(mid):
    assert {name for name, _ in mid.named_children()} == {"encoder1", "encoder", "decoder", "segmentation_head"}
    assert (mid.fusion, mid.encoder_name, mid.s1_bands, mid.s2_bands, mid.classes) == ("mid", ENCODER, 2, 9, 5)
    assert mid.encoder_for("s1") is mid.encoder1 and mid.encoder_for("s2") is mid.encoder
    channels = [block.conv2[0].out_channels for block in mid.decoder.blocks]
    assert channels == [256, 128, 64, 32, 16]
    assert isinstance(mid.decoder.blocks[0].conv1[1], torch.nn.BatchNorm2d)
    assert mid.segmentation_head[0].kernel_size == (3, 3)


def test_late_fusion_is_two_full_unets(late):
    assert {name for name, _ in late.named_children()} == {"model1", "model2"}
    assert isinstance(late.model1, smp.Unet) and isinstance(late.model2, smp.Unet)
    assert late.encoder_for("s2") is late.model2.encoder


@pytest.mark.parametrize("fixture", ["mid", "late"])
def test_forward_returns_both_branches_and_matches_single_branch_inference(fixture, request):
    model = request.getfixturevalue(fixture)
    x1, x2 = _images(model.s2_bands)
    with torch.no_grad():
        z1, z2 = model(x1, x2)
        assert z1.shape == z2.shape == (2, model.classes, SIZE, SIZE)
        torch.testing.assert_close(model.forward_branch(x1, "s1"), z1)
        torch.testing.assert_close(model.forward_branch(x2, "s2"), z2)


def test_mid_fusion_runs_the_shared_decoder_on_each_encoder(mid):
    x1, x2 = _images(9)
    with torch.no_grad():
        z1, _ = mid(x1, x2)
        expected = mid.segmentation_head(mid.decoder(mid.encoder1(x1)))
    torch.testing.assert_close(z1, expected)


def test_fused_probabilities_average_the_softmaxes():
    z1 = torch.tensor([0.0, 0.0]).view(1, 2, 1, 1)
    z2 = torch.log(torch.tensor([0.9, 0.1])).view(1, 2, 1, 1)
    # ((0.5, 0.5) + (0.9, 0.1)) / 2
    assert fused_probabilities(z1, z2).flatten().tolist() == pytest.approx([0.7, 0.3])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.forward_branch(torch.zeros(1, 2, 30, 32), "s1"), "multiples of 32"),
        (lambda m: m.forward_branch(torch.zeros(1, 3, 32, 32), "s1"), r"\(N, 2, H, W\)"),
        (lambda m: m.forward_branch(torch.zeros(1, 2, 32, 32), "s3"), "modality"),
        (lambda m: m.encoder_for("rgb"), "modality"),
    ],
)
def test_bad_network_inputs_are_named(mid, call, message):
    with pytest.raises(ValueError, match=message):
        call(mid)


def test_bad_model_options_are_named():
    with pytest.raises(ValueError, match="fusion"):
        build_model("early", ENCODER)
    with pytest.raises(ValueError, match="two classes"):
        build_model("mid", ENCODER, classes=1)


@pytest.mark.parametrize("modality", ["s1", "s2"])
def test_encoder_state_loads_strictly_into_smp_and_into_timm_without_its_head(mid, modality):
    state = encoder_state_dict(mid, modality)
    bands = 2 if modality == "s1" else 9
    smp.Unet(ENCODER, encoder_weights=None, in_channels=bands).encoder.load_state_dict(state, strict=True)
    backbone = timm.create_model(ENCODER, in_chans=bands, pretrained=False)
    result = backbone.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    torch.testing.assert_close(backbone.layer4[1].conv2.weight, mid.encoder_for(modality).layer4[1].conv2.weight)
    assert state["conv1.weight"].data_ptr() != mid.encoder_for(modality).conv1.weight.data_ptr()


@pytest.mark.parametrize("arch", ["Unet", "deeplabv3plus", "FPN", "PSPNet"])
def test_transfer_into_any_smp_architecture(mid, arch):
    model = build_segmentation_model(arch, ENCODER, in_channels=9, classes=8)
    load_encoder_state(model, encoder_state_dict(mid, "s2"))
    torch.testing.assert_close(model.encoder.conv1.weight, mid.encoder.conv1.weight)
    assert model.segmentation_head[0].out_channels == 8


def test_transferred_network_segments_a_single_modality(mid):
    model = build_segmentation_model("DeepLabV3Plus", ENCODER, in_channels=2, classes=8).eval()
    load_encoder_state(model, encoder_state_dict(mid, "s1"))
    with torch.no_grad():
        assert model(torch.zeros(1, 2, 64, 64)).shape == (1, 8, 64, 64)


def test_encoder_state_errors_name_the_problem(mid):
    model = build_segmentation_model("FPN", ENCODER, in_channels=13, classes=8)
    with pytest.raises(ValueError, match="input-channel mismatch: the encoder state takes 9 bands"):
        load_encoder_state(model, encoder_state_dict(mid, "s2"))
    state = encoder_state_dict(mid, "s1")
    state.pop("layer2.0.bn1.running_mean")
    state["fc.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \[layer2.0.bn1.running_mean\], unexpected keys \[fc.weight\]"):
        load_encoder_state(build_segmentation_model("FPN", ENCODER, in_channels=2, classes=8), state)
    with pytest.raises(ValueError, match="no 'encoder' submodule"):
        load_encoder_state(torch.nn.Linear(2, 2), state)
    with pytest.raises(ValueError, match="unknown segmentation architecture 'SegNet'"):
        build_segmentation_model("SegNet", ENCODER, 2, 8)


def _lightning_checkpoint(model: torch.nn.Module) -> dict:
    """A checkpoint laid out like the paper's Lightning files (spec 12)."""
    return {
        "epoch": 199,
        "state_dict": {f"net.{key}": value.clone() for key, value in model.state_dict().items()},
        "hyper_parameters": {"args": argparse.Namespace(mt=ENCODER, n_channels=9, fuse_type="mid")},
        "optimizer_states": [],
    }


@pytest.mark.parametrize("fixture", ["mid", "late"])
def test_reference_checkpoint_file_round_trip_infers_bands_and_classes(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)
    path = tmp_path / "cromss.ckpt"
    torch.save(_lightning_checkpoint(model), path)
    loaded = load_reference_checkpoint(path, model.fusion, encoder=ENCODER).eval()
    assert (loaded.s1_bands, loaded.s2_bands, loaded.classes) == (model.s1_bands, model.s2_bands, model.classes)
    x1, x2 = _images(model.s2_bands)
    with torch.no_grad():
        for got, expected in zip(loaded(x1, x2), model(x1, x2)):
            torch.testing.assert_close(got, expected)


def test_reference_checkpoint_keys_mirror_the_spec_prefixes(mid, late):
    prefixes = {key.split(".")[1] for key in _lightning_checkpoint(mid)["state_dict"]}
    assert prefixes == {"encoder1", "encoder", "decoder", "segmentation_head"}
    late_keys = _lightning_checkpoint(late)["state_dict"]
    assert {key.split(".")[1] for key in late_keys} == {"model1", "model2"}
    assert "net.model1.encoder.layer4.1.bn2.weight" in late_keys


def test_reference_checkpoint_errors_name_keys_and_fusion(mid):
    checkpoint = _lightning_checkpoint(mid)
    with pytest.raises(ValueError, match="look like a mid-fusion checkpoint"):
        load_reference_checkpoint(checkpoint, "late", encoder=ENCODER)
    with pytest.raises(ValueError, match="s2_bands = 13 was requested"):
        load_reference_checkpoint(checkpoint, "mid", encoder=ENCODER, s2_bands=13)
    checkpoint["state_dict"].pop("net.decoder.blocks.1.conv1.0.weight")
    with pytest.raises(ValueError, match=r"missing keys \[decoder.blocks.1.conv1.0.weight\]"):
        load_reference_checkpoint(checkpoint, "mid", encoder=ENCODER)


def test_a_file_without_a_checkpoint_dict_is_named(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match=r"tensor.pt: holds a Tensor"):
        load_reference_checkpoint(path, "mid", encoder=ENCODER)


class _Opaque:
    """An object the weights-only unpickler refuses."""


def test_untrusted_objects_need_explicit_trust(mid, tmp_path):
    checkpoint = _lightning_checkpoint(mid)
    checkpoint["callbacks"] = _Opaque()
    path = tmp_path / "opaque.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"opaque.ckpt.*trusted=True"):
        load_reference_checkpoint(path, "mid", encoder=ENCODER)
    assert load_reference_checkpoint(path, "mid", encoder=ENCODER, trusted=True).s2_bands == 9


@pytest.mark.parametrize("fusion", ["mid", "late"])
def test_a_few_optimisation_steps_lower_the_loss(fusion):
    torch.manual_seed(3)
    model = build_model(fusion, ENCODER, s1_bands=2, s2_bands=4, classes=3)
    generator = torch.Generator().manual_seed(4)
    x1, x2 = torch.randn(2, 2, SIZE, SIZE, generator=generator), torch.randn(2, 4, SIZE, SIZE, generator=generator)
    labels = torch.randint(0, 3, (2, 4, SIZE, SIZE), generator=generator)
    season = torch.tensor([0, 2])
    y = labels[torch.arange(2), season]
    prior = smoothing_prior(labels, season, classes=3)
    criterion = CromSSLoss(classes=3, ramp_length=4)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss, _ = criterion(*model(x1, x2), y, prior, epoch=2)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_single_modality_baseline_is_one_unet_with_the_references_names():
    torch.manual_seed(2)
    network = build_single_model("s1", ENCODER, bands=2, classes=5).eval()
    reference = smp.Unet(ENCODER, encoder_weights=None, in_channels=2, classes=5)
    assert network.state_dict().keys() == reference.state_dict().keys()
    assert network.fusion == "single" and network.modalities == ("s1",)
    x = torch.randn(2, 2, SIZE, SIZE)
    with torch.no_grad():
        logits = network(x)
        assert logits.shape == (2, 5, SIZE, SIZE)
        torch.testing.assert_close(logits, network.segmentation_head(network.decoder(network.encoder(x))))
    assert network.encoder_for("s1") is network.encoder
    with pytest.raises(ValueError, match="single-modality S1 network has no S2 encoder"):
        network.encoder_for("s2")
    with pytest.raises(ValueError, match=r"s1 input must be \(N, 2, H, W\)"):
        network(torch.randn(1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="multiples of 32"):
        network(torch.randn(1, 2, 40, 40))
    with pytest.raises(ValueError, match="modality"):
        build_single_model("s3", ENCODER)
