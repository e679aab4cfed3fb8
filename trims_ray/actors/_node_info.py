"""What a node cache actor reads of its node from Ray: the node's entry (resources, raylet
address), the bytes its object store has in use, and the share of that store bypassed misses
may use. Ray-side helpers of ``node_cache_actor``, apart so that the actor's module holds the
actor alone.
"""

from __future__ import annotations

import ray

__all__ = ["alive_nodes", "bypass_budget", "check_host_budget", "node_info", "object_store_bytes_used"]


def alive_nodes() -> set[str]:
    """The ids of the nodes Ray lists as alive."""
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def bypass_budget(node: dict, host_budget: int) -> int:
    """Object store bytes that the shared copies of misses the host tier does not keep may hold
    (NodeCache's ``bypass_budget``): half of what the host budget leaves of the node's store. The
    other half stays for tasks' own objects; beyond it a bypassed miss is read by its task, as
    its private copy, as before."""
    store = int(node["Resources"].get("object_store_memory", 0))
    return max(0, store - host_budget) // 2


def check_host_budget(node: dict, nbytes: object) -> None:
    """Raises ValueError when a host budget of ``nbytes`` cannot fit ``node``'s object store,
    where the host tier lives (other checks of the value are the node cache's)."""
    store = int(node["Resources"].get("object_store_memory", 0))
    if type(nbytes) is int and nbytes > store:
        raise ValueError(
            f"a host budget of {nbytes} bytes exceeds the {store}-byte object store of node "
            f"{node['NodeID']}: the host tier lives in it"
        )


def node_info(node_id: str) -> dict:
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
