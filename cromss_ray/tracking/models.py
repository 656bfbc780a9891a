"""A pretrained CromSS network as an MLflow pyfunc model, logged with its run and registered.

Input: a dict of two float32 arrays, already scaled the way the trainer feeds them,

* ``"s1"``: ``(N, 2, H, W)``, Sentinel-1 VV and VH;
* ``"s2"``: ``(N, B, H, W)``, the model's B Sentinel-2 bands (spec 9);

for any N, H and W (each image is padded to the encoder stride, 32 for ResNets, and
the outputs cropped back). Output: a dict of arrays,

* ``"classes"`` ``(N, H, W)`` int64 and ``"probabilities"`` ``(N, C, H, W)`` float32:
  the fused prediction, the mean of the two branches' softmax outputs (spec 1);
* ``"s1_classes"``, ``"s1_probabilities"``, ``"s2_classes"``, ``"s2_probabilities"``:
  each branch alone.

The inference param ``batch_size`` (default 8) bounds the images run at once.

Nothing is pickled and nothing is downloaded at load time: the model is stored as
source (``pyfunc_code.py``, an MLflow "model from code", with the ``cromss_ray``
package as its code path) plus two artifacts, ``model.pt`` (the state dict) and
``config.yaml``, from which :func:`cromss_ray.method.build_model` rebuilds the network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import version as installed_version
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from mlflow.models import Model, ModelSignature
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec
from pydantic import BaseModel

import cromss_ray
from cromss_ray.config import PretrainConfig, to_yaml
from cromss_ray.method import CromSSNet, fused_probabilities
from cromss_ray.tracking.registry import LATEST_ALIAS, register_model_version, set_alias, using_tracking_uri
from cromss_ray.tracking.runs import RunTracker, config_params, redacted_config
from cromss_ray.tracking.storage import (
    CONFIG_ARTIFACT,
    MODEL_NAME,
    S1_BANDS,
    WEIGHTS_ARTIFACT,
    check_matches_config,
    load_network,
    pretrain_part,
)

PYFUNC_CODE = Path(__file__).with_name("pyfunc_code.py")
DEFAULT_BATCH_SIZE = 8
EXAMPLE_SIZE = 32
INFERENCE_DISTRIBUTIONS = (
    "mlflow",
    "torch",
    "torchvision",
    "segmentation-models-pytorch",
    "timm",
    "numpy",
    "scipy",
    "pydantic",
    "pyyaml",
    "matplotlib",
)
"""What loading and running the pyfunc imports; pinned to the installed versions when logged."""


def _padded(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """``images`` (N, B, H, W) padded at the bottom and right (edge values repeated) to multiples of ``multiple``."""
    height, width = images.shape[-2:]
    return F.pad(images, (0, -width % multiple, 0, -height % multiple), mode="replicate")


def _checked_inputs(model: CromSSNet, s1: np.ndarray, s2: np.ndarray) -> None:
    for name, array, bands in (("s1", s1, model.s1_bands), ("s2", s2, model.s2_bands)):
        if array.ndim != 4 or array.shape[1] != bands:
            raise ValueError(f"input '{name}' must be (N, {bands}, H, W), got {array.shape}")
    if s1.shape[0] != s2.shape[0] or s1.shape[2:] != s2.shape[2:]:
        raise ValueError(f"inputs 's1' {s1.shape} and 's2' {s2.shape} differ in N, H or W")


@torch.no_grad()
def predict_maps(
    model: CromSSNet, s1: np.ndarray, s2: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE
) -> dict[str, np.ndarray]:
    """Class maps and probabilities of the fused prediction and of each branch (module docstring).

    Runs on the device of ``model``'s parameters, ``batch_size`` images at a time.
    """
    _checked_inputs(model, s1, s2)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    multiple = max(model.encoder_for(modality).output_stride for modality in ("s1", "s2"))
    height, width = s1.shape[2:]
    parts: dict[str, list[torch.Tensor]] = {"probabilities": [], "s1_probabilities": [], "s2_probabilities": []}
    for start in range(0, s1.shape[0], batch_size):
        x1 = _padded(torch.as_tensor(s1[start : start + batch_size], dtype=torch.float32, device=device), multiple)
        x2 = _padded(torch.as_tensor(s2[start : start + batch_size], dtype=torch.float32, device=device), multiple)
        z1, z2 = (logits[..., :height, :width] for logits in model(x1, x2))
        parts["probabilities"].append(fused_probabilities(z1, z2).cpu())
        parts["s1_probabilities"].append(torch.softmax(z1, dim=1).cpu())
        parts["s2_probabilities"].append(torch.softmax(z2, dim=1).cpu())
    outputs: dict[str, np.ndarray] = {}
    for prefix in ("", "s1_", "s2_"):
        probabilities = torch.cat(parts[f"{prefix}probabilities"])
        outputs[f"{prefix}classes"] = probabilities.argmax(dim=1).numpy()
        outputs[f"{prefix}probabilities"] = probabilities.numpy()
    return outputs


class CromSSPyfunc(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper of a pretrained CromSS network (input and output: module docstring)."""

    # The input is a dict of tensors, which MLflow's type-hint validation (list[...] inputs
    # only) cannot describe: model_input carries no hint, and MLflow's nag about that is
    # switched off. The input contract is the tensor signature, which MLflow enforces.
    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Rebuild the network from the ``weights`` and ``config`` artifacts, on a GPU when present."""
        weights, config_file = (Path(context.artifacts[key]) for key in (WEIGHTS_ARTIFACT, CONFIG_ARTIFACT))
        network, _ = load_network(weights, config_file)
        self.network = network.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input,
        params: dict[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """``{"s1": (N, 2, H, W), "s2": (N, B, H, W)}`` float32 -> class maps and probabilities."""
        batch_size = int((params or {}).get("batch_size", DEFAULT_BATCH_SIZE))
        return predict_maps(self.network, model_input["s1"], model_input["s2"], batch_size)


def model_signature(s2_bands: int, classes: int) -> ModelSignature:
    """Named tensor inputs and outputs with -1 for N, H and W, plus the ``batch_size`` param."""
    images = np.dtype(np.float32)
    inputs = Schema(
        [TensorSpec(images, (-1, S1_BANDS, -1, -1), "s1"), TensorSpec(images, (-1, s2_bands, -1, -1), "s2")]
    )
    outputs = []
    for prefix in ("", "s1_", "s2_"):
        outputs.append(TensorSpec(np.dtype(np.int64), (-1, -1, -1), f"{prefix}classes"))
        outputs.append(TensorSpec(images, (-1, classes, -1, -1), f"{prefix}probabilities"))
    params = ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE)])
    return ModelSignature(inputs=inputs, outputs=Schema(outputs), params=params)


def example_input(s2_bands: int, given: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The stored input example: the first image of ``given``, cut to 32 x 32 px; zeros without one."""
    if given is None:
        return {
            "s1": np.zeros((1, S1_BANDS, EXAMPLE_SIZE, EXAMPLE_SIZE), np.float32),
            "s2": np.zeros((1, s2_bands, EXAMPLE_SIZE, EXAMPLE_SIZE), np.float32),
        }
    missing = {"s1", "s2"} - set(given)
    if missing:
        raise ValueError(f"input_example needs arrays 's1' and 's2'; missing {sorted(missing)}")
    example = {}
    for key in ("s1", "s2"):
        value = given[key]
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if array.ndim != 4:
            raise ValueError(f"input_example '{key}' must be (N, bands, H, W), got {array.shape}")
        example[key] = np.ascontiguousarray(array[:1, :, :EXAMPLE_SIZE, :EXAMPLE_SIZE], dtype=np.float32)
    return example


