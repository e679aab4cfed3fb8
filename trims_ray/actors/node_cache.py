"""The node cache's logic: TrIMS's model resource manager for one node, as a plain class.

It keeps models in two tiers, host (one shared-memory object per model) and disk (verified
blobs in a directory), each with a byte budget that counts loads in flight. A miss loads once
however many ask (single flight); every use holds a lease, and a leased model is never freed.
Entries are keyed per tenant (``cache_key``), a tenant may have a byte quota in each tier, and
``scrub`` re-hashes resident host copies. Ray is not imported here: the host tier's shared
memory comes in as a ``HostMemory`` (the actor passes one built on ``ray.put``), so all of this
is testable without a cluster.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from .._errors import CapacityError, IntegrityError, ModelNotFoundError
from .._fsio import write_atomically
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
    PEER,
    STORE,
    Caller,
    Grant,
    Holder,
    TenantStats,
    TierStats,
    cache_key,
    holder_alive,
)
from .._reader import read_blob
from .._store import ModelStore
from ..policy import EvictionPolicy, choose_victims, make_policy

__all__ = ["HostMemory", "NodeCache", "DiskTier"]

log = logging.getLogger("trims_ray")

# Load rates assumed before any load from a source was measured (bytes/s), to price misses.
_ASSUMED_RATES = {DISK: 0.5e9, PEER: 1e9, STORE: 0.1e9}


def _detached(error: BaseException) -> BaseException:
    """A copy of ``error`` without traceback, cause or context, for a waiter to raise.

    A failed load's error is kept on its table entry for the waiters. Kept as raised, its
    traceback holds the loader's frames, whose locals hold the entry (and the blob's buffer):
    entry -> error -> traceback -> frame -> entry, a cycle that kept the buffer until the cyclic
    collector ran. Raised as one object by many waiters, each would add its own frames to it.
    Our errors pickle, so they copy; anything that does not is raised as it is.
    """
    try:
        return copy.copy(error)
    except Exception:
        return error


def _tenant_of(key: str) -> str:
    return key.split("/", 1)[0]


class HostMemory(Protocol):
    """Where host-tier objects live. The Ray actor implements it with ``ray.put``."""

    def publish(self, buffer: np.ndarray) -> object:
        """Copies ``buffer`` into shared memory; the returned handle keeps it alive.

        An implementation whose handle is not the array itself also defines
        ``view(handle) -> np.ndarray`` (the published bytes, for ``NodeCache.scrub``).
        """


@dataclass(eq=False)  # entries are told apart by identity (a key may have a dropped one and a new one)
class _HostEntry:
    manifest: Manifest
    nbytes: int  # accounted bytes: the blob and its guard pages
    handle: object | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    leases: int = 0
    evict_when_idle: bool = False
    source: str = ""  # where the load read from: "disk", "peer" or "store"


@dataclass
class _Lease:
    entry: _HostEntry  # the entry, not its key: a corrupt copy dropped while leased keeps its leases
    holder: Holder | Caller | None  # None until the task that will use it claims it
    granted_at: float = 0.0


class DiskTier:
    """Verified blobs in a directory, one file per cache key: ``<tenant>/<sha256>.safetensors``,
    under a byte budget and optional per-tenant quotas.

    Files are per tenant like host entries, because a disk hit is as visible a timing signal as
    a host hit: identical weights of two tenants are two files (see ``cache_key``). Files found
    at start-up are adopted (the tier persists across restarts); they are verified when read,
    like everything else. Not thread-safe on its own: NodeCache calls it under its lock for
    bookkeeping and does the I/O outside.
    """

    def __init__(
        self,
        directory: Path,
        budget: int,
        policy: EvictionPolicy,
        on_change: Callable[[], None] = lambda: None,
        quota: Callable[[str], int | None] = lambda tenant: None,
    ) -> None:
        self.directory = directory
        self.budget = budget
        self.policy = policy
        self.on_change = on_change
        self.quota = quota  # tenant -> the bytes it may hold here, None: no quota
        self.sizes: dict[str, int] = {}
        self.reserved: dict[str, int] = {}  # writes in flight count against the budget too
        self.stats = TierStats(capacity=budget)
        self.quota_denied: dict[str, int] = {}  # per tenant: disk copies its quota refused
        directory.mkdir(parents=True, exist_ok=True)
        self._directory_id = _directory_id(directory)  # to notice it deleted or replaced
        # Files directly in the directory are named as before tenants (by sha256 alone): whose
        # they are is unknown, so they go.
        stale = [*directory.glob("*.safetensors"), *directory.glob(".*.part"), *directory.glob("*/.*.part")]
        for path in stale:  # ...and temp files of writes that a crash interrupted
            path.unlink(missing_ok=True)
        for path in sorted(directory.glob("*/*.safetensors")):
            key = f"{path.parent.name}/{path.name.removesuffix('.safetensors')}"
            size = path.stat().st_size
            quota = self.quota(path.parent.name) if _is_cache_key(key) else None
            if (
                not _is_cache_key(key)
                or self.used + size > budget  # over a (smaller) new budget
                or (quota is not None and self.tenant_used(path.parent.name) + size > quota)
            ):
                path.unlink(missing_ok=True)
                continue
            self._track(key, size)

    @property
    def used(self) -> int:
        return sum(self.sizes.values()) + sum(self.reserved.values())

    def tenant_used(self, tenant: str) -> int:
        """Bytes of ``tenant``'s blobs here, writes in flight included."""
        return sum(n for held in (self.sizes, self.reserved) for k, n in held.items() if _tenant_of(k) == tenant)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def _track(self, key: str, size: int) -> None:
        self.sizes[key] = size
        self.policy.on_insert(key, size, 0.0)
        self._refresh()

    def _refresh(self) -> None:
        self.stats.bytes_used, self.stats.models = self.used, len(self.sizes)
        self.on_change()

    def forget(self, key: str, *, evicted: bool) -> None:
        if key in self.sizes:
            del self.sizes[key]
            self.policy.on_remove(key)
            self.path(key).unlink(missing_ok=True)
            self.stats.evictions += evicted
            self._refresh()

    def reserve(self, key: str, nbytes: int, cost: float | None) -> bool:
        """Claims room for a write about to start (evicting if needed); False if it can't fit,
        the blob is already here or on its way, or the policy does not admit it at the price of
        its victims (``cost``: what a disk hit saves, seconds; None: admit in any case)."""
        self.check_directory()
        if key in self.sizes or key in self.reserved or not self.make_room(nbytes, key, cost):
            return False
        self.reserved[key] = nbytes
        self._refresh()
        return True

    def unreserve(self, key: str) -> None:
        del self.reserved[key]
        self._refresh()

    def make_room(self, nbytes: int, key: str, cost: float | None) -> bool:
        """Evicts least valuable blobs until ``nbytes`` fit; False (nothing evicted) if they
        can't, or if the policy would rather keep them than ``key``.

        A tenant over its quota makes room from its own blobs only: another tenant's are never
        evicted to let one exceed its share (a disk copy it cannot have is skipped, counted in
        ``quota_denials``; the load it came from is not failed).
        """
        if nbytes > self.budget:
            return False
        tenant = _tenant_of(key)
        quota, used = self.quota(tenant), self.tenant_used(tenant)
        own = _victims_within_quota(self.policy, tenant, nbytes, quota, used, self.sizes, lambda k: True)
        if own is None:
            self.stats.quota_denials += 1
            self.quota_denied[tenant] = self.quota_denied.get(tenant, 0) + 1
            return False
        freed = sum(self.sizes[k] for k in own)
        rest = choose_victims(self.policy, nbytes, self.budget - self.used + freed, self.sizes, lambda k: k not in own)
        victims = None if rest is None else own + rest
        if victims is None or (victims and cost is not None and not self.policy.admit(key, nbytes, cost, victims)):
            if victims:
                self.stats.bypasses += 1
            return False
        for victim in victims:
            self.forget(victim, evicted=True)
        return True

    def adopt(self, key: str, size: int) -> None:
        self._track(key, size)
        self.stats.loads += 1

    # -- faults: the disk full, the directory deleted, a file gone or bad ----------------------

    def read_failed(self, key: str) -> None:
        """A blob's file could not be read or failed verification: forgets it, counts the
        error, and recovers in case the whole directory went."""
        self.forget(key, evicted=False)
        self._failed()

    def write_failed(self, key: str) -> None:
        """A write reserved with ``reserve`` failed (disk full, file-size limit, directory
        deleted): releases its room, counts the error, and recovers."""
        self.unreserve(key)
        self._failed()

    def check_directory(self) -> None:
        """Recovers if the directory was deleted or replaced since it was last seen (a cheap
        stat, done before every write so that the blobs that went with it are not counted)."""
        if _directory_id(self.directory) != self._directory_id:
            log.warning("trims_ray: disk tier directory %s was deleted or replaced", self.directory)
            self._failed()

    def recover(self) -> int:
        """Recreates the directory if it is gone and forgets every blob whose file is missing or
        has changed size, so that the budget and stats count what is really there. Returns how
        many blobs were forgotten.

        Raises:
            OSError: the directory cannot be recreated.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self._directory_id = _directory_id(self.directory)
        gone = [key for key, size in self.sizes.items() if _file_size(self.path(key)) != size]
        for key in gone:
            self.forget(key, evicted=False)
        if gone:
            log.warning("trims_ray: disk tier %s: forgot %d blob(s) whose files are gone", self.directory, len(gone))
        return len(gone)

    def _failed(self) -> None:
        self.stats.errors += 1
        try:
            self.recover()
        except OSError as exc:  # tried again at the next failure or write
            log.warning("trims_ray: disk tier %s cannot recover yet: %s", self.directory, exc)
        self._refresh()


def _directory_id(directory: Path) -> tuple[int, int] | None:
    try:
        st = directory.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


_KEY_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}/[0-9a-f]{64}")


def _is_cache_key(key: str) -> bool:
    return _KEY_RE.fullmatch(key) is not None


def _victims_within_quota(
    policy: EvictionPolicy,
    tenant: str,
    need: int,
    quota: int | None,
    used: int,
    sizes: Mapping[str, int],
    evictable: Callable[[str], bool],
) -> list[str] | None:
    """The tenant's own victims that bring it back within ``quota`` once ``need`` more bytes are
    in: ``[]`` when no quota applies or it fits, None when even all its evictable entries are
    not enough (or ``need`` alone is over the quota)."""
    if quota is None or used + need <= quota:
        return []
    if need > quota:
        return None
    mine = {k: n for k, n in sizes.items() if _tenant_of(k) == tenant}
    return choose_victims(policy, used + need - quota, 0, mine, lambda k: k in mine and evictable(k))


class NodeCache:
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
    ) -> None:
        self.store = store
        self.memory = memory
        self.host_budget = host_budget
        self.host_policy = make_policy(policy, clock=clock)
        self.on_change = on_change
        self.tenant_share = tenant_share
        self.tenant_quotas = {t: dict(q) for t, q in (tenant_quotas or {}).items()}
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
        # Measured load rates by source (bytes/s, moving averages), for choosing between a peer
        # and the store; empty until the first load from each.
        self.rates: dict[str, float] = {}
        self.last_load_source = ""
        # One (source, tenant, name, nbytes, seconds) per load, drained by the metrics exporter
        # (trims_ray/_metrics.py); bounded, so that without one it keeps only the latest loads.
        self.load_events: deque[tuple[str, str, str, int, float]] = deque(maxlen=1024)
        self._lock = threading.Lock()
        self._host: dict[str, _HostEntry] = {}
        # Copies scrub found corrupt while leased: out of the table (no new lease gets them),
        # their bytes still counted, freed when their last lease ends.
        self._condemned: dict[int, _HostEntry] = {}
        self._host_stats = TierStats(capacity=host_budget)
        self._refusals: dict[str, dict[str, int]] = {}  # tenant -> {NOT_FOUND | DENIED: count}
        self._host_quota_denied: dict[str, int] = {}  # tenant -> host loads its quota refused
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(1)
        # Caller-chosen lease ids released before their acquire finished (the task ran on
        # another node, say): the acquire ends its lease as soon as it is granted.
        self._released_early: dict[str, float] = {}
        # Names resolved for tenants; the actor refreshes those in use in the background.
        self.manifests = ManifestCache(
            lambda name, tenant: self.store.manifest(name, tenant=tenant), manifest_ttl_s, clock=lambda: self.clock()
        )
        # Disk copies are written after the model is served from the host tier, off the path
        # of the invocation that missed; one writer keeps the disk's I/O sequential.
        self._disk_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trims-disk-write")
        self._disk_queued: dict[str, int] = {}  # blob -> disk copies queued or being written
        self._disk_cancelled: set[str] = set()  # blobs evicted while a copy was queued

    # -- resolving names -----------------------------------------------------------------------

    def resolve(self, name: str, tenant: str) -> Manifest:
        """The manifest ``name`` means for ``tenant``, trusted for ``manifest_ttl_s``.

        Raises:
            ModelNotFoundError, ModelFormatError, ValueError: as ModelStore.manifest.
        """
        try:
            return self.manifests.get(name, tenant)
        except ModelNotFoundError:
            # Missing and another tenant's are one case to the store, so one count here.
            self.count_refusal(NOT_FOUND, tenant)
            raise

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
        force: bool = False,
    ) -> Grant:
        """Leases the model for ``holder``, loading it into the host tier first on a miss.

        ``holder`` is the process that will use the model, or the Caller that submits a task
        and ends the lease when the task's result exists (then ``lease_id`` is the caller's own
        id for it, so that it can release without waiting for this call). It may be None when a
        task will ``claim`` it; a lease nobody claims within ``unclaimed_ttl_s`` is reclaimed.

        Concurrent misses for the same blob cause one load; the others wait for it and share its
        result or its error. The lease counts from the moment the request is admitted, so a
        model being loaded for someone cannot be evicted.

        A miss that would evict others is kept only if the host tier's policy admits it (unless
        ``force``, as for prefetch); otherwise the grant's tier is "bypass", it holds no lease
        and no object, and the task loads the model itself.

        Raises:
            ModelNotFoundError: no such model for this tenant.
            CapacityError: the model cannot fit the host tier even after evicting what is idle.
            IntegrityError: the bytes read do not match the manifest (nothing is kept).
            StoreUnavailableError: the store cannot be reached.
        """
        if lease_id is not None and not isinstance(lease_id, str):
            raise TypeError(f"a caller's lease_id must be a str, got {type(lease_id).__name__}")
        return self._acquire(self.resolve(name, tenant), holder, lease_id, force)

    def _acquire(
        self, manifest: Manifest, holder: Holder | Caller | None, lease_id: int | str | None, force: bool
    ) -> Grant:
        key = cache_key(manifest)
        with self._lock:
            if lease_id in self._leases:
                raise ValueError(f"lease id {lease_id!r} is in use already")
            entry = self._host.get(key)
            leader = entry is None
            if leader:
                entry = self._admit(manifest, force)
                if entry is None:
                    return Grant(lease_id or 0, None, manifest, 0, BYPASS)
            elif entry.ready.is_set():  # failed loads leave the table, so this one succeeded
                self._host_stats.hits += 1
                self.host_policy.on_access(key)
            else:
                self._host_stats.misses += 1  # joins the load in flight
            entry.leases += 1
        if leader:
            self._load_into(entry)
        else:
            entry.ready.wait()
        with self._lock:
            if entry.error is not None:
                entry.leases -= 1
                raise _detached(entry.error)
            if lease_id is None:
                lease_id = next(self._lease_ids)
            self._leases[lease_id] = _Lease(entry, holder, self.clock())
            if self._released_early.pop(lease_id, None) is not None:
                del self._leases[lease_id]
                self._unlease(entry)
            self.on_change()
        return Grant(lease_id, entry.handle, manifest, GUARD_BYTES, entry.source if leader else HOST)

    def lend(self, key: str) -> Grant | None:
        """Leases a blob that is ready in the host tier to a peer node copying it, without
        loading anything: None when it is not here (or not ready). The peer releases it."""
        with self._lock:
            entry = self._host.get(key)
            if entry is None or not entry.ready.is_set() or entry.evict_when_idle:
                return None
            entry.leases += 1
            lease_id = next(self._lease_ids)
            self._leases[lease_id] = _Lease(entry, None, self.clock())
            self.on_change()
            return Grant(lease_id, entry.handle, entry.manifest, GUARD_BYTES, HOST)

    def release(self, lease_id: int | str) -> bool:
        """Ends a lease; True if it was held. Releasing twice is harmless (the reaper may have
        ended it already when its process died). A caller's lease id that is not granted yet
        is ended as soon as its acquire grants it."""
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                if isinstance(lease_id, str):
                    self._released_early[lease_id] = self.clock()
                return False
            self._unlease(lease.entry)
            return True

    def claim(self, lease_id: int, holder: Holder) -> bool:
        """Names the process that uses a lease taken on its behalf; False if the lease is gone."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                return False
            lease.holder = holder
            return True

    def reap(self) -> int:
        """Ends the leases of processes that died, and those never claimed; returns how many."""
        now = self.clock()
        with self._lock:
            dead = [
                lid
                for lid, lease in self._leases.items()
                if (lease.holder is None and now - lease.granted_at > self.unclaimed_ttl_s)
                or (lease.holder is not None and not self.holder_alive(lease.holder))
            ]
            for lid in dead:
                self._unlease(self._leases.pop(lid).entry)
            for lid in [i for i, at in self._released_early.items() if now - at > self.unclaimed_ttl_s]:
                del self._released_early[lid]  # their acquire never came: nothing to end
        if dead:
            log.info("trims_ray: reclaimed %d lease(s) of dead processes", len(dead))
        return len(dead)

    def _unlease(self, entry: _HostEntry) -> None:
        entry.leases -= 1
        if entry.leases == 0 and entry.evict_when_idle:
            key = cache_key(entry.manifest)
            if self._host.get(key) is entry:
                self._drop_host(key, evicted=True)
            elif self._condemned.pop(id(entry), None) is not None:
                entry.handle = None  # a corrupt copy: its last holder is done with it
                self._update_host_usage()
        self.on_change()

    def _changed(self) -> None:
        # Through a method, so that a later change of ``on_change`` reaches the disk tier too.
        self.on_change()

    # -- loading -------------------------------------------------------------------------------

    def _admit(self, manifest: Manifest, force: bool) -> _HostEntry | None:
        """Reserves host bytes for a load (evicting idle models if needed), or None when the
        policy does not admit it; call under the lock."""
        need = manifest.nbytes + 2 * GUARD_BYTES
        self._host_stats.misses += 1
        if not self._make_host_room(need, manifest, force):
            self._host_stats.bypasses += 1
            return None
        entry = _HostEntry(manifest, need)
        self._host[cache_key(manifest)] = entry
        self._update_host_usage()
        return entry

    def expected_load_s(self, nbytes: int, source: str) -> float:
        """What loading ``nbytes`` from ``source`` is expected to take, by measured rates."""
        return nbytes / self.rates.get(source, _ASSUMED_RATES[source])

    def _make_host_room(self, need: int, manifest: Manifest, force: bool) -> bool:
        what = f"{manifest.tenant}/{manifest.name}"
        if need > self.host_budget:
            raise CapacityError(
                f"model {what} needs {need} bytes in the host tier, whose budget is "
                f"{self.host_budget}: raise CacheConfig.host_bytes (or host_fraction) or use a "
                "smaller model"
            )
        sizes = {k: e.nbytes for k, e in self._host.items() if e.ready.is_set()}

        def idle(k: str) -> bool:
            return self._host[k].leases == 0

        # A tenant over its quota makes room from its own models first: no other tenant's model
        # is evicted to let one tenant exceed its share.
        tenant, quota = manifest.tenant, self.quota(manifest.tenant, HOST)
        used = self._tenant_host_used(tenant)
        own = _victims_within_quota(self.host_policy, tenant, need, quota, used, sizes, idle)
        if own is None:
            self._host_stats.quota_denials += 1
            self._host_quota_denied[tenant] = self._host_quota_denied.get(tenant, 0) + 1
            if need > quota:
                raise CapacityError(
                    f"model {what} needs {need} bytes in the host tier, over the host quota of "
                    f"tenant {tenant!r} ({quota} bytes): raise its quota (CacheConfig.tenant_quotas "
                    "or tenant_share) or use a smaller model"
                )
            raise CapacityError(
                f"model {what} needs {need} bytes in the host tier, which would put tenant "
                f"{tenant!r} over its host quota of {quota} bytes ({used} in use, not enough of "
                "them idle): retry when its models are released, or raise its quota "
                "(CacheConfig.tenant_quotas or tenant_share)"
            )
        freed = sum(sizes[k] for k in own)
        free = self.host_budget - self._host_used() + freed
        victims = choose_victims(self.host_policy, need, free, sizes, lambda k: idle(k) and k not in own)
        if victims is not None:
            victims = own + victims
        if victims is None:
            if not force:
                # Everything that could make room is leased or loading (a burst): the request is
                # served from the task's own copy (a bypass) rather than failed; the model can be
                # cached on a later miss, when leases have ended.
                return False
            busy = self._host_used() - sum(s for k, s in sizes.items() if self._host[k].leases == 0)
            raise CapacityError(
                f"model {what} needs {need} bytes in the host tier, but {busy} of its "
                f"{self.host_budget} bytes are leased or loading: retry when they are released, "
                "or raise the host budget"
            )
        if victims and not force:
            source = DISK if cache_key(manifest) in self.disk.sizes else STORE
            cost = self.expected_load_s(manifest.nbytes, source)
            if not self.host_policy.admit(cache_key(manifest), need, cost, victims):
                return False
        for key in victims:
            self._drop_host(key, evicted=True)
        return True

    def _load_into(self, entry: _HostEntry) -> None:
        """Reads the blob (disk tier, else store), publishes it, and wakes the waiters."""
        manifest = entry.manifest
        started = self.clock()
        try:
            buffer = np.empty(entry.nbytes, dtype=np.uint8)
            # Guard pages on both sides: tasks make the blob's pages read-only, and those pages
            # must hold nothing but this object.
            buffer[:GUARD_BYTES] = 0
            buffer[-GUARD_BYTES:] = 0
            view = buffer[GUARD_BYTES : GUARD_BYTES + manifest.nbytes]
            entry.source = self._read(manifest, view)
            handle = self.memory.publish(buffer)
            del buffer, view
        except BaseException as exc:
            with self._lock:
                entry.error = _detached(exc)
                if self._host.get(cache_key(manifest)) is entry:
                    del self._host[cache_key(manifest)]
                self._update_host_usage()
                entry.ready.set()
            raise
        with self._lock:
            entry.handle = handle
            # The miss cost a cost-aware policy weighs: what this load took.
            self.host_policy.on_insert(cache_key(manifest), entry.nbytes, max(0.0, self.clock() - started))
            self._host_stats.loads += 1
            entry.ready.set()
            self._update_host_usage()

    def _read(self, manifest: Manifest, out: np.ndarray) -> str:
        """Fills ``out`` with the verified blob from the first source that has it: the disk tier,
        a peer node (when one holds it and is expected to be faster), the store. Returns the
        source's name and records its rate."""
        started = time.perf_counter()
        source = self._read_from_first(manifest, out)
        seconds = time.perf_counter() - started
        self._record_rate(source, manifest.nbytes, seconds)
        self.load_events.append((source, manifest.tenant, manifest.name, manifest.nbytes, seconds))
        self.last_load_source = source
        return source

    def _record_rate(self, source: str, nbytes: int, seconds: float) -> None:
        if seconds <= 0 or nbytes < 1024 * 1024:
            return  # tiny reads measure latency, not bandwidth
        rate = nbytes / seconds
        with self._lock:
            old = self.rates.get(source)
            self.rates[source] = rate if old is None else 0.7 * old + 0.3 * rate

    def _read_from_first(self, manifest: Manifest, out: np.ndarray) -> str:
        key = cache_key(manifest)
        with self._lock:
            on_disk = key in self.disk.sizes
            if on_disk:
                self.disk.stats.hits += 1
                self.disk.policy.on_access(key)
            else:
                self.disk.stats.misses += 1
        if on_disk:
            try:
                read_blob(
                    _LOCAL_FS,
                    str(self.disk.path(key)),
                    nbytes=manifest.nbytes,
                    chunk_digests=manifest.chunks,
                    out=out,
                    source=str(self.disk.path(key)),
                )
                return DISK
            except (IntegrityError, OSError) as exc:
                log.warning("trims_ray: dropping a bad disk copy of %s: %s", key, exc)
                with self._lock:
                    self.disk.read_failed(key)
        if self.peer_read is not None:
            try:
                if self.peer_read(manifest, out):
                    self._write_later(key, out)
                    return PEER
            except (IntegrityError, OSError) as exc:
                log.warning("trims_ray: peer fetch of %s failed, reading the store: %s", key, exc)
        self.store.read(manifest, out=out)
        self._write_later(key, out)
        return STORE

    def _write_later(self, key: str, data: np.ndarray) -> None:
        """Queues a disk copy; ``data`` stays alive in the job until written, though the load
        has already moved on. An evict of the disk tier meanwhile cancels it."""
        with self._lock:
            self._disk_queued[key] = self._disk_queued.get(key, 0) + 1
        self._disk_writer.submit(self._write_queued, key, data)

    def _write_queued(self, key: str, data: np.ndarray) -> None:
        try:
            self._write_through(key, data)
        finally:
            with self._lock:
                self._disk_queued[key] -= 1
                if not self._disk_queued[key]:
                    del self._disk_queued[key]
                    self._disk_cancelled.discard(key)

    def _write_through(self, key: str, data: np.ndarray, force: bool = False) -> None:
        """Keeps a disk copy of verified bytes, if the disk budget (and, unless ``force``, the
        disk policy's admission) allows; never fails a load."""
        with self._lock:
            saves = None if force else self.expected_load_s(len(data), STORE)
            if key in self._disk_cancelled or not self.disk.reserve(key, len(data), saves):
                return
        try:
            write_atomically(_LOCAL_FS, str(self.disk.path(key)), [memoryview(data)])
        except BaseException as exc:
            with self._lock:
                if isinstance(exc, OSError):
                    self.disk.write_failed(key)  # counted; a deleted directory is recreated
                else:
                    self.disk.unreserve(key)
            if isinstance(exc, OSError):
                log.warning("trims_ray: disk tier write of %s failed: %s", key, exc)
                return
            raise
        # One step from "being written" to "on disk": no moment where another write of the same
        # blob could find neither and reserve it again.
        with self._lock:
            self.disk.unreserve(key)
            if key in self._disk_cancelled:  # evicted while being written: it must not appear
                self.disk.path(key).unlink(missing_ok=True)
                return
            self.disk.adopt(key, len(data))

    # -- eviction and prefetch -----------------------------------------------------------------

    def evict(self, name: str, tenant: str, tier: str | None = None) -> dict[str, str]:
        """Evicts a model from one tier or both; a leased host copy goes when its last lease ends.

        Returns, per tier, "evicted", "deferred" (leased now) or "absent".
        """
        tiers = _check_tier(tier, (HOST, DISK))
        key = cache_key(self.resolve(name, tenant))
        result = {}
        with self._lock:
            if HOST in tiers:
                entry = self._host.get(key)
                if entry is None or not entry.ready.is_set():
                    result[HOST] = "absent" if entry is None else "deferred"
                    if entry is not None:
                        entry.evict_when_idle = True
                elif entry.leases:
                    entry.evict_when_idle = True
                    result[HOST] = "deferred"
                else:
                    self._drop_host(key, evicted=True)
                    result[HOST] = "evicted"
            if DISK in tiers:
                present = key in self.disk.sizes
                self.disk.forget(key, evicted=True)
                if key in self._disk_queued:
                    self._disk_cancelled.add(key)
                result[DISK] = "evicted" if present else "absent"
        return result

    def prefetch(self, name: str, tenant: str, tier: str = HOST) -> str:
        """Warms a tier ahead of traffic; returns where the model was found ("host", "disk",
        "store"). Raises as ``acquire``."""
        (tier,) = _check_tier(tier, (HOST, DISK))
        if tier == HOST:
            grant = self.acquire(name, tenant, None, force=True)  # asked for by name: kept
            self.release(grant.lease_id)
            return grant.tier
        manifest = self.resolve(name, tenant)
        with self._lock:
            if cache_key(manifest) in self.disk.sizes:
                return DISK
        buffer, _ = self.store.read(manifest)
        self._write_through(cache_key(manifest), buffer, force=True)
        return STORE

    def _drop_host(self, key: str, *, evicted: bool) -> None:
        """Forgets a ready, unleased host entry; dropping the handle frees the object."""
        entry = self._host.pop(key)
        self.host_policy.on_remove(key)
        entry.handle = None
        self._host_stats.evictions += evicted
        self._update_host_usage()

    # -- scrub ---------------------------------------------------------------------------------

    def scrub(self) -> dict[str, int]:
        """Re-hashes every copy ready in the host tier against its manifest's chunk digests
        (the digests every read was verified with), one model at a time.

        A copy that no longer matches (a stray write into shared memory, a bit flip) leaves the
        table at once, so no new lease gets it: unleased, it is freed now; leased, when its last
        lease ends (those holders already have it mapped). It is then reloaded, verified, from
        the disk tier or the store (force: as a prefetch); if that fails (no room while the bad
        copy is still leased, store down) it is logged and left to the next miss.

        Returns:
            {"scrubbed": copies hashed, "corrupt": copies dropped, "reloaded": copies reloaded}.
        """
        done = {"scrubbed": 0, "corrupt": 0, "reloaded": 0}
        with self._lock:
            keys = [k for k, e in self._host.items() if e.ready.is_set()]
        for key in keys:
            with self._lock:
                entry = self._host.get(key)
                if entry is None or not entry.ready.is_set() or entry.evict_when_idle:
                    continue  # gone, replaced by a load in flight, or on its way out
                # The scrub's own lease: an evict meanwhile waits for the hash to finish.
                entry.leases += 1
            intact = None  # not hashed: the view of the copy could not be had
            try:
                intact = self._intact(entry)
            finally:
                with self._lock:
                    if intact is not None:
                        self._host_stats.scrubbed += 1
                        done["scrubbed"] += 1
                    if intact is False and self._host.get(key) is entry:
                        self._condemn(key, entry)
                        done["corrupt"] += 1
                    self._unlease(entry)
            if intact is False:
                log.warning(
                    "trims_ray: scrub found the host copy of %s/%s corrupt: dropped, reloading",
                    entry.manifest.tenant, entry.manifest.name,
                )
                try:
                    self.release(self._acquire(entry.manifest, None, None, force=True).lease_id)
                    done["reloaded"] += 1
                except Exception as exc:  # the next miss loads it
                    log.warning("trims_ray: reloading %s after scrub failed: %s", key, exc)
        return done

    def _intact(self, entry: _HostEntry) -> bool:
        """Whether a published copy still matches its manifest, chunk by chunk."""
        view = getattr(self.memory, "view", None)
        published = view(entry.handle) if view is not None else entry.handle
        manifest = entry.manifest
        blob = memoryview(published[GUARD_BYTES : GUARD_BYTES + manifest.nbytes])
        chunks = manifest.chunks
        return len(blob) == manifest.nbytes and all(
            hashlib.sha256(blob[start:end]).hexdigest() == digest
            for (start, end), digest in zip(chunks.ranges(manifest.nbytes), chunks.digests)
        )

    def _condemn(self, key: str, entry: _HostEntry) -> None:
        """Takes a corrupt copy out of the table; its bytes count until its leases end. Under
        the lock; the caller still holds a lease on it."""
        del self._host[key]
        self.host_policy.on_remove(key)
        entry.evict_when_idle = True
        self._condemned[id(entry)] = entry
        self._host_stats.corrupt += 1
        self._update_host_usage()

    # -- quotas --------------------------------------------------------------------------------

    def quota(self, tenant: str, tier: str) -> int | None:
        """The bytes ``tenant`` may hold in ``tier`` ("host" or "disk") on this node; None when
        only the tier's budget limits it."""
        explicit = self.tenant_quotas.get(tenant, {}).get(tier)
        if explicit is not None:
            return explicit
        if self.tenant_share >= 1.0:
            return None
        budget = self.host_budget if tier == HOST else self.disk.budget
        return int(self.tenant_share * budget)

    def _tenant_host_used(self, tenant: str) -> int:
        return sum(e.nbytes for e in self._host_entries() if e.manifest.tenant == tenant)

    # -- accounting ----------------------------------------------------------------------------

    def _host_entries(self) -> list[_HostEntry]:
        """Every entry that holds host bytes: in the table (ready or loading) or condemned."""
        return [*self._host.values(), *self._condemned.values()]

    def _host_used(self) -> int:
        return sum(e.nbytes for e in self._host_entries())

    def _update_host_usage(self) -> None:
        self._host_stats.bytes_used = self._host_used()
        self._host_stats.models = sum(1 for e in self._host.values() if e.ready.is_set())
        self.on_change()

    def stats(self) -> dict[str, TierStats]:
        """A snapshot of both tiers' counters; host bytes include loads in flight."""
        with self._lock:
            return {
                HOST: TierStats(**vars(self._host_stats)),
                DISK: TierStats(**vars(self.disk.stats)),
            }

    def tenant_stats(self, tenant: str | None = None) -> dict[str, TenantStats]:
        """Per tenant: bytes held per tier, quotas, and refusals met here; only ``tenant``'s
        entry when given (what a tenant may see of this node), else every tenant known here."""
        with self._lock:
            known = {e.manifest.tenant for e in self._host_entries()}
            known |= {_tenant_of(k) for held in (self.disk.sizes, self.disk.reserved) for k in held}
            known |= set(self._refusals) | set(self._host_quota_denied) | set(self.disk.quota_denied)
            out = {}
            for name in sorted(known) if tenant is None else [tenant]:
                refusals = self._refusals.get(name, {})
                out[name] = TenantStats(
                    host_bytes=self._tenant_host_used(name),
                    host_quota=self.quota(name, HOST),
                    disk_bytes=self.disk.tenant_used(name),
                    disk_quota=self.quota(name, DISK),
                    not_found=refusals.get(NOT_FOUND, 0),
                    denied=refusals.get(DENIED, 0),
                    quota_denials=self._host_quota_denied.get(name, 0) + self.disk.quota_denied.get(name, 0),
                )
            return out

    def leases(self) -> int:
        with self._lock:
            return len(self._leases)

    def callers(self, older_than_s: float) -> set[str]:
        """Ids of the Callers holding leases granted more than ``older_than_s`` ago (whose
        liveness the actor checks with placement)."""
        now = self.clock()
        with self._lock:
            return {
                lease.holder.id
                for lease in self._leases.values()
                if isinstance(lease.holder, Caller) and now - lease.granted_at > older_than_s
            }

    def report(self) -> dict:
        """What placement needs of this node, in one consistent snapshot: the best tier of every
        blob here ("host", "loading" or "disk"), host budget and use, leases per blob, and one
        (tenant, name, nbytes) per blob so that placement can ask another node for a copy."""
        with self._lock:
            residency = {key: DISK for key in self.disk.sizes}
            models = {}
            for key, entry in self._host.items():
                residency[key] = HOST if entry.ready.is_set() else "loading"
                models[key] = (entry.manifest.tenant, entry.manifest.name, entry.manifest.nbytes)
            # Leases held and requests waiting for a load in flight alike.
            in_flight = {key: entry.leases for key, entry in self._host.items() if entry.leases}
            return {
                "residency": residency,
                "host_capacity": self.host_budget,
                "host_used": self._host_used(),
                "in_flight": in_flight,
                "models": models,
            }

    def drain(self) -> None:
        """Waits until the disk copies of earlier loads are written."""
        self._disk_writer.submit(lambda: None).result()

    def close(self) -> None:
        """Finishes pending disk writes and stops the writer."""
        self._disk_writer.shutdown(wait=True)


def _check_tier(tier: str | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if tier is None:
        return allowed
    if tier == "gpu":
        raise ValueError("tier 'gpu': this node has no GPU tier")
    if tier not in allowed:
        raise ValueError(f"tier must be one of {', '.join(allowed)} or None (all), got {tier!r}")
    return (tier,)


_LOCAL_FS = LocalFileSystem()
