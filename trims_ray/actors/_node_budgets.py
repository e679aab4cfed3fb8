"""A node's tier budgets and tenant quotas changed while it runs: a mixin of
``node_cache_actor.NodeCacheActor`` (``trims_ray.set_budget`` and ``set_quota`` call it on every
node asked), kept apart so that the actor's module
holds its load path alone. It uses the actor's node, config, cache and GPU holders.

Calls are ordered by their turns (see ``_budgets``): a tier's budget, or a tenant's quota,
changes only for a turn at least as high as the last this node was asked for, or read from the
records when it started, so that a call that began earlier and reaches this node later changes
nothing here.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import ray

from .._config import check_budget
from .._protocol import HOST
from ..cache.gpu_entry import check_fits_device
from ..cache.gpu_tier import GPU
from ._budgets import TIERS, Recorded, quota_subject
from ._node_info import bypass_budget, check_host_budget

__all__ = ["NodeBudgetCalls"]


class NodeBudgetCalls:
    """``set_budget``, ``check_budget_fits`` and ``set_quota`` of the node cache actor (see the
    module's doc)."""

    def _remember_budget_records(self, recorded: dict[str, Recorded]) -> None:
        """Takes the turns of the budget records this cache started with (``with_recorded_budgets``)."""
        self._budget_turns = {subject: record.turn for subject, record in recorded.items()}
        # The GPU budget per GPU that holds here, as the holders read it from the same records.
        self._gpu_budget = recorded["gpu"].nbytes if "gpu" in recorded else self.config.gpu_bytes
        # A turn is checked and applied as one step; tiers do not wait for each other, nor
        # quotas (a lock per quota subject, made on first use) for them.
        self._budget_locks = {tier: threading.Lock() for tier in TIERS}

    def check_budget_fits(self, tier: str, nbytes: int) -> None:
        """Raises ValueError, changing nothing, when this node cannot take ``nbytes`` as the
        budget of ``tier``: not a non-negative int, a host budget above its object store, or a
        GPU budget above one of its GPUs' memory. ``trims_ray.set_budget`` asks every node
        first, so that a budget one node refuses changes none."""
        check_budget(nbytes, f"the {tier} budget")
        if tier == HOST:
            check_host_budget(self._node, nbytes)
        elif tier == GPU:
            for label, gpu in self._gpu_stats()["gpus"].items():
                if gpu["enabled"]:
                    check_fits_device(nbytes, gpu["device"]["total"], label)

    def set_budget(self, tier: str, nbytes: int, turn: int = 0) -> dict[str, int]:
        """Changes a tier's byte budget on this node now (``NodeCache.set_budget``; for "gpu",
        each GPU holder's, ``GpuTier.set_budget``, summed over the GPUs). The caller records it
        for caches that start later (``_budgets``). ``turn``: the call's (``claim_turn``); one
        below the last this node was asked for (applied or refused) changes nothing, and the
        figures returned are the tier's as it stands ("evicted": 0).

        Raises:
            ValueError: an unknown tier, a budget that is not a non-negative int, a host budget
                above the node's object store, or a GPU budget above a GPU's memory.
        """
        if tier not in TIERS:  # the locks also hold quota subjects
            raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
        with self._budget_locks[tier]:  # the evictions it waits for take up to ``reclaim_wait_s``
            if turn < self._budget_turns.get(tier, 0):
                return self._budget_now(tier)
            # Taken even if this node refuses the budget below (a node that joined with a
            # smaller object store keeps its own): an earlier call must not apply here after it.
            self._budget_turns[tier] = turn
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
                return result
            finally:
                self.cache.give_back_memory()  # what the evicted models' loads left behind
                self._send_report()  # placement knows before the caller's set_budget() returns

    def set_quota(self, tenant: str, tier: str, nbytes: int | None, turn: int = 0) -> dict[str, int | None]:
        """Sets ``tenant``'s quota in ``tier`` on this node now (``NodeCache.set_quota``; None
        drops it, so that its share of the budget holds). ``turn`` as for ``set_budget``: a
        call older than the last this node was asked for changes nothing, and answers with the
        quota as it stands.

        Raises:
            ValueError: an unknown tier or a quota that is neither None nor a non-negative int.
            TypeError / ValueError: an invalid tenant id.
        """
        subject = quota_subject(tenant, tier)
        with self._budget_locks.setdefault(subject, threading.Lock()):
            if turn < self._budget_turns.get(subject, 0):
                return self.cache.quota_figures(tenant, tier)
            self._budget_turns[subject] = turn  # as for a budget: taken even if refused
            try:
                return self.cache.set_quota(tenant, tier, nbytes)
            finally:
                self.cache.give_back_memory()
                self._send_report()

    def _budget_now(self, tier: str) -> dict[str, int]:
        """``set_budget``'s figures for ``tier`` as it stands, nothing evicted."""
        if tier == GPU:
            per_gpu = [gpu["tiers"][GPU] for gpu in self._gpu_stats()["gpus"].values() if gpu["enabled"]]
            used = sum(t["bytes_used"] for t in per_gpu)
            over = sum(max(0, t["bytes_used"] - t["capacity"]) for t in per_gpu)
            budget = self._gpu_budget if self._gpu_budget is not None else (per_gpu[0]["capacity"] if per_gpu else 0)
            return {"budget": budget, "bytes_used": used, "evicted": 0, "over_budget": over,
                    "gpus": len(self._gpu_holders)}
        tier_stats = self.cache.stats()[tier]
        used, budget = tier_stats.bytes_used, tier_stats.capacity
        return {"budget": budget, "bytes_used": used, "evicted": 0, "over_budget": max(0, used - budget)}

    def _set_gpu_budget(self, nbytes: int) -> dict[str, int]:
        """Each GPU's budget (``nbytes`` per GPU), the figures summed over the node's GPUs;
        "gpus": how many were set (0 where the GPU tier is off: nothing to change, and the
        caller's record still reaches a holder that starts later). A budget one GPU cannot
        hold changes none."""
        self.check_budget_fits(GPU, nbytes)
        results = ray.get([h.set_budget.remote(nbytes) for h in self._gpu_holders.values()])
        self.config = replace(self.config, gpu_bytes=nbytes)
        self._gpu_budget = nbytes
        summed = {field: sum(r[field] for r in results) for field in ("bytes_used", "evicted", "over_budget")}
        return {"budget": nbytes, **summed, "gpus": len(results)}
