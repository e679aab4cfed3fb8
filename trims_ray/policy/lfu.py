"""Least frequently used: evicts the key with the fewest hits since it became resident.

In-cache LFU (a key's count starts again at 1 when it returns), ties broken by the older last
request. Ignores sizes and miss costs and never ages counts, so a formerly hot key can outstay
its popularity: the classic baseline GDSF and the cost-aware policy improve on. O(log n).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator

from trims_ray.policy._heap import LazyHeap
from trims_ray.policy.base import EvictionPolicy

__all__ = ["LFU"]


class LFU(EvictionPolicy):
    """Fewest requests since insert first; among equal counts, least recently requested first."""

    name = "lfu"

    def __init__(self, **kwargs) -> None:
        """Creates an empty LFU policy; kwargs (clock) go to EvictionPolicy."""
        super().__init__(**kwargs)
        self._heap = LazyHeap()

    def _insert(self, key: Hashable, nbytes: int, cost: float) -> None:
        self._heap.push(key, 1)

    def _access(self, key: Hashable) -> None:
        self._heap.push(key, self._heap.priority(key) + 1)

    def _remove(self, key: Hashable) -> None:
        self._heap.discard(key)

    def _order(self) -> Iterator[Hashable]:
        return iter(self._heap)
