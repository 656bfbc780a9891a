"""The two-branch CromSS networks, middle and late fusion U-Nets (spec 1), and the single-modality baseline.

Submodule names mirror the paper's released checkpoints (spec 12): middle fusion has
``encoder1`` (S1), ``encoder`` (S2), one shared ``decoder`` and ``segmentation_head``;
late fusion has two complete smp U-Nets ``model1`` (S1) and ``model2`` (S2). The
single-modality baseline (spec 11) is one such U-Net on one modality, with smp's own
``encoder``, ``decoder`` and ``segmentation_head``, as the reference's baseline network.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal, NamedTuple, cast

import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn

Fusion = Literal["mid", "late"]
Modality = Literal["s1", "s2"]
FUSIONS: tuple[str, ...] = ("mid", "late")
SINGLE = "single"
"""The fusion name of the single-modality baseline (spec 11), beside :data:`FUSIONS`."""
MODALITY_NAMES: tuple[str, ...] = ("s1", "s2")
DECODER_CHANNELS = (256, 128, 64, 32, 16)
ENCODER_DEPTH = 5


class Branch(NamedTuple):
    """The modules that turn one modality's image into logits."""

    encoder: nn.Module
    decoder: nn.Module
    head: nn.Module


def _unet(encoder: str, in_channels: int, classes: int) -> smp.Unet:
    """A randomly initialised smp U-Net with the spec-1 decoder (256, 128, 64, 32, 16), batch norm and 3x3 head."""
    return smp.Unet(
        encoder_name=encoder,
        encoder_weights=None,
        encoder_depth=ENCODER_DEPTH,
        in_channels=in_channels,
        classes=classes,
        decoder_channels=DECODER_CHANNELS,
        decoder_use_norm="batchnorm",
    )


class CromSSNet(nn.Module, ABC):
    """A two-branch segmentation network returning per-modality logits ``(z1, z2)`` (spec 1).

    Attributes ``fusion``, ``encoder_name``, ``s1_bands``, ``s2_bands`` and ``classes``
    describe it; :meth:`forward_branch` runs one modality alone and :meth:`encoder_for`
    gives one modality's encoder (for transfer, spec 11).
    """

    fusion: Fusion
    modalities: tuple[str, ...] = MODALITY_NAMES

    def __init__(self, encoder: str, s1_bands: int, s2_bands: int, classes: int) -> None:
        super().__init__()
        self.encoder_name = encoder
        self.s1_bands = s1_bands
        self.s2_bands = s2_bands
        self.classes = classes

    @abstractmethod
    def branch(self, modality: Modality) -> Branch:
        """Encoder, decoder and head that produce ``modality``'s logits."""

    def encoder_for(self, modality: Modality) -> nn.Module:
        """The encoder of ``modality`` ('s1' or 's2')."""
        return self.branch(_check_modality(modality)).encoder

    def forward_branch(self, x: torch.Tensor, modality: Modality) -> torch.Tensor:
        """Logits ``(N, C, H, W)`` of one modality's image ``x`` ``(N, bands, H, W)``; H and W multiples of 32."""
        modality = _check_modality(modality)
        encoder, decoder, head = self.branch(modality)
        _check_input(x, modality, self.s1_bands if modality == "s1" else self.s2_bands, encoder.output_stride)
        return head(decoder(encoder(x)))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(z1, z2)`` of the S1 image ``x1`` and the S2 image ``x2``."""
        return self.forward_branch(x1, "s1"), self.forward_branch(x2, "s2")


class MidFusionNet(CromSSNet):
    """Middle fusion: two encoders, one shared U-Net decoder and head, run once per modality (spec 1)."""

    fusion: Fusion = "mid"

    def __init__(self, encoder: str, s1_bands: int, s2_bands: int, classes: int) -> None:
        super().__init__(encoder, s1_bands, s2_bands, classes)
        unet = _unet(encoder, s2_bands, classes)
        self.encoder1 = get_encoder(encoder, in_channels=s1_bands, depth=ENCODER_DEPTH, weights=None)
        self.encoder = unet.encoder
        self.decoder = unet.decoder
        self.segmentation_head = unet.segmentation_head

    def branch(self, modality: Modality) -> Branch:
        """``encoder1`` or ``encoder`` with the shared decoder and head."""
        encoder = self.encoder1 if modality == "s1" else self.encoder
        return Branch(encoder, self.decoder, self.segmentation_head)


class LateFusionNet(CromSSNet):
    """Late fusion: two complete, independent U-Nets, ``model1`` for S1 and ``model2`` for S2 (spec 1)."""

    fusion: Fusion = "late"

    def __init__(self, encoder: str, s1_bands: int, s2_bands: int, classes: int) -> None:
        super().__init__(encoder, s1_bands, s2_bands, classes)
        self.model1 = _unet(encoder, s1_bands, classes)
        self.model2 = _unet(encoder, s2_bands, classes)

    def branch(self, modality: Modality) -> Branch:
        """The encoder, decoder and head of ``model1`` or ``model2``."""
        unet = self.model1 if modality == "s1" else self.model2
        return Branch(unet.encoder, unet.decoder, unet.segmentation_head)


class SingleModalityNet(nn.Module):
    """The single-modality baseline (spec 11): one U-Net with the spec-1 decoder on one modality's image.

    Attributes ``fusion`` ('single'), ``modality``, ``modalities`` (its one modality),
    ``encoder_name``, ``bands`` and ``classes`` describe it; ``forward(x)`` gives the
    logits of ``modality``'s image and :meth:`encoder_for` its encoder (for transfer).
    """

    fusion = SINGLE

    def __init__(self, modality: Modality, encoder: str, bands: int, classes: int) -> None:
        super().__init__()
        self.modality = _check_modality(modality)
        self.modalities = (self.modality,)
        self.encoder_name = encoder
        self.bands = bands
        self.classes = classes
        unet = _unet(encoder, bands, classes)
        self.encoder = unet.encoder
        self.decoder = unet.decoder
        self.segmentation_head = unet.segmentation_head

    def encoder_for(self, modality: Modality) -> nn.Module:
        """The encoder, when ``modality`` is the network's; a ValueError naming both otherwise."""
        if _check_modality(modality) != self.modality:
            raise ValueError(f"the single-modality {self.modality.upper()} network has no {modality.upper()} encoder")
        return self.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, C, H, W)`` of the modality's image ``x`` ``(N, bands, H, W)``; H and W multiples of 32."""
        _check_input(x, self.modality, self.bands, self.encoder.output_stride)
        return self.segmentation_head(self.decoder(self.encoder(x)))


