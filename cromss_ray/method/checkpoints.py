"""State dicts in and out: the paper's released checkpoints and single-branch encoders (spec 11-12).

The released weights are PyTorch Lightning checkpoints whose ``state_dict`` keys start
with ``net.`` followed by the submodule names :func:`build_model` uses (``encoder1``,
``encoder``, ``decoder``, ``segmentation_head`` for middle fusion; ``model1``,
``model2`` for late fusion), so importing them is a prefix strip and a strict load.
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from cromss_ray.method.networks import CromSSNet, Fusion, Modality, PretrainNet, build_model

LIGHTNING_PREFIX = "net."
INPUT_CONV_KEY = "conv1.weight"
SHAPE_KEYS: dict[str, tuple[str, str, str]] = {
    "mid": ("encoder1.conv1.weight", "encoder.conv1.weight", "segmentation_head.0.weight"),
    "late": ("model1.encoder.conv1.weight", "model2.encoder.conv1.weight", "model1.segmentation_head.0.weight"),
}
"""Per fusion: the S1 and S2 input convolutions and the head, whose shapes give bands and classes."""
FUSION_MARKERS: dict[str, str] = {"mid": "encoder1.", "late": "model1."}
KEYS_SHOWN = 8


def _summarise(keys: Iterable[str]) -> str:
    """A short, sorted listing of state-dict keys for error messages."""
    keys = sorted(keys)
    shown = ", ".join(keys[:KEYS_SHOWN])
    more = f", ... ({len(keys) - KEYS_SHOWN} more)" if len(keys) > KEYS_SHOWN else ""
    return f"[{shown}{more}]"


def _check_fits(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise a ValueError naming missing, unexpected and wrongly shaped keys of ``given``."""
    missing = expected.keys() - given.keys()
    unexpected = given.keys() - expected.keys()
    mismatched = [
        f"{key}: {tuple(given[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(expected.keys() & given.keys())
        if given[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{what}: missing keys {_summarise(missing)}, unexpected keys {_summarise(unexpected)}, "
            f"shape mismatches (given vs expected) {mismatched}"
        )


def encoder_state_dict(model: PretrainNet, modality: Modality) -> dict[str, torch.Tensor]:
    """The encoder of ``modality`` ('s1' or 's2') as a plain, detached state dict (spec 11-12); a
    single-modality baseline has only its own (a ValueError names the other).

    For ResNet encoders the keys are torchvision's (``conv1.weight``, ``layer1.0.bn1.bias``,
    ...): ``smp.Unet(encoder, in_channels=bands).encoder`` loads it strictly, and
    ``timm.create_model(encoder, in_chans=bands)`` loads it with only its ``fc`` head missing.
    """
    return {key: value.detach().clone() for key, value in model.encoder_for(modality).state_dict().items()}


def load_encoder_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a plain encoder state dict (from :func:`encoder_state_dict`) into ``model.encoder`` (spec 11).

    ``model`` is e.g. a :func:`build_segmentation_model` network. A ValueError names an
    input-channel mismatch, or the missing, unexpected and wrongly shaped keys; nothing
    is loaded then.
    """
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ValueError(f"{type(model).__name__} has no 'encoder' submodule to load an encoder state into")
    expected = encoder.state_dict()
    if INPUT_CONV_KEY in expected and INPUT_CONV_KEY in state_dict:
        given_bands, model_bands = state_dict[INPUT_CONV_KEY].shape[1], expected[INPUT_CONV_KEY].shape[1]
        if given_bands != model_bands:
            raise ValueError(
                f"input-channel mismatch: the encoder state takes {given_bands} bands, "
                f"the model's encoder {model_bands}"
            )
    _check_fits(expected, state_dict, "encoder state does not fit the model's encoder")
    encoder.load_state_dict(dict(state_dict), strict=True)


def _read_checkpoint(path: str | os.PathLike[str], trusted: bool) -> Mapping[str, Any]:
    """Load a checkpoint file on the CPU; only tensors and plain containers unless ``trusted``."""
    if trusted:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).splitlines()[0]
        raise ValueError(
            f"{os.fspath(path)}: holds objects beyond tensors and plain containers ({first_line}); "
            "if you trust this file, pass trusted=True to unpickle it in full"
        ) from error


def _network_state(checkpoint: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """The network's own state dict from a Lightning checkpoint (``net.`` keys) or a plain state dict."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise ValueError(f"{source}: 'state_dict' is a {type(state).__name__}, not a mapping of tensors")
    if any(key.startswith(LIGHTNING_PREFIX) for key in state):
        prefixed = (key for key in state if key.startswith(LIGHTNING_PREFIX))
        return {key.removeprefix(LIGHTNING_PREFIX): state[key] for key in prefixed}
    return dict(state)


def _size_from(
    state: Mapping[str, torch.Tensor], key: str, axis: int, given: int | None, default: int, what: str, source: str
) -> int:
    """``given``, checked against the checkpoint's ``key`` shape; else the shape's size; else ``default``."""
    found = state[key].shape[axis] if key in state and state[key].dim() > axis else None
    if given is not None and found is not None and given != found:
        raise ValueError(f"{source}: {what} = {given} was requested, but the checkpoint's {key} has {found}")
    if given is not None:
        return given
    return found if found is not None else default


def load_reference_checkpoint(
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any],
    fusion: Fusion,
    encoder: str = "resnet50",
    s1_bands: int | None = None,
    s2_bands: int | None = None,
    classes: int | None = None,
    trusted: bool = False,
) -> CromSSNet:
    """A :func:`build_model` network holding the paper's released weights (spec 12).

    ``path_or_state_dict`` is a checkpoint file, a loaded Lightning checkpoint
    (``{"state_dict": {"net.encoder1.conv1.weight": ...}, ...}``) or a plain network
    state dict. Keys outside ``net.`` (other parts of the Lightning module) are left
    out. Band counts and classes default to what the checkpoint's input convolutions
    and head say (else 2, 13 and 9); given values are checked against them. Files are
    read with ``weights_only=True`` (``argparse.Namespace`` hyper-parameters allowed)
    unless ``trusted``. A ValueError names the missing, unexpected or wrongly shaped
    keys, and hints at the other fusion when the keys look like it.
    """
    if isinstance(path_or_state_dict, Mapping):
        source, checkpoint = "checkpoint", path_or_state_dict
    else:
        source, checkpoint = os.fspath(path_or_state_dict), _read_checkpoint(path_or_state_dict, trusted)
    if fusion not in SHAPE_KEYS:
        raise ValueError(f"fusion must be one of {tuple(SHAPE_KEYS)}, got {fusion!r}")
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{source}: holds a {type(checkpoint).__name__}, not a checkpoint or state dict")
    state = _network_state(checkpoint, source)
    s1_key, s2_key, head_key = SHAPE_KEYS[fusion]
    model = build_model(
        fusion,
        encoder=encoder,
        s1_bands=_size_from(state, s1_key, 1, s1_bands, 2, "s1_bands", source),
        s2_bands=_size_from(state, s2_key, 1, s2_bands, 13, "s2_bands", source),
        classes=_size_from(state, head_key, 0, classes, 9, "classes", source),
    )
    other = "late" if fusion == "mid" else "mid"
    hint = ""
    if any(key.startswith(FUSION_MARKERS[other]) for key in state):
        hint = f" (its keys look like a {other}-fusion checkpoint)"
    _check_fits(model.state_dict(), state, f"{source} does not fit a {fusion}-fusion {encoder} network{hint}")
    model.load_state_dict(state, strict=True)
    return model
