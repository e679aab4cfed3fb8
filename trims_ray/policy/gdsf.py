"""Greedy-Dual-Size-Frequency: keeps the keys that save the most miss cost per byte they hold.

Priority = L + freq * cost / size, lowest evicted first; L (the inflation value) rises to the
priority of what is evicted, so keys not requested for a while age out. Admission compares what
a newcomer would save with what its victims save, by aged request counts (TinyLFU's idea).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

from trims_ray.policy._heap import LazyHeap
from trims_ray.policy.base import EvictionPolicy, check_positive

__all__ = ["GDSF"]


class GDSF(EvictionPolicy):
    """GDSF (Cherkasova 1998) with a frequency-based admission rule.

    Eviction: a key's priority is set on insert and on every hit to
    ``L + freq * cost / max(nbytes, 1)``, with freq the hits since insert plus one. When a key
    is removed, L rises to the lowest priority tracked at that moment: for an eviction in
    GDSF's own order that is the evicted key's priority (the classic rule); when the cache
    skipped a leased key, or removes a key explicitly, L stops at the leased or lowest one, so
    L never passes a tracked key's priority and an explicit eviction of a hot model does not
    make every newcomer outrank the whole cache. (A key whose cost ``on_cost`` lowered since
    its last hit may sit below L: only its cost term moved, and it goes first.)

    Admission: a miss is kept when its ``requests * cost / nbytes`` is at least that of its
    victims together (their summed ``requests * cost`` over their summed bytes), where
    requests() counts requests (hits and misses, resident or not) and halves every count after
    a window of 16 requests per tracked key (at least 32), and again every ``half_life``
    seconds of the clock, so popularity fades while requests come and while none do (after an
    idle hour, yesterday's hot set does not hold off today's models). Both sides
    estimate the miss time saved per window per byte held: a one-off huge model (one request)
    loses against a hot set holding the same bytes, yet a model that turns hot wins after a few
    requests. Per byte, not in total: the victims usually free more bytes than the newcomer
    needs (the last one overshoots), and totals would count that against every newcomer (the
    simulator's curves lost 2-6 points of hit ratio at large caches that way). The newcomer must
    promise ``admit_margin`` times what its victims save (2 by default): counts of a few
    requests are noisy, and every swap costs a load, so without a margin two models of about
    the same demand that do not fit together take turns, each evicting the other (on three
    nodes of the real zoo models, ConvNeXt and T5-small did; see docs/benchmarks.md). With
    unknown (zero) costs admission never refuses. Exact counts rather than a sketch: a cache of
    models sees few distinct keys.
    """

    name = "gdsf"

    def __init__(
        self, *, admission: bool = True, admit_margin: float = 2.0, half_life: float = 600.0, **kwargs
    ) -> None:
        """Creates an empty GDSF policy.

        Args:
            admission: False admits every miss (plain GDSF).
            admit_margin: How many times its victims' saving per byte a newcomer must promise
                to be kept (>= 1; 1 admits ties).
            half_life: Seconds (of the clock) after which admission's request counts halve.
            **kwargs: Passed to EvictionPolicy (clock).

        Raises:
            TypeError: If half_life is not a number.
            ValueError: If admit_margin is below 1 (or NaN), or half_life is not finite and > 0.
        """
        if not admit_margin >= 1:  # also refuses NaN
            raise ValueError(f"admit_margin must be >= 1, got {admit_margin!r}")
        half_life = check_positive("half_life", half_life)
        super().__init__(**kwargs)
        self._heap = LazyHeap()
        self._freq: dict[Hashable, int] = {}
        self._inflation = 0.0
        self._admission = bool(admission)
        self._admit_margin = float(admit_margin)
        self._requests: dict[Hashable, int] = {}  # aged request counts, resident or not
        self._window_used = 0
        self._half_life = half_life
        self._halved_at: float | None = None  # clock time the counts last halved for time

    def _insert(self, key: Hashable, nbytes: int, cost: float) -> None:
        self._freq[key] = 1
        self._heap.push(key, self._inflation + cost / max(nbytes, 1))
        self._record(key)

    def _access(self, key: Hashable) -> None:
        entry = self._entries[key]
        freq = self._freq[key] = self._freq[key] + 1
        self._heap.push(key, self._inflation + freq * entry.cost / max(entry.nbytes, 1))
        self._record(key)

    def _recost(self, key: Hashable, old_cost: float) -> None:
        # The cost term alone moves: the inflation the key last got (on its insert or last
        # hit) stays, so a cheaper reload does not count as a fresh hit.
        entry = self._entries[key]
        delta = self._freq[key] * (entry.cost - old_cost) / max(entry.nbytes, 1)
        self._heap.push(key, self._heap.priority(key) + delta)

    def _remove(self, key: Hashable) -> None:
        self._inflation = max(self._inflation, self._heap.lowest())
        self._heap.discard(key)
        del self._freq[key]

    def _order(self) -> Iterator[Hashable]:
        return iter(self._heap)

    def _admit(self, key: Hashable, nbytes: int, cost: float, victims: Sequence[Hashable]) -> bool:
        if not self._admission:
            return True
        self._age()
        requests, entries = self._requests, self._entries
        kept = (requests.get(key, 0) + 1) * cost / max(nbytes, 1)  # + 1: this request
        lost = sum(requests.get(v, 0) * entries[v].cost for v in victims)
        if kept >= self._admit_margin * lost / max(sum(entries[v].nbytes for v in victims), 1):
            return True  # on_insert records this request
        self._record(key)  # a refused request still counts towards the key's next chance
        return False

    def _record(self, key: Hashable) -> None:
        self._age()
        self._requests[key] = self._requests.get(key, 0) + 1
        self._window_used += 1
        if self._window_used >= max(32, 16 * len(self._entries)):
            # TinyLFU's reset: halve every count; keys that fall to zero are forgotten, which
            # bounds the memory to the keys requested in the last few windows.
            self._requests = {k: n >> 1 for k, n in self._requests.items() if n > 1}
            self._window_used = 0

    def _age(self) -> None:
        """Halves every request count once per ``half_life`` passed since they last halved
        for time (counts that reach zero are forgotten)."""
        now = self._clock()
        if self._halved_at is None:
            self._halved_at = now
            return
        periods = int((now - self._halved_at) // self._half_life)
        if periods > 0:
            shift = min(periods, 63)
            self._requests = {k: n >> shift for k, n in self._requests.items() if n >> shift}
            self._halved_at += periods * self._half_life
