"""The node cache actor: a thin Ray wrapper that gives NodeCache shared memory, a lease reaper,
peer fetch over Ray's object transfer, and residency reports to the placement actor.

One per node, named ``trims_ray:node:<node id>`` in namespace "trims_ray", pinned to its node,
detached so that cached models outlive the job that loaded them. It owns every host-tier object
(``ray.put`` from this actor), so an object lives as long as the actor keeps its reference. Its
GPU holders, one per GPU, are started and called by the ``_node_gpus`` mixin; budget changes
are the ``_node_budgets`` mixin's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from dataclasses import asdict

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .._config import CacheConfig
from .._errors import ModelNotFoundError
from .._gc import freeze_startup_objects
from .._fsio import has_credentials, without_credentials
from .._malloc import ACTOR_ENV
from .._manifest import Manifest
from .._metrics import export_node_cache, set_per_model
from .._raycalls import get
from .._store import ModelStore
from ._naming import NAMESPACE, forget_placement_actor, node_cache_actor, node_cache_actor_name, placement_actor
from ..cache.gpu_tier import GPU
from .._protocol import ASSUMED_LOAD_RATES, PEER, STORE, Caller, Holder, HostGrant, Resolved, cache_key, holder_alive
from ..cache.host_loader import LEND_CALL_TIMEOUT_S, PEER_CHUNK_BYTES, lend_ttl_s
from ..cache.node_cache import NodeCache
from ..cache.placement import ReportSequence
from ._lending import Lent, copy_lent
from ._budgets import with_recorded_budgets
from ._node_budgets import NodeBudgetCalls
from ._node_gpus import NodeGpus
from ._node_info import bypass_budget, node_info, object_store_bytes_used
from .gpu_tier_actor import node_gpu_residency

__all__ = [
    "start_node_cache_actor",
    "NodeCacheActor",
]

log = logging.getLogger("trims_ray")


# Enough threads that callers waiting on a load in flight do not block hits on other models.
_ACTOR_CONCURRENCY = 64
# Threads for the reclaim threads of worker processes that keep models (one long poll each):
# apart, so that they never starve the calls above. All but a few of them may hold a poll while
# it waits for an ask (``ProcessPins.max_waiting``); polls beyond that are answered at once, on
# the threads left, and their processes poll again a poll period later. A node can run more
# such processes than the group has threads (fractional-CPU tasks), and their polls queued.
_RECLAIM_CONCURRENCY = 64
_RECLAIM_SPARE = 8
# Threads for the calls that end or take over a lease (release, pin): they only take the
# cache's lock for a moment, and they must not queue behind the calls of the default group that
# wait (a miss waiting up to 2 s for a kept model's room, an evict, loads' followers): with all
# its threads waiting so, the releases that would end those waits could not run, and each wait
# ran out (the misses then bypassed, the evicts were deferred).
_QUICK_CONCURRENCY = 8


def start_node_cache_actor(
    node_id: str, store_uri: str, storage_options: dict | None, config: CacheConfig
) -> ray.actor.ActorHandle:
    """Gets or creates the cache actor of ``node_id`` (returns at once; it starts on its node)."""
    return (
        # Concurrency groups are class options in Ray, not ``.options()``.
        ray.remote(concurrency_groups={"reclaim": _RECLAIM_CONCURRENCY, "quick": _QUICK_CONCURRENCY})(NodeCacheActor)
        .options(
            name=node_cache_actor_name(node_id),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,  # a cache must not take CPUs from the tasks it serves
            max_concurrency=_ACTOR_CONCURRENCY,
            max_restarts=-1,
            max_task_retries=2,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            runtime_env={"env_vars": ACTOR_ENV},  # read when its process starts: see _malloc
        )
        .remote(node_id, store_uri, storage_options, config, polls_waiting=max(1, _RECLAIM_CONCURRENCY - _RECLAIM_SPARE))
    )


class _PlasmaMemory:
    """HostMemory on the node's object store: one object per model, owned by this actor."""

    def publish(self, buffer: np.ndarray) -> ray.ObjectRef:
        # A numpy array comes back from ray.get as a zero-copy, read-only view of plasma.
        return ray.put(buffer)

    def view(self, handle: ray.ObjectRef) -> np.ndarray:
        return ray.get(handle)  # the object as it is in plasma now (what scrub re-hashes)


