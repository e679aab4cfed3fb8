"""Changing a node's tier budgets and tenant quotas while it runs (``trims_ray.set_budget``,
``trims_ray.set_quota``): a mixin of
``node_cache.NodeCache`` (it uses the cache's lock, tiers, write-behind queue and pins), kept
apart so that the cache's module holds the load path alone. Each tier evicts for itself
(``HostTier.set_budget``, ``DiskTier.set_budget``); this waits for the copies processes were
asked to give back.
"""

from __future__ import annotations

from .._config import check_budget
from .._names import check_tenant
from .._protocol import DISK, HOST
from .pins import wait_until_gone

__all__ = ["NodeBudgets"]


class NodeBudgets:
    """``set_budget`` and ``set_quota`` of a ``NodeCache`` (see the module's doc)."""

    def set_budget(self, tier: str, nbytes: int, *, bypass_budget: int | None = None) -> dict[str, int]:
        """Changes the byte budget of ``tier`` ("host" or "disk") now, and with it every
        tenant's share of it (``tenant_share``; explicit quotas stay as they are).

        A higher budget only lets more in. A lower one evicts idle models in the policy's
        eviction order until the tier fits, and a tenant over its lowered share gives back its
        own idle models: host copies that processes keep built are asked back and waited for
        (``reclaim_wait_s``). What is leased stays until its leases end;
        until then the tier holds more than its budget (``over_budget``), and no miss is kept
        before that excess is freed. ``bypass_budget``: the host tier's new bypass allowance
        (the actor's share of the object store outside the new budget); None: unchanged.

        Returns:
            {"budget", "bytes_used" (after the evictions), "evicted" (models evicted by this
            call, those given back by processes included), "over_budget" (bytes held beyond
            the budget: by leases, copies on their way out, or for the disk tier writes queued
            before the change; 0 when the tier fits)}.

        Raises:
            ValueError: an unknown tier or a budget that is not a non-negative int.
        """
        if tier not in (HOST, DISK):
            if tier == "gpu":
                raise ValueError("tier 'gpu': the node cache holds the host and disk tiers; GPU budgets are its GPU holders'")
            raise ValueError(f"tier must be {HOST!r} or {DISK!r}, got {tier!r}")
        check_budget(nbytes, f"the {tier} budget")
        with self._lock:
            if tier == HOST:
                self.host_budget = nbytes
                if self._queue_follows_host:
                    self._disk_copies.max_bytes = nbytes
                evicted, asked = self.host.set_budget(nbytes, bypass_budget)
            else:
                self.disk_budget = nbytes
                evicted, asked = self.disk.set_budget(nbytes), []
            if self.tenant_share < 1.0:  # every share followed the budget
                tier_of = self.host if tier == HOST else self.disk
                for tenant in sorted(tier_of.tenants()):
                    more, more_asked = self._fit_tenant(tenant, tier)
                    evicted, asked = evicted + more, asked + more_asked
        evicted += self._given_back(asked)
        with self._lock:
            used = self.host.used if tier == HOST else self.disk.used
        return {"budget": nbytes, "bytes_used": used, "evicted": evicted, "over_budget": max(0, used - nbytes)}

    def set_quota(self, tenant: str, tier: str, nbytes: int | None) -> dict[str, int | None]:
        """Sets ``tenant``'s quota in ``tier`` ("host" or "disk") to ``nbytes`` now, in place of
        the one it was given (``tenant_quotas``); None drops its explicit quota, so that
        ``tenant_share`` of the budget holds again. A lower quota than the tenant holds evicts
        its idle models in the policy's eviction order until it fits, as a lower budget does
        (``set_budget``); other tenants' models never go for it. Disk copies being written go
        when they land, if the quota cannot take them then (``DiskTier.adopt``).

        Returns:
            ``quota_figures`` after the evictions, "evicted" counting them.

        Raises:
            ValueError: an unknown tier, or a quota that is neither None nor a non-negative int.
            TypeError / ValueError: an invalid tenant id.
        """
        check_tenant(tenant)
        if tier not in (HOST, DISK):
            raise ValueError(f"tier must be {HOST!r} or {DISK!r} (the GPU tier has no per-tenant quota), got {tier!r}")
        if nbytes is not None:
            check_budget(nbytes, f"the {tier} quota of tenant {tenant!r}")
        with self._lock:
            quotas = self.tenant_quotas.setdefault(tenant, {})
            if nbytes is None:
                quotas.pop(tier, None)
            else:
                quotas[tier] = nbytes
            if not quotas:
                del self.tenant_quotas[tenant]
            evicted, asked = self._fit_tenant(tenant, tier)
        evicted += self._given_back(asked)
        return self.quota_figures(tenant, tier, evicted)

    def quota_figures(self, tenant: str, tier: str, evicted: int = 0) -> dict[str, int | None]:
        """{"quota" (the bytes ``tenant`` may hold in ``tier`` now; None: only the budget limits
        it), "bytes_used" (the tenant's, loads and disk writes in flight included), "evicted",
        "over_quota" (bytes held beyond the quota: by leases, copies on their way out, loads or
        disk writes in flight; 0 when it fits)}."""
        with self._lock:
            limit = self.quota(tenant, tier)
            used = (self.host if tier == HOST else self.disk).tenant_used(tenant)
        return {"quota": limit, "bytes_used": used, "evicted": evicted,
                "over_quota": 0 if limit is None else max(0, used - limit)}

    def _fit_tenant(self, tenant: str, tier: str) -> tuple[int, list]:
        """Evicts ``tenant``'s idle models in ``tier`` until it fits its quota (none: nothing);
        returns (models freed now, host copies asked back). Call under the lock."""
        limit = self.quota(tenant, tier)
        if limit is None:
            return 0, []
        if tier == HOST:
            return self.host.fit_tenant(tenant, limit)
        return self.disk.fit_tenant(tenant, limit), []

    def _given_back(self, asked: list) -> int:
        """Waits for the host copies processes were asked to give back (``reclaim_wait_s`` at
        most; call without the lock); returns how many are gone."""
        if not asked:
            return 0
        wait_until_gone(asked, self._gone, self.reclaim_wait_s)
        return sum(1 for entry in asked if self._gone(entry))
