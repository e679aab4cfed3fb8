"""trims_ray: a multi-tier model cache for DNN inference on Ray.

One copy of each model per node, shared zero-copy by every process, kept in GPU memory, host
shared memory, local disk and a cloud store. ``__all__`` is the public contract of DESIGN.md;
everything in underscore modules may change.
"""

import importlib
from typing import TYPE_CHECKING

# Where each public name is defined. They are imported on first use (PEP 562), so that
# `import trims_ray` (and any `trims_ray.<module>`) stays cheap and works where Ray is not
# installed: Ray and torch load with the first name that needs them.
_PUBLIC = {
    "list_models": "_api",
    "register": "_api",
    "Cluster": "_cluster",
    "ClusterStats": "_cluster",
    "NodeStats": "_cluster",
    "evict": "_cluster",
    "init": "_cluster",
    "prefetch": "_cluster",
    "scrub": "_cluster",
    "set_budget": "_cluster",
    "set_quota": "_cluster",
    "shutdown": "_cluster",
    "stats": "_cluster",
    "CacheConfig": "_config",
    "ReadOptions": "_config",
    "AccessDeniedError": "_errors",
    "CapacityError": "_errors",
    "IntegrityError": "_errors",
    "ModelFormatError": "_errors",
    "ModelNotFoundError": "_errors",
    "StoreUnavailableError": "_errors",
    "TrimsError": "_errors",
    "function": "_lease",
    "open": "_lease",
    "ModelInfo": "_manifest",
    "TenantStats": "_protocol",
    "TierStats": "_protocol",
    "ReadStats": "_reader",
    "ModelStore": "_store",
}

if TYPE_CHECKING:  # what type checkers and IDEs see
    from ._api import list_models, register
    from ._cluster import (
        Cluster,
        ClusterStats,
        NodeStats,
        evict,
        init,
        prefetch,
        scrub,
        set_budget,
        set_quota,
        shutdown,
        stats,
    )
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
    from ._protocol import TenantStats, TierStats
    from ._reader import ReadStats
    from ._store import ModelStore


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'trims_ray' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


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
    "set_budget",
    "set_quota",
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