def pinned_requirements() -> list[str]:
    """``INFERENCE_DISTRIBUTIONS`` at their installed versions (local labels such as ``+cu130`` dropped)."""
    return [f"{name}=={installed_version(name).split('+')[0]}" for name in INFERENCE_DISTRIBUTIONS]


def log_registered_model(
    tracker: RunTracker,
    config: BaseModel,
    *,
    python_model: str | mlflow.pyfunc.PythonModel,
    write_artifacts: Callable[[Path], Mapping[str, Path]],
    signature: ModelSignature,
    input_example: Mapping[str, np.ndarray],
    registry_name: str,
    description: str,
    aliases: Sequence[str],
    epoch: int | None = None,
    version_tags: Mapping[str, Any] | None = None,
) -> int:
    """Log a CromSS pyfunc model of the tracker's run, register it, point ``aliases`` at it; the new version.

    The logged model is named ``model`` and carries ``config``'s flattened params;
    ``write_artifacts(folder)`` writes the model's files into a temporary folder and
    returns them by artifact key. ``python_model`` is a model-from-code file or a
    :class:`~mlflow.pyfunc.PythonModel`; the ``cromss_ray`` package is logged as its code
    path and the inference packages are pinned (:func:`pinned_requirements`).
    ``epoch`` is the step the model is logged at; the version gets ``description`` and
    ``version_tags``. ``@latest`` is MLflow's built-in alias of the newest version, so
    ``"latest"`` in ``aliases`` needs (and gets) no assignment.
    """
    logged = tracker.client.create_logged_model(
        experiment_id=tracker.experiment_id, name=MODEL_NAME, source_run_id=tracker.run_id, params=config_params(config)
    )
    with TemporaryDirectory() as folder, using_tracking_uri(tracker.tracking_uri):
        artifacts = write_artifacts(Path(folder))
        Model.log(
            artifact_path=None,
            name=MODEL_NAME,
            flavor=mlflow.pyfunc,
            run_id=tracker.run_id,
            model_id=logged.model_id,
            step=epoch or 0,
            python_model=python_model,
            artifacts={key: str(path) for key, path in artifacts.items()},
            code_paths=[str(Path(cromss_ray.__file__).parent)],
            signature=signature,
            input_example=input_example,
            pip_requirements=pinned_requirements(),
        )
        version = register_model_version(
            tracker.client,
            registry_name,
            logged.model_id,
            description,
            run_id=tracker.run_id,
            tags={key: str(value) for key, value in (version_tags or {}).items()},
        )
    for alias in aliases:
        if alias.lower() != LATEST_ALIAS:
            set_alias(registry_name, alias, version, tracking_uri=tracker.tracking_uri)
    return version


