"""The eviction-policy contract: a policy orders the keys resident in one cache tier.

The node cache owns the bytes and the leases and tells a policy what happened (insert, hit,
removal); the policy only answers "which keys to evict first". It knows nothing of Ray.
"""

from __future__ import annotations

import abc
import math
import numbers
import time
from collections.abc import Callable, Hashable, Iterator, KeysView, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

__all__ = ["Entry", "EvictionPolicy", "check_positive", "choose_victims", "shrink_victims"]

Key = Hashable
Evictable = Callable[[Key], bool]


@dataclass(frozen=True, slots=True)
class Entry:
    """What a policy knows about one resident key.

    Attributes:
        nbytes: Size of the entry in bytes.
        cost: Miss cost: the seconds it took to load the entry into this tier.
    """

    nbytes: int
    cost: float


class EvictionPolicy(abc.ABC):
    """Base class of every eviction policy: validates calls, keeps the set of tracked keys.

    Subclasses implement four hooks, each called only after the base class has checked the
    call (so a hook never sees a duplicate insert, an unknown key or a bad size):
    ``_insert``, ``_access``, ``_remove`` and ``_order``; an admission rule overrides
    ``_admit`` too. ``self._entries`` maps every tracked key to its :class:`Entry`; it is
    updated after ``_insert`` and after ``_remove`` return, so ``_remove`` can still read the
    entry it is dropping.

    Attributes:
        name: The name this policy is registered under (see ``trims_ray.policy.POLICIES``).
        offline: True for a policy that must be told the future (Belady): simulation only,
            never a node cache's policy.
    """

    name: ClassVar[str]
    offline: ClassVar[bool] = False

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        """Creates an empty policy.

        Args:
            clock: Returns the current time in seconds; injected so that time-aware policies
                are deterministic under test and in simulation.

        Raises:
            TypeError: If clock is not callable.
        """
        if not callable(clock):
            raise TypeError(f"clock must be a zero-argument callable, got {clock!r}")
        self._clock = clock
        self._entries: dict[Key, Entry] = {}

    # -- the calls the cache makes -------------------------------------------------------------

    def on_insert(self, key: Key, nbytes: int, cost: float) -> None:
        """Starts tracking a key that just became resident.

        Args:
            key: Opaque hashable key (the cache uses blob sha256 hex digests).
            nbytes: Size of the entry in bytes, >= 0.
            cost: Miss cost in seconds (the load time), finite and >= 0.

        Raises:
            ValueError: If the key is already tracked, or nbytes or cost is negative (or cost
                is not finite).
            TypeError: If nbytes is not an int or cost is not a real number.
        """
        if key in self._entries:
            raise ValueError(
                f"{type(self).__name__}.on_insert({key!r}): key is already tracked; "
                "call on_remove first if it left the tier and came back"
            )
        entry = Entry(_check_nbytes(nbytes), _check_cost(cost))
        self._insert(key, entry.nbytes, entry.cost)
        self._entries[key] = entry

    def on_access(self, key: Key) -> None:
        """Records a hit on a tracked key.

        Raises:
            KeyError: If the key is not tracked: the cache must only report keys it inserted.
        """
        self._require(key, "on_access")
        self._access(key)

    def on_remove(self, key: Key) -> None:
        """Stops tracking a key that left the tier (evicted, or removed explicitly).

        Raises:
            KeyError: If the key is not tracked.
        """
        self._require(key, "on_remove")
        self._remove(key)
        del self._entries[key]

    def on_cost(self, key: Key, cost: float) -> None:
        """Sets a tracked key's miss cost to what reloading it would take now: a copy in a
        lower tier landed or left, or the measured load rates moved since it was inserted. A
        cost-aware policy re-orders the key as if it had been inserted at that cost; the
        others only record it. Then a resident and a newcomer are weighed by one estimate.

        Raises:
            KeyError: If the key is not tracked.
            ValueError: If cost is negative or not finite.
            TypeError: If cost is not a real number.
        """
        self._require(key, "on_cost")
        cost = _check_cost(cost)
        entry = self._entries[key]
        if cost != entry.cost:
            self._entries[key] = Entry(entry.nbytes, cost)
            self._recost(key, entry.cost)

    def admit(self, key: Key, nbytes: int, cost: float, victims: Sequence[Key]) -> bool:
        """Decides whether a key that missed is worth keeping at the price of its victims.

        Asked by :func:`~trims_ray.policy.admission.decide_admission` (the one admission
        sequence) only for a miss whose keeping would evict something: after
        :func:`choose_victims` picked the victims and before any is evicted; not for a load
        kept whatever the policy says (a prefetch). On True the cache evicts the victims
        (``on_remove`` each) and calls ``on_insert(key, ...)``; on False it serves the load
        once, keeps nothing and evicts nothing. This is how a one-off request for a huge model
        is kept from flushing a hot working set. With no victims nothing is traded: admit
        returns True without consulting the rule (a kept miss reaches the policy through
        ``on_insert`` anyway). The default admits every key; admit never changes the eviction
        order.

        Args:
            key: The key that missed; not tracked.
            nbytes: Its size in bytes, as for on_insert.
            cost: Its miss cost in seconds, as for on_insert.
            victims: The tracked keys that keeping it would evict, as choose_victims returned.

        Returns:
            True to keep the key, False to serve it without keeping it.

        Raises:
            ValueError: If key is already tracked, or nbytes or cost is out of range.
            TypeError: If nbytes is not an int or cost is not a real number.
            KeyError: If a victim is not tracked.
        """
        if key in self._entries:
            raise ValueError(
                f"{type(self).__name__}.admit({key!r}): key is already tracked (resident), so "
                "there is nothing to admit; call admit only for a miss"
            )
        nbytes, cost = _check_nbytes(nbytes), _check_cost(cost)
        if not victims:
            return True
        for victim in victims:
            self._require(victim, "admit")
        return bool(self._admit(key, nbytes, cost, victims))

    def victims(self, evictable: Evictable) -> Iterator[Key]:
        """Yields tracked keys in eviction order (first = evict first), lazily.

        Only reads state: the caller picks its victims, finishes with the iterator, then calls
        on_remove for each. Calling on_* while the iterator is live is an error (the underlying
        containers may raise RuntimeError).

        Args:
            evictable: Returns False for keys that must stay (leased ones); they are skipped.

        Yields:
            Every tracked key for which evictable(key) is true, each exactly once.
        """
        for key in self._order():
            if evictable(key):
                yield key

    def keys(self) -> KeysView[Key]:
        """Returns a live view of the tracked keys, in no particular order (see victims)."""
        return self._entries.keys()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __repr__(self) -> str:
        return f"<{type(self).__name__} policy: {len(self._entries)} keys>"

    # -- the hooks a policy implements ---------------------------------------------------------

    @abc.abstractmethod
    def _insert(self, key: Key, nbytes: int, cost: float) -> None:
        """Starts ordering a new key (validated: not tracked, nbytes and cost >= 0)."""

    @abc.abstractmethod
    def _access(self, key: Key) -> None:
        """Updates the order after a hit on a tracked key."""

    @abc.abstractmethod
    def _remove(self, key: Key) -> None:
        """Forgets a tracked key."""

    @abc.abstractmethod
    def _order(self) -> Iterator[Key]:
        """Yields every tracked key once, evict-first first, without changing any state."""

    def _recost(self, key: Key, old_cost: float) -> None:
        """A tracked key's cost changed from ``old_cost`` (``self._entries`` holds the new one);
        default: the order does not weigh cost."""

    def _admit(self, key: Key, nbytes: int, cost: float, victims: Sequence[Key]) -> bool:
        """Admission rule (validated call: key untracked, victims tracked and never empty);
        default: admit."""
        return True

    def _require(self, key: Key, call: str) -> None:
        if key not in self._entries:
            raise KeyError(
                f"{type(self).__name__}.{call}({key!r}): key is not tracked; the cache must "
                "only report keys it inserted and has not removed"
            )


