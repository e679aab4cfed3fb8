"""The node cache actor: a thin Ray wrapper that gives NodeCache shared memory and a lease reaper.

One per node, named ``trims_ray:node:<node id>`` in namespace "trims_ray", pinned to its node,
detached so that cached models outlive the job that loaded them. It owns every host-tier object
(``ray.put`` from this actor), so an object lives as long as the actor keeps its reference.
"""

from __future__ import annotations

import threading
from dataclasses import asdict

import numpy as np
import ray

from .._config import CacheConfig
from .._store import ModelStore
from .node_cache import Grant, Holder, NodeCache

__all__ = ["NAMESPACE", "node_actor_name", "NodeCacheServer"]

NAMESPACE = "trims_ray"


def node_actor_name(node_id: str) -> str:
    return f"trims_ray:node:{node_id}"


class _PlasmaMemory:
    """HostMemory on the node's object store: one object per model, owned by this actor."""

    def publish(self, buffer: np.ndarray) -> ray.ObjectRef:
        # A numpy array comes back from ray.get as a zero-copy, read-only view of plasma.
        return ray.put(buffer)


class NodeCacheServer:
    """Ray actor body around NodeCache (made remote with ``ray.remote(...)`` at the call site).

    Args:
        node_id: the node this actor serves (hex).
        store_uri: the model store's URI.
        storage_options: fsspec options for the store.
        config: tier budgets and policy.
    """

    def __init__(self, node_id: str, store_uri: str, storage_options: dict | None, config: CacheConfig) -> None:
        self.node_id = node_id
        self.config = config
        # Looked up once: the node's object store size and its raylet's address do not change.
        self._node = _node_info(node_id)
        host_budget = config.host_bytes
        if host_budget is None:
            host_budget = int(self._node["Resources"].get("object_store_memory", 0) * config.host_fraction)
        self.cache = NodeCache(
            store=ModelStore(store_uri, storage_options=storage_options),
            memory=_PlasmaMemory(),
            host_budget=host_budget,
            disk_dir=config.disk_path(node_id),
            disk_budget=config.disk_bytes,
            policy=config.policy,
            manifest_ttl_s=config.manifest_ttl_s,
        )
        self._stop = threading.Event()
        threading.Thread(target=self._reap_forever, name="trims-lease-reaper", daemon=True).start()

    def _reap_forever(self) -> None:
        while not self._stop.wait(self.config.lease_check_s):
            self.cache.reap()

    def ping(self) -> str:
        return self.node_id

    def claim(self, lease_id: int, holder: Holder) -> bool:
        return self.cache.claim(lease_id, holder)

    def acquire(self, name: str, tenant: str, holder: Holder | None) -> dict:
        grant: Grant = self.cache.acquire(name, tenant, holder)
        # The ref travels inside a list so that Ray hands the caller the ref, not the value.
        return {
            "lease_id": grant.lease_id,
            "refs": [grant.handle],
            "manifest": grant.manifest,
            "offset": grant.offset,
            "tier": grant.tier,
        }

    def drain(self) -> None:
        """Waits until disk copies of earlier loads are written (for tests and benchmarks)."""
        self.cache.drain()

    def release(self, lease_id: int) -> bool:
        return self.cache.release(lease_id)

    def prefetch(self, name: str, tenant: str, tier: str) -> str:
        return self.cache.prefetch(name, tenant, tier)

    def evict(self, name: str, tenant: str, tier: str | None) -> dict[str, str]:
        return self.cache.evict(name, tenant, tier)

    def stats(self) -> dict:
        return {
            "tiers": {t: asdict(s) for t, s in self.cache.stats().items()},
            "leases": self.cache.leases(),
            "object_store_bytes_used": object_store_bytes_used(self._node),
        }


def _node_info(node_id: str) -> dict:
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node
    raise RuntimeError(f"node {node_id} is not in the cluster")


def object_store_bytes_used(node: dict) -> int:
    """Bytes in use in the node's object store, as its raylet reports them (all objects, ours
    and everyone else's): the figure that shows whether an eviction really freed memory."""
    # Ray has no public per-node store API; this is the call `ray memory --stats-only` makes.
    from ray._private.internal_api import node_stats

    reply = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"], include_memory_info=False)
    return int(reply.store_stats.object_store_bytes_used)
