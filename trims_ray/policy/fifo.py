"""First in, first out: evicts the key that became resident earliest; hits change nothing.

A baseline for the simulator's curves (what a cache without any use information does). O(1)
insert and remove; a hit costs nothing.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator

from trims_ray.policy.base import EvictionPolicy

__all__ = ["FIFO"]


class FIFO(EvictionPolicy):
    """Oldest insert first; ignores hits, sizes and miss costs."""

    name = "fifo"

    def __init__(self, **kwargs) -> None:
        """Creates an empty FIFO policy; kwargs (clock) go to EvictionPolicy."""
        super().__init__(**kwargs)
        # dicts keep insertion order: the first key is the oldest resident.
        self._arrival: dict[Hashable, None] = {}

    def _insert(self, key: Hashable, nbytes: int, cost: float) -> None:
        self._arrival[key] = None

    def _access(self, key: Hashable) -> None:
        pass  # a hit does not change when the key arrived

    def _remove(self, key: Hashable) -> None:
        del self._arrival[key]

    def _order(self) -> Iterator[Hashable]:
        return iter(self._arrival)