def save_weights(model: torch.nn.Module, path: Path) -> Path:
    """``model``'s state dict, detached and on the CPU, saved to ``path`` (``model.pt``)."""
    torch.save({key: value.detach().cpu() for key, value in model.state_dict().items()}, path)
    return path


def log_pretrained_model(
    model: CromSSNet,
    config: PretrainConfig,
    *,
    tracker: RunTracker,
    registry_name: str,
    aliases: Sequence[str],
    input_example: Mapping[str, Any] | None = None,
    epoch: int | None = None,
    version_tags: Mapping[str, Any] | None = None,
) -> int:
    """Log ``model`` as the pyfunc of the tracker's run, register it, point ``aliases`` at it.

    Returns the new version of ``registry_name``. ``@latest`` is MLflow's built-in
    alias for the newest version, so ``"latest"`` in ``aliases`` needs (and gets) no
    assignment. ``input_example`` (``{"s1": ..., "s2": ...}``) is stored cut to one
    32 x 32 px image. ``epoch`` is the step the model is logged at (the run's metrics
    of that step are copied to the logged model); ``version_tags`` go on the model
    version (e.g. its validation scores).
    """
    config = pretrain_part(config)
    check_matches_config(model, config)

    def write_artifacts(folder: Path) -> dict[str, Path]:
        config_file = folder / "config.yaml"
        config_file.write_text(to_yaml(redacted_config(config)))
        return {WEIGHTS_ARTIFACT: save_weights(model, folder / "model.pt"), CONFIG_ARTIFACT: config_file}

    return log_registered_model(
        tracker,
        config,
        python_model=str(PYFUNC_CODE),
        write_artifacts=write_artifacts,
        signature=model_signature(config.data.s2_bands, config.model.classes),
        input_example=example_input(config.data.s2_bands, input_example),
        registry_name=registry_name,
        description=(
            f"CromSS {config.model.fusion}-fusion {config.model.encoder}: S1 ({S1_BANDS} bands) and "
            f"S2 ({config.data.s2_bands} bands) to {config.model.classes} classes"
        ),
        aliases=aliases,
        epoch=epoch,
        version_tags=version_tags,
    )
