"""A node's tier budgets changed while it runs: a mixin of ``node_cache_actor.NodeCacheActor``
(``trims_ray.set_budget`` calls it on every node asked), kept apart so that the actor's module
holds its load path alone. It uses the actor's node, config, cache, GPU holders, the turns of
the budgets it applied (``_budget_turns``, see ``_budgets``) and the lock they change under.
"""

from __future__ import annotations

from dataclasses import replace

import ray

from .._config import check_budget
from .._malloc import give_back_free_memory
from .._protocol import HOST
from ..cache.gpu_tier import GPU
from ._node_info import bypass_budget, check_host_budget

__all__ = ["NodeBudgetCalls"]


class NodeBudgetCalls:
    """``set_budget`` of the node cache actor (see the module's doc)."""

    def set_budget(self, tier: str, nbytes: int, turn: int = 0) -> dict[str, int]:
        """Changes a tier's byte budget on this node now (``NodeCache.set_budget``; for "gpu",
        each GPU holder's, ``GpuTier.set_budget``, summed over the GPUs). The caller records it
        for caches that start later (``_budgets``). ``turn``: the call's (``claim_turn``); one
        below the last this node applied to the tier changes nothing, and the figures returned
        are the tier's as that later call left it ("evicted": 0).

        Raises:
            ValueError: an unknown tier, a budget that is not a non-negative int, a host budget
                above the node's object store, or a GPU budget above a GPU's memory.
        """
        with self._budget_lock:  # the evictions it waits for take up to ``reclaim_wait_s``
            if turn < self._budget_turns.get(tier, 0):
                return self._budget_now(tier)
            try:
                if tier == GPU:
                    result = self._set_gpu_budget(nbytes)
                else:
                    if tier == HOST:
                        check_host_budget(self._node, nbytes)
                        result = self.cache.set_budget(HOST, nbytes, bypass_budget=bypass_budget(self._node, nbytes))
                    else:
                        result = self.cache.set_budget(tier, nbytes)
                    self.config = replace(self.config, **{f"{tier}_bytes": nbytes})
                self._budget_turns[tier] = turn
                return result
            finally:
                give_back_free_memory()  # what the evicted models' loads left in malloc's arenas
                self._send_report()  # placement knows before the caller's set_budget() returns

    def _budget_now(self, tier: str) -> dict[str, int]:
        """``set_budget``'s figures for ``tier`` as it stands, nothing evicted."""
        if tier == GPU:
            per_gpu = [g["tiers"][GPU] for g in self._gpu_stats()["gpus"].values() if g["enabled"]]
            used = sum(t["bytes_used"] for t in per_gpu)
            budget = per_gpu[0]["capacity"] if per_gpu else (self.config.gpu_bytes or 0)
            over = sum(max(0, t["bytes_used"] - t["capacity"]) for t in per_gpu)
            return {"budget": budget, "bytes_used": used, "evicted": 0, "over_budget": over, "gpus": len(per_gpu)}
        tier_stats = self.cache.stats()[tier]
        used, budget = tier_stats.bytes_used, tier_stats.capacity
        return {"budget": budget, "bytes_used": used, "evicted": 0, "over_budget": max(0, used - budget)}

    def _set_gpu_budget(self, nbytes: int) -> dict[str, int]:
        """Each GPU's budget (``nbytes`` per GPU), the figures summed over the node's GPUs;
        "gpus": how many were set (0 where the GPU tier is off: nothing to change, and the
        caller's record still reaches a holder that starts later)."""
        check_budget(nbytes, "the GPU budget")
        results = ray.get([h.set_budget.remote(nbytes) for h in self._gpu_holders.values()])
        self.config = replace(self.config, gpu_bytes=nbytes)
        summed = {field: sum(r[field] for r in results) for field in ("bytes_used", "evicted", "over_budget")}
        return {"budget": nbytes, **summed, "gpus": len(results)}
