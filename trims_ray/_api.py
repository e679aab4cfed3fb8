"""The public functions of trims_ray that work without a Ray cluster: choosing the store and the
caller's tenant, ``register`` and ``list_models``, and the tenant checks every API path makes.

The caller's store and tenant are process-wide: ``trims_ray.init`` will set them (next to the Ray
connection); until then they come from ``$TRIMS_RAY_STORE`` and ``$TRIMS_RAY_TENANT``. A caller
may name its own tenant or "public", never another: that is an AccessDeniedError, counted (with
not-found names) per tenant by the node cache of the caller's node (``note_refusal``).

The tenant travels with the work: a decorated task runs as the tenant that submitted it
(``acting_as``), and every task of a job whose driver gave ``init`` a tenant acts as that tenant
(``publish_job_tenant``), even when ``ray.init`` came first and the job's runtime_env does not
carry ``$TRIMS_RAY_TENANT``: a worker must never fall back to "default" and open its models.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ._config import caller_tenant_from_env, default_store_uri
from ._errors import AccessDeniedError
from ._manifest import ModelInfo
from ._names import DEFAULT_TENANT, PUBLIC_TENANT, check_tenant
from ._store import ModelStore

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "register",
    "list_models",
    "current_store",
    "caller_tenant",
    "acting_tenant",
    "tenant_for_write",
    "note_refusal",
    "set_session",
    "acting_as",
    "publish_job_tenant",
    "session_store",
]

log = logging.getLogger("trims_ray")

_lock = threading.Lock()
_session: dict[str, object] = {"store": None, "tenant": None}
_stores: dict[tuple[str, str], ModelStore] = {}
# The tenant of the task running in this context (a decorated task's submitter): a ContextVar, so
# that it ends with the task and never leaks into the next task a reused worker runs.
_task_tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("trims_ray_task_tenant", default=None)
# Where a driver records the tenant its init was given, per Ray job, for the job's workers.
_KV_NAMESPACE = "trims_ray"


def set_session(store: ModelStore | None, tenant: str | None) -> None:
    """Makes ``store`` and ``tenant`` this process's (``init``); None and None forget them, and
    the stores opened so far (``shutdown``: a later ``init`` may name other storage options)."""
    _session["store"] = store
    _session["tenant"] = tenant
    if store is None:
        with _lock:
            _stores.clear()


def session_store() -> ModelStore | None:
    """The store ``init`` opened in this process (with the options it was given), or None."""
    store = _session["store"]
    return store if isinstance(store, ModelStore) else None


def current_store() -> ModelStore:
    """The store of this process: the one ``init`` chose, else the default store."""
    store = session_store()
    return store if store is not None else store_for(default_store_uri(), None)


def store_for(uri: str, storage_options: dict | None) -> ModelStore:
    """The store at ``uri``, one instance per URI and options in this process (so that its
    reachability check runs once)."""
    key = (uri, repr(sorted((storage_options or {}).items())))
    with _lock:
        if key not in _stores:
            _stores[key] = ModelStore(uri, storage_options=storage_options)
        return _stores[key]


def caller_tenant() -> str:
    """The tenant this caller acts as: the submitter's, in a decorated task (``acting_as``); else
    ``init(tenant=...)`` of this process; else ``$TRIMS_RAY_TENANT`` of this process (an actor
    given its own tenant in its runtime_env keeps it); else, in a worker, the tenant its job's
    driver gave ``init`` (``publish_job_tenant``); else "default"."""
    tenant = (
        _task_tenant.get()
        or _session["tenant"]
        or caller_tenant_from_env()
        or _job_tenant()
        or DEFAULT_TENANT
    )
    return check_tenant(tenant)


@contextlib.contextmanager
def acting_as(tenant: str) -> Iterator[str]:
    """Makes ``caller_tenant()`` return ``tenant`` in this context until the block ends (a
    decorated task runs its function, ``open`` and nested invocations as its submitter)."""
    token = _task_tenant.set(check_tenant(tenant))
    try:
        yield tenant
    finally:
        _task_tenant.reset(token)


def publish_job_tenant(tenant: str | None) -> None:
    """Records (or, with None, forgets) ``tenant`` as the tenant of this driver's Ray job, where
    the job's workers read it (``caller_tenant``). Called by ``init`` and ``shutdown``."""
    from ray.experimental import internal_kv  # imports Ray: only a driver on a cluster gets here

    key = _job_key()
    if key is None:
        return
    if tenant is None:
        internal_kv._internal_kv_del(key, namespace=_KV_NAMESPACE)
    else:
        internal_kv._internal_kv_put(key, check_tenant(tenant), namespace=_KV_NAMESPACE)


def _job_key() -> str | None:
    import ray

    if not ray.is_initialized():
        return None
    return f"tenant/{ray.get_runtime_context().get_job_id()}"


def _job_tenant() -> str | None:
    """The tenant the driver of this worker's job gave ``init``, or None (not a Ray worker, or
    the driver named none: then ``$TRIMS_RAY_TENANT``, which its runtime_env may carry).

    Read from Ray's KV store on every call (a GCS round trip), never cached: a reused worker
    must follow a driver that re-inits as another tenant. Decorated tasks do not get here."""
    import sys

    if "ray" not in sys.modules:  # no Ray in this process: not a worker
        return None
    import ray

    if not ray.is_initialized() or ray._private.worker.global_worker.mode != ray.WORKER_MODE:
        return None  # a driver's tenant is its own session's or environment's
    from ray.experimental import internal_kv

    key = _job_key()
    value = internal_kv._internal_kv_get(key, namespace=_KV_NAMESPACE) if key else None
    return value.decode() if value else None


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
        AccessDeniedError: ``tenant`` names another tenant, or ``tenant`` is "public" and
            another tenant published a model of that name (only its owner replaces it).
        ModelFormatError: malformed safetensors, weights that do not fit the factory, or a
            module a task would not rebuild exactly (the tensors are named).
        StoreUnavailableError: the store cannot be reached or written.
    """
    acting = tenant_for_write(tenant)
    own = caller_tenant()
    try:
        return current_store().register(
            name, weights, tenant=acting, factory=factory, example_input=example_input, owner=own
        )
    except AccessDeniedError:  # a public name another tenant owns
        note_refusal("denied", own)
        raise


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
