"""What the node cache tells others, in consistent snapshots taken under its lock: the tiers'
counters, per-tenant usage, lease and pin counts, the callers holding leases, and the report
placement ranks nodes by. A mixin of ``node_cache.NodeCache`` (it reads the cache's lock, tiers
and tables, and changes nothing), kept apart so that the cache's module holds its logic alone.
"""

from __future__ import annotations

from .._protocol import DISK, HOST, Caller, TenantStats, TierStats
from .quotas import tenant_stats

__all__ = ["NodeCacheViews"]


class NodeCacheViews:
    """Read-only views of a ``NodeCache`` (see the module's doc)."""

    def stats(self) -> dict[str, TierStats]:
        """A snapshot of both tiers' counters; host bytes include loads in flight."""
        with self._lock:
            return {
                HOST: TierStats(**vars(self.host.stats)),
                DISK: TierStats(**vars(self.disk.stats)),
            }

    def tenant_stats(self, tenant: str | None = None) -> dict[str, TenantStats]:
        """Per tenant: bytes held per tier, quotas, and refusals met here; only ``tenant``'s
        entry when given (what a tenant may see of this node), else every tenant known here."""
        with self._lock:
            return tenant_stats(self.host, self.disk, self._refusals, self.quota, tenant)

    def leases(self) -> int:
        """Leases held by tasks and callers (processes' pins are counted by ``pinned``)."""
        with self._lock:
            return len(self._leases) - len(self.pins)

    def pinned(self) -> int:
        with self._lock:
            return len(self.pins)

    @property
    def _released_early(self) -> dict[str, float]:
        """Caller ids released before their grant, still remembered (tests check they go)."""
        with self._lock:
            return self._leases.released_early()

    def callers(self, older_than_s: float) -> set[str]:
        """Ids of the Callers holding leases granted more than ``older_than_s`` ago (whose
        liveness the actor checks with placement)."""
        with self._lock:
            return {holder.id for holder in self._leases.holders(older_than_s) if isinstance(holder, Caller)}

    def report(self) -> dict:
        """What placement needs of this node, in one consistent snapshot: the best tier of every
        blob here ("host", "loading" or "disk"), host budget and use, leases per blob, and one
        (tenant, name, nbytes) per blob so that placement can ask another node for a copy, and
        what a load here could evict, in order, with each model's recent uses."""
        with self._lock:
            residency, models, in_flight = self.host.report()
            return {
                "residency": {**{key: DISK for key in self.disk.sizes}, **residency},
                "host_capacity": self.host_budget,
                "host_used": self.host.used,
                "in_flight": in_flight,
                "models": models,
                "evictable": self.host.evictable(),
            }
