"""The GPU tier's logic for ONE GPU, as a plain class: models resident in device memory (one
allocation each, keyed per tenant by ``cache_key``: <tenant>/<sha256>) and handed to tasks as IPC handles under leases.

A miss swaps the model in from the host tier (late binding, FaaSwap): one flight per model
however many ask, bytes counted against the budget from the moment it is admitted, copied
layer by layer so that a pipelined grant can be handed out before the last layer arrives. The
lease rules are the host tier's (``node_cache.NodeCache``): a leased model is never freed, an
evict of one is deferred until its last release, a reaper ends the leases of dead processes and
unclaimed ones, and a model that cannot fit raises CapacityError without evicting anything.
Ray and CUDA are not imported here: the device comes in as a ``GpuDevice`` (``CudaDevice`` in
``trims_ray._cuda``, ``FakeDevice`` in ``gpu_testing`` for tests) and host bytes as a
``HostSource``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._config import GpuTierConfig, check_budget  # GpuTierConfig: defined with the rest of the settings; re-exported
from .._devices import CopyJob, DeviceMemory, GpuDevice, HostSource  # re-exported
from .._errors import CapacityError
from .._gpu_ipc import DeviceIdentity, module_order, plan_layers
from .._manifest import Manifest
from ..policy import EvictionPolicy, Outcome, decide_admission, make_policy, shrink_victims
from .._protocol import ASSUMED_SWAP_RATE, BYPASS, Caller, GpuGrant, Holder, TierStats, cache_key, holder_alive  # GpuGrant re-exported
from .gpu_entry import Resident as _Resident
from .gpu_entry import cannot_allocate, check_fits_device, device_short, no_room, too_big
from .gpu_views import GPU, GpuTierViews, off_stats
from .host_entry import detached
from .leases import LeaseTable

__all__ = [
    "GPU",
    "DeviceMemory",
    "CopyJob",
    "GpuDevice",
    "HostSource",
    "GpuTierConfig",
    "GpuGrant",
    "GpuTier",
    "off_stats",
]

log = logging.getLogger("trims_ray")

MiB = 1024 * 1024


class GpuTier(GpuTierViews):
    """The GPU tier of one GPU.

    Args:
        device: the GPU.
        identity: which GPU it is (goes into every grant).
        host: where swap-ins read models from.
        config: budget, policy, lease timing.
        policy: an eviction policy instance, instead of ``config.policy`` by name.
        clock: monotonic time source.
        holder_alive: tells whether a lease holder still runs (injected for tests).
        layer_order: tensor names in module order for a manifest (pipelining order); default
            reads the module order recorded in the manifest (``module_order``): no tenant code runs.
        on_change: called (under the tier's lock, so it must only signal) when residency,
            usage or leases change.

    Raises:
        ValueError: an explicit budget above the device's memory.
    """

    def __init__(
        self,
        *,
        device: GpuDevice,
        identity: DeviceIdentity,
        host: HostSource,
        config: GpuTierConfig | None = None,
        policy: EvictionPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        holder_alive: Callable[[Holder | Caller], bool] = holder_alive,
        layer_order: Callable[[Manifest], Sequence[str] | None] = module_order,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config if config is not None else GpuTierConfig()
        self.device = device
        self.identity = identity
        self.host = host
        total = device.memory().total
        budget = self.config.budget_bytes
        if budget is None:
            budget = int(total * self.config.budget_fraction)
        else:
            check_fits_device(budget, total, identity.uuid, ": lower budget_bytes or use budget_fraction")
        self.budget = budget
        self.policy = policy if policy is not None else make_policy(self.config.policy, clock=clock)
        self.layer_order = layer_order
        self.on_change = on_change
        self.swap_rate: float | None = None  # measured host-to-GPU bytes/s (moving average)
        self._orders: dict[str, Sequence[str] | None] = {}
        self._lock = threading.Lock()
        self._resident: dict[str, _Resident] = {}
        # Entries out of the table whose memory is still held: failed swap-ins whose pipelined
        # grantees still hold leases; freed when the last lease ends.
        self._orphans: list[_Resident] = []
        self._freeing = 0  # bytes of dropped entries whose memory is being freed now
        self._stats = TierStats(capacity=budget)
        self._leases: LeaseTable[_Resident] = LeaseTable(
            clock=clock, holder_alive=holder_alive, unclaimed_ttl_s=self.config.unclaimed_ttl_s
        )
        self._swaps = ThreadPoolExecutor(self.config.swap_workers, thread_name_prefix="trims-gpu-swap")

    # -- leases --------------------------------------------------------------------------------

    def acquire(
        self,
        manifest: Manifest,
        holder: Holder | Caller | None,
        lease_id: str | None = None,
        *,
        pipelined: bool = False,
        force: bool = False,
        bypass_when_busy: bool = False,
    ) -> GpuGrant:
        """Leases the model on this GPU for ``holder``, swapping it in from the host tier first
        on a miss.

        Concurrent misses for one blob cause one swap-in; the others wait for it and share its
        result or its error. The lease counts from the moment the request is admitted, so a model
        on its way in cannot be evicted. ``pipelined``: return as soon as the copies are
        enqueued, with one event per layer group to wait on (see GpuGrant), instead of when the
        last byte has arrived. A miss that would evict others is kept only if the policy admits
        it (unless ``force``); otherwise the grant's tier is "bypass", with no lease and no
        handle. ``holder`` None: a task claims the lease later (``claim``).
        ``bypass_when_busy``: a miss with no room now (leased bytes, swap-ins in flight, other
        processes' memory) is a bypass too, so that a task is served by the host tier rather
        than failed (what a holder does for tasks; prefetch wants the error).

        Raises:
            CapacityError: the model cannot fit the GPU budget; or, unless ``bypass_when_busy``,
                it cannot fit even after evicting what is idle, or the GPU has not that much
                memory free (other processes use it).
            ModelNotFoundError, IntegrityError, StoreUnavailableError: from the host tier.
            ValueError / TypeError: a lease id in use, or not a str.
        """
        key = cache_key(manifest)
        victims: list[_Resident] = []
        with self._lock:
            self._leases.check_new(lease_id)
            entry = self._resident.get(key)
            leader = entry is None
            if leader:
                entry = self._admit(manifest, force, victims, bypass_when_busy)
                if entry is None:
                    return GpuGrant(lease_id or 0, None, manifest, 0, self.identity, BYPASS)
            elif entry.ready.is_set():
                self._stats.hits += 1
                self.policy.on_access(key)
            else:
                self._stats.misses += 1  # joins the swap-in in flight
            entry.leases += 1
        try:
            self._free(victims)  # before the swap-in allocates: the GPU must have the room
        finally:
            if leader:  # its waiters must hear from the swap-in whatever happened above
                self._swaps.submit(self._swap_in, entry)
        (entry.started if pipelined else entry.ready).wait()
        dropped: list[_Resident] = []
        with self._lock:
            if entry.error is not None:
                self._unlease(entry, dropped)
                # Each waiter raises its own copy: one object raised by many would collect every
                # waiter's frames in its traceback (see host_entry.detached).
                error = None if entry.busy and bypass_when_busy else detached(entry.error)
                if error is None:
                    self._stats.bypasses += 1
                    grant = GpuGrant(lease_id or 0, None, manifest, 0, self.identity, BYPASS)
            else:
                error = None
                lease_id, over = self._leases.add(entry, holder, lease_id)
                if over:
                    self._unlease(entry, dropped)
                in_flight = not entry.ready.is_set()
                grant = GpuGrant(lease_id, entry.handle, manifest, 0, self.identity, entry.source if leader else GPU,
                                 entry.groups if in_flight else (), entry.events if in_flight else ())
                self.on_change()
        self._free(dropped)
        if error is not None:
            raise error
        return grant

    def claim(self, lease_id: int | str, holder: Holder) -> bool:
        """Names the process that uses a lease taken on its behalf; False if the lease is gone."""
        with self._lock:
            return self._leases.claim(lease_id, holder)

    def release(self, lease_id: int | str) -> bool:
        """Ends a lease; True if it was held. Releasing twice is harmless. A caller's lease id
        (a str) not granted yet is ended as soon as its acquire grants it."""
        dropped: list[_Resident] = []
        with self._lock:
            entry = self._leases.pop(lease_id)
            if entry is not None:
                self._unlease(entry, dropped)
        self._free(dropped)
        return entry is not None

    def reap(self) -> int:
        """Ends the leases of processes that died, and those never claimed; returns how many."""
        dropped: list[_Resident] = []
        with self._lock:
            dead = self._leases.expired()
            for entry in dead:
                self._unlease(entry, dropped)
        self._free(dropped)
        if dead:
            log.info("trims_ray: GPU %s reclaimed %d lease(s) of dead processes", self.identity.label, len(dead))
        return len(dead)

    def _unlease(self, entry: _Resident, dropped: list[_Resident]) -> None:
        """One lease (or waiting acquire) of ``entry`` ends; frees it when it was the last and
        the entry is to go. Call under the lock; free ``dropped`` after releasing it."""
        entry.leases -= 1
        if entry.leases == 0:
            if entry in self._orphans:
                self._orphans.remove(entry)
                self._drop(entry, dropped, evicted=False)
            elif entry.evict_when_idle and self._resident.get(cache_key(entry.manifest)) is entry:
                self._drop(entry, dropped, evicted=True)
            self._fit_budget(dropped)  # the budget may have been lowered under this lease
        self.on_change()

    # -- admission and eviction ----------------------------------------------------------------

    def _used(self) -> int:
        return sum(e.nbytes for e in self._resident.values()) + sum(e.nbytes for e in self._orphans) + self._freeing

    def _admit(
        self, manifest: Manifest, force: bool, victims_out: list[_Resident], bypass_when_busy: bool = False
    ) -> _Resident | None:
        """Reserves room for a swap-in, choosing and dropping idle victims (appended to
        ``victims_out`` for the caller to free after the lock), or None when the policy does
        not admit it (or, with ``bypass_when_busy``, when there is no room now). Call under the
        lock.

        Raises:
            CapacityError: it cannot fit, or the GPU lacks the memory; nothing is evicted.
        """
        key, gpu = cache_key(manifest), self.identity.label
        need = self.device.footprint(manifest.nbytes)
        self._stats.misses += 1
        sizes = {k: e.nbytes for k, e in self._resident.items() if e.ready.is_set()}

        def idle(k: str) -> bool:
            return self._resident[k].leases == 0

        decision = decide_admission(
            self.policy,
            key,
            need,
            self.policy_cost(manifest.nbytes),
            budget=self.budget,
            used=self._used(),
            sizes=sizes,
            evictable=idle,
            force=force,
        )
        if decision.outcome is Outcome.TOO_BIG:  # never fits: an error whoever asks
            raise CapacityError(too_big(manifest, need, gpu, self.budget))
        if decision.outcome is Outcome.NO_ROOM:
            busy = self._used() - sum(s for k, s in sizes.items() if idle(k))
            return self._busy(no_room(manifest, need, gpu, self.budget, busy), bypass_when_busy)
        if not decision.kept:  # REFUSED: a bypass; the tier allocates nothing, so no device check
            self._stats.bypasses += 1
            return None
        # Other processes (the tasks' own tensors) share the GPU: the budget alone does not
        # promise the memory, so check what the device has, counting what evicting will free
        # and what admitted swap-ins have not allocated yet.
        pending = sum(e.nbytes for e in self._resident.values() if e.buffer is None)
        room = self.device.memory().free + self._freeing + sum(sizes[k] for k in decision.victims) - pending
        if room < need:
            return self._busy(device_short(manifest, need, gpu, room), bypass_when_busy)
        for victim in decision.victims:
            self._drop(self._resident[victim], victims_out, evicted=True)
        entry = _Resident(manifest, need)
        self._resident[key] = entry
        self._update_usage()
        return entry

    def _busy(self, message: str, bypass: bool) -> None:
        """No room now: None (a bypass: the task uses the host tier) or CapacityError."""
        if not bypass:
            raise CapacityError(message)
        self._stats.bypasses += 1

    @staticmethod
    def policy_cost(nbytes: int) -> float:
        """The miss cost the policy weighs for a blob of ``nbytes``, at admission and at insert
        alike: its swap-in time at the assumed rate. Every swap-in on one GPU crosses the same
        link, so the cost per byte is the same for every blob, and measured times would only add
        noise: a resident blob whose swap-in was slow (a slow host load, a busy link) kept that
        time as its cost and outweighed every newcomer of the same popularity, so those bypassed
        the GPU (cost-aware policies: gdsf, cost)."""
        return nbytes / ASSUMED_SWAP_RATE

    def _drop(self, entry: _Resident, dropped: list[_Resident], *, evicted: bool) -> None:
        """Takes an entry out of the tier; its memory stays counted until ``_free`` frees it.
        Call under the lock."""
        key = cache_key(entry.manifest)
        if self._resident.get(key) is entry:
            del self._resident[key]
            if key in self.policy:
                self.policy.on_remove(key)
        self._stats.evictions += evicted
        self._freeing += entry.nbytes
        dropped.append(entry)
        self._update_usage()

    def _free(self, dropped: list[_Resident]) -> None:
        """Frees the memory of dropped entries; outside the lock (freeing waits for the GPU).
        An entry whose copy still runs stays counted, and its swap-in frees it when the copy
        ends: freed now, the copy engine would write into memory given to someone else."""
        for entry in dropped:
            with self._lock:
                if entry.copying:
                    entry.free_after_copy = True
                    continue
                buffer, entry.buffer, entry.handle = entry.buffer, None, None
            try:
                if buffer is not None:
                    self.device.free(buffer)
            finally:
                with self._lock:
                    self._freeing -= entry.nbytes
                    self._update_usage()

    def set_budget(self, budget: int) -> dict[str, int]:
        """Changes this GPU's byte budget now. A lower one evicts idle models in the policy's
        eviction order until the tier fits; leased ones and swap-ins in flight stay, and go
        (in the same order) as their leases end while the tier holds more than its budget.

        Returns:
            {"budget", "bytes_used" (after the evictions), "evicted" (models evicted by this
            call), "over_budget" (bytes held beyond the budget by leases; 0 when it fits)}.

        Raises:
            ValueError: not a non-negative int, or more than the GPU's memory.
        """
        check_budget(budget, "the GPU budget")
        check_fits_device(budget, self.device.memory().total, self.identity.uuid)
        dropped: list[_Resident] = []
        with self._lock:
            self.budget = budget
            self._stats.capacity = budget
            self._fit_budget(dropped)
        self._free(dropped)
        with self._lock:
            used = self._used()
        return {"budget": budget, "bytes_used": used, "evicted": len(dropped), "over_budget": max(0, used - budget)}

    def _fit_budget(self, dropped: list[_Resident]) -> None:
        """If the tier holds more than its budget (it was lowered), drops idle models in the
        policy's eviction order until it fits. What is already going does not count: memory
        being freed, orphans of failed swap-ins, and models evicted while leased (they go with
        their last lease); evicting others for them would free their bytes twice. Called when
        the budget changes and whenever a model becomes idle. Call under the lock; free
        ``dropped`` after releasing it."""
        staying = sum(e.nbytes for e in self._resident.values() if not e.evict_when_idle)
        excess = staying - self.budget
        if excess <= 0:
            return
        sizes = {k: e.nbytes for k, e in self._resident.items() if e.ready.is_set()}
        for key in shrink_victims(self.policy, excess, sizes, lambda k: self._resident[k].leases == 0):
            self._drop(self._resident[key], dropped, evicted=True)

    def evict(self, key: str) -> str:
        """Evicts a blob from this GPU: "evicted", "deferred" (leased or on its way in: it goes
        when its last lease ends) or "absent"."""
        dropped: list[_Resident] = []
        with self._lock:
            entry = self._resident.get(key)
            if entry is None:
                return "absent"
            if entry.leases or not entry.ready.is_set():
                entry.evict_when_idle = True
                return "deferred"
            self._drop(entry, dropped, evicted=True)
        self._free(dropped)
        return "evicted"

    def prefetch(self, manifest: Manifest) -> str:
        """Swaps a model in ahead of traffic (kept whatever the policy's admission says);
        returns where it was found: "gpu", or the tier its bytes came from. Raises as acquire."""
        grant = self.acquire(manifest, None, force=True)
        self.release(grant.lease_id)
        return grant.tier

    # -- swap-in -------------------------------------------------------------------------------

    def _order(self, manifest: Manifest) -> Sequence[str] | None:
        key = cache_key(manifest)
        if key not in self._orders:
            self._orders[key] = self.layer_order(manifest)
        return self._orders[key]

    def _swap_in(self, entry: _Resident) -> None:
        """Allocates, copies the blob from the host tier layer by layer, and wakes the waiters:
        pipelined ones when the copies are enqueued, the others when they are done. Runs in a
        swap worker; never raises (errors go to the waiters)."""
        manifest = entry.manifest
        started = time.perf_counter()
        try:
            groups = plan_layers(manifest, self._order(manifest), min_bytes=self.config.min_layer_bytes)
            with self.host.open(manifest) as (host, source):
                if host.dtype != np.uint8 or host.ndim != 1 or len(host) != manifest.nbytes:
                    raise TypeError(f"host source gave {host.dtype} {host.shape} for a blob of {manifest.nbytes} bytes")
                try:
                    buffer = self.device.allocate(manifest.nbytes)
                except MemoryError as exc:
                    entry.busy = True  # other processes took the memory since admission: not now
                    raise CapacityError(cannot_allocate(manifest, entry.nbytes, self.identity.label, exc)) from None
                with self._lock:
                    entry.buffer = buffer
                handle = self.device.export(buffer)
                job = self.device.copy_in(buffer, host, groups, lambda i: setattr(entry, "layers_done", i + 1))
                with self._lock:
                    entry.handle, entry.groups, entry.events, entry.source = handle, groups, tuple(job.events), source
                entry.started.set()
                job.wait()
        except BaseException as exc:
            self._fail(entry, exc)
            if not isinstance(exc, Exception):
                raise
            return
        seconds = time.perf_counter() - started
        key, dropped = cache_key(manifest), []
        with self._lock:
            entry.copying = False
            if manifest.nbytes >= MiB and seconds > 0:
                rate = manifest.nbytes / seconds
                self.swap_rate = rate if self.swap_rate is None else 0.7 * self.swap_rate + 0.3 * rate
            self._stats.loads += 1
            entry.ready.set()
            if self._resident.get(key) is entry:  # the policy tracks exactly what is resident
                self.policy.on_insert(key, entry.nbytes, self.policy_cost(manifest.nbytes))  # as admission weighed it
                if entry.evict_when_idle and entry.leases == 0:  # evicted while copying, unleased
                    self._drop(entry, dropped, evicted=True)
                elif entry.leases == 0:  # its pipelined grants ended before the copy did
                    self._fit_budget(dropped)
            self._settle(entry, dropped)
        self._free(dropped)

    def _settle(self, entry: _Resident, dropped: list[_Resident]) -> None:
        """The copy into ``entry`` ended: if it was dropped meanwhile, it is freed now (added to
        ``dropped``). Call under the lock."""
        if entry.free_after_copy:
            entry.free_after_copy = False
            dropped.append(entry)
        self._update_usage()

    def _fail(self, entry: _Resident, exc: BaseException) -> None:
        log.warning("trims_ray: swap-in of %s/%s onto GPU %s failed: %s", entry.manifest.tenant,
                    entry.manifest.name, self.identity.label, exc)
        dropped: list[_Resident] = []
        with self._lock:
            entry.copying = False
            entry.error = detached(exc)  # kept as raised, its traceback's frames hold the entry
            if self._resident.get(cache_key(entry.manifest)) is entry:
                if entry.leases:
                    # Its waiters (at least the leader's acquire) and pipelined grantees still
                    # count as leases; the last of them to let go frees what was allocated.
                    del self._resident[cache_key(entry.manifest)]
                    self._orphans.append(entry)
                else:  # every grantee let go already: nobody is left to free it but us
                    self._drop(entry, dropped, evicted=False)
            self._settle(entry, dropped)
            entry.started.set()
            entry.ready.set()
        self._free(dropped)

    # -- accounting ----------------------------------------------------------------------------

    def _update_usage(self) -> None:
        self._stats.bytes_used = self._used()
        self._stats.models = sum(1 for e in self._resident.values() if e.ready.is_set())
        self.on_change()

    def close(self) -> None:
        """Waits for swap-ins in flight, then frees every model not leased (leased ones go when
        released)."""
        self._swaps.shutdown(wait=True)
        for key in list(self.resident()):
            self.evict(key)
