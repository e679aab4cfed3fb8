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

__all__ = ["MAX_RELEASED_EARLY", "Lease", "LeaseTable"]

E = TypeVar("E")

# How many releases of ids not granted (yet) a table remembers at most. Such a release is kept
# in case its grant is still to come; an id whose acquire is under way is remembered apart and
# never forgotten before its grant (see ``begin``), so this bound only forgets releases whose
# acquire never came here at all (the task ran elsewhere, the grant was a bypass).
MAX_RELEASED_EARLY = 4096


@dataclass
class Lease(Generic[E]):
    entry: E  # the entry, not its key: an entry dropped from its tier while leased keeps its leases
    holder: object | None  # a Holder or Caller (_protocol); None until a task claims it
    granted_at: float
    ttl_s: float | None = None  # unclaimed, it ends after this long (None: the table's ttl)


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
            an id released before an acquire of it began.
        incarnation: the prefix of the ids this table chooses; None: a fresh random one (64 bits).
        max_released_early: how many releases of ids not granted a table remembers at most.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        holder_alive: Callable[[object], bool],
        unclaimed_ttl_s: float,
        incarnation: str | None = None,
        max_released_early: int = MAX_RELEASED_EARLY,
    ) -> None:
        self.clock = clock
        self.holder_alive = holder_alive
        self.unclaimed_ttl_s = unclaimed_ttl_s
        self.incarnation = secrets.token_hex(8) if incarnation is None else incarnation
        self._leases: dict[int | str, Lease[E]] = {}
        self._ids = itertools.count(1)
        self.max_released_early = max_released_early
        # Releases of caller ids nobody has asked to acquire yet, oldest first: forgotten after
        # the ttl, and beyond ``max_released_early`` (the oldest go).
        self._released_early: dict[str, float] = {}
        # Caller ids whose acquire is under way (``begin``), and those of them released already:
        # their grant ends at once however long its load takes (a ttl would let a load slower
        # than it pin its lease for as long as the caller lives).
        self._acquiring: set[str] = set()
        self._released_acquiring: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def holds(self, lease_id: object) -> bool:
        """Whether ``lease_id`` is a lease granted and not ended."""
        return lease_id in self._leases

    def check_new(self, lease_id: str | None) -> None:
        """Raises TypeError for a caller's id that is not a str, ValueError for one in use."""
        if lease_id is not None and not isinstance(lease_id, str):
            raise TypeError(f"a caller's lease_id must be a str, got {type(lease_id).__name__}")
        if lease_id in self._leases:
            raise ValueError(f"lease id {lease_id!r} is in use already")

    def begin(self, lease_id: str | None) -> None:
        """Marks a caller's id as being acquired (``check_new`` first): a release of it from now
        on is remembered until ``finish``, so that its grant ends at once however late it comes.

        Raises:
            TypeError, ValueError: as ``check_new``; ValueError also for an id being acquired.
        """
        self.check_new(lease_id)
        if lease_id is None:
            return
        if lease_id in self._acquiring:
            raise ValueError(f"lease id {lease_id!r} is in use already")
        self._acquiring.add(lease_id)
        released = self._released_early.pop(lease_id, None)
        if released is not None:  # released before its acquire even began
            self._released_acquiring[lease_id] = released

    def finish(self, lease_id: str | None) -> None:
        """The acquire of a caller's id is over (granted by ``add``, or no lease at all: a
        bypass, an error); a release of it remembered meanwhile has nothing more to end."""
        if lease_id is not None:
            self._acquiring.discard(lease_id)
            self._released_acquiring.pop(lease_id, None)
            self._released_early.pop(lease_id, None)

    def add(
        self, entry: E, holder: object | None, lease_id: str | None = None, *, ttl_s: float | None = None
    ) -> tuple[str, bool]:
        """Records a granted lease; returns its id and whether it is over already (its caller
        released that id before the grant came), in which case nothing is recorded.

        ``ttl_s``: how long the lease may stay unclaimed (None: ``unclaimed_ttl_s``); a peer's
        lend, which nobody claims, ends after the time its copy may take."""
        if lease_id is None:
            lease_id = f"{self.incarnation}:{next(self._ids)}"
        self._acquiring.discard(lease_id)
        released = self._released_acquiring.pop(lease_id, None)
        if released is None:
            released = self._released_early.pop(lease_id, None)
        if released is not None:
            return lease_id, True
        self._leases[lease_id] = Lease(entry, holder, self.clock(), ttl_s)
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
                self._remember_release(lease_id)
            return None
        return lease.entry

    def _remember_release(self, lease_id: str) -> None:
        if lease_id in self._acquiring:  # its grant is on its way: it ends when it comes
            self._released_acquiring.setdefault(lease_id, self.clock())
            return
        self._released_early.pop(lease_id, None)  # a repeated release counts from now
        self._released_early[lease_id] = self.clock()
        while len(self._released_early) > self.max_released_early:
            del self._released_early[next(iter(self._released_early))]  # the oldest

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
            if (lease.holder is None and now - lease.granted_at > _ttl(lease, self.unclaimed_ttl_s))
            or (lease.holder is not None and not self.holder_alive(lease.holder))
        ]
        # Their acquire never began here: nothing to end. (Those whose acquire is under way are
        # kept apart, in ``_released_acquiring``, until it finishes.)
        for lid in [i for i, at in self._released_early.items() if now - at > self.unclaimed_ttl_s]:
            del self._released_early[lid]
        return [self._leases.pop(lid).entry for lid in dead]

    def holders(self, older_than_s: float) -> list[object]:
        """The holders of leases granted more than ``older_than_s`` ago (None for unclaimed
        ones)."""
        now = self.clock()
        return [lease.holder for lease in self._leases.values() if now - lease.granted_at > older_than_s]

    def released_early(self) -> dict[str, float]:
        """Caller ids released before their grant, and when (a copy; for tests and reports)."""
        return {**self._released_early, **self._released_acquiring}


def _ttl(lease: Lease, default: float) -> float:
    return default if lease.ttl_s is None else lease.ttl_s
