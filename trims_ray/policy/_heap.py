"""A keyed min-heap with lazy invalidation, shared by the priority-ordered policies.

LFU, GDSF, the cost-aware policy and Belady each order keys by a number that changes on a hit;
this heap gives them O(log n) updates and an eviction order that is read without changing state.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterator

__all__ = ["LazyHeap"]

# An entry is (priority, seq, key). seq is unique, so tuples never compare keys (which may not
# be orderable) and equal priorities come out in update order: the older update first.
_Item = tuple[float, int, Hashable]


class LazyHeap:
    """Keys ordered by priority, lowest first; an update pushes a new entry, the old one goes stale.

    A stale entry (one that is no longer its key's current entry) stays in the list until it
    reaches the top or the list is rebuilt, which happens once stale entries outnumber live
    ones, so memory stays O(n) and every operation O(log n) amortized. The top entry is kept
    live after every change, so the first key of the order costs no copy.
    """

    def __init__(self) -> None:
        self._items: list[_Item] = []
        self._live: dict[Hashable, _Item] = {}
        self._seq = itertools.count()

    def push(self, key: Hashable, priority: float) -> None:
        """Sets key's priority (inserting the key if it is new)."""
        item = (priority, next(self._seq), key)
        self._live[key] = item
        heapq.heappush(self._items, item)
        self._tidy()

    def discard(self, key: Hashable) -> None:
        """Forgets key (KeyError if it is not here)."""
        del self._live[key]
        self._tidy()

    def priority(self, key: Hashable) -> float:
        """Returns key's current priority (KeyError if it is not here)."""
        return self._live[key][0]

    def lowest(self) -> float:
        """Returns the lowest priority held (IndexError when empty)."""
        return self._items[0][0]

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Hashable]:
        """Yields every key once, lowest priority first, without changing the heap."""
        items, live = self._items, self._live
        if not items:
            return
        yield items[0][2]  # live by _tidy's invariant
        # Most callers stop at the first key; only those that go on pay for a copy.
        rest = items.copy()
        heapq.heappop(rest)
        while rest:
            item = heapq.heappop(rest)
            if live.get(item[2]) is item:
                yield item[2]

    def _tidy(self) -> None:
        items, live = self._items, self._live
        if len(items) > 2 * len(live) + 32:
            items[:] = live.values()
            heapq.heapify(items)
        while items and live.get(items[0][2]) is not items[0]:
            heapq.heappop(items)
