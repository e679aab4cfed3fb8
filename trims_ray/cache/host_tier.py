"""The host tier of a node: one shared-memory object per model, under a byte budget that counts
loads in flight, with per-tenant quotas. Cache core, no Ray: ``node_cache.NodeCache`` owns one
and calls it under its own lock; the loads themselves (I/O) run outside, in the node cache.

Besides the table of copies that new requests may lease (``entries``), it holds copies that take
no new lease but still hold bytes until their last lease ends: corrupt ones (``condemned``, by
scrub), evicted ones (``leaving``, an evict while leased), and the shared copies of misses the
tier did not keep (``bypassing``, see ``bypass``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .._errors import CapacityError
from .._manifest import Manifest
from .._protect import GUARD_BYTES
from .._protocol import DISK, HOST, RecentUses, TierStats, cache_key
from ..policy import EvictionPolicy, Outcome, decide_admission, shrink_victims
from .host_entry import HostEntry, RoomPending
from .quotas import tenant_quota

__all__ = ["HostTier"]

# The most evict-first models a report lists (every caller gets them): enough for any load
# but one that would evict more models than this, which placement then prices as a bypass.
EVICTABLE_REPORTED = 64


class HostTier:
    """The host tier's entries and their bytes: which models are here or loading, which corrupt
    copies still wait for their last lease, what may be evicted to admit a load, and the
    tier's counters. Not thread-safe: the node cache calls it under its lock.

    Args:
        budget: bytes the tier may hold, guard pages included.
        policy: the tier's eviction policy.
        on_change: called whenever residency, usage or leases change.
        quota: tenant -> the bytes it may hold here, None: no quota.
        bypass_budget: bytes that shared copies of misses the tier does not keep may hold, outside
            ``budget`` (see ``bypass``); 0: none, each such miss is read by its task.
        ask_back: asks the processes pinning an entry to give it back (``pins.ProcessPins``);
            called when a pinned entry is evicted or chosen to make room.
        wall_clock: wall-clock time source, for the recent uses it reports (``RecentUses``).
        reload_cost: where a miss of a model would read it from now ("disk" or "store"), what
            that is expected to cost (seconds), the estimate a newcomer is weighed by, and
            whether the rate it is priced at was measured on this node; before a load chooses
            its victims, a resident whose disk copy came or went since its cost was set, or
            that was priced at an assumed rate since measured, is priced again by it. None:
            residents keep the cost they came in with.
    """

    def __init__(
        self,
        budget: int,
        policy: EvictionPolicy,
        on_change: Callable[[], None],
        quota: Callable[[str], int | None],
        bypass_budget: int = 0,
        ask_back: Callable[[HostEntry], int] = lambda entry: 0,
        wall_clock: Callable[[], float] = time.time,
        reload_cost: Callable[[Manifest], tuple[str, float, bool]] | None = None,
    ) -> None:
        self.budget = budget
        self.reload_cost = reload_cost
        self.wall_clock = wall_clock
        # Recent uses of the models in the table (requests and the hits processes served from
        # the models they keep), which placement weighs when it chooses where a load evicts.
        self.uses: dict[str, RecentUses] = {}
        self.ask_back = ask_back
        self.policy = policy
        self.on_change = on_change
        self.quota = quota
        self.entries: dict[str, HostEntry] = {}  # by cache key, ready or loading
        # Copies scrub found corrupt while leased: out of the table (no new lease gets them),
        # their bytes still counted, freed when their last lease ends.
        self.condemned: dict[int, HostEntry] = {}
        # Copies evicted while leased (or loading): out of the table, so that no new lease keeps
        # them (overlapping leases would otherwise defer the evict forever) and placement no
        # longer hears of them; their bytes count until their last lease ends.
        self.leaving: dict[int, HostEntry] = {}
        # Shared copies of misses the tier did not keep, by cache key (see ``bypass``).
        self.bypass_budget = bypass_budget
        self.bypassing: dict[str, HostEntry] = {}
        # Room being made for a miss, by its cache key: the pinned models asked back for it.
        # Other requests for that key wait for the same ones; choosing afresh, each would ask
        # back more kept models (the first victims' bytes still count until given back).
        self.making_room: dict[str, list[HostEntry]] = {}
        self.stats = TierStats(capacity=budget)
        self.quota_denied: dict[str, int] = {}  # tenant -> loads its quota refused

    # -- accounting ----------------------------------------------------------------------------

    def held(self) -> list[HostEntry]:
        """Every entry that holds bytes of the budget: in the table (ready or loading), leaving
        or condemned."""
        return [*self.entries.values(), *self.leaving.values(), *self.condemned.values()]

    @property
    def bypass_used(self) -> int:
        """Bytes of the shared copies of bypassed misses (outside the budget)."""
        return sum(e.nbytes for e in self.bypassing.values())

    @property
    def used(self) -> int:
        return sum(e.nbytes for e in self.held())

    def tenant_used(self, tenant: str) -> int:
        """Bytes of ``tenant``'s entries here, loads in flight included."""
        return sum(e.nbytes for e in self.held() if e.manifest.tenant == tenant)

    def tenants(self) -> set[str]:
        """The tenants holding bytes here."""
        return {e.manifest.tenant for e in self.held()}

    def refresh(self) -> None:
        self.stats.bytes_used = self.used
        # A copy evicted while leased is still resident (mapped, its bytes held) until it goes.
        self.stats.models = sum(1 for e in [*self.entries.values(), *self.leaving.values()] if e.ready.is_set())
        self.stats.bypass_bytes = self.bypass_used
        self.on_change()

    def report(self) -> tuple[dict[str, str], dict[str, tuple[str, str, int]], dict[str, int]]:
        """For placement, per blob in the table (copies that take no new lease are not there):
        "host" or "loading"; (tenant, name, nbytes); and the leases of invocations running or
        waiting for its load (processes' pins are not invocations)."""
        residency = {k: HOST if e.ready.is_set() else "loading" for k, e in self.entries.items()}
        models = {k: (e.manifest.tenant, e.manifest.name, e.manifest.nbytes) for k, e in self.entries.items()}
        return residency, models, {k: e.leases - e.pins for k, e in self.entries.items() if e.leases > e.pins}

    def evictable(self) -> list[tuple[str, int, float, float]]:
        """For placement, the models a load could evict now, in the policy's eviction order
        (the first ``EVICTABLE_REPORTED``): (key, accounted bytes, recent uses' count and time:
        ``RecentUses``). Those leased by an invocation are not; those only processes' pins hold
        are (they are asked back)."""

        def idle(k: str) -> bool:
            entry = self.entries[k]
            return entry.ready.is_set() and entry.leases == entry.pins

        order = []
        for key in self.policy.victims(idle):
            uses = self.uses.get(key, RecentUses())
            order.append((key, self.entries[key].nbytes, uses.count, uses.at))
            if len(order) == EVICTABLE_REPORTED:
                break
        return order

    def note_use(self, key: str, times: int = 1) -> None:
        """``key`` was used ``times`` times now (a request, or hits processes served)."""
        now = self.wall_clock()
        self.uses[key] = self.uses.get(key, RecentUses()).used(now, times)
        if len(self.uses) > max(256, 4 * len(self.entries)):
            # Bounded: half of the models not here, those used least lately, are forgotten.
            gone = sorted((u.count_at(now), k) for k, u in self.uses.items() if k not in self.entries)
            for _, k in gone[: len(gone) // 2]:
                del self.uses[k]

    # -- admission -----------------------------------------------------------------------------

    def request(
        self, manifest: Manifest, force: bool, miss_cost: float, reclaim: bool = False, again: bool = False
    ) -> tuple[HostEntry | None, bool]:
        """A request for ``manifest``: the entry it leases (its count taken: ``leases`` + 1) and
        whether the caller loads it (a miss admitted, or a new shared copy), or (None, False):
        a bypass, which the task reads itself. ``again``: the same request asked once more
        after RoomPending (its use is counted once). Raises as ``admit``."""
        key = cache_key(manifest)
        if not again:
            self.note_use(key)
        entry = self.entries.get(key)
        leader = entry is None
        if leader:
            entry = self.admit(manifest, force, miss_cost, reclaim)
            if entry is None:  # not kept: a shared copy (one read for a burst), or none
                entry, leader = self.bypass(manifest)
                if entry is None:
                    return None, False
        elif entry.ready.is_set():  # failed loads leave the table, so this one succeeded
            self.stats.hits += 1
            self.policy.on_access(key)
        else:
            self.stats.misses += 1  # joins the load in flight
        entry.leases += 1
        return entry, leader

    def admit(self, manifest: Manifest, force: bool, miss_cost: float, reclaim: bool = False) -> HostEntry | None:
        """Reserves host bytes for a load (evicting idle models if needed) and returns its entry,
        or None when the policy does not admit it. ``miss_cost``: what a miss of this model
        costs (seconds), which the policy weighs against its victims; ``force``: admit anyway.
        ``reclaim``: a model only processes' pins hold counts as idle; if one must go to make
        room, it is evicted (it goes when its pins are given back), the processes are asked for
        it, and RoomPending is raised: the caller waits for it and asks again.

        Raises:
            RoomPending: see ``reclaim``; nothing is reserved, no miss is counted.
            CapacityError: it cannot fit the budget or its tenant's quota, even after evicting
                what is idle (or, with ``force``, when what would make room is in use).
        """
        need = manifest.nbytes + 2 * GUARD_BYTES
        asked = self._room_being_made(cache_key(manifest))
        if asked and reclaim:
            raise RoomPending(asked)
        self.stats.misses += 1
        try:
            made = self._make_room(need, manifest, force, miss_cost, reclaim)
        except RoomPending:
            self.stats.misses -= 1  # counted when it is asked again
            raise
        if not made:
            self.stats.bypasses += 1
            return None
        entry = HostEntry(manifest, need)
        self.entries[cache_key(manifest)] = entry
        self.refresh()
        return entry

    def bypass(self, manifest: Manifest) -> tuple[HostEntry | None, bool]:
        """A shared copy for a miss ``admit`` did not keep: the one already held or loading for
        its key (joined), else a new one when ``bypass_budget`` has room for it; returns it and
        whether it is new (its caller loads it), or (None, False): the task reads its own copy.

        Why: with the tier fully leased (a burst), every miss is a bypass, and if each task read
        the blob itself, N concurrent requests would make N reads and N private copies that no
        budget counts. A shared copy keeps single flight (one read, one object, zero-copy views
        for every request) and is counted, in ``bypass_bytes``, against its own allowance
        rather than the budget: it is never kept (no policy entry, never reported resident),
        and it goes with its last lease.
        """
        key = cache_key(manifest)
        entry = self.bypassing.get(key)
        if entry is not None:
            return entry, False
        need = manifest.nbytes + 2 * GUARD_BYTES
        # What the tier holds beyond its budget (lowered under leased models) takes room from
        # the allowance: the two together must stay within the object store.
        if self.bypass_used + need > self.bypass_budget - max(0, self.used - self.budget):
            return None, False
        entry = HostEntry(manifest, need, evict_when_idle=True)
        self.bypassing[key] = entry
        self.refresh()
        return entry, True

    def _reweigh_residents(self) -> None:
        """Prices again, by the estimate a newcomer gets, each resident whose disk copy came or
        went since its cost in the policy was set. A model loaded from the store kept the cost
        of a store load after its disk copy landed, and a newcomer with a disk copy, asked for as
        often, lost to it at a third of the cost (on one node, 5 times running).

        Only then: priced again at every load's rates, residents followed the latest rate
        instead of their own load's, and the real-zoo peers run read from the store more often
        (docs/benchmarks.md, "Residents priced by their reload")."""
        if self.reload_cost is None:
            return
        for key, entry in self.entries.items():
            if not entry.ready.is_set() or key not in self.policy:
                continue
            source, seconds, measured = self.reload_cost(entry.manifest)
            # Also once the rate it was priced at is measured: priced at an assumed disk rate,
            # it outweighed newcomers priced at the measured one however often they were asked.
            if (source == DISK) != entry.priced_from_disk or (measured and not entry.priced_at_measured_rate):
                self.policy.on_cost(key, max(0.0, seconds))
                entry.priced_from_disk, entry.priced_at_measured_rate = source == DISK, measured

    def _make_room(self, need: int, manifest: Manifest, force: bool, miss_cost: float, reclaim: bool) -> bool:
        what, tenant = f"{manifest.tenant}/{manifest.name}", manifest.tenant
        sizes = {k: e.nbytes for k, e in self.entries.items() if e.ready.is_set()}

        def idle(k: str) -> bool:
            entry = self.entries[k]
            return entry.leases == (entry.pins if reclaim else 0)

        # A tenant over its quota makes room from its own models first: no other tenant's model
        # is evicted to let one tenant exceed its share.
        quota, used = self.quota(tenant), self.tenant_used(tenant)
        self._reweigh_residents()
        decision = decide_admission(
            self.policy,
            cache_key(manifest),
            need,
            miss_cost,
            budget=self.budget,
            # Shared copies of bypassed misses beyond their allowance (it shrank when the budget
            # was raised) take room from the budget until they go.
            used=self.used + max(0, self.bypass_used - self.bypass_budget),
            sizes=sizes,
            evictable=idle,
            quota=tenant_quota(tenant, quota, used),
            force=force,
        )
        if decision.outcome is Outcome.TOO_BIG:
            raise CapacityError(
                f"model {what} needs {need} bytes in the host tier, whose budget is "
                f"{self.budget}: raise CacheConfig.host_bytes (or host_fraction) or use a "
                "smaller model"
            )
        if decision.outcome is Outcome.OVER_QUOTA:
            self.stats.quota_denials += 1
            self.quota_denied[tenant] = self.quota_denied.get(tenant, 0) + 1
            if need > quota:
                raise CapacityError(
                    f"model {what} needs {need} bytes in the host tier, over the host quota of "
                    f"tenant {tenant!r} ({quota} bytes): raise its quota (trims_ray.set_quota, or "
                    "CacheConfig.tenant_quotas or tenant_share) or use a smaller model"
                )
            raise CapacityError(
                f"model {what} needs {need} bytes in the host tier, which would put tenant "
                f"{tenant!r} over its host quota of {quota} bytes ({used} in use, not enough of "
                "them idle): retry when its models are released, or raise its quota "
                "(trims_ray.set_quota, or CacheConfig.tenant_quotas or tenant_share)"
            )
        if decision.outcome is Outcome.NO_ROOM:
            if not force:
                # Everything that could make room is leased or loading (a burst): the request is
                # served from the task's own copy (a bypass) rather than failed; the model can be
                # cached on a later miss, when leases have ended.
                return False
            busy = self.used - sum(s for k, s in sizes.items() if self.entries[k].leases == 0)
            raise CapacityError(
                f"model {what} needs {need} bytes in the host tier, but {busy} bytes of it are "
                f"leased or loading (budget {self.budget}): retry when they are released, "
                "or raise the host budget"
            )
        if not decision.kept:  # REFUSED: the policy keeps its victims; served as a bypass
            return False
        pinned = [self.entries[key] for key in decision.victims if self.entries[key].leases]
        for key in decision.victims:
            if self.entries[key].leases:
                self.evict(key)  # only pins hold it: it goes when they are given back
            else:
                self.drop(key, evicted=True)
        if pinned:
            self.making_room[cache_key(manifest)] = pinned
            raise RoomPending(pinned)
        return True

    def _room_being_made(self, key: str) -> list[HostEntry]:
        """The pinned models asked back for a miss of ``key`` and not given back yet ([]: none);
        forgets the records of room that is made (those of every key: a miss that gave up
        waiting leaves one behind)."""
        for made in [k for k, asked in self.making_room.items() if not any(id(e) in self.leaving for e in asked)]:
            del self.making_room[made]
        return [e for e in self.making_room.get(key, ()) if id(e) in self.leaving]

    # -- the budget ----------------------------------------------------------------------------

    def set_budget(self, budget: int, bypass_budget: int | None = None) -> tuple[int, list[HostEntry]]:
        """Changes the budget (and, when given, the bypass allowance) now. Lowered below what
        the tier holds, idle models go in the policy's eviction order until it fits: unleased
        ones are freed at once; those only processes' pins hold are evicted and asked back
        (they go when given back). Models leased by invocations, and loads in flight, stay;
        until they end the tier holds more than its budget, and admission frees that excess
        before it keeps anything new. Returns (models freed now, models asked back)."""
        self.budget = budget
        self.stats.capacity = budget
        if bypass_budget is not None:
            self.bypass_budget = bypass_budget
        freed, asked = self.fit_budget()
        self.refresh()
        return freed, asked

    def fit_budget(self) -> tuple[int, list[HostEntry]]:
        """If the table holds more than the budget (it was lowered), evicts idle models in the
        policy's order until it fits, or none is left idle; see ``set_budget``. Called when the
        budget changes and, through ``fit``, whenever a model becomes idle. Copies already
        leaving the table (evicted or condemned while leased) are on their way out, and do not
        count: evicting others for them would free their bytes twice. Returns (models freed
        now, models asked back)."""
        return self._shrink(self.entries, self.budget)

    def fit(self, tenant: str) -> None:
        """``fit_budget``, then ``fit_tenant`` against ``tenant``'s quota: called when one of its
        models becomes idle, as either may have been lowered while it was in use."""
        self.fit_budget()
        quota = self.quota(tenant)
        if quota is not None:
            self.fit_tenant(tenant, quota)

    def fit_tenant(self, tenant: str, limit: int) -> tuple[int, list[HostEntry]]:
        """``fit_budget`` for ``tenant``'s own models against its quota of ``limit`` bytes."""
        return self._shrink({k: e for k, e in self.entries.items() if e.manifest.tenant == tenant}, limit)

    def _shrink(self, entries: dict[str, HostEntry], limit: int) -> tuple[int, list[HostEntry]]:
        """Evicts idle models of ``entries`` (some of the table's) in the policy's order until
        they hold at most ``limit`` bytes, or none is left idle (see ``set_budget``)."""
        excess = sum(e.nbytes for e in entries.values()) - limit
        if excess <= 0:
            return 0, []
        sizes = {k: e.nbytes for k, e in entries.items() if e.ready.is_set()}

        def idle(k: str) -> bool:
            entry = entries.get(k)
            return entry is not None and k in sizes and entry.leases == entry.pins

        freed, asked = 0, []
        for key in shrink_victims(self.policy, excess, sizes, idle):
            entry = self.entries[key]
            if entry.leases:
                self.evict(key)  # only pins hold it: it goes when they are given back
                asked.append(entry)
            else:
                self.drop(key, evicted=True)
                freed += 1
        return freed, asked

    # -- the end of a load ---------------------------------------------------------------------

    def loaded(self, entry: HostEntry, handle: object, miss_cost: float) -> None:
        """An admitted entry's load published its object: waiters may have it. ``miss_cost``:
        what a miss of it is expected to cost (seconds), by the same estimate as admission's."""
        entry.handle = handle
        entry.priced_from_disk = entry.source == DISK
        if self.entries.get(cache_key(entry.manifest)) is entry:  # kept (not evicted, not a bypass)
            self.policy.on_insert(cache_key(entry.manifest), entry.nbytes, max(0.0, miss_cost))
        if not self._is_bypass(entry):
            self.stats.loads += 1
        entry.ready.set()
        self.refresh()

    def failed(self, entry: HostEntry, error: BaseException) -> None:
        """An admitted entry's load failed: it leaves the table, and its waiters get ``error``."""
        entry.error = error
        key = cache_key(entry.manifest)
        if self.entries.get(key) is entry:
            del self.entries[key]
        elif self._is_bypass(entry):
            del self.bypassing[key]
        self.leaving.pop(id(entry), None)
        self.refresh()
        entry.ready.set()

    # -- leaving the tier ----------------------------------------------------------------------

    def evict(self, key: str) -> str:
        """Evicts the copy under ``key``: "evicted" (it was idle: freed now), "deferred" (leased
        or loading: it leaves the table now, so that it takes no new lease and is not reported,
        and is freed with its last lease) or "absent"."""
        entry = self.entries.get(key)
        if entry is None:
            leaving = any(cache_key(e.manifest) == key for e in self.leaving.values())
            return "deferred" if leaving else "absent"
        if entry.ready.is_set() and not entry.leases:
            self.drop(key, evicted=True)
            return "evicted"
        del self.entries[key]
        if entry.ready.is_set():
            self.policy.on_remove(key)  # a load in flight has no policy entry yet
        entry.evict_when_idle = True
        self.leaving[id(entry)] = entry
        self.refresh()
        if entry.pins:
            self.ask_back(entry)
        return "deferred"

    def _is_bypass(self, entry: HostEntry) -> bool:
        return self.bypassing.get(cache_key(entry.manifest)) is entry

    def drop(self, key: str, *, evicted: bool) -> None:
        """Forgets a ready, unleased entry; dropping the handle frees the object."""
        entry = self.entries.pop(key)
        self.policy.on_remove(key)
        entry.handle = None
        self.stats.evictions += evicted
        self.refresh()

    def condemn(self, key: str, entry: HostEntry) -> None:
        """Takes a corrupt copy out of the table; its bytes count until its leases end. The
        caller holds a lease on it."""
        del self.entries[key]
        self.policy.on_remove(key)
        entry.evict_when_idle = True
        self.condemned[id(entry)] = entry
        self.stats.corrupt += 1
        self.refresh()
        if entry.pins:
            self.ask_back(entry)  # processes that keep it built must not serve it again

    def unlease(self, entry: HostEntry) -> None:
        """One lease of ``entry`` (or a request waiting for its load) ends; the entry goes when
        that was its last and it is to be evicted."""
        entry.leases -= 1
        if entry.leases == 0 and entry.evict_when_idle:
            key = cache_key(entry.manifest)
            if self.entries.get(key) is entry:
                self.drop(key, evicted=True)
            elif self.leaving.pop(id(entry), None) is not None:
                entry.handle = None  # an evicted copy: its last holder is done with it
                self.stats.evictions += 1
                self.refresh()
            elif self.condemned.pop(id(entry), None) is not None:
                entry.handle = None  # a corrupt copy: its last holder is done with it
                self.refresh()
            elif self._is_bypass(entry):
                del self.bypassing[key]  # a bypassed miss's shared copy: nobody uses it now
                entry.handle = None
                self.refresh()
        if entry.leases == entry.pins:
            self.fit(entry.manifest.tenant)  # the budget or its quota may have been lowered under this lease
        self.on_change()
