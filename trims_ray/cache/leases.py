"""The lease table of a cache tier: who holds which entry since when, the caller-chosen ids
released before their grant, and which leases the reaper ends (dead holders, unclaimed ones).

The one lease table of the cache core: the host tier (``node_cache.NodeCache``) and the GPU tier
(``gpu_tier.GpuTier``) each keep one. The tier owns its entries and its lock and calls this under
that lock, so it is not thread-safe on its own. Holders are opaque here: liveness is the
injected ``holder_alive``.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Lease", "LeaseTable"]

E = TypeVar("E")


@dataclass
class Lease(Generic[E]):
    entry: E  # the entry, not its key: an entry dropped from its tier while leased keeps its leases
    holder: object | None  # a Holder or Caller (_protocol); None until a task claims it
    granted_at: float


class LeaseTable(Generic[E]):
    """Leases by id: str ids this table chooses, or a caller's own str ids.

    The ids this table chooses are ``"<incarnation>:<n>"``. The incarnation is new for every
    table, so an id granted before its actor restarted (a task that leased from the previous
    incarnation releases it afterwards) never matches a lease of this one: with plain counters
    both incarnations would hand out 1, 2, ... and that release would end another task's lease.
    Callers' ids (``_routing``: ``"<caller uuid, 32 hex digits>:<n>"``) never start like ours
    (16 hex digits and a colon).

    Args:
        clock: monotonic time source.
        holder_alive: tells whether a holder still runs.
        unclaimed_ttl_s: a lease with no holder is ended after this long; so is the memory of
            an id released before its grant.
        incarnation: the prefix of the ids this table chooses; None: a fresh random one (64 bits).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        holder_alive: Callable[[object], bool],
        unclaimed_ttl_s: float,
        incarnation: str | None = None,
    ) -> None:
        self.clock = clock
        self.holder_alive = holder_alive
        self.unclaimed_ttl_s = unclaimed_ttl_s
        self.incarnation = secrets.token_hex(8) if incarnation is None else incarnation
        self._leases: dict[int | str, Lease[E]] = {}
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

    def add(self, entry: E, holder: object | None, lease_id: str | None = None) -> tuple[str, bool]:
        """Records a granted lease; returns its id and whether it is over already (its caller
        released that id before the grant came), in which case nothing is recorded."""
        if lease_id is None:
            lease_id = f"{self.incarnation}:{next(self._ids)}"
        if self._released_early.pop(lease_id, None) is not None:
            return lease_id, True
        self._leases[lease_id] = Lease(entry, holder, self.clock())
        return lease_id, False

    def pop(self, lease_id: int | str) -> E | None:
        """Ends a lease and returns its entry; None if it was not held (a caller's str id is
        then remembered, so that its grant, when it comes, ends at once)."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            # An id of ours was granted, so it is over for good (released twice, or reaped).
            # Anything else may be a caller's whose grant is yet to come: a stale id of an earlier
            # incarnation is remembered too, harmlessly (no grant will ever carry it), until
            # ``expired`` forgets it.
            if isinstance(lease_id, str) and not lease_id.startswith(f"{self.incarnation}:"):
                self._released_early[lease_id] = self.clock()
            return None
        return lease.entry

    def claim(self, lease_id: int | str, holder: object) -> bool:
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
        """The holders of leases granted more than ``older_than_s`` ago (None for unclaimed
        ones)."""
        now = self.clock()
        return [lease.holder for lease in self._leases.values() if now - lease.granted_at > older_than_s]

    def released_early(self) -> dict[str, float]:
        """Caller ids released before their grant, and when (a copy; for tests and reports)."""
        return dict(self._released_early)
