"""The caller's side of placement: a local copy of the cluster's routing table, kept fresh by a
long poll to the placement actor, so that choosing a node for an invocation costs no round trip.

Every process that submits ``@trims_ray.function`` tasks has one ``Router``. It resolves model
names through the store (manifests cached for a few seconds), ranks nodes with the same
``Placement`` logic the actor runs, and counts its own invocations in flight per node (they are
in the table's figures only after the nodes' next reports), so that a burst from one caller
spreads over copies at once.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable

import ray

from . import _api, _metrics
from ._errors import ModelNotFoundError, TrimsError
from ._manifest import Manifest
from ._manifest_cache import ManifestCache
from ._protect import GUARD_BYTES
from ._protocol import cache_key
from ._raycalls import call
from .actors._naming import placement_actor
from .cache.placement import Placement, Route, Snapshot

__all__ = ["Router", "router", "refresh", "reset"]

log = logging.getLogger("trims_ray")

# A long poll returns at least this often, with fresh load figures, even when residency is
# unchanged.
_POLL_S = 2.0
# How long a long poll's answer may take beyond the poll itself.
_ANSWER_S = 30.0
# How long ``close`` waits for the router's threads to end.
_JOIN_S = 5.0
# How long a load this caller started stays "loading" in its table while the node's reports do
# not show it yet (a report sent before the load began, or a load that failed).
_LOADING_GRACE_S = 10.0

_lock = threading.Lock()
_router: Router | None = None


def router() -> Router:
    """This process's router (created, with its first table fetched, on first use).

    Raises:
        TrimsError: trims_ray is not initialized on this cluster (no placement actor).
    """
    global _router
    with _lock:
        if _router is None:
            _router = Router()
        return _router


def refresh() -> None:
    """Brings this process's table up to date now, if it has one (after prefetch or evict, so
    that the caller's next invocation sees what it just did)."""
    with _lock:
        current = _router
    if current is not None:
        current.refresh()


def reset() -> None:
    """Drops this process's router (after ``trims_ray.shutdown``, and at exit); its threads
    have ended when this returns (``Router.close``)."""
    global _router
    with _lock:
        if _router is not None:
            _router.close()
        _router = None


# Registered after Ray's own exit handler (``import ray`` above registers it), so it runs before
# it: this process's threads are out of Ray's calls before ray.shutdown tears the core worker down.
atexit.register(reset)