PretrainNet = CromSSNet | SingleModalityNet
"""A network pretrained on the noisy labels: CromSS (two branches) or the single-modality baseline."""


def _check_input(x: torch.Tensor, modality: str, bands: int, stride: int) -> None:
    """A ValueError unless ``x`` is ``(N, bands, H, W)`` with H and W multiples of ``stride``."""
    if x.dim() != 4 or x.shape[1] != bands:
        raise ValueError(f"{modality} input must be (N, {bands}, H, W), got {tuple(x.shape)}")
    height, width = x.shape[-2:]
    if height % stride or width % stride:
        raise ValueError(f"{modality} input is {height} x {width} px; height and width must be multiples of {stride}")


def _check_modality(modality: str) -> Modality:
    """``modality`` if it names a branch ('s1' or 's2'), else a ValueError."""
    if modality not in MODALITY_NAMES:
        raise ValueError(f"modality must be one of {MODALITY_NAMES}, got {modality!r}")
    return cast(Modality, modality)


def build_model(
    fusion: Fusion,
    encoder: str = "resnet50",
    s1_bands: int = 2,
    s2_bands: int = 13,
    classes: int = 9,
) -> CromSSNet:
    """A randomly initialised CromSS network (spec 1); encoder weights are never downloaded.

    ``fusion`` 'mid' shares one decoder and head between the two encoders, 'late' builds
    two full U-Nets. ``encoder`` is any segmentation-models-pytorch encoder name.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if min(s1_bands, s2_bands) < 1 or classes < 2:
        raise ValueError(f"need at least one band per modality and two classes, got {s1_bands}, {s2_bands}, {classes}")
    network = MidFusionNet if fusion == "mid" else LateFusionNet
    return network(encoder, s1_bands, s2_bands, classes)


def build_single_model(
    modality: Modality, encoder: str = "resnet50", bands: int = 13, classes: int = 9
) -> SingleModalityNet:
    """A randomly initialised single-modality baseline network (spec 11) of ``bands`` input bands."""
    if bands < 1 or classes < 2:
        raise ValueError(f"need at least one band and two classes, got {bands}, {classes}")
    return SingleModalityNet(modality, encoder, bands, classes)


def fused_probabilities(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Fused prediction ``(N, C, H, W)``: the mean of the two modalities' softmax outputs (spec 1)."""
    return (torch.softmax(z1, dim=1) + torch.softmax(z2, dim=1)) / 2


def build_segmentation_model(arch: str, encoder: str, in_channels: int, classes: int) -> nn.Module:
    """A randomly initialised single-modality smp network for transfer (spec 11).

    ``arch`` names any smp architecture, case-insensitive ('Unet', 'DeepLabV3Plus',
    'FPN', 'PSPNet', ...); its ``encoder`` submodule takes a pretrained branch encoder
    through :func:`cromss_ray.method.load_encoder_state`. Weights are never downloaded.
    """
    architectures = smp.MODEL_ARCHITECTURES_MAPPING
    if arch.lower() not in architectures:
        raise ValueError(f"unknown segmentation architecture {arch!r}; smp offers {sorted(architectures)}")
    return smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=in_channels, classes=classes)
