"""Tier budgets changed at run time (``trims_ray.set_budget``), recorded where every cache that
starts later finds them: Ray's KV store (in the GCS, namespace "trims_ray"), which outlives
any actor. A running cache applies a change when it is asked to (``NodeCacheActor.set_budget``);
a cache Ray restarts, one placement starts on a node that joins, and a GPU holder read the
record when they start, so a budget set for the cluster holds on every node from then on.

Calls are ordered by turns: each ``set_budget`` call first claims a number above every turn
claimed before it (``claim_turn``: a put-if-absent in the GCS, the one atomic write its KV
store has). Its record and every node's cache keep the budget of the highest turn they have
seen, so that concurrent calls end with the same one, the last to claim its turn, on every node
and in the record; a call that ran first but arrives late at a node changes nothing there.

Tenant quotas changed at run time (``trims_ray.set_quota``) are recorded and ordered the same
way, under the subject ``quota.<tenant>.<tier>`` where a budget's is its tier.

Keys: ``budget/<subject>@<turn>`` for every node, ``budget/<subject>/<node id>@<turn>`` for one
node; of those that name a node, the highest turn holds there. A quota's value may be "none":
the tenant's explicit quota dropped. A call that succeeds deletes the
records it overrides; one that fails deletes its own, so that the ones before it hold again.
``trims_ray.shutdown()``, and an ``init`` that starts the caches anew, forget the records, so
that a config given to ``init`` is what a new start gets; turns are never reused, as a running
cache may remember one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from .._config import CacheConfig, GpuTierConfig

__all__ = [
    "TIERS",
    "Recorded",
    "claim_turn",
    "drop_overridden",
    "forget_budgets",
    "gpu_config_with",
    "quota_subject",
    "record_budget",
    "recorded_budgets",
    "recorded_quotas",
    "unrecord",
    "with_recorded_budgets",
    "with_recorded_gpu_budget",
]

log = logging.getLogger("trims_ray")

TIERS = ("host", "disk", "gpu")
_NAMESPACE = "trims_ray"
_PREFIX = "budget/"
_TURNS = "budget-turn/"  # not under _PREFIX: forgetting the records must not reuse turns


_QUOTA = "quota."


@dataclass(frozen=True)
class Recorded:
    """One record of ``subject`` (a tier, or ``quota_subject``): ``nbytes`` for ``node`` (None:
    every node), set by call ``turn``; a quota's ``nbytes`` None drops the tenant's quota."""

    subject: str
    nbytes: int | None
    turn: int
    node: str | None
    key: str


def quota_subject(tenant: str, tier: str) -> str:
    """What the records of ``tenant``'s quota in ``tier`` are kept under."""
    return f"{_QUOTA}{tenant}.{tier}"


def _kv():
    from ray.experimental import internal_kv  # Ray's own KV client: a driver or a worker has one

    return internal_kv


def claim_turn() -> int:
    """A turn that no other caller holds, above every turn claimed before this call began.

    The GCS creates a key only if it is absent, and turns below the highest are deleted as they
    are claimed. A caller whose listing is stale may create anew a turn that was held and
    deleted, so a claim holds only if no higher turn exists once its key is in: whoever deleted
    a turn had claimed a higher one first, and the highest is never deleted."""
    kv = _kv()
    while True:
        claimed = _claimed_turns()
        turn = max(claimed, default=0) + 1
        if kv._internal_kv_put(f"{_TURNS}{turn}", b"1", overwrite=False, namespace=_NAMESPACE):
            continue  # taken by a concurrent call since the listing
        if max(_claimed_turns()) == turn:
            break
    for old in claimed:  # all below ``turn``: the next claim counts up from the highest
        kv._internal_kv_del(f"{_TURNS}{old}", namespace=_NAMESPACE)
    return turn


def _claimed_turns() -> list[int]:
    keys = _kv()._internal_kv_list(_TURNS, namespace=_NAMESPACE)
    return [int(key.decode()[len(_TURNS):]) for key in keys]


def record_budget(subject: str, nbytes: int | None, nodes: list[str] | None, turn: int) -> list[str]:
    """Records ``subject``'s bytes (a tier's budget, or a quota: None drops it) for ``nodes``
    (None: every node, now and later) as call ``turn``'s; returns the keys written
    (``unrecord`` takes them back)."""
    kv = _kv()
    base = f"{_PREFIX}{subject}"
    keys = [f"{base}@{turn}"] if nodes is None else [f"{base}/{node}@{turn}" for node in nodes]
    for key in keys:
        kv._internal_kv_put(key, "none" if nbytes is None else str(nbytes), namespace=_NAMESPACE)
    return keys


def unrecord(keys: list[str]) -> None:
    """Deletes the records ``record_budget`` wrote (its call failed): the ones before hold again."""
    kv = _kv()
    for key in keys:
        kv._internal_kv_del(key, namespace=_NAMESPACE)


def drop_overridden(subject: str, nodes: list[str] | None, turn: int) -> None:
    """Deletes the records of ``subject`` that call ``turn`` (done) overrides: older ones for
    ``nodes`` (None: every older one). Only tidies up: readers take the highest turn anyway."""
    kv = _kv()
    for record in _records(subject):
        if record.turn < turn and (nodes is None or record.node in nodes):
            kv._internal_kv_del(record.key, namespace=_NAMESPACE)


