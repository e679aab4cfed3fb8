"""The admission sequence, written once: whether a miss is kept in a tier, and what it evicts.

Every tier that keeps what it loads (host, disk, GPU) and the simulator call
:func:`decide_admission` with what is their own (the budget and bytes in use, which entries
are idle, the tenant's quota) and act on the :class:`Admission` it returns: drop its victims
and insert, serve the load without keeping it, or fail it. Pure Python, no Ray.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

from trims_ray.policy.base import EvictionPolicy, choose_victims

__all__ = ["Admission", "Outcome", "Quota", "decide_admission"]

Key = Hashable


class Outcome(enum.Enum):
    """What :func:`decide_admission` decided for one miss."""

    KEEP = "keep"  # kept: evict the victims (if any), then insert
    TOO_BIG = "too_big"  # bigger than the whole budget: it can never be kept
    OVER_QUOTA = "over_quota"  # the tenant's quota cannot take it, even by evicting its own idle keys
    NO_ROOM = "no_room"  # not enough idle bytes to evict: the rest is in use (leased, loading)
    REFUSED = "refused"  # the policy would rather keep the victims than this key


@dataclass(frozen=True, slots=True)
class Quota:
    """One tenant's share of a tier's bytes, as the tier counts them.

    Attributes:
        limit: Bytes the tenant may hold in the tier.
        used: Bytes it holds there now, loads in flight included.
        owns: Tells whether a key is the tenant's.
    """

    limit: int
    used: int
    owns: Callable[[Key], bool]


@dataclass(frozen=True, slots=True)
class Admission:
    """The decision for one miss.

    Attributes:
        outcome: What was decided.
        victims: The keys to evict, in eviction order, when the outcome is KEEP (the tenant's
            own first when its quota asked for them); ``()`` for every other outcome, so a load
            that is not kept evicts nothing.
    """

    outcome: Outcome
    victims: tuple[Key, ...] = ()

    @property
    def kept(self) -> bool:
        """True when the key is to be kept (its victims evicted first)."""
        return self.outcome is Outcome.KEEP


_NOT_KEPT = {outcome: Admission(outcome) for outcome in Outcome}


def _always(_key: Key) -> bool:
    return True


def decide_admission(
    policy: EvictionPolicy,
    key: Key,
    nbytes: int,
    cost: float,
    *,
    budget: int,
    used: int,
    sizes: Mapping[Key, int],
    evictable: Callable[[Key], bool] = _always,
    quota: Quota | None = None,
    force: bool = False,
) -> Admission:
    """Decides whether a miss is kept in a tier, and what keeping it evicts; changes nothing.

    In this order: a key bigger than the budget is never kept (TOO_BIG). A tenant that would
    go over its quota makes room from its own idle keys first, and never from another
    tenant's (OVER_QUOTA if its own are not enough, or the key alone is over the quota). Then
    :func:`choose_victims` picks the fewest idle keys whose bytes, with those the quota took
    and the free bytes, make room (NO_ROOM if even all of them are not enough). Last, when
    keeping the key evicts something and the load is not forced, the policy's
    :meth:`~EvictionPolicy.admit` weighs the key against its victims (REFUSED if it would
    rather keep them). A key that fits in free room is kept without asking: nothing is traded.

    The caller evicts the victims (``policy.on_remove`` each) and inserts the key, or serves
    the load without keeping it, or fails it: which of these each outcome means is the tier's.

    Args:
        policy: The tier's policy; it orders the victims and admits.
        key: The key that missed; not tracked by the policy.
        nbytes: Bytes keeping it takes in the tier, >= 0.
        cost: Its miss cost in seconds, as for ``policy.on_insert`` (unused when force).
        budget: Bytes the tier may hold.
        used: Bytes the tier holds now, loads in flight included; above ``budget`` only
            after the budget was lowered below what is leased (``set_budget`` of a tier).
        sizes: Bytes of every key that may be evicted: the policy's keys that are resident
            (not loading).
        evictable: Returns False for keys in use (leased) that must stay.
        quota: The tenant's quota in this tier; None when none applies.
        force: Keep the key whatever the policy's admit would say (a prefetch: asked for by
            name); quota and budget still apply.

    Returns:
        The Admission: its victims when KEEP, else none.

    Raises:
        ValueError: If nbytes is negative, or as ``policy.admit``.
        KeyError: If a key the policy yields is missing from sizes.
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if nbytes > budget:
        return _NOT_KEPT[Outcome.TOO_BIG]
    own: list[Key] = []
    free = budget - used
    candidates = evictable
    if quota is not None and quota.used + nbytes > quota.limit:
        if nbytes > quota.limit:
            return _NOT_KEPT[Outcome.OVER_QUOTA]
        mine = {k: n for k, n in sizes.items() if quota.owns(k)}
        excess = quota.used + nbytes - quota.limit
        chosen = choose_victims(
            policy, excess, 0, mine, lambda k: k in mine and evictable(k)
        )
        if chosen is None:
            return _NOT_KEPT[Outcome.OVER_QUOTA]
        if chosen:
            own, taken = chosen, set(chosen)
            free += sum(mine[k] for k in own)
            candidates = lambda k: k not in taken and evictable(k)
    # A tier whose budget was lowered at run time may hold more than it (what is leased stays
    # until its leases end): then keeping the key needs its own bytes and that excess freed.
    rest = choose_victims(policy, nbytes - min(free, 0), max(free, 0), sizes, candidates)
    if rest is None:
        # Evicting a partial set would destroy useful entries and still fail the load.
        return _NOT_KEPT[Outcome.NO_ROOM]
    victims = (*own, *rest)
    if victims and not force and not policy.admit(key, nbytes, cost, victims):
        return _NOT_KEPT[Outcome.REFUSED]
    return Admission(Outcome.KEEP, victims)