def choose_victims(
    policy: EvictionPolicy,
    need_bytes: int,
    free_bytes: int,
    sizes: Mapping[Key, int],
    evictable: Evictable,
) -> list[Key] | None:
    """Picks the fewest evict-first keys whose bytes make room for a load of need_bytes.

    Takes the shortest prefix of ``policy.victims(evictable)`` such that free_bytes plus the
    victims' sizes reach need_bytes. Removes nothing: the caller evicts the victims and calls
    ``policy.on_remove`` for each.

    Args:
        policy: Orders the candidates.
        need_bytes: Bytes the new entry needs, >= 0.
        free_bytes: Bytes free in the tier now, >= 0.
        sizes: Size in bytes of every key the policy may yield (the cache's own accounting).
        evictable: Returns False for keys that must stay (leased ones).

    Returns:
        ``[]`` if free_bytes already suffices; the victims, in eviction order, if evicting them
        makes enough room; None if even every evictable key is not enough, so that the caller
        fails the load (CapacityError) without evicting anything for it.

    Raises:
        ValueError: If need_bytes or free_bytes is negative.
        KeyError: If a yielded key is missing from sizes.
    """
    if need_bytes < 0 or free_bytes < 0:
        raise ValueError(
            f"need_bytes and free_bytes must be >= 0, got need_bytes={need_bytes}, "
            f"free_bytes={free_bytes}"
        )
    if free_bytes >= need_bytes:
        return []
    chosen: list[Key] = []
    available = free_bytes
    for key in policy.victims(evictable):
        chosen.append(key)
        available += sizes[key]
        if available >= need_bytes:
            return chosen
    # Evicting a partial set would destroy useful entries and still fail the load.
    return None


