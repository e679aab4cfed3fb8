"""Least recently used: evicts the key whose last insert or hit is oldest.

The baseline policy; ignores sizes and miss costs. O(1) insert, hit and remove.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator

from trims_ray.policy.base import EvictionPolicy

__all__ = ["LRU"]


class LRU(EvictionPolicy):
    """Least recently used first; ties cannot happen (every event moves one key)."""

    name = "lru"

    def __init__(self, **kwargs) -> None:
        """Creates an empty LRU policy; kwargs (clock) go to EvictionPolicy."""
        super().__init__(**kwargs)
        # Front = least recently used; move_to_end keeps a hit O(1).
        self._recency: OrderedDict[Hashable, None] = OrderedDict()

    def _insert(self, key: Hashable, nbytes: int, cost: float) -> None:
        self._recency[key] = None

    def _access(self, key: Hashable) -> None:
        self._recency.move_to_end(key)

    def _remove(self, key: Hashable) -> None:
        del self._recency[key]

    def _order(self) -> Iterator[Hashable]:
        return iter(self._recency)
