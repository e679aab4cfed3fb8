"""The GPU side of a node's cache actor: a mixin of ``node_cache_actor.NodeCacheActor`` that
starts a GPU holder per GPU Ray manages on the node (``gpu_tier_actor``) and hands them the
node-wide calls (stats, prefetch, evict), kept apart so that the actor's module holds
its host side alone. It uses the actor's node, config and ``_gpu_holders``.
"""

from __future__ import annotations

import logging
import os

import ray

from .._errors import TrimsError
from ..cache.gpu_tier import GPU
from .gpu_tier_actor import node_gpu_stats, start_gpu_tier_actors

__all__ = ["NodeGpus"]

log = logging.getLogger("trims_ray")


class NodeGpus:
    """The node cache actor's GPU holders (see the module's doc)."""

    def _start_gpu_tier(self, store_uri: str, storage_options: dict | None) -> tuple[dict, str]:
        """A GPU holder per GPU Ray manages on this node, or none and the reason the tier is off."""
        ray_gpus = int(self._node["Resources"].get("GPU", 0))
        if ray_gpus == 0:
            return {}, "no GPU on this node (Ray manages none)"
        try:
            return start_gpu_tier_actors(
                self.node_id,
                store_uri,
                storage_options,
                self.config.gpu_tier_config(),
                visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
                ray_gpus=ray_gpus,
            )
        except Exception as exc:  # the host tier works without it: say why in stats()
            log.warning("trims_ray: GPU tier off on node %s: %s", self.node_id, exc)
            return {}, f"GPU holders failed to start: {exc}"

    def _gpu_stats(self) -> dict:
        return node_gpu_stats(self._gpu_holders, self._gpu_off_reason)

    def _prefetch_gpu(self, name: str, tenant: str) -> str:
        """Swaps the model onto this node's GPU with the most free budget."""
        if not self._gpu_holders:
            raise TrimsError(f"cannot prefetch {name!r} to the GPU tier of node {self.node_id}: {self._gpu_off_reason}")
        per_gpu = self._gpu_stats()["gpus"]

        def room(label: str) -> int:
            tier = per_gpu[label]["tiers"][GPU]
            return tier["capacity"] - tier["bytes_used"] if per_gpu[label]["enabled"] else -1
        label = max(self._gpu_holders, key=room)
        return ray.get(self._gpu_holders[label].prefetch.remote(name, tenant))

    def _evict_gpu(self, name: str, tenant: str) -> str:
        """"evicted" if any GPU held it, "deferred" if one still leases it, else "absent"."""
        if not self._gpu_holders:
            return "absent"
        outcomes = ray.get([h.evict.remote(name, tenant) for h in self._gpu_holders.values()])
        for outcome in ("deferred", "evicted"):
            if outcome in outcomes:
                return outcome
        return "absent"
