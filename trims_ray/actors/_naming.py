"""The names of trims_ray's actors, and finding them: one place for both.

Every actor lives in namespace "trims_ray" under a name derived from what it serves (a node, a
GPU, the cluster), so any process finds the same actor by name. Lookups of the node caches and
of placement are cached per process; a handle whose actor died is dropped with
``forget_node_actor`` and found again on the next lookup. Imports nothing of trims_ray but its
errors, so that every layer above may use it.
"""

from __future__ import annotations

import threading

import ray

from .._errors import TrimsError

__all__ = [
    "NAMESPACE",
    "PLACEMENT_NAME",
    "node_actor_name",
    "gpu_holder_name",
    "node_actor",
    "placement_actor",
    "forget_node_actor",
    "remember_node_actors",
    "forget_node_actors",
    "our_actor_names",
]

NAMESPACE = "trims_ray"
PLACEMENT_NAME = "trims_ray:placement"

_lock = threading.Lock()
_node_actors: dict[str, ray.actor.ActorHandle] = {}


def node_actor_name(node_id: str) -> str:
    return f"trims_ray:node:{node_id}"


def gpu_holder_name(node_id: str, label: str) -> str:
    """The holder of Ray's GPU ``label`` (what ``ray.get_gpu_ids()`` says in a task) on a node."""
    return f"trims_ray:gpu:{node_id}:{label}"


def node_actor(node_id: str | None = None) -> ray.actor.ActorHandle:
    """The cache actor of ``node_id`` (default: the node this process runs on).

    Raises:
        TrimsError: Ray is not initialized, or the node has no trims_ray cache.
    """
    if not ray.is_initialized():
        raise TrimsError("Ray is not initialized: call trims_ray.init() first")
    node_id = node_id or ray.get_runtime_context().get_node_id()
    with _lock:
        handle = _node_actors.get(node_id)
    if handle is None:
        try:
            handle = ray.get_actor(node_actor_name(node_id), namespace=NAMESPACE)
        except ValueError:
            raise TrimsError(
                f"node {node_id} has no trims_ray cache: call trims_ray.init() in the driver first"
            ) from None
        with _lock:
            _node_actors[node_id] = handle
    return handle


def placement_actor() -> ray.actor.ActorHandle:
    """The cluster's placement actor.

    Raises:
        TrimsError: Ray is not initialized, or trims_ray is not running on this cluster.
    """
    if not ray.is_initialized():
        raise TrimsError("Ray is not initialized: call trims_ray.init() first")
    try:
        return ray.get_actor(PLACEMENT_NAME, namespace=NAMESPACE)
    except ValueError:
        raise TrimsError("trims_ray is not running on this cluster: call trims_ray.init() first") from None


def remember_node_actors(handles: dict[str, ray.actor.ActorHandle]) -> None:
    """Caches the handles of node caches this process just started or found, by node id."""
    with _lock:
        _node_actors.update(handles)


def forget_node_actors() -> None:
    """Drops every cached node-cache handle (trims_ray was shut down)."""
    with _lock:
        _node_actors.clear()


def forget_node_actor(node_id: str | None = None) -> None:
    """Drops a cached actor handle (after its actor died), so the next lookup finds the new one."""
    node_id = node_id or ray.get_runtime_context().get_node_id()
    with _lock:
        _node_actors.pop(node_id, None)


def our_actor_names() -> list[str]:
    """The names of every trims_ray actor alive on the cluster."""
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE and a["name"].startswith("trims_ray:")
    ]
