"""Tier budgets changed at run time (``trims_ray.set_budget``), recorded where every cache that
starts later finds them: Ray's KV store (in the GCS, namespace "trims_ray"), which outlives
any actor. A running cache applies a change when it is asked to (``NodeCacheActor.set_budget``);
a cache Ray restarts, one placement starts on a node that joins, and a GPU holder read the
record when they start, so a budget set for the cluster holds on every node from then on.

Keys: ``budget/<tier>`` for every node, ``budget/<tier>/<node id>`` for one node (it wins over
the first). Setting a tier for every node forgets that tier's per-node records: the latest call
holds. ``trims_ray.shutdown()``, and an ``init`` that starts the caches anew, forget them all,
so that a config given to ``init`` is what a new start gets.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from .._config import CacheConfig, GpuTierConfig

__all__ = [
    "TIERS",
    "forget_budgets",
    "gpu_config_with",
    "record_budget",
    "recorded_budgets",
    "restore_tier_records",
    "tier_records",
    "with_recorded_budgets",
    "with_recorded_gpu_budget",
]

log = logging.getLogger("trims_ray")

TIERS = ("host", "disk", "gpu")
_NAMESPACE = "trims_ray"
_PREFIX = "budget/"


def _kv():
    from ray.experimental import internal_kv  # Ray's own KV client: a driver or a worker has one

    return internal_kv


def record_budget(tier: str, nbytes: int, nodes: list[str] | None) -> None:
    """Records ``tier``'s budget for ``nodes`` (None: every node, now and later)."""
    kv = _kv()
    if nodes is None:
        kv._internal_kv_del(f"{_PREFIX}{tier}/", del_by_prefix=True, namespace=_NAMESPACE)
        kv._internal_kv_put(f"{_PREFIX}{tier}", str(nbytes), namespace=_NAMESPACE)
        return
    for node in nodes:
        kv._internal_kv_put(f"{_PREFIX}{tier}/{node}", str(nbytes), namespace=_NAMESPACE)


def recorded_budgets(node_id: str, tiers: tuple[str, ...] = TIERS) -> dict[str, int]:
    """The budgets recorded for ``node_id`` in ``tiers``: tier -> bytes, for the tiers that
    have one ({} in a process not connected to Ray, as when a test builds an actor's class
    directly). Two KV reads a tier at most."""
    kv = _kv()
    if not kv._internal_kv_initialized():
        return {}
    out = {}
    for tier in tiers:
        for key in (f"{_PREFIX}{tier}/{node_id}", f"{_PREFIX}{tier}"):
            value = kv._internal_kv_get(key, namespace=_NAMESPACE)
            if value is not None:
                out[tier] = int(value)
                break
    return out


def forget_budgets() -> None:
    """Forgets every recorded budget."""
    _kv()._internal_kv_del(_PREFIX, del_by_prefix=True, namespace=_NAMESPACE)


def with_recorded_budgets(config: CacheConfig, node_id: str, object_store_bytes: int) -> CacheConfig:
    """``config`` with the host and disk budgets recorded for ``node_id`` in place of its own;
    a recorded host budget above the node's object store (``object_store_bytes``: a node that
    joined after the budget was set) is left out, with a warning, as ``set_budget`` would
    refuse it. The GPU budget is left as given: each GPU holder applies the record itself
    (``with_recorded_gpu_budget``), where it can check it against its GPU's memory."""
    recorded = recorded_budgets(node_id, ("host", "disk"))
    if recorded.get("host", 0) > object_store_bytes:
        log.warning(
            "trims_ray: node %s keeps its host budget: the one set for the cluster (%d bytes) exceeds its "
            "%d-byte object store", node_id, recorded.pop("host"), object_store_bytes,
        )
    fields = {"host": "host_bytes", "disk": "disk_bytes"}
    return replace(config, **{fields[tier]: nbytes for tier, nbytes in recorded.items()})


def tier_records(tier: str) -> dict[str, bytes]:
    """Every record of ``tier`` (key -> value), to put back with ``restore_tier_records``."""
    kv = _kv()
    keys = kv._internal_kv_list(f"{_PREFIX}{tier}", namespace=_NAMESPACE)
    return {key.decode(): kv._internal_kv_get(key, namespace=_NAMESPACE) for key in keys}


def restore_tier_records(tier: str, records: dict[str, bytes]) -> None:
    """Puts ``tier``'s records back as ``tier_records`` found them."""
    kv = _kv()
    kv._internal_kv_del(f"{_PREFIX}{tier}", del_by_prefix=True, namespace=_NAMESPACE)
    for key, value in records.items():
        if value is not None:
            kv._internal_kv_put(key, value, namespace=_NAMESPACE)


def with_recorded_gpu_budget(config: GpuTierConfig, node_id: str, gpu_bytes: int) -> GpuTierConfig:
    """A GPU holder's ``config`` with the GPU budget recorded for ``node_id``, if any and if it
    fits the holder's GPU (``gpu_bytes`` of memory); see ``gpu_config_with``."""
    return gpu_config_with(config, recorded_budgets(node_id, ("gpu",)).get("gpu"), gpu_bytes, node_id)


def gpu_config_with(config: GpuTierConfig, recorded: int | None, gpu_bytes: int, node_id: str) -> GpuTierConfig:
    """``config`` with the ``recorded`` GPU budget (None: none recorded); one above the GPU's
    ``gpu_bytes`` (a node that joined with a smaller GPU) is left out, with a warning, as
    ``set_budget`` would refuse it."""
    if recorded is None:
        return config
    if recorded > gpu_bytes:
        log.warning(
            "trims_ray: a GPU of node %s keeps its budget: the one set for the cluster (%d bytes) exceeds its "
            "%d bytes", node_id, recorded, gpu_bytes,
        )
        return config
    return replace(config, budget_bytes=recorded)
