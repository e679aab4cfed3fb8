"""Imports trims_ray's Ray-free modules on a machine without Ray.

GPU machines may have torch but not Ray (it travels there as wheels, when at all). Importing any
``trims_ray.<module>`` runs the package's ``__init__``, which imports the Ray-bound public API;
``install()`` puts a bare package in its place when Ray is missing, so that the GPU tier's plain
classes, the CUDA device and the model store import on their own (``from trims_ray import X``
does not work then: import X from its module).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

__all__ = ["install", "ray_available"]


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def install() -> bool:
    """Registers a bare ``trims_ray`` package when Ray cannot be imported and trims_ray is not
    imported yet; returns whether it did. Harmless to call more than once."""
    if "trims_ray" in sys.modules or ray_available():
        return False
    root = Path(__file__).resolve().parent.parent / "trims_ray"
    package = types.ModuleType("trims_ray", "trims_ray without its Ray-bound public API")
    package.__path__ = [str(root)]
    package.__file__ = str(root / "__init__.py")
    sys.modules["trims_ray"] = package
    return True
