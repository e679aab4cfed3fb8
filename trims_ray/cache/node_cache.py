"""The node cache's logic: TrIMS's model resource manager for one node, as a plain class.

It keeps models in two tiers, host (one shared-memory object per model) and disk (verified
blobs in a directory), each with a byte budget that counts loads in flight. A miss loads once
however many ask (single flight); every use holds a lease, and a leased model is never freed.
Entries are keyed per tenant (``cache_key``), a tenant may have a byte quota in each tier, and
``scrub`` re-hashes resident host copies. Ray is not imported here: the host tier's shared
memory comes in as a ``HostMemory`` (the actor passes one built on ``ray.put``), so all of this
is testable without a cluster.

NodeCache composes the parts and owns the one lock they share: the tiers' bookkeeping
(``host_tier``, ``disk_tier``, both within ``quotas``), the lease table (``leases``), the reads
of a miss and the queue of disk copies (``host_loader``), and ``scrub``; budgets changed at run
time are ``node_budgets``'. What spans the tiers is here: a miss admitted, loaded and
published, its disk copy written, eviction, prefetch, reports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .._errors import ModelNotFoundError
from .._malloc import give_back_free_memory
from .._manifest import Manifest
from .._manifest_cache import ManifestCache
from .._names import check_tenant
from .._protect import GUARD_BYTES
from .._protocol import (
    BYPASS,
    DENIED,
    DISK,
    HOST,
    NOT_FOUND,
    STORE,
    Caller,
    Grant,
    Holder,
    Resolved,
    cache_key,
    holder_alive,
)
from .._store import ModelStore
from ..policy import make_policy
from .leases import LeaseTable
from .disk_tier import DiskTier
from .host_loader import HostLoader, WriteBehind, lend_ttl_s
from .host_entry import HostEntry, HostMemory, RoomPending, detached
from .host_tier import HostTier
from .pins import NodePins, ProcessPins, wait_until_gone
from .node_budgets import NodeBudgets
from .node_views import NodeCacheViews
from .quotas import tier_quota
from .scrub import NodeScrub

__all__ = ["HostMemory", "NodeCache"]

log = logging.getLogger("trims_ray")

class NodeCache(NodeCacheViews, NodePins, NodeBudgets, NodeScrub):
    """The host and disk tiers of one node.

    Args:
        store: the model store (the cloud tier) misses load from.
        memory: where host-tier objects are published.
        host_budget: bytes the host tier may hold, guard pages included.
        disk_dir: the disk tier's directory.
        disk_budget: bytes the disk tier may hold.
        policy: eviction policy name, one instance per tier.
        manifest_ttl_s: how long a resolved manifest is trusted.
        clock: monotonic time source.
        holder_alive: tells whether a lease holder still runs (injected for tests).
        peer_read: fills a buffer with a blob from another node's host tier and returns True,
            or returns False when no peer is expected to be faster than the store (the actor
            passes one built on Ray's object transfer; None: never).
        on_change: called (under the cache's lock, so it must only signal) whenever residency,
            usage or leases change, so that the actor can report to placement.
        tenant_share: the fraction of each tier's budget one tenant may hold (1.0: no limit);
            public models count as tenant "public".
        tenant_quotas: tenant -> {"host" | "disk": bytes}, quotas that override
            ``tenant_share`` for those tenants and tiers.
        bypass_budget: bytes of memory beyond ``host_budget`` that shared copies of misses the
            host tier does not keep may hold (``HostTier.bypass``); 0: each such miss is read
            by its own task. The actor passes part of the object store outside the host budget.
        disk_queue_bytes: bytes the disk copies waiting to be written may hold (None: the host
            budget); a copy that does not fit is skipped (``WriteBehind``).
        reclaim_wait_s: how long a load or an evict waits for processes to give back a model
            they pin (``pins``) before it does without that room.
    """

    def __init__(
        self,
        *,
        store: ModelStore,
        memory: HostMemory,
        host_budget: int,
        disk_dir: Path,
        disk_budget: int,
        policy: str = "lru",
        manifest_ttl_s: float = 2.0,
        unclaimed_ttl_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        holder_alive: Callable[[Holder | Caller], bool] = holder_alive,
        peer_read: Callable[[Manifest, np.ndarray], bool] | None = None,
        on_change: Callable[[], None] = lambda: None,
        tenant_share: float = 1.0,
        tenant_quotas: Mapping[str, Mapping[str, int]] | None = None,
        bypass_budget: int = 0,
        disk_queue_bytes: int | None = None,
        reclaim_wait_s: float = 2.0,
    ) -> None:
        self.store = store
        self.memory = memory
        self.host_budget = host_budget
        # Both budgets are known before either tier is built: the disk tier asks the quotas
        # while it adopts the files of an earlier incarnation, from its constructor.
        self.disk_budget = disk_budget
        self.on_change = on_change
        self.tenant_share = tenant_share
        self.tenant_quotas = {t: dict(q) for t, q in (tenant_quotas or {}).items()}
        # Models worker processes keep built between tasks, as leases the node can ask back.
        self.pins = ProcessPins()
        self.reclaim_wait_s = reclaim_wait_s
        # The tiers call ``_changed``, not the callable given: a later change of ``on_change``
        # reaches them too.
        self.host = HostTier(
            host_budget,
            make_policy(policy, clock=clock),
            self._changed,
            quota=lambda tenant: self.quota(tenant, HOST),
            bypass_budget=bypass_budget,
            ask_back=self.pins.ask_back,
            reload_cost=self._reload_estimate,
        )
        self.host_policy = self.host.policy
        self.disk = DiskTier(
            Path(disk_dir),
            disk_budget,
            make_policy(policy, clock=clock),
            self._changed,
            quota=lambda tenant: self.quota(tenant, DISK),
        )
        self.manifest_ttl_s = manifest_ttl_s
        self.unclaimed_ttl_s = unclaimed_ttl_s
        self.clock = clock
        self.holder_alive = holder_alive
        self.peer_read = peer_read
        # One lock for the tiers, the lease table, the loader's measurements and the disk
        # copies queued, so that a report or an admission sees them all in one state; no I/O is
        # done under it.
        self._lock = threading.Lock()
        self.loader = HostLoader(store=store, disk=self.disk, lock=self._lock)
        # What the loads measured (the loader updates them in place): rates by source, for
        # choosing between a peer and the store; one event per load, for the metrics exporter;
        # and where the latest load read from.
        self.rates = self.loader.rates
        self.load_events = self.loader.load_events
        self.last_load_source = ""
        self._refusals: dict[str, dict[str, int]] = {}  # tenant -> {NOT_FOUND | DENIED: count}
        # The ids it chooses are new in every incarnation, so a release from before a restart
        # ends nothing. Caller-chosen ids released before their acquire finished (the task ran
        # on another node, say) are remembered, and the acquire ends its lease once granted.
        self._leases: LeaseTable[HostEntry] = LeaseTable(
            clock=clock, holder_alive=holder_alive, unclaimed_ttl_s=unclaimed_ttl_s
        )
        # Names this cache among those a node has had (one per actor start): what a process
        # that keeps a model checks its cache by.
        self.incarnation = self._leases.incarnation
        # Names resolved for tenants; the actor refreshes those in use in the background.
        self.manifests = ManifestCache(
            lambda name, tenant: self.store.manifest(name, tenant=tenant), manifest_ttl_s, clock=lambda: self.clock()
        )
        # Disk copies of what misses read from a peer or the store, written after the model is
        # served from the host tier; their bound follows the host budget unless it was given.
        self._queue_follows_host = disk_queue_bytes is None
        queue_bytes = host_budget if self._queue_follows_host else disk_queue_bytes
        self._disk_copies = WriteBehind(self._lock, self.disk, self.expected_load_s, max_bytes=queue_bytes)

    # -- resolving names -----------------------------------------------------------------------

    def resolve(self, name: str, tenant: str, hint: Resolved | None = None) -> Manifest:
        """The manifest ``name`` means for ``tenant``, trusted for ``manifest_ttl_s``.

        ``hint``: what the caller resolved the name to. It is served without a store read when
        this node resolved the name itself lately, or holds a host copy of that very manifest
        (``ManifestCache.get``) that ``tenant`` may see; otherwise the name is resolved here.

        Raises:
            ModelNotFoundError, ModelFormatError, ValueError: as ModelStore.manifest.
        """
        try:
            return self.manifests.get(name, tenant, hint=hint, held=self.held_manifest)
        except ModelNotFoundError:
            # Missing and another tenant's are one case to the store, so one count here.
            self.count_refusal(NOT_FOUND, tenant)
            raise

    def held_manifest(self, key: str) -> Manifest | None:
        """The manifest of the host copy under ``key`` (ready or loading), or None: what a hint
        is checked against, here and by the node's GPU holders. Every copy's manifest was
        resolved by this node (``resolve``) before the copy was admitted."""
        with self._lock:
            entry = self.host.entries.get(key)
            return None if entry is None else entry.manifest

    def count_refusal(self, kind: str, tenant: str) -> None:
        """Counts a refusal ``tenant`` met: NOT_FOUND (a name it cannot see) or DENIED (it named
        another tenant; its own process checks that, and reports it here).

        Raises:
            ValueError: an unknown kind or an invalid tenant id.
        """
        if kind not in (NOT_FOUND, DENIED):
            raise ValueError(f"refusal kind must be {NOT_FOUND!r} or {DENIED!r}, got {kind!r}")
        check_tenant(tenant)
        with self._lock:
            counts = self._refusals.setdefault(tenant, {NOT_FOUND: 0, DENIED: 0})
            counts[kind] += 1

    # -- leases --------------------------------------------------------------------------------

    def acquire(
        self,
        name: str,
        tenant: str,
        holder: Holder | Caller | None,
        lease_id: str | None = None,
        *,
        hint: Resolved | None = None,
        force: bool = False,
        pin: bool = False,
    ) -> Grant:
        """Leases the model for ``holder``, loading it into the host tier first on a miss.
        ``pin``: the holder, a worker process, keeps the model built after its task (see
        ``pins``); the grant says whether it became a pin (not for a copy the tier does not keep).

        ``hint``: what the caller already resolved ``name`` to, so that a hit resolves nothing
        again here (see ``resolve``).

        ``holder`` is the process that will use the model, or the Caller that submits a task
        and ends the lease when the task's result exists (then ``lease_id`` is the caller's own
        id for it, so that it can release without waiting for this call). It may be None when a
        task will ``claim`` it; a lease nobody claims within ``unclaimed_ttl_s`` is reclaimed.

        Concurrent misses for the same blob cause one load; the others wait for it and share its
        result or its error. The lease counts from the moment the request is admitted, so a
        model being loaded for someone cannot be evicted.

        A miss that would evict others is kept only if the host tier's policy admits it (unless
        ``force``, as for prefetch); otherwise it is served from a shared copy that is not kept
        (``HostTier.bypass``: one read for a burst), or, beyond ``bypass_budget``, the grant's
        tier is "bypass", it holds no lease and no object, and the task loads the model itself.

        Raises:
            ModelNotFoundError: no such model for this tenant.
            CapacityError: the model cannot fit the host tier even after evicting what is idle.
            IntegrityError: the bytes read do not match the manifest (nothing is kept).
            StoreUnavailableError: the store cannot be reached.
        """
        if lease_id is not None and not isinstance(lease_id, str):
            raise TypeError(f"a caller's lease_id must be a str, got {type(lease_id).__name__}")
        pin = pin and isinstance(holder, Holder)
        return self._acquire(self.resolve(name, tenant, hint), holder, lease_id, force, pin)

    def _acquire(
        self, manifest: Manifest, holder: Holder | Caller | None, lease_id: str | None, force: bool, pin: bool = False
    ) -> Grant:
        with self._lock:
            # From here until the grant, a release of the caller's id ends the grant when it
            # comes, however long the load takes.
            self._leases.begin(lease_id)
        try:
            entry, leader = self._request(manifest, force)
            if entry is None:
                return Grant(lease_id or 0, None, manifest, 0, BYPASS)
            if leader:
                self._load_into(entry)
            else:
                entry.ready.wait()
            with self._lock:
                if entry.error is not None:
                    entry.leases -= 1
                    raise detached(entry.error)
                lease_id, over = self._leases.add(entry, holder, lease_id)
                if over:
                    self.host.unlease(entry)
                pinned = pin and not over and self.host.entries.get(cache_key(manifest)) is entry
                if pinned:
                    self.pins.add(lease_id, holder, entry)
                    self.host.fit(manifest.tenant)  # its lease is a pin now: asked back if over the budget or quota
                self.on_change()
        finally:
            with self._lock:
                self._leases.finish(lease_id)
        return Grant(lease_id, entry.handle, manifest, GUARD_BYTES, entry.source if leader else HOST, pinned)

    def _request(self, manifest: Manifest, force: bool) -> tuple[HostEntry | None, bool]:
        """``HostTier.request``, making room from models processes pin when it must: they are
        asked back and waited for (``reclaim_wait_s``); past that, they count as leased."""
        deadline = time.monotonic() + self.reclaim_wait_s  # real time: processes answer in it
        again = False
        while True:
            with self._lock:
                try:
                    reclaim = time.monotonic() < deadline
                    return self.host.request(manifest, force, self._miss_cost(manifest), reclaim, again)
                except RoomPending as pending:
                    asked = pending.entries
            wait_until_gone(asked, self._gone, max(0.0, deadline - time.monotonic()))
            again = True

    def _gone(self, entry: HostEntry) -> bool:
        """Whether a copy that left the table (evicted, or condemned by scrub) was freed."""
        with self._lock:
            return id(entry) not in self.host.leaving and id(entry) not in self.host.condemned

    def lend(self, key: str, lease_id: str | None = None) -> Grant | None:
        """Leases a blob that is ready in the host tier to a peer node copying it, without
        loading anything: None when it is not here (or not ready). The peer releases it.

        ``lease_id``: the borrower's own id for the lease, so that a borrower whose call timed
        out can release it before it is granted (the grant then ends at once, and None comes
        back). A lend ends by itself after the longest copy may take (``lend_ttl_s``), not after
        the unclaimed-lease ttl, so a borrower that vanishes pins the copy only that long.
        """
        with self._lock:
            self._leases.check_new(lease_id)
            entry = self.host.entries.get(key)
            if entry is None or not entry.ready.is_set() or entry.evict_when_idle:
                self._leases.finish(lease_id)  # its release, if it came first, ends nothing
                return None
            lease_id, over = self._leases.add(entry, None, lease_id, ttl_s=lend_ttl_s(entry.manifest.nbytes))
            if over:
                return None
            entry.leases += 1
            self.on_change()
            return Grant(lease_id, entry.handle, entry.manifest, GUARD_BYTES, HOST)

    def release(self, lease_id: int | str) -> bool:
        """Ends a lease; True if it was held. Releasing twice is harmless (the reaper may have
        ended it already when its process died). A caller's lease id that is not granted yet
        is ended as soon as its acquire grants it."""
        with self._lock:
            entry = self._leases.pop(lease_id)
            if entry is None:
                return False
            self.pins.discard(lease_id)
            self.host.unlease(entry)
            return True

    def claim(self, lease_id: int | str, holder: Holder) -> bool:
        """Names the process that uses a lease taken on its behalf; False if the lease is gone."""
        with self._lock:
            return self._leases.claim(lease_id, holder)

    def reap(self) -> int:
        """Ends the leases of processes that died, and those never claimed; returns how many."""
        with self._lock:
            dead = self._leases.expired()
            self.pins.prune(self._leases.holds)  # before unlease: an entry's pins count as it goes
            for entry in dead:
                self.host.unlease(entry)
        if dead:
            log.info("trims_ray: reclaimed %d lease(s) of dead processes", len(dead))
        return len(dead)

    def _changed(self) -> None:
        self.on_change()

    # -- loading -------------------------------------------------------------------------------

    def _miss_cost(self, manifest: Manifest) -> float:
        """What a host-tier miss of ``manifest`` costs now (seconds): a load from the disk tier
        if it is there, else from the store."""
        return self._reload_estimate(manifest)[1]

    def _reload_estimate(self, manifest: Manifest) -> tuple[str, float, bool]:
        """Where a host-tier miss of ``manifest`` would read it from now (disk or store), what
        that is expected to take (seconds), and whether that source's rate was measured here."""
        source = DISK if cache_key(manifest) in self.disk.sizes else STORE
        return source, self.expected_load_s(manifest.nbytes, source), source in self.rates

    def expected_load_s(self, nbytes: int, source: str) -> float:
        """What loading ``nbytes`` from ``source`` is expected to take, by measured rates."""
        return self.loader.expected_load_s(nbytes, source)

    def _load_into(self, entry: HostEntry) -> None:
        """Reads the blob (disk tier, a peer, else the store), publishes it, queues its disk
        copy if it came from elsewhere, and wakes the waiters."""
        key = cache_key(entry.manifest)
        try:
            entry.source, handle = self.loader.load(
                entry.manifest, entry.nbytes, self.memory, self.peer_read, lambda view: self._disk_copies.submit(key, view)
            )
            self.last_load_source = entry.source
        except BaseException as exc:
            with self._lock:
                self.host.failed(entry, detached(exc))
            raise
        with self._lock:
            # The cost a cost-aware policy (gdsf, cost) weighs for this model: the estimate
            # admission gives every newcomer (bytes over the source's measured rate, which this
            # load has just updated), not the time the load took. That time also holds the put,
            # the wait for room and a first load's warm-up, and the first estimate was made at
            # an assumed rate: every resident model outweighed a newcomer as popular as itself,
            # and such misses went unkept (bypasses) while an idle model stayed.
            self.host.loaded(entry, handle, self.expected_load_s(entry.manifest.nbytes, entry.source))

    # -- eviction and prefetch -----------------------------------------------------------------

    def evict(self, name: str, tenant: str, tier: str | None = None, *, key: str | None = None) -> dict[str, str]:
        """Evicts a model from one tier or both; a leased host copy takes no new lease from now
        on (a new request loads a fresh one) and goes when its last lease ends. ``key``: the
        blob to evict (placement names the one it means: the name may have been re-registered
        to another since); None: the blob ``name`` means now.

        Returns, per tier, "evicted", "deferred" (leased now, or leaving) or "absent".
        """
        tiers = _check_tier(tier, (HOST, DISK))
        if key is None:
            key = cache_key(self.resolve(name, tenant))
        elif not key.startswith(f"{tenant}/"):
            raise ValueError(f"cache key {key!r} is not one of tenant {tenant!r}")
        result = {}
        with self._lock:
            entry = self.host.entries.get(key)
            if HOST in tiers:
                result[HOST] = self.host.evict(key)
            if DISK in tiers:
                result[DISK] = self._disk_copies.evict(key)
            # Only processes' pins hold it: they were asked for it, and give it back at once.
            reclaimed = result.get(HOST) == "deferred" and entry is not None and entry.leases == entry.pins
        if reclaimed and wait_until_gone([entry], self._gone, self.reclaim_wait_s):
            result[HOST] = "evicted"
        return result

    def prefetch(self, name: str, tenant: str, tier: str = HOST, *, key: str | None = None) -> str:
        """Warms a tier ahead of traffic; returns where the model was found ("host", "disk",
        "store"). ``key``: load only that blob; when ``name`` means another one here now (it
        was re-registered), nothing is loaded and "stale" is returned. Raises as ``acquire``."""
        (tier,) = _check_tier(tier, (HOST, DISK))
        manifest = self.resolve(name, tenant)
        if key is not None and cache_key(manifest) != key:
            return "stale"
        if tier == HOST:
            grant = self._acquire(manifest, None, None, force=True)  # asked for by name: kept
            self.release(grant.lease_id)
            return grant.tier
        with self._lock:
            if cache_key(manifest) in self.disk.sizes:
                return DISK
        buffer, _ = self.store.read(manifest)
        self._disk_copies.write(cache_key(manifest), buffer, force=True)
        return STORE

    # -- quotas --------------------------------------------------------------------------------

    def quota(self, tenant: str, tier: str) -> int | None:
        """The bytes ``tenant`` may hold in ``tier`` ("host" or "disk") on this node; None when
        only the tier's budget limits it."""
        budgets = {HOST: self.host_budget, DISK: self.disk_budget}
        return tier_quota(self.tenant_quotas.get(tenant, {}).get(tier), self.tenant_share, budgets[tier])

    def give_back_memory(self) -> None:
        """Hands this process's idle memory back to the OS: the load buffers kept for the next
        loads, and what malloc keeps free (after an evict or a smaller budget)."""
        self.loader.buffers.trim()
        give_back_free_memory()

    def give_back_idle_buffers(self) -> None:
        """Lets the load buffers go if no load used one for a while (for a periodic call)."""
        self.loader.buffers.trim_if_idle()

    def drain(self) -> None:
        """Waits until the disk copies of earlier loads are written."""
        self._disk_copies.drain()

    def close(self) -> None:
        """Finishes pending disk writes and stops the writer."""
        self._disk_copies.close()


def _check_tier(tier: str | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if tier is None:
        return allowed
    if tier == "gpu":
        raise ValueError("tier 'gpu': this node has no GPU tier")
    if tier not in allowed:
        raise ValueError(f"tier must be one of {', '.join(allowed)} or None (all), got {tier!r}")
    return (tier,)

