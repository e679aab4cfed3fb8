"""Tenant quotas: how the host tier (``host_tier.HostTier``) and the disk tier
(``disk_tier.DiskTier``) tell the one admission sequence (``policy.admission``) a tenant's share
of their bytes. Cache core, no Ray; the node cache (``node_cache.NodeCache``) decides each
tenant's quota.
"""

from __future__ import annotations

from ..policy import Quota

__all__ = ["tenant_of", "tenant_quota"]


def tenant_of(key: str) -> str:
    """The tenant of a cache key (``<tenant>/<sha256>``, see ``_protocol.cache_key``)."""
    return key.split("/", 1)[0]


def tenant_quota(tenant: str, limit: int | None, used: int) -> Quota | None:
    """``tenant``'s quota in a tier as the admission sequence takes it: ``limit`` bytes, of
    which it holds ``used``, over the cache keys of that tenant; None when no quota applies."""
    if limit is None:
        return None
    return Quota(limit, used, lambda key: tenant_of(key) == tenant)
