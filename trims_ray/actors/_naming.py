"""The names of trims_ray's actors, and finding them: one place for both.

Every actor lives in namespace "trims_ray" under a name derived from what it serves (a node, a
GPU, the cluster), so any process finds the same actor by name. This module is also the one
per-process cache of their handles: a lookup is cached; a caller whose call found the actor dead
drops the handle (``forget_node_cache_actor``, ``forget_gpu_tier_actor``,
``forget_placement_actor``) and the next lookup finds the replacement; ``forget_all_actors``
(``trims_ray.shutdown``) drops them all. Imports nothing of trims_ray but its errors, so that
every layer above may use it.
"""

from __future__ import annotations

import threading

import ray

from .._errors import TrimsError

__all__ = [
    "NAMESPACE",
    "PLACEMENT_ACTOR_NAME",
    "node_cache_actor_name",
    "gpu_tier_actor_name",
    "node_cache_actor",
    "gpu_tier_actor",
    "placement_actor",
    "require_running",
    "remember_node_cache_actors",
    "forget_node_cache_actor",
    "forget_gpu_tier_actor",
    "forget_placement_actor",
    "forget_all_actors",
    "kill_actor",
    "our_actor_names",
]

NAMESPACE = "trims_ray"
PLACEMENT_ACTOR_NAME = "trims_ray:placement"

_lock = threading.Lock()
# The handle caches, by actor name. A handle of an actor Ray restarts stays valid; one of an
# actor killed and started again (a node cache replaced by placement, a new init) does not.
_handles: dict[str, ray.actor.ActorHandle] = {}


def _lookup(name: str) -> ray.actor.ActorHandle | None:
    """The actor named ``name`` (cached), or None when there is none."""
    with _lock:
        handle = _handles.get(name)
    if handle is None:
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return None
        with _lock:
            _handles[name] = handle
    return handle


def _forget(name: str) -> None:
    with _lock:
        _handles.pop(name, None)


def _require_ray() -> None:
    if not ray.is_initialized():
        raise TrimsError("Ray is not initialized: call trims_ray.init() first")


def node_cache_actor_name(node_id: str) -> str:
    return f"trims_ray:node:{node_id}"


def gpu_tier_actor_name(node_id: str, label: str) -> str:
    """The holder of Ray's GPU ``label`` (what ``ray.get_gpu_ids()`` says in a task) on a node."""
    return f"trims_ray:gpu:{node_id}:{label}"


def node_cache_actor(node_id: str | None = None) -> ray.actor.ActorHandle:
    """The cache actor of ``node_id`` (default: the node this process runs on).

    Raises:
        TrimsError: Ray is not initialized, or the node has no trims_ray cache.
    """
    _require_ray()
    node_id = node_id or ray.get_runtime_context().get_node_id()
    handle = _lookup(node_cache_actor_name(node_id))
    if handle is None:
        raise TrimsError(f"node {node_id} has no trims_ray cache: call trims_ray.init() in the driver first")
    return handle


def gpu_tier_actor(node_id: str, label: str) -> ray.actor.ActorHandle | None:
    """The GPU holder of Ray's GPU ``label`` on ``node_id``, or None: the node has none for it."""
    _require_ray()
    return _lookup(gpu_tier_actor_name(node_id, label))


def placement_actor() -> ray.actor.ActorHandle:
    """The cluster's placement actor.

    Raises:
        TrimsError: Ray is not initialized, or trims_ray is not running on this cluster.
    """
    _require_ray()
    handle = _lookup(PLACEMENT_ACTOR_NAME)
    if handle is None:
        raise TrimsError("trims_ray is not running on this cluster: call trims_ray.init() first")
    return handle


def require_running() -> None:
    """Raises unless trims_ray runs on this cluster now: asks Ray, not this process's cache (a
    worker may hold the handle of a placement actor that a shutdown has since killed).

    Raises:
        TrimsError: Ray is not initialized, or trims_ray is not running on this cluster.
    """
    _require_ray()
    try:
        ray.get_actor(PLACEMENT_ACTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        raise TrimsError("trims_ray is not running on this cluster: call trims_ray.init() first") from None


def remember_node_cache_actors(handles: dict[str, ray.actor.ActorHandle]) -> None:
    """Caches the handles of node caches this process just started or found, by node id."""
    with _lock:
        _handles.update({node_cache_actor_name(node): h for node, h in handles.items()})


def forget_node_cache_actor(node_id: str | None = None) -> None:
    """Drops a node cache's handle (its actor died), so the next lookup finds the new one."""
    _forget(node_cache_actor_name(node_id or ray.get_runtime_context().get_node_id()))


def forget_gpu_tier_actor(node_id: str, label: str) -> None:
    """Drops a GPU holder's handle (its actor died)."""
    _forget(gpu_tier_actor_name(node_id, label))


def forget_placement_actor() -> None:
    """Drops the placement actor's handle (a call to it failed: it may be being replaced)."""
    _forget(PLACEMENT_ACTOR_NAME)


def forget_all_actors() -> None:
    """Drops every cached handle (trims_ray was shut down: its actors are gone)."""
    with _lock:
        _handles.clear()


def kill_actor(name: str) -> bool:
    """Kills the actor named ``name`` for good (no restart) and drops its handle; False when
    there is no such actor."""
    _forget(name)
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    except ValueError:
        return False
    return True


def our_actor_names() -> list[str]:
    """The names of every trims_ray actor alive on the cluster."""
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE and a["name"].startswith("trims_ray:")
    ]