class NodeCacheActor(NodeGpus, NodeBudgetCalls):
    """Ray actor body around NodeCache (made remote with ``start_node_cache_actor``).

    Args:
        node_id: the node this actor serves (hex).
        store_uri: the model store's URI.
        storage_options: fsspec options for the store.
        config: tier budgets and policy.
        polls_waiting: how many processes' polls may wait at once (``ProcessPins.max_waiting``);
            None: any number.
    """

    def __init__(
        self,
        node_id: str,
        store_uri: str,
        storage_options: dict | None,
        config: CacheConfig,
        polls_waiting: int | None = None,
    ) -> None:
        self.node_id = node_id
        # Looked up once: the node's object store size and its raylet's address do not change.
        self._node = node_info(node_id)
        # Budgets changed since ``config`` was given (``set_budget``): this cache may be one Ray
        # restarted, or one started on a node that joined after the change.
        object_store = int(self._node["Resources"].get("object_store_memory", 0))
        config, recorded = with_recorded_budgets(config, node_id, object_store)
        self.config = config
        self._remember_budget_records(recorded)  # a call of an earlier turn must not undo them
        set_per_model(config.metrics_per_model)  # before this process records anything
        self._actor_id = ray.get_runtime_context().get_actor_id()
        # What routing counts a node's task slots from (``placement.task_slots``).
        self._slots = max(1.0, float(self._node["Resources"].get("CPU", 1)))
        self._gpus = float(self._node["Resources"].get("GPU", 0))
        host_budget = config.host_bytes
        if host_budget is None:
            host_budget = int(self._node["Resources"].get("object_store_memory", 0) * config.host_fraction)
        # What a bypassed task is told of the store: never its credentials (any process can
        # call this actor); with them withheld, the task reads through ``read_bypassed``.
        self._store_spec = (store_uri, without_credentials(storage_options))
        self._relay_bypasses = has_credentials(storage_options)
        self._changed = threading.Event()
        # One report at a time, each built just before it is sent: reports arrive in order.
        self._report_lock = threading.Lock()
        self._last_report: tuple[dict | None, float] = (None, 0.0)
        # Numbers every report, so placement applies them in order however Ray delivers them.
        self._reports = ReportSequence()
        self.cache = NodeCache(
            store=ModelStore(store_uri, storage_options=storage_options),
            memory=_PlasmaMemory(),
            host_budget=host_budget,
            disk_dir=config.disk_path(node_id),
            disk_budget=config.disk_bytes,
            policy=config.policy,
            manifest_ttl_s=config.manifest_ttl_s,
            peer_read=self._peer_read if config.peer_fetch else None,
            on_change=self._changed.set,
            holder_alive=self._holder_alive,
            tenant_share=config.tenant_share,
            tenant_quotas=config.tenant_quotas,
            bypass_budget=bypass_budget(self._node, host_budget),
        )
        self.cache.pins.max_waiting = polls_waiting  # sized with the reclaim group, where it is made
        self._dead_callers: set[str] = set()
        # Lends a peer copies slice by slice (``lend_chunk``): lease id -> Lent, the lent
        # object mapped once per lend, dropped with its lease (release, or its ttl).
        self._lent: dict[str, Lent] = {}
        self._lent_lock = threading.Lock()
        self._peer_mode = "auto" if config.peer_fetch else "never"
        self._stop = threading.Event()
        self._gpu_holders, self._gpu_off_reason = self._start_gpu_tier(store_uri, storage_options)
        threading.Thread(target=self._reap_forever, name="trims-lease-reaper", daemon=True).start()
        threading.Thread(target=self._report_forever, name="trims-report", daemon=True).start()
        self.cache.manifests.start_refreshing(self._stop)
        freeze_startup_objects()  # what Ray's node-wide gc.collect would walk for nothing (``_gc``)

    def _reap_forever(self) -> None:
        scrubbed_at = time.monotonic()
        while not self._stop.wait(self.config.lease_check_s):
            self._dead_callers = self._find_dead_callers()
            self.cache.reap()
            self.cache.give_back_idle_buffers()
            self._forget_expired_lends()
            if self.config.scrub_s and time.monotonic() - scrubbed_at >= self.config.scrub_s:
                try:
                    self.scrub()
                except Exception as exc:  # the reaper must go on
                    log.warning("trims_ray: periodic scrub failed: %s", exc)
                scrubbed_at = time.monotonic()

    def _find_dead_callers(self) -> set[str]:
        """Callers holding leases here that placement has not seen polling lately (they died,
        and their tasks' results will never come to release the leases)."""
        # Only leases older than the timeout: their caller has had time to be seen polling.
        ids = sorted(self.cache.callers(older_than_s=self.config.caller_timeout_s))
        if not ids:
            return set()
        try:
            alive = get(placement_actor().callers_alive.remote(ids), timeout=5)
        except Exception:  # placement unreachable: no evidence that anyone died
            forget_placement_actor()
            return set()
        return {caller for caller, ok in zip(ids, alive) if not ok}

    def _holder_alive(self, holder: Holder | Caller) -> bool:
        if isinstance(holder, Caller):
            return holder.id not in self._dead_callers
        return holder_alive(holder)

    # -- the calls tasks make ------------------------------------------------------------------

    def ping(self) -> str:
        return self.node_id

    def claim(self, lease_id: int, holder: Holder) -> bool:
        return self.cache.claim(lease_id, holder)

    def acquire(
        self,
        name: str,
        tenant: str,
        holder: Holder | Caller | None,
        lease_id: str | None = None,
        hint: Resolved | None = None,
        pin: bool = False,
    ) -> HostGrant:
        """NodeCache.acquire; ``hint``: what the caller resolved ``name`` to (it is checked);
        ``pin``: the holder process keeps the model built (``pin``)."""
        grant = self.cache.acquire(name, tenant, holder, lease_id, hint=hint, pin=pin)
        if grant.bypass:
            # The task reads the model itself: tell it from where (its own process may not know
            # the store, when Ray was started before trims_ray.init).
            return HostGrant.of(grant, self.node_id, *self._store_spec, relayed=self._relay_bypasses)
        return HostGrant.of(grant, self.node_id, actor_id=self._actor_id, incarnation=self.cache.incarnation)

    def read_bypassed(self, name: str, tenant: str, sha256: str) -> np.ndarray:
        """The verified blob of a miss this cache did not keep (a bypass), for its task, when the
        store's credentials stay here (``HostGrant.relayed``): read from the store into an
        object of the task's own, and not kept.

        Raises:
            ModelNotFoundError: ``name`` does not mean the blob ``sha256`` for ``tenant`` now.
        """
        manifest = self.cache.resolve(name, tenant)  # what this node trusts the name to mean
        if manifest.sha256 != sha256:
            raise ModelNotFoundError(f"{tenant}/{name} was re-registered ({manifest.sha256}, not {sha256}): retry")
        buffer, _ = self.cache.store.read(manifest)
        return buffer

    @ray.method(concurrency_group="quick")
    def pin(self, key: str, holder: Holder, lease_id: str) -> str:
        """A process keeps the blob ``key`` built after a task that a caller's lease served:
        its own lease on it from now on, asked back when the node needs it (NodeCache.pin).
        Returns this cache's incarnation, or "" when it was refused."""
        return self.cache.incarnation if self.cache.pin(key, holder, lease_id) else ""

    @ray.method(concurrency_group="reclaim")
    def reclaims(self, holder: Holder, hits: dict[str, int], timeout_s: float, incarnation: str = "") -> tuple[str, list[str]]:
        """A process's long poll: counts the hits it served from the models it keeps since its
        last poll, then returns this cache's incarnation and the ids of its pins the node asks
        back, waiting up to ``timeout_s`` for one ([] if none). At once when ``incarnation``
        (what the process last heard) is not this one: it kept models from a cache that died."""
        if incarnation and incarnation != self.cache.incarnation:
            return self.cache.incarnation, []
        if hits:
            self.cache.note_hits(hits)
        return self.cache.incarnation, self.cache.wait_asked(holder, min(float(timeout_s), 30.0))

    @ray.method(concurrency_group="quick")
    def release(self, lease_id: int | str) -> bool:
        with self._lent_lock:
            self._lent.pop(lease_id, None)  # its mapping goes before the lease: nothing reads it
        return self.cache.release(lease_id)

    def held_manifest(self, key: str) -> Manifest | None:
        """The manifest of this node's host copy under ``key`` (None: none here), for a GPU
        holder to check a task's hint against (NodeCache.held_manifest)."""
        return self.cache.held_manifest(key)

    def lend(self, key: str, lease_id: str | None = None) -> HostGrant | None:
        """A lease on a blob this node holds in memory, for a peer copying it (None: not here);
        ``lease_id``: the borrower's own id for it (NodeCache.lend). The peer reads it with
        ``lend_chunk`` (its ``ref`` is for callers on this node, which map it in place)."""
        # Before the lend: this mapping must not outlive the lease, whose ttl starts in it.
        started = time.monotonic()
        grant = self.cache.lend(key, lease_id)
        if grant is None:
            return None
        with self._lent_lock:
            expires = started + lend_ttl_s(grant.manifest.nbytes)
            self._lent[grant.lease_id] = Lent(grant.handle, grant.offset, grant.manifest.nbytes, expires)
        return HostGrant.of(grant, self.node_id)

    def lend_chunk(self, lease_id: str, offset: int, length: int) -> np.ndarray | None:
        """Bytes [offset, offset + length) of the blob lent under ``lease_id`` (at most
        PEER_CHUNK_BYTES), for the peer copying it: a slice is all a borrower pulls into its
        object store at once (``_peer_read``). None when the lend is over (released, or its ttl
        passed), so that a slow borrower never reads a copy that may have been evicted.

        Raises:
            ValueError: a range outside the blob, or longer than PEER_CHUNK_BYTES.
        """
        with self._lent_lock:
            lent = self._lent.get(lease_id)
            if lent is None or time.monotonic() > lent.expires:
                return None
            if not (0 <= offset and 0 < length <= PEER_CHUNK_BYTES and offset + length <= lent.nbytes):
                raise ValueError(
                    f"bytes {offset}-{offset + length} are not a slice of at most {PEER_CHUNK_BYTES} "
                    f"bytes of a {lent.nbytes}-byte blob"
                )
            if lent.view is None:  # mapped once per lend: a zero-copy view of our own object
                lent.view = self.cache.memory.view(lent.handle)
            start = lent.offset + offset
            # A view: Ray copies it once, into the object it returns to the borrower.
            return lent.view[start : start + length]

    def _forget_expired_lends(self) -> None:
        """Drops the mappings of lends whose ttl passed (their borrower never released them);
        the lease table ends those leases by the same ttl, so the copy can be freed."""
        now = time.monotonic()
        with self._lent_lock:
            for lease_id in [i for i, lent in self._lent.items() if now > lent.expires]:
                del self._lent[lease_id]

    def drain(self) -> None:
        """Waits until disk copies of earlier loads are written (for tests and benchmarks)."""
        self.cache.drain()

    def prefetch(self, name: str, tenant: str, tier: str, key: str | None = None) -> str:
        try:
            if tier == GPU:
                return self._prefetch_gpu(name, tenant)
            return self.cache.prefetch(name, tenant, tier, key=key)
        finally:
            self._send_report()  # placement knows before the caller's prefetch() returns

    def evict(self, name: str, tenant: str, tier: str | None, key: str | None = None) -> dict[str, str]:
        try:
            result = {}
            if tier in (None, GPU):
                result[GPU] = self._evict_gpu(name, tenant)
            if tier != GPU:
                result.update(self.cache.evict(name, tenant, tier, key=key))
            return result
        finally:
            self.cache.give_back_memory()  # what the evicted models' loads left behind
            self._send_report()

    def scrub(self) -> dict[str, int]:
        """Re-hashes the host tier's copies now (NodeCache.scrub); placement hears of any drop."""
        try:
            return self.cache.scrub()
        finally:
            self._send_report()

    def count_refusal(self, kind: str, tenant: str) -> None:
        """Counts a refusal that a caller's process met (NodeCache.count_refusal)."""
        self.cache.count_refusal(kind, tenant)

    def stats(self, tenant: str | None = None) -> dict:
        """Tier totals, and per-tenant use and refusals: ``tenant``'s only when given."""
        gpu = self._gpu_stats()
        return {
            "tenants": {t: asdict(s) for t, s in self.cache.tenant_stats(tenant).items()},
            "tiers": {GPU: gpu["tier"], **{t: asdict(s) for t, s in self.cache.stats().items()}},
            # Whether the GPU tier is on here, why not, and each GPU's own counters and memory.
            "gpu": {"enabled": gpu["enabled"], "reason": gpu["reason"], "gpus": gpu["gpus"]},
            "leases": self.cache.leases(),
            "pinned": self.cache.pinned(),
            "object_store_bytes_used": object_store_bytes_used(self._node),
            "load_rates": dict(self.cache.rates),
            "last_load_source": self.cache.last_load_source,
        }

    def configure(self, *, peer_fetch: str | None = None) -> None:
        """Changes settings of the running cache. ``peer_fetch``: "auto" (copy from a peer when
        expected faster than the store), "always" (whenever a peer has it) or "never";
        benchmarks compare the last two.

        Raises:
            ValueError: an unknown mode.
        """
        if peer_fetch is not None:
            if peer_fetch not in ("auto", "always", "never"):
                raise ValueError(f"peer_fetch must be 'auto', 'always' or 'never', got {peer_fetch!r}")
            self._peer_mode = peer_fetch
            self.cache.peer_read = None if peer_fetch == "never" else self._peer_read

    def report(self) -> dict:
        """This node's residency snapshot for placement (it also pushes them on every change),
        numbered (``seq``) in the order snapshots are taken."""
        return self._reports.stamp(self._snapshot)

    def _snapshot(self) -> dict:
        report = {**self.cache.report(), "slots": self._slots, "gpus": self._gpus}
        if self._gpu_holders:  # apart from the host side: only GPU tasks can use these copies
            report["gpu"] = node_gpu_residency(self._gpu_holders)
        return report

    # -- placement -----------------------------------------------------------------------------

    def _report_forever(self) -> None:
        """Pushes a snapshot to placement soon after every change, and at least every few
        seconds (so that a restarted placement actor, or a lost report, is caught up)."""
        while not self._stop.is_set():
            self._changed.wait(timeout=self.config.report_s)
            self._changed.clear()
            self._stop.wait(0.02)  # coalesce a burst of changes into one report
            self._send_report(unless_unchanged_for=5 * self.config.report_s)
            export_node_cache(self.node_id, self.cache)  # Ray metrics; never raises

    def _send_report(self, unless_unchanged_for: float = 0.0) -> None:
        with self._report_lock:
            report = self.report()
            now = time.monotonic()
            last, last_sent = self._last_report
            unchanged = last is not None and {**report, "seq": last["seq"]} == last  # its number aside
            if unchanged and now - last_sent < unless_unchanged_for:
                return
            try:
                get(placement_actor().report.remote(self.node_id, report), timeout=10)
                self._last_report = (report, now)
            except Exception as exc:  # placement restarting or not created yet: retry later
                log.debug("trims_ray: report to placement failed: %s", exc)
                forget_placement_actor()

    def _peer_read(self, manifest: Manifest, out: np.ndarray) -> bool:
        """Copies the blob from a peer that holds it in memory, when that is expected to be
        faster than the store; verifies every chunk. False when no peer can serve it."""
        rates = {**ASSUMED_LOAD_RATES, **self.cache.rates}
        if self._peer_mode == "auto" and rates[PEER] <= rates[STORE]:
            return False
        try:
            # Per tenant, like every key: another tenant's copy of the same bytes is not lent.
            holders = get(placement_actor().holders.remote(cache_key(manifest)), timeout=5)
        except Exception as exc:
            log.debug("trims_ray: no peer list from placement: %s", exc)
            forget_placement_actor()
            return False
        peers = [n for n, tier in holders.items() if tier in ("host", "gpu") and n != self.node_id]
        for peer in peers:
            try:
                lender = node_cache_actor(peer)
            except Exception as exc:
                log.debug("trims_ray: no cache actor on peer %s: %s", peer, exc)
                continue
            # Our own id for the lease: if the lend call times out here, it may still be granted
            # there, and this release (which the lender remembers until the grant) ends it then.
            lease_id = f"{uuid.uuid4().hex}:lend"
            try:
                grant = get(lender.lend.remote(cache_key(manifest), lease_id), timeout=LEND_CALL_TIMEOUT_S)
            except Exception as exc:
                log.debug("trims_ray: peer %s cannot lend %s: %s", peer, manifest.sha256, exc)
                with contextlib.suppress(Exception):  # a dead lender holds no lease
                    lender.release.remote(lease_id)
                continue
            if grant is None:
                continue
            try:
                copy_lent(lender, peer, grant.lease_id, manifest, out)
                return True
            except Exception as exc:
                if isinstance(exc, (ray.exceptions.RayError, TimeoutError)):
                    log.warning("trims_ray: peer fetch from %s failed: %s", peer, exc)
                    continue
                raise  # a bad chunk (IntegrityError): the loader reads the store instead
            finally:
                lender.release.remote(grant.lease_id)
        return False
