"""The lease table of one cache tier: who holds which entry since when, the caller-chosen ids
released before their grant, and which leases the reaper ends (dead holders, unclaimed ones).

These are the host tier's lease rules (``node_cache.NodeCache``) as a class the GPU tier uses
too; the tier owns its entries and its lock and calls this under that lock, so it is not
thread-safe on its own. Holders are opaque here: liveness is the injected ``holder_alive``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Lease", "LeaseTable"]

E = TypeVar("E")


@dataclass
class Lease(Generic[E]):
    entry: E
    holder: object | None  # a Holder or Caller (node_cache); None until a task claims it
    granted_at: float


class LeaseTable(Generic[E]):
    """Leases by id (ints this table chooses, or a caller's own str ids).

    Args:
        clock: monotonic time source.
        holder_alive: tells whether a holder still runs.
        unclaimed_ttl_s: a lease with no holder is ended after this long; so is the memory of
            an id released before its grant.
    """

    def __init__(self, *, clock: Callable[[], float], holder_alive: Callable[[object], bool], unclaimed_ttl_s: float) -> None:
        self.clock = clock
        self.holder_alive = holder_alive
        self.unclaimed_ttl_s = unclaimed_ttl_s
        self._leases: dict[Hashable, Lease[E]] = {}
        self._ids = itertools.count(1)
        self._released_early: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def check_new(self, lease_id: str | None) -> None:
        """Raises TypeError for a caller's id that is not a str, ValueError for one in use."""
        if lease_id is not None and not isinstance(lease_id, str):
            raise TypeError(f"a caller's lease_id must be a str, got {type(lease_id).__name__}")
        if lease_id in self._leases:
            raise ValueError(f"lease id {lease_id!r} is in use already")

    def add(self, entry: E, holder: object | None, lease_id: str | None = None) -> tuple[Hashable, bool]:
        """Records a granted lease; returns its id and whether it is over already (its caller
        released that id before the grant came), in which case nothing is recorded."""
        if lease_id is None:
            lease_id = next(self._ids)
        if self._released_early.pop(lease_id, None) is not None:
            return lease_id, True
        self._leases[lease_id] = Lease(entry, holder, self.clock())
        return lease_id, False

    def pop(self, lease_id: Hashable) -> E | None:
        """Ends a lease and returns its entry; None if it was not held (a caller's str id is
        then remembered, so that its grant, when it comes, ends at once)."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            if isinstance(lease_id, str):
                self._released_early[lease_id] = self.clock()
            return None
        return lease.entry

    def claim(self, lease_id: Hashable, holder: object) -> bool:
        """Names the holder of a lease taken on its behalf; False if the lease is gone."""
        lease = self._leases.get(lease_id)
        if lease is None:
            return False
        lease.holder = holder
        return True

    def expired(self) -> list[E]:
        """Ends the leases of holders that died and those unclaimed for too long; returns their
        entries (once per lease ended)."""
        now = self.clock()
        dead = [
            lid
            for lid, lease in self._leases.items()
            if (lease.holder is None and now - lease.granted_at > self.unclaimed_ttl_s)
            or (lease.holder is not None and not self.holder_alive(lease.holder))
        ]
        for lid in [i for i, at in self._released_early.items() if now - at > self.unclaimed_ttl_s]:
            del self._released_early[lid]  # their grant never came: nothing to end
        return [self._leases.pop(lid).entry for lid in dead]

    def holders(self, older_than_s: float) -> list[object]:
        """The holders of leases granted more than ``older_than_s`` ago."""
        now = self.clock()
        return [lease.holder for lease in self._leases.values() if now - lease.granted_at > older_than_s]
