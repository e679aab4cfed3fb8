"""Belady's MIN, the offline optimum: evicts the key whose next request is furthest in the future.

For simulation only (workloads.simulate tells it the future). With equal sizes, and with its
admission rule (bypass a key needed later than everything it would displace), no policy gets a
higher object hit ratio on the same trace; with varied sizes it is a reference, not a bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence

from trims_ray.policy._heap import LazyHeap
from trims_ray.policy.base import EvictionPolicy

__all__ = ["Belady"]

NextUse = Callable[[Hashable], float]


class Belady(EvictionPolicy):
    """Furthest next request first, told by an oracle the simulator drives.

    The oracle, ``next_use(key)``, is asked only while ``key`` is the request being served (on
    its insert, hits and admission) and answers when ``key`` is requested next after this
    request, in any unit that grows with time (seconds or request index), ``math.inf`` if
    never. The answer stays right until that next request, which is the next time the policy
    asks, so one heap keyed on it gives the exact MIN order in O(log n).

    Admission (Belady with bypass): a miss is kept only if it is needed before every key it
    would evict; otherwise serving it once and keeping the victims loses no hit MIN would get.
    With free room (no victims) it is always kept.
    """

    name = "belady"
    offline = True

    def __init__(self, *, next_use: NextUse | None = None, **kwargs) -> None:
        """Creates an empty Belady policy.

        Args:
            next_use: The oracle described above; required.
            **kwargs: Passed to EvictionPolicy (clock).

        Raises:
            TypeError: If next_use is missing or not callable: Belady must be told the future,
                so a node cache cannot use it (choose an online policy there).
        """
        if not callable(next_use):
            raise TypeError(
                f"Belady needs next_use=<callable key -> time of its next request>, got "
                f"{next_use!r}: it is an offline policy for simulation (workloads.simulate "
                "builds the oracle from the trace); a node cache needs an online policy"
            )
        super().__init__(**kwargs)
        self._next_use = next_use
        self._heap = LazyHeap()  # priority = -next use: the furthest comes out first

    def _when(self, key: Hashable) -> float:
        when = float(self._next_use(key))
        if math.isnan(when):
            raise ValueError(f"Belady's next_use({key!r}) returned NaN; return math.inf for never")
        return when

    def _insert(self, key: Hashable, nbytes: int, cost: float) -> None:
        self._heap.push(key, -self._when(key))

    def _access(self, key: Hashable) -> None:
        self._heap.push(key, -self._when(key))

    def _remove(self, key: Hashable) -> None:
        self._heap.discard(key)

    def _order(self) -> Iterator[Hashable]:
        return iter(self._heap)

    def _admit(self, key: Hashable, nbytes: int, cost: float, victims: Sequence[Hashable]) -> bool:
        return self._when(key) < min(-self._heap.priority(v) for v in victims)
