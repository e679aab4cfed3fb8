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

Keys: ``budget/<tier>@<turn>`` for every node, ``budget/<tier>/<node id>@<turn>`` for one node;
of those that name a node, the highest turn holds there. A call that succeeds deletes the
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
    "record_budget",
    "recorded_budgets",
    "unrecord",
    "with_recorded_budgets",
    "with_recorded_gpu_budget",
]

log = logging.getLogger("trims_ray")

TIERS = ("host", "disk", "gpu")
_NAMESPACE = "trims_ray"
_PREFIX = "budget/"
_TURNS = "budget-turn/"  # not under _PREFIX: forgetting the records must not reuse turns


@dataclass(frozen=True)
class Recorded:
    """One budget record: ``nbytes`` for ``node`` (None: every node), set by call ``turn``."""

    tier: str
    nbytes: int
    turn: int
    node: str | None
    key: str


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


def record_budget(tier: str, nbytes: int, nodes: list[str] | None, turn: int) -> list[str]:
    """Records ``tier``'s budget for ``nodes`` (None: every node, now and later) as call
    ``turn``'s; returns the keys written (``unrecord`` takes them back)."""
    kv = _kv()
    keys = [f"{_PREFIX}{tier}@{turn}"] if nodes is None else [f"{_PREFIX}{tier}/{node}@{turn}" for node in nodes]
    for key in keys:
        kv._internal_kv_put(key, str(nbytes), namespace=_NAMESPACE)
    return keys


def unrecord(keys: list[str]) -> None:
    """Deletes the records ``record_budget`` wrote (its call failed): the ones before hold again."""
    kv = _kv()
    for key in keys:
        kv._internal_kv_del(key, namespace=_NAMESPACE)


def drop_overridden(tier: str, nodes: list[str] | None, turn: int) -> None:
    """Deletes the records of ``tier`` that call ``turn`` (done) overrides: older ones for
    ``nodes`` (None: every older one). Only tidies up: readers take the highest turn anyway."""
    kv = _kv()
    for record in _records(tier):
        if record.turn < turn and (nodes is None or record.node in nodes):
            kv._internal_kv_del(record.key, namespace=_NAMESPACE)


def _records(tier: str) -> list[Recorded]:
    """Every record of ``tier``, its value unread (``nbytes`` -1)."""
    out = []
    base = f"{_PREFIX}{tier}"
    for raw in _kv()._internal_kv_list(base, namespace=_NAMESPACE):
        key = raw.decode()
        rest, _, turn = key[len(base):].rpartition("@")
        if not turn.isdigit() or (rest and not rest.startswith("/")):
            continue  # another tier's name that starts alike, or not a record of this form
        out.append(Recorded(tier, -1, int(turn), rest[1:] or None, key))
    return out


def recorded_budgets(node_id: str, tiers: tuple[str, ...] = TIERS) -> dict[str, Recorded]:
    """The budgets that hold for ``node_id`` in ``tiers`` (tier -> the record of the highest
    turn among those for every node and those for it), for the tiers that have one ({} in a
    process not connected to Ray, as when a test builds an actor's class directly)."""
    kv = _kv()
    if not kv._internal_kv_initialized():
        return {}
    out = {}
    for tier in tiers:
        mine = [r for r in _records(tier) if r.node in (None, node_id)]
        for record in sorted(mine, key=lambda r: r.turn, reverse=True):
            value = kv._internal_kv_get(record.key, namespace=_NAMESPACE)
            if value is not None:  # else deleted since the listing: the next one holds
                out[tier] = replace(record, nbytes=int(value))
                break
    return out


def forget_budgets() -> None:
    """Forgets every recorded budget (not the turns: a running cache may know the last one)."""
    _kv()._internal_kv_del(_PREFIX, del_by_prefix=True, namespace=_NAMESPACE)


def with_recorded_budgets(
    config: CacheConfig, node_id: str, object_store_bytes: int
) -> tuple[CacheConfig, dict[str, Recorded]]:
    """``config`` with the host and disk budgets recorded for ``node_id`` in place of its own,
    and the records that hold for the node (tier -> record; the GPU's too), whose turns a call
    of an earlier turn must not undo. A recorded host budget above the node's object store
    (``object_store_bytes``: a node that joined after the budget was set) is left out, with a
    warning, as ``set_budget`` would refuse it. The GPU budget is left as given: each GPU holder
    applies the record itself (``with_recorded_gpu_budget``), where it can check it against its
    GPU's memory."""
    recorded = recorded_budgets(node_id)
    budgets = {tier: recorded[tier].nbytes for tier in ("host", "disk") if tier in recorded}
    if budgets.get("host", 0) > object_store_bytes:
        log.warning(
            "trims_ray: node %s keeps its host budget: the one set for the cluster (%d bytes) exceeds its "
            "%d-byte object store", node_id, budgets.pop("host"), object_store_bytes,
        )
    fields = {"host": "host_bytes", "disk": "disk_bytes"}
    return replace(config, **{fields[tier]: nbytes for tier, nbytes in budgets.items()}), recorded


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