def _check_nbytes(nbytes: int) -> int:
    # bool is an int subclass; True as a size is a caller bug, not one byte. The exact-type
    # test first spares the common case the slow ABC check (the simulator's hot path).
    if type(nbytes) is not int and (
        isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral)
    ):
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__} {nbytes!r}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    return int(nbytes)


def check_positive(label: str, value: float) -> float:
    """``value`` as a float, for a policy setting that must be a finite number > 0.

    Raises:
        TypeError: If it is not a number (a bool included).
        ValueError: If it is not finite and > 0.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{label} must be a number > 0, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{label} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_cost(cost: float) -> float:
    if type(cost) is not float and (isinstance(cost, bool) or not isinstance(cost, numbers.Real)):
        raise TypeError(f"cost must be a number of seconds, got {type(cost).__name__} {cost!r}")
    # NaN or inf would poison cost-weighted priorities (GDSF's running minimum) for good.
    if not math.isfinite(cost) or cost < 0:
        raise ValueError(f"cost must be a finite number of seconds >= 0, got {cost}")
    return float(cost)


def shrink_victims(
    policy: EvictionPolicy, excess_bytes: int, sizes: Mapping[Key, int], evictable: Evictable
) -> list[Key]:
    """Picks the evict-first keys to free when a tier's budget is lowered below what it holds.

    Unlike :func:`choose_victims`, a partial set is what is wanted: every idle key that frees
    bytes brings the tier nearer its new budget, and what is in use (leased) stays until it is
    released. Takes the shortest prefix of ``policy.victims(evictable)`` whose sizes reach
    excess_bytes, or every evictable key when they do not. Removes nothing.

    Args:
        policy: Orders the candidates.
        excess_bytes: Bytes the tier holds beyond its new budget (<= 0: nothing to free).
        sizes: Size in bytes of every key the policy may yield.
        evictable: Returns False for keys that must stay (leased ones).

    Raises:
        KeyError: If a yielded key is missing from sizes.
    """
    chosen: list[Key] = []
    freed = 0
    if excess_bytes <= 0:
        return chosen
    for key in policy.victims(evictable):
        chosen.append(key)
        freed += sizes[key]
        if freed >= excess_bytes:
            break
    return chosen
