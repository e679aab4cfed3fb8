"""The public functions of trims_ray that work without a Ray cluster: choosing the store and the
caller's tenant, and ``register``.

The caller's store and tenant are process-wide: ``trims_ray.init`` will set them (next to the Ray
connection); until then they come from ``$TRIMS_RAY_STORE`` and ``$TRIMS_RAY_TENANT``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from torch import nn

from ._config import caller_tenant_from_env, default_store_uri
from ._errors import AccessDeniedError
from ._manifest import ModelInfo
from ._names import DEFAULT_TENANT, PUBLIC_TENANT, check_tenant
from ._store import ModelStore

__all__ = ["register", "current_store", "caller_tenant", "tenant_for_write"]

_lock = threading.Lock()
_session: dict[str, object] = {"store": None, "tenant": None}
_stores: dict[tuple[str, str], ModelStore] = {}


def current_store() -> ModelStore:
    """The store of this process: the one ``init`` chose, else the default store."""
    store = _session["store"]
    if isinstance(store, ModelStore):
        return store
    return store_for(default_store_uri(), None)


def store_for(uri: str, storage_options: dict | None) -> ModelStore:
    """The store at ``uri``, one instance per URI and options in this process (so that its
    reachability check runs once)."""
    key = (uri, repr(sorted((storage_options or {}).items())))
    with _lock:
        if key not in _stores:
            _stores[key] = ModelStore(uri, storage_options=storage_options)
        return _stores[key]


def caller_tenant() -> str:
    """The tenant this process acts as: ``init(tenant=...)``, ``$TRIMS_RAY_TENANT``, or "default"."""
    tenant = _session["tenant"] or caller_tenant_from_env() or DEFAULT_TENANT
    return check_tenant(tenant)


def tenant_for_write(tenant: str | None) -> str:
    """The tenant a write goes to: the caller's own, or "public" when asked for.

    Raises:
        ValueError: ``tenant`` is not a valid tenant id.
        AccessDeniedError: ``tenant`` names another tenant.
    """
    own = caller_tenant()
    if tenant is None:
        return own
    check_tenant(tenant)
    if tenant not in (own, PUBLIC_TENANT):
        raise AccessDeniedError(
            f"tenant {own!r} cannot register models for tenant {tenant!r}: register for your own "
            "tenant (tenant=None) or share with tenant='public'"
        )
    return tenant


def register(
    name: str,
    weights: object,
    *,
    factory: str | Callable[[], nn.Module] | None = None,
    tenant: str | None = None,
) -> ModelInfo:
    """Registers a model's weights in the store, once, content-addressed by sha256.

    Args:
        name: the model's name (1-128 characters from ``A-Za-z0-9._-``).
        weights: an ``nn.Module``, a state dict of tensors, or the path/URI of a
            ``.safetensors`` file or of a directory of safetensors shards.
        factory: a zero-argument callable or "module:attr" string that builds the architecture;
            tasks then get an ``nn.Module``, otherwise a read-only state dict.
        tenant: None for the caller's own tenant, or "public" to share the model.

    Returns:
        ModelInfo with name, tenant, sha256 and nbytes.

    Raises:
        ValueError / TypeError: bad name, tenant, factory or weights.
        AccessDeniedError: ``tenant`` names another tenant.
        ModelFormatError: malformed safetensors, or weights that do not fit the factory.
        StoreUnavailableError: the store cannot be reached or written.
    """
    return current_store().register(name, weights, tenant=tenant_for_write(tenant), factory=factory)