class Router:
    """Routes invocations on a cached, versioned copy of the placement table."""

    def __init__(self) -> None:
        self._actor = placement_actor()  # raises TrimsError where trims_ray is not running
        self._lock = threading.Lock()
        # Who this process is to the node caches: it holds the leases of the tasks it submits
        # until their results exist, and stays alive to them by polling placement.
        self.id = uuid.uuid4().hex
        self._lease_ids = itertools.count(1)
        self._releases: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        # Our invocations in flight: (model key, node) -> count; kept across
        # table refreshes, since the nodes report them only later.
        self._mine: dict[tuple[str, str], int] = {}
        self._outstanding: dict[int, ray.ObjectRef] = {}
        # Loads this caller started: (model key, node) -> (when, bytes); kept across table
        # refreshes until the node reports the model, so that the next invocation joins the
        # load and the next load elsewhere does not count on the room this one takes.
        self._loads_started: dict[tuple[str, str], tuple[float, int]] = {}
        self._closed = threading.Event()
        # Set when the pending long poll's answer is in, or by ``close``: what the poll thread
        # waits on, so that it need not sit in a Ray call when the router closes.
        self._poll_woken = threading.Event()
        # Names resolve in the cluster's store, the one the node caches load from (this process
        # may not know it: a worker whose Ray was started before trims_ray.init).
        spec, withheld, ttl_s, per_model = ray.get(
            [
                self._actor.store_spec.remote(),
                self._actor.credentials_withheld.remote(),
                self._actor.manifest_ttl_s.remote(),
                self._actor.metrics_per_model.remote(),
            ]
        )
        _metrics.set_per_model(per_model)  # before this process records its first route
        # Names resolved in the store, trusted as long as the node caches trust them; those in
        # use are refreshed in the background.
        self._manifests = ManifestCache(self._resolver(spec, withheld), ttl_s)
        self._placement = self._adopt(ray.get(self._actor.snapshot.remote(-1, 0.0)))
        self._threads = [
            threading.Thread(target=self._poll_forever, name="trims-routing", daemon=True),
            threading.Thread(target=self._release_forever, name="trims-release", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self._threads.append(self._manifests.start_refreshing(self._closed))

    def _resolver(self, spec: tuple[str, dict | None], withheld: bool) -> Callable[[str, str], Manifest]:
        """How this process resolves a name: in the store itself, unless the cluster's store
        options hold credentials (placement does not hand them out) and this process did not
        open that store itself (the driver that called init did); then through placement."""
        own = _api.session_store()
        if own is not None and own.uri == spec[0]:
            store = own
        elif not withheld:
            store = _api.store_for(*spec)
        else:
            return lambda name, tenant: call(self._actor.manifest.remote(name, tenant))
        return lambda name, tenant: store.manifest(name, tenant=tenant)

    @property
    def version(self) -> int:
        return self._placement.version

    def _adopt(self, snapshot: Snapshot) -> Placement:
        placement = Placement.from_snapshot(snapshot, previous=getattr(self, "_placement", None))
        per_node: dict[str, int] = {}
        for (_key, node), count in self._mine.items():
            per_node[node] = per_node.get(node, 0) + count
        for node, count in per_node.items():
            placement.at_least_in_flight(node, count)
        # A snapshot may predate a load this caller just started (the node had not reported
        # it yet): without the mark, the next invocation would start another load.
        now = time.monotonic()
        for (key, node), (since, nbytes) in list(self._loads_started.items()):
            if node in snapshot.where.get(key, {}) or now - since > _LOADING_GRACE_S:
                del self._loads_started[(key, node)]
            else:
                placement.loading(key, node, nbytes)
        return placement

    def _poll_forever(self) -> None:
        backoff = 0.1
        while not self._closed.is_set():
            try:
                version = self._placement.version
                snapshot = self._long_poll(version)
                if snapshot is None:  # closed while the poll was pending: its answer is dropped
                    return
                backoff = 0.1
            except BaseException as exc:  # ray.shutdown() ends a blocked get with SystemExit
                if not ray.is_initialized() or self._closed.is_set() or not isinstance(exc, Exception):
                    return
                # The placement actor is restarting: keep routing on the table we have.
                log.debug("trims_ray: routing table refresh failed: %s", exc)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            with self._lock:
                self._placement = self._adopt(snapshot)

    def _long_poll(self, version: int) -> Snapshot | None:
        """The placement actor's next table after ``version`` (within ``_POLL_S``); None if the
        router closed first. The thread waits on an event, not in ``ray.get``: a thread blocked
        in a Ray call while ray.shutdown frees the core worker can crash the process (ray#31145)."""
        woken = self._poll_woken = threading.Event()  # one per poll: a late answer wakes no other
        if self._closed.is_set():  # ``close`` sets _closed before it wakes the current poll
            return None
        ref = self._actor.snapshot.options(max_task_retries=0).remote(version, _POLL_S, self.id)
        ref._on_ready(lambda _exc: woken.set())
        # Not forever: after a ray.shutdown that skipped trims_ray.shutdown no answer comes, and
        # the caller's error path sees that Ray is down and ends the thread.
        if not woken.wait(_POLL_S + _ANSWER_S):
            raise TimeoutError(f"placement did not answer a long poll within {_POLL_S + _ANSWER_S:g} s")
        if self._closed.is_set():
            return None
        return ray.get(ref)  # ready: this does not wait

    def refresh(self) -> None:
        snapshot = ray.get(self._actor.snapshot.remote(-1, 0.0))
        with self._lock:
            if snapshot.version >= self._placement.version:
                self._placement = self._adopt(snapshot)

    def wait_for_version(self, version: int, timeout: float = 10.0) -> bool:
        """Waits until the cached table is at ``version`` or later (for tests)."""
        deadline = time.monotonic() + timeout
        while self._placement.version < version:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        """Stops the router's threads and waits (up to ``_JOIN_S``) for them to end; releases
        queued before are sent first."""
        self._closed.set()
        self._releases.put(None)
        self._poll_woken.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(_JOIN_S)

    def new_lease_id(self) -> str:
        """A lease id unique in the cluster, chosen here so that the lease can be ended without
        waiting for the acquire that grants it."""
        return f"{self.id}:{next(self._lease_ids)}"

    def _release_forever(self) -> None:
        # Releases are sent from this thread, not from Ray's completion callback, which must
        # not block or call back into Ray.
        while True:
            release = self._releases.get()
            if release is None:
                return
            try:
                release()
            except Exception as exc:  # the node or its cache is gone: so is the lease
                log.debug("trims_ray: lease release failed: %s", exc)

    # -- routing -------------------------------------------------------------------------------

    def manifest(self, name: str, tenant: str) -> Manifest:
        """The manifest ``name`` resolves to for ``tenant`` (trusted the cluster's manifest_ttl_s).

        Raises:
            ModelNotFoundError, ModelFormatError, StoreUnavailableError: as ModelStore.manifest.
        """
        try:
            return self._manifests.get(name, tenant)
        except ModelNotFoundError:
            _api.note_refusal("not_found", tenant)  # before any task: no node cache sees it
            raise

    def route(
        self, name: str, tenant: str, *, gpu: bool = False, cpus: float = 1.0, gpus: float = 0.0
    ) -> tuple[Manifest, Route]:
        """Where an invocation of ``name`` should run; ``gpu``: whether it asks for a GPU (only
        then does a copy on a node's GPU count); ``cpus``, ``gpus``: what it asks Ray for, which
        sets how many such invocations a node runs at once.

        Raises:
            ModelNotFoundError: no such model for ``tenant``.
            CapacityError: no node's host tier can hold it.
            TrimsError: no node cache has reported yet.
        """
        manifest = self.manifest(name, tenant)
        key = cache_key(manifest)
        nbytes = manifest.nbytes + 2 * GUARD_BYTES
        with self._lock:
            try:
                route = self._placement.route(key, nbytes, gpu=gpu, cpus=cpus, gpus=gpus)
            except LookupError:
                raise TrimsError(
                    "no trims_ray node cache has reported to placement yet: retry in a moment, "
                    "or check that trims_ray.init() succeeded"
                ) from None
            if route.tier is None:
                self._placement.loading(key, route.node, nbytes)
                self._loads_started[(key, route.node)] = (time.monotonic(), nbytes)
        _metrics.record_route(route.node, route.tier, tenant, name)
        return manifest, route

    def queued(self, node: str, cpus: float = 1.0, gpus: float = 0.0) -> bool:
        """Whether an invocation asking for ``cpus`` and ``gpus`` sent to ``node`` now would
        wait for one of its slots."""
        with self._lock:
            return self._placement.queued(node, cpus, gpus)

    def track(
        self,
        ref: ray.ObjectRef,
        key: str,
        node: str,
        release: Callable[[], object],
        labels: tuple[str, str] | None = None,
        *,
        demand: tuple[float, float] = (1.0, 0.0),
        service: ray.ObjectRef | None = None,
    ) -> None:
        """Counts an invocation in flight on ``node`` until its result exists, then calls
        ``release`` (which ends its lease) from this router's release thread. ``labels``:
        (tenant, model) to record its latency under, end to end, in Ray's metrics. ``demand``:
        the CPUs and GPUs it asked for. ``service``: the seconds the task measured it occupied
        its slot (a second return of the task), which refine the model's service time; None:
        its end-to-end time does, unless it queued."""
        submitted = time.monotonic()
        with self._lock:
            queued = self._placement.queued(node, *demand)
            self._placement.started(key, node)
            self._mine[(key, node)] = self._mine.get((key, node), 0) + 1
            # Held until done: Ray does not call back for a ref that was dropped.
            self._outstanding[id(ref)] = ref

        def done(_exc: BaseException | None, ref_id: int = id(ref)) -> None:
            seconds = time.monotonic() - submitted
            with self._lock:
                self._outstanding.pop(ref_id, None)
                left = self._mine.get((key, node), 0) - 1
                if left > 0:
                    self._mine[(key, node)] = left
                else:
                    self._mine.pop((key, node), None)
                # Without the task's own measure, only an invocation that did not queue tells
                # the time one occupies a slot.
                self._placement.finished(key, node, None if queued or service is not None else seconds)
            if service is not None:
                self._releases.put(functools.partial(self._note_service, key, service))
            self._releases.put(release)
            if labels is not None:
                _metrics.record_invocation(node, *labels, seconds)

        ref._on_ready(done)

    def _note_service(self, key: str, service: ray.ObjectRef) -> None:
        """Refines ``key``'s service time with what its task measured (on the release thread:
        the value came with the result, so this get does not wait)."""
        try:
            seconds = ray.get(service, timeout=5)
        except Exception:  # the task failed: it measured nothing
            return
        with self._lock:
            self._placement.finished(key, None, float(seconds))

    def in_flight(self) -> int:
        with self._lock:
            return sum(self._mine.values())
