"""The method package stays pure PyTorch (architecture: layers)."""

import ast
import sys
from pathlib import Path

import cromss_ray.method

ALLOWED = {"torch", "segmentation_models_pytorch", "numpy", "scipy"}


def test_method_modules_import_only_torch_smp_numpy_scipy_and_the_standard_library():
    package = Path(cromss_ray.method.__file__).parent
    for module in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                allowed = top in ALLOWED or top in sys.stdlib_module_names or name.startswith("cromss_ray.method")
                assert allowed, f"{module.name} imports {name}"
