"""The public functions of trims_ray that work without a Ray cluster: choosing the store and the
caller's tenant, ``register`` and ``list_models``, and the tenant checks every API path makes.

The caller's store and tenant are process-wide: ``trims_ray.init`` will set them (next to the Ray
connection); until then they come from ``$TRIMS_RAY_STORE`` and ``$TRIMS_RAY_TENANT``. A caller
may name its own tenant or "public", never another: that is an AccessDeniedError, counted (with
not-found names) per tenant by the node cache of the caller's node (``note_refusal``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from torch import nn

from ._config import caller_tenant_from_env, default_store_uri
from ._errors import AccessDeniedError
from ._manifest import ModelInfo
from ._names import DEFAULT_TENANT, PUBLIC_TENANT, check_tenant
from ._store import ModelStore

__all__ = [
    "register",
    "list_models",
    "current_store",
    "caller_tenant",
    "acting_tenant",
    "tenant_for_write",
    "note_refusal",
    "set_session",
]

log = logging.getLogger("trims_ray")

_lock = threading.Lock()
_session: dict[str, object] = {"store": None, "tenant": None}
_stores: dict[tuple[str, str], ModelStore] = {}


def set_session(store: ModelStore | None, tenant: str | None) -> None:
    """Makes ``store`` and ``tenant`` this process's (``init``); None and None forget them, and
    the stores opened so far (``shutdown``: a later ``init`` may name other storage options)."""
    _session["store"] = store
    _session["tenant"] = tenant
    if store is None:
        with _lock:
            _stores.clear()


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


def acting_tenant(tenant: str | None, action: str) -> str:
    """The tenant a call acts as: the caller's own (``tenant`` None or its own id) or "public".

    Args:
        tenant: what the caller asked for.
        action: what the call does, for the message ("open models", "register models").

    Raises:
        ValueError / TypeError: ``tenant`` is not a valid tenant id.
        AccessDeniedError: ``tenant`` names another tenant (counted: ``note_refusal``).
    """
    own = caller_tenant()
    if tenant is None:
        return own
    check_tenant(tenant)
    if tenant not in (own, PUBLIC_TENANT):
        note_refusal("denied", own)
        raise AccessDeniedError(
            f"tenant {own!r} cannot {action} for tenant {tenant!r}: use your own tenant (the "
            "default) or 'public'"
        )
    return tenant


def tenant_for_write(tenant: str | None) -> str:
    """The tenant a write goes to: the caller's own, or "public" when asked for.

    Raises:
        ValueError: ``tenant`` is not a valid tenant id.
        AccessDeniedError: ``tenant`` names another tenant.
    """
    return acting_tenant(tenant, "register models")


def note_refusal(kind: str, tenant: str) -> None:
    """Counts a refusal met in this process ("not_found" or "denied") for ``tenant``, in the
    node cache of this process's node, when trims_ray runs on the cluster Ray is connected to.

    Fire and forget, and never raises: a refusal is already an error path, and without a
    cluster (``register`` needs none) it is only logged.
    """
    log.info("trims_ray: refused (%s) for tenant %s", kind, tenant)
    try:
        import ray

        if not ray.is_initialized():
            return
        from .actors._naming import node_cache_actor  # imports Ray: only where a refusal is counted

        node_cache_actor().count_refusal.remote(kind, tenant)
    except Exception as exc:  # no cache on this node, or trims_ray not running here
        log.debug("trims_ray: refusal not counted: %s", exc)


def register(
    name: str,
    weights: object,
    *,
    factory: str | Callable[[], nn.Module] | None = None,
    tenant: str | None = None,
    example_input: object = None,
) -> ModelInfo:
    """Registers a model's weights in the store, once, content-addressed by sha256.

    With a factory, registration builds the module the way a task will and compares every
    parameter and buffer with the source, bit for bit; it refuses a model it would not hand
    back exactly.

    Args:
        name: the model's name (1-128 characters from ``A-Za-z0-9._-``).
        weights: an ``nn.Module``, a state dict of tensors, or the path/URI of a
            ``.safetensors`` file or of a directory of safetensors shards. A Hugging Face
            directory (``config.json`` beside the weights) is read as transformers'
            ``from_pretrained`` reads it.
        factory: a zero-argument callable or "module:attr" string that builds the architecture;
            tasks then get an ``nn.Module``, otherwise a read-only state dict. A transformers
            model, or a Hugging Face directory, needs none: its config is the factory.
        tenant: None for the caller's own tenant, or "public" to share the model.
        example_input: an input (a tensor, a tuple of arguments or a mapping of keyword
            arguments) on which the rebuilt module's forward must also equal the source's.

    Returns:
        ModelInfo with name, tenant, sha256 and nbytes.

    Raises:
        ValueError / TypeError: bad name, tenant, factory or weights.
        AccessDeniedError: ``tenant`` names another tenant.
        ModelFormatError: malformed safetensors, weights that do not fit the factory, or a
            module a task would not rebuild exactly (the tensors are named).
        StoreUnavailableError: the store cannot be reached or written.
    """
    return current_store().register(
        name, weights, tenant=tenant_for_write(tenant), factory=factory, example_input=example_input
    )


def list_models(*, tenant: str | None = None) -> list[ModelInfo]:
    """The models the caller's tenant can see in its store: its own and the public ones.

    Args:
        tenant: None for the caller's own tenant, or "public" for the public models only.

    Raises:
        ValueError / TypeError: a bad tenant id.
        AccessDeniedError: ``tenant`` names another tenant.
        StoreUnavailableError: the store cannot be reached.
    """
    return current_store().list_models(tenant=acting_tenant(tenant, "list models"))
