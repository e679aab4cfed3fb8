"""Cost-aware: keeps the keys that save the most load time per byte at their recent request rate.

The trims_ray policy of choice for a tier whose misses cost different amounts: it weighs each
model's miss cost (its load time, or its bytes over the tier's load bandwidth when the cost is
unknown) by how often it is requested now, per byte it occupies; admission uses the same value.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence

from trims_ray.policy._heap import LazyHeap
from trims_ray.policy.base import EvictionPolicy, check_positive

__all__ = ["CostAware"]


class CostAware(EvictionPolicy):
    """Evicts the key with the least expected load time saved per byte; refuses poor trades.

    Design. A key's value is ``miss_cost * rate / nbytes``: the seconds of loading that keeping
    it saves per second, per byte it holds. ``miss_cost`` is the cost the cache reported; when
    that is 0 (unknown, as for the disk tier), it is ``nbytes / bandwidth``, with bandwidth the
    tier's load rate measured from the loads whose cost was known (total bytes over total
    seconds), else the configured one. ``rate`` is an exponentially decayed request count with
    the given half-life: every request adds 1 and the count halves every half_life seconds of
    the injected clock. Unlike LFU's counts it forgets old popularity; unlike LRU it tells a
    model requested every second from one requested once.

    O(log n): the decayed count of every key shrinks by the same factor as time passes, so the
    order between two keys changes only when one of them is requested. The heap therefore keys
    each entry on ``log(miss_cost * count / nbytes) + decay * t_last``, which is the value's log
    at any later time plus a term shared by all keys, and needs no update between requests.

    Admission: a miss is kept when its value per byte (its rate counting this request and the
    ones remembered for recently seen, non-resident keys) is at least its victims' together
    (their summed ``miss_cost * rate`` over their summed bytes). A one-off request for a huge
    model loses against a hot set holding the same bytes; a model that turns hot wins after a
    few requests, since refused requests are counted too. Per byte rather than in total
    because the victims usually free more bytes than needed (the last one overshoots), which
    totals would count against every newcomer. Rates of recently removed or refused keys are
    kept for at most 8 times as many keys as are resident (at least 256), oldest forgotten
    first.
    """

    name = "cost"

    def __init__(
        self,
        *,
        bandwidth: float = 1e9,
        half_life: float = 600.0,
        admission: bool = True,
        **kwargs,
    ) -> None:
        """Creates an empty cost-aware policy.

        Args:
            bandwidth: The tier's load rate in bytes per second, used for keys reported with
                cost 0 until loads with a known cost have measured it.
            half_life: Seconds (of the clock) in which a key's request count halves.
            admission: False admits every miss.
            **kwargs: Passed to EvictionPolicy (clock).

        Raises:
            TypeError: If bandwidth or half_life is not a number.
            ValueError: If bandwidth or half_life is not finite and > 0.
        """
        super().__init__(**kwargs)
        self._bandwidth = check_positive("bandwidth", bandwidth)
        self._decay = math.log(2) / check_positive("half_life", half_life)
        self._admission = bool(admission)
        self._heap = LazyHeap()
        self._miss_cost: dict[Hashable, float] = {}
        self._rate: dict[Hashable, tuple[float, float]] = {}  # key -> (count, at time)
        self._ghosts: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()
        self._known_bytes = 0
        self._known_seconds = 0.0

    def _insert(self, key: Hashable, nbytes: int, cost: float) -> None:
        if cost > 0:
            self._known_bytes += nbytes
            self._known_seconds += cost
        self._miss_cost[key] = self._effective_cost(nbytes, cost)
        self._rate[key] = self._bumped(self._ghosts.pop(key, None))
        self._push(key, nbytes)

    def _access(self, key: Hashable) -> None:
        self._rate[key] = self._bumped(self._rate[key])
        self._push(key, self._entries[key].nbytes)

    def _recost(self, key: Hashable, old_cost: float) -> None:
        # The rate bandwidth is estimated from stays that of measured loads: a new estimate
        # of a reload is not one.
        entry = self._entries[key]
        self._miss_cost[key] = self._effective_cost(entry.nbytes, entry.cost)
        self._push(key, entry.nbytes)

    def _remove(self, key: Hashable) -> None:
        self._heap.discard(key)
        del self._miss_cost[key]
        self._remember(key, self._rate.pop(key))

    def _order(self) -> Iterator[Hashable]:
        return iter(self._heap)

    def _admit(self, key: Hashable, nbytes: int, cost: float, victims: Sequence[Hashable]) -> bool:
        if not self._admission:
            return True
        now = self._clock()
        seen = self._bumped(self._ghosts.get(key))
        kept = self._effective_cost(nbytes, cost) * seen[0] / max(nbytes, 1)
        lost = sum(self._miss_cost[v] * self._count_at(self._rate[v], now) for v in victims)
        if kept >= lost / max(sum(self._entries[v].nbytes for v in victims), 1):
            return True  # on_insert counts this request
        self._remember(key, seen)
        return False

    # -- helpers -------------------------------------------------------------------------------

    def _effective_cost(self, nbytes: int, cost: float) -> float:
        if cost > 0:
            return cost
        if self._known_bytes > 0 and self._known_seconds > 0:
            return nbytes * self._known_seconds / self._known_bytes
        return nbytes / self._bandwidth

    def _count_at(self, state: tuple[float, float], now: float) -> float:
        count, then = state
        return count * math.exp(-self._decay * max(0.0, now - then))

    def _bumped(self, state: tuple[float, float] | None) -> tuple[float, float]:
        now = self._clock()
        return (1.0 if state is None else self._count_at(state, now) + 1.0), now

    def _push(self, key: Hashable, nbytes: int) -> None:
        count, then = self._rate[key]
        value = self._miss_cost[key] * count / max(nbytes, 1)
        self._heap.push(key, (math.log(value) if value > 0 else -math.inf) + self._decay * then)

    def _remember(self, key: Hashable, state: tuple[float, float]) -> None:
        self._ghosts[key] = state
        self._ghosts.move_to_end(key)
        while len(self._ghosts) > max(256, 8 * len(self._entries)):
            self._ghosts.popitem(last=False)