def _parse(key: str) -> Recorded | None:
    """The record ``key`` names, its value unread (``nbytes`` -1); None for a key of another form."""
    rest, _, turn = key[len(_PREFIX):].rpartition("@")
    subject, _, node = rest.partition("/")
    if not turn.isdigit() or not subject:
        return None
    return Recorded(subject, -1, int(turn), node or None, key)


def _records_under(prefix: str) -> list[Recorded]:
    """Every record whose subject starts with ``prefix`` (one listing of the KV store)."""
    keys = _kv()._internal_kv_list(f"{_PREFIX}{prefix}", namespace=_NAMESPACE)
    return [record for record in (_parse(key.decode()) for key in keys) if record is not None]


def _records(subject: str) -> list[Recorded]:
    """Every record of ``subject``, its value unread."""
    return [record for record in _records_under(subject) if record.subject == subject]


def _holding(records: list[Recorded], node_id: str) -> Recorded | None:
    """Of one subject's ``records``, the one that holds for ``node_id``: the highest turn among
    those for every node and those for it, its value read; None when there is none."""
    kv = _kv()
    mine = [r for r in records if r.node in (None, node_id)]
    for record in sorted(mine, key=lambda r: r.turn, reverse=True):
        value = kv._internal_kv_get(record.key, namespace=_NAMESPACE)
        if value is not None:  # else deleted since the listing: the next one holds
            return replace(record, nbytes=None if value == b"none" else int(value))
    return None


def recorded_budgets(node_id: str, tiers: tuple[str, ...] = TIERS) -> dict[str, Recorded]:
    """The budgets that hold for ``node_id`` in ``tiers`` (tier -> its record), for the tiers
    that have one ({} in a process not connected to Ray, as when a test builds an actor's
    class directly)."""
    if not _kv()._internal_kv_initialized():
        return {}
    held = {tier: _holding(_records(tier), node_id) for tier in tiers}
    return {tier: record for tier, record in held.items() if record is not None}


def recorded_quotas(node_id: str) -> dict[str, Recorded]:
    """The tenant quotas that hold for ``node_id`` (``quota_subject`` -> its record)."""
    if not _kv()._internal_kv_initialized():
        return {}
    by_subject: dict[str, list[Recorded]] = {}
    for record in _records_under(_QUOTA):
        by_subject.setdefault(record.subject, []).append(record)
    held = {subject: _holding(records, node_id) for subject, records in by_subject.items()}
    return {subject: record for subject, record in held.items() if record is not None}


def forget_budgets() -> None:
    """Forgets every recorded budget (not the turns: a running cache may know the last one)."""
    _kv()._internal_kv_del(_PREFIX, del_by_prefix=True, namespace=_NAMESPACE)


def with_recorded_budgets(
    config: CacheConfig, node_id: str, object_store_bytes: int
) -> tuple[CacheConfig, dict[str, Recorded]]:
    """``config`` with the host and disk budgets and the tenant quotas recorded for ``node_id``
    in place of its own, and the records that hold for the node (subject -> record; the GPU's
    budget too), whose turns a call of an earlier turn must not undo. A recorded host budget
    above the node's object store (``object_store_bytes``: a node that joined after the budget
    was set) is left out, with a warning, as ``set_budget`` would refuse it. The GPU budget is
    left as given: each GPU holder applies the record itself (``with_recorded_gpu_budget``),
    where it can check it against its GPU's memory."""
    recorded = {**recorded_budgets(node_id), **recorded_quotas(node_id)}
    budgets = {tier: recorded[tier].nbytes for tier in ("host", "disk") if tier in recorded}
    if budgets.get("host", 0) > object_store_bytes:
        log.warning(
            "trims_ray: node %s keeps its host budget: the one set for the cluster (%d bytes) exceeds its "
            "%d-byte object store", node_id, budgets.pop("host"), object_store_bytes,
        )
    quotas = {tenant: dict(tiers) for tenant, tiers in config.tenant_quotas.items()}
    for subject, record in recorded.items():
        if subject.startswith(_QUOTA):
            _, tenant, tier = subject.split(".")
            if record.nbytes is None:
                quotas.get(tenant, {}).pop(tier, None)
            else:
                quotas.setdefault(tenant, {})[tier] = record.nbytes
    fields = {"host": "host_bytes", "disk": "disk_bytes"}
    changed = {fields[tier]: nbytes for tier, nbytes in budgets.items()}
    return replace(config, **changed, tenant_quotas={t: q for t, q in quotas.items() if q}), recorded


def with_recorded_gpu_budget(config: GpuTierConfig, node_id: str, gpu_bytes: int) -> GpuTierConfig:
    """A GPU holder's ``config`` with the GPU budget recorded for ``node_id``, if any and if it
    fits the holder's GPU (``gpu_bytes`` of memory); see ``gpu_config_with``."""
    record = recorded_budgets(node_id, ("gpu",)).get("gpu")
    return gpu_config_with(config, None if record is None else record.nbytes, gpu_bytes, node_id)


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
