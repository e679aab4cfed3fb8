"""Tenant quotas: how the host tier (``host_tier.HostTier``) and the disk tier
(``disk_tier.DiskTier``) tell the one admission sequence (``policy.admission``) a tenant's share
of their bytes. Cache core, no Ray; the node cache (``node_cache.NodeCache``) decides each
tenant's quota.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from .._protocol import DENIED, DISK, HOST, NOT_FOUND, TenantStats
from ..policy import Quota

__all__ = ["TenantUsage", "tenant_of", "tenant_quota", "tenant_stats", "tier_quota"]


class TenantUsage(Protocol):
    """What a tier (``HostTier``, ``DiskTier``) tells of its tenants."""

    quota_denied: dict[str, int]  # tenant -> admissions its quota refused

    def tenant_used(self, tenant: str) -> int: ...

    def tenants(self) -> set[str]: ...


def tenant_of(key: str) -> str:
    """The tenant of a cache key (``<tenant>/<sha256>``, see ``_protocol.cache_key``)."""
    return key.split("/", 1)[0]


def tier_quota(explicit: int | None, share: float, budget: int) -> int | None:
    """A tenant's bytes in a tier: its ``explicit`` quota there, else ``share`` of the tier's
    ``budget``; None when only the budget limits it (a share of 1)."""
    if explicit is not None:
        return explicit
    return None if share >= 1.0 else int(share * budget)


def tenant_quota(tenant: str, limit: int | None, used: int) -> Quota | None:
    """``tenant``'s quota in a tier as the admission sequence takes it: ``limit`` bytes, of
    which it holds ``used``, over the cache keys of that tenant; None when no quota applies."""
    if limit is None:
        return None
    return Quota(limit, used, lambda key: tenant_of(key) == tenant)


def tenant_stats(
    host: TenantUsage,
    disk: TenantUsage,
    refusals: Mapping[str, Mapping[str, int]],
    quota: Callable[[str, str], int | None],
    tenant: str | None = None,
) -> dict[str, TenantStats]:
    """Per tenant: bytes held in each tier, quotas (``quota(tenant, tier)``), and the refusals
    met (``refusals``: tenant -> {NOT_FOUND | DENIED: count}); only ``tenant``'s entry when
    given, else every tenant the tiers or the refusals know. The caller holds the tiers' lock."""
    known = host.tenants() | disk.tenants() | set(refusals) | set(host.quota_denied) | set(disk.quota_denied)
    out = {}
    for name in sorted(known) if tenant is None else [tenant]:
        met = refusals.get(name, {})
        out[name] = TenantStats(
            host_bytes=host.tenant_used(name),
            host_quota=quota(name, HOST),
            disk_bytes=disk.tenant_used(name),
            disk_quota=quota(name, DISK),
            not_found=met.get(NOT_FOUND, 0),
            denied=met.get(DENIED, 0),
            quota_denials=host.quota_denied.get(name, 0) + disk.quota_denied.get(name, 0),
        )
    return out
