"""Dependencies point down only, and no package imports another in a loop (docs/architecture.md, layers).

Every ``cromss_ray`` import of every module counts, also the ones inside functions (the
command line imports heavy packages lazily, but they are dependencies all the same).
"""

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import cromss_ray

PACKAGE = Path(cromss_ray.__file__).parent
LAYERS = {
    "cromss_ray": 0,
    "config": 0,
    "arguments": 0,
    "method": 1,
    "data": 2,
    "models": 3,
    "tracking": 4,
    "train": 5,
    "tune": 5,
    "inference": 5,
    "cli": 6,
}
"""Low to high: a module may import its own layer's packages and lower layers only."""


def unit(module: str) -> str:
    """The package (or top-level module) a dotted ``cromss_ray`` module name belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports() -> dict[str, set[str]]:
    """Every cromss_ray module name each module of the package imports, by the importing module's name."""
    found: dict[str, set[str]] = defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(part for part in relative.parts if part != "__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            else:
                continue
            found[name].update(target for target in targets if target.split(".")[0] == "cromss_ray")
    return found


def test_every_package_has_a_layer():
    units = {unit(module) for module in imports()}
    assert units <= set(LAYERS), f"no layer for {sorted(units - set(LAYERS))}"


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    upward = [
        f"{module} (layer {LAYERS[unit(module)]}) imports {target} (layer {LAYERS[unit(target)]})"
        for module, targets in imports().items()
        for target in sorted(targets)
        if LAYERS[unit(target)] > LAYERS[unit(module)]
    ]
    assert upward == []


def test_no_package_imports_another_in_a_loop():
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in imports().items():
        edges[unit(module)].update(unit(target) for target in targets if unit(target) != unit(module))

    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(
            step == goal or (step not in seen and reaches(step, goal, seen | {step})) for step in edges[start]
        )

    loops = sorted(package for package in list(edges) if reaches(package, package))
    assert loops == [], f"packages in an import loop: {loops}"


def test_models_and_lower_layers_import_neither_mlflow_nor_ray():
    for path in sorted(PACKAGE.rglob("*.py")):
        top = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if LAYERS.get(top, 0) > LAYERS["models"] or top == "data":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )
            for name in names:
                assert name.split(".")[0] not in {"mlflow", "ray"}, f"{path.relative_to(PACKAGE)} imports {name}"


def test_the_modules_ray_processes_unpickle_without_training_load_neither_torch_nor_mlflow():
    """The pipeline's tasks and actors and the Train controller import these modules (their classes travel
    inside the datasets and the run config) but never train: torch, segmentation-models-pytorch and MLflow
    would cost each such process seconds of start-up in every run."""
    light = ["cromss_ray.data.pipeline", "cromss_ray.data.transforms", "cromss_ray.train.cluster"]
    script = f"import json, sys\nfor name in {light!r}: __import__(name)\nprint(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    heavy = {"torch", "segmentation_models_pytorch", "mlflow"}
    assert heavy.isdisjoint(loaded), f"loaded: {sorted(heavy.intersection(loaded))}"


def test_model_uris_resolve_without_torch_or_ray():
    """``cromss finetune`` looks its source model up with this module before Ray and the network load."""
    script = "import json, sys\nimport cromss_ray.tracking.model_uris\nprint(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    heavy = {"torch", "segmentation_models_pytorch", "ray"}
    assert heavy.isdisjoint(loaded), f"loaded: {sorted(heavy.intersection(loaded))}"
