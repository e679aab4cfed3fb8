"""trims_ray: a multi-tier model cache for DNN inference on Ray.

One copy of each model per node, shared zero-copy by every process, kept in GPU memory, host
shared memory, local disk and a cloud store. ``__all__`` is the public contract of DESIGN.md;
everything in underscore modules may change.
"""

from ._api import list_models, register
from ._cluster import Cluster, ClusterStats, NodeStats, evict, init, prefetch, scrub, shutdown, stats
from ._config import CacheConfig, ReadOptions
from ._errors import (
    AccessDeniedError,
    CapacityError,
    IntegrityError,
    ModelFormatError,
    ModelNotFoundError,
    StoreUnavailableError,
    TrimsError,
)
from ._lease import function, open
from ._manifest import ModelInfo
from ._reader import ReadStats
from ._store import ModelStore
from .actors.node_cache import TenantStats, TierStats

__all__ = [
    "init",
    "register",
    "list_models",
    "function",
    "open",
    "prefetch",
    "evict",
    "stats",
    "scrub",
    "shutdown",
    "Cluster",
    "ClusterStats",
    "NodeStats",
    "TierStats",
    "TenantStats",
    "CacheConfig",
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
