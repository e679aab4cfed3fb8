"""Keeps a torchvision whose C++ operators cannot load importable (transformers imports it).

PyPI's torchvision wheels for Linux are built against CUDA torch. Beside a CPU build of the same
torch release their extension library does not load, and ``import torchvision`` then fails in
``_meta_registrations`` (it registers fake kernels for ``torchvision::nms`` and ``qnms`` without
checking that the operators exist). transformers imports torchvision whenever it is installed,
so every model it builds fails with it. Declaring the two operator schemas first lets the
pure-Python parts (the model classes, transforms) import; calling ``nms`` still raises.
Nothing is done where torchvision is absent, already imported, or its extension loads.
"""

from __future__ import annotations

import importlib.util
import os
import sys

__all__ = ["ensure_torchvision_importable"]

_fragment = None  # the torch.library fragment holding the schemas: kept alive for the process


def ensure_torchvision_importable() -> None:
    """Declares ``torchvision::nms``/``qnms`` when torchvision's extension cannot load."""
    global _fragment
    if _fragment is not None or "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import torch

    directory = next(iter(spec.submodule_search_locations))
    extension = next(
        (os.path.join(directory, f) for f in sorted(os.listdir(directory)) if f.startswith("_C.") and f.endswith((".so", ".pyd"))),
        None,
    )
    if extension is not None:
        try:
            torch.ops.load_library(extension)
            return  # it loads: torchvision declares its operators itself
        except OSError:
            pass
    fragment = torch.library.Library("torchvision", "DEF")
    fragment.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    fragment.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _fragment = fragment
