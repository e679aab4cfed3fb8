"""Tenant quotas: the one rule by which the host tier (``host_tier.HostTier``) and the disk tier
(``disk_tier.DiskTier``) keep a tenant within its share of a tier's bytes. Cache core, no Ray;
the node cache (``node_cache.NodeCache``) decides each tenant's quota.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..policy import EvictionPolicy, choose_victims

__all__ = ["tenant_of", "victims_within_quota"]


def tenant_of(key: str) -> str:
    """The tenant of a cache key (``<tenant>/<sha256>``, see ``_protocol.cache_key``)."""
    return key.split("/", 1)[0]


def victims_within_quota(
    policy: EvictionPolicy,
    tenant: str,
    need: int,
    quota: int | None,
    used: int,
    sizes: Mapping[str, int],
    evictable: Callable[[str], bool],
) -> list[str] | None:
    """The tenant's own victims that bring it back within ``quota`` once ``need`` more bytes are
    in: ``[]`` when no quota applies or it fits, None when even all its evictable entries are
    not enough (or ``need`` alone is over the quota)."""
    if quota is None or used + need <= quota:
        return []
    if need > quota:
        return None
    mine = {k: n for k, n in sizes.items() if tenant_of(k) == tenant}
    return choose_victims(policy, used + need - quota, 0, mine, lambda k: k in mine and evictable(k))
