"""trims_ray: a multi-tier model cache for DNN inference on Ray.

One copy of each model per node, shared zero-copy by every process, kept in GPU memory, host
shared memory, local disk and a cloud store. ``__all__`` is the public contract of DESIGN.md;
everything in underscore modules may change.
"""

from ._api import register
from ._config import ReadOptions
from ._errors import (
    AccessDeniedError,
    CapacityError,
    IntegrityError,
    ModelFormatError,
    ModelNotFoundError,
    StoreUnavailableError,
    TrimsError,
)
from ._manifest import ModelInfo
from ._reader import ReadStats
from ._store import ModelStore

__all__ = [
    "register",
    "ModelInfo",
    "ModelStore",
    "ReadOptions",
    "ReadStats",
    "TrimsError",
    "ModelNotFoundError",
    "ModelFormatError",
    "IntegrityError",
    "CapacityError",
    "AccessDeniedError",
    "StoreUnavailableError",
]

__version__ = "0.1.0"
