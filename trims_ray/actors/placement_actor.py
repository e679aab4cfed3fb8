"""The placement actor: a thin Ray wrapper around ``Placement``, one per cluster.

Named ``trims_ray:placement`` in namespace "trims_ray", detached, restarted when it dies. It keeps
the cluster's residency table from the node caches' reports, answers callers' long polls for
the table (so that callers route locally and hear of changes at once), watches membership (a
node that joins gets a cache actor; a dead node leaves the table at the next check), and scales
copies of hot models. Everything it knows can be rebuilt from the node caches, which it asks
for their snapshots when it (re)starts.
"""

from __future__ import annotations

import logging
import threading
import time

import ray

from .._config import CacheConfig
from .._errors import ModelNotFoundError
from .._gc import freeze_startup_objects
from .._fsio import has_credentials, without_credentials
from .._malloc import ACTOR_ENV
from .._manifest import Manifest
from .._metrics import record_decision, set_per_model
from .._protocol import cache_key
from .._store import ModelStore
from ._naming import (
    NAMESPACE,
    PLACEMENT_ACTOR_NAME,
    kill_actor,
    node_cache_actor,
    node_cache_actor_name,
    remember_node_cache_actors,
)
from ._node_info import alive_nodes
from .node_cache_actor import start_node_cache_actor
from ..cache.placement import NodeReport, Placement, Snapshot

__all__ = ["PlacementActor", "start_placement_actor"]

log = logging.getLogger("trims_ray")

# Every caller process keeps one long poll open here; beyond that, queries.
_CONCURRENCY = 1000
_LONG_POLL_S = 10.0
# The node caches' reports, the most frequent calls (one soon after every change on a node),
# run on threads of their own: spread over the 1,000 above, each call would touch another
# thread's stack, which the process keeps (soak: the actor's private memory grew past 32 MiB).
# They take the table's lock in turn anyway.
_REPORT_CONCURRENCY = 2


def start_placement_actor(store_uri: str, storage_options: dict | None, config: CacheConfig) -> ray.actor.ActorHandle:
    """Gets or creates the cluster's placement actor (returns at once)."""
    return (
        # Concurrency groups are class options in Ray, not ``.options()``.
        ray.remote(concurrency_groups={"reports": _REPORT_CONCURRENCY})(PlacementActor)
        .options(
            name=PLACEMENT_ACTOR_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=_CONCURRENCY,
            max_restarts=-1,
            max_task_retries=-1,  # its calls are idempotent: retried across a restart
            runtime_env={"env_vars": ACTOR_ENV},  # a long-lived actor: see _malloc
        )
        .remote(store_uri, storage_options, config)
    )


class PlacementActor:
    """Ray actor body around Placement (made remote with ``start_placement_actor``).

    Args:
        store_uri, storage_options, config: what node cache actors it creates are given.
    """

    def __init__(self, store_uri: str, storage_options: dict | None, config: CacheConfig) -> None:
        self._node_args = (store_uri, storage_options, config)
        set_per_model(config.metrics_per_model)  # before this process records anything
        self._interval = config.report_s
        self._caller_timeout_s = config.caller_timeout_s
        self._cond = threading.Condition()
        self.placement = Placement()
        self._names = _SettledNames(store_uri, storage_options, config.manifest_ttl_s)
        # Callers (processes routing invocations) are alive while they poll: id -> last seen,
        # and how many of their polls are open now.
        self._callers_seen: dict[str, float] = {}
        self._callers_polling: dict[str, int] = {}
        self._rebuild()
        # Callers can poll only once this constructor returns: their grace period starts now, not
        # before a rebuild that may itself outlast caller_timeout_s (then every node's reaper
        # would have ended every caller's leases under running tasks).
        self._ready_at = time.monotonic()
        self._stop = threading.Event()
        threading.Thread(target=self._watch_forever, name="trims-placement", daemon=True).start()
        freeze_startup_objects()  # what Ray's node-wide gc.collect would walk for nothing (``_gc``)

    # -- state from the node caches ------------------------------------------------------------

    def _rebuild(self) -> None:
        """Asks every alive node's cache for its snapshot (after a restart, the table is empty),
        creating the caches of nodes that have none."""
        pending = {}
        for node in alive_nodes():
            handle = start_node_cache_actor(node, *self._node_args)
            remember_node_cache_actors({node: handle})
            pending[node] = handle.report.remote()
        for node, ref in pending.items():
            try:
                self.report(node, ray.get(ref, timeout=30))
            except Exception as exc:  # a cache still starting reports by itself when it is up
                log.info("trims_ray: placement could not rebuild node %s yet: %s", node, exc)

    @ray.method(concurrency_group="reports")
    def report(self, node: str, report: dict) -> None:
        """A node cache's snapshot (see ``NodeReport``)."""
        with self._cond:
            self.placement.report(node, NodeReport(**report))
            self._cond.notify_all()

    # -- what callers ask ----------------------------------------------------------------------

    def snapshot(self, after_version: int = -1, timeout_s: float = 0.0, caller: str | None = None) -> Snapshot:
        """The table, once its version is past ``after_version`` or ``timeout_s`` has passed
        (a long poll: callers hear of a change as soon as it happens). ``caller`` names the
        polling process, which counts as alive while it polls."""
        deadline = time.monotonic() + min(max(timeout_s, 0.0), _LONG_POLL_S * 3)
        with self._cond:
            if caller is not None:
                self._callers_polling[caller] = self._callers_polling.get(caller, 0) + 1
            try:
                while self.placement.version <= after_version:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                return self.placement.snapshot()
            finally:
                if caller is not None:
                    self._callers_seen[caller] = time.monotonic()
                    self._callers_polling[caller] -= 1
                    if not self._callers_polling[caller]:
                        del self._callers_polling[caller]

    def callers_alive(self, callers: list[str]) -> list[bool]:
        """Whether each caller polled lately (or polls now). Until a full timeout after this
        placement was ready (a restart), when not every caller has had time to poll again,
        everyone counts as alive."""
        now = time.monotonic()
        with self._cond:
            if now - self._ready_at < self._caller_timeout_s:
                return [True] * len(callers)
            return [
                c in self._callers_polling or now - self._callers_seen.get(c, -1e9) < self._caller_timeout_s
                for c in callers
            ]

    def store_spec(self) -> tuple[str, dict | None]:
        """The cluster's store: (URI, storage options) every node cache reads from, without the
        credentials in those options (``without_credentials``): they never leave trims_ray's
        actors, since any process of the cluster can call this."""
        return self._node_args[0], without_credentials(self._node_args[1])

    def credentials_withheld(self) -> bool:
        """Whether ``store_spec`` left credentials out: a caller whose own environment has none
        resolves names through ``manifest`` instead of reading the store itself."""
        return has_credentials(self._node_args[1])

    def manifest(self, name: str, tenant: str) -> Manifest:
        """What ``name`` means for ``tenant`` in the store now (ModelStore.manifest), for callers
        that cannot read the store themselves.

        Raises:
            ModelNotFoundError, ModelFormatError, StoreUnavailableError: as ModelStore.manifest.
        """
        return self._names.store().manifest(name, tenant=tenant)

    def manifest_ttl_s(self) -> float:
        """How long the cluster trusts a resolved manifest (its CacheConfig's)."""
        return self._node_args[2].manifest_ttl_s

    def metrics_per_model(self) -> bool:
        """Whether metrics carry a ``model`` label (its CacheConfig's ``metrics_per_model``)."""
        return self._node_args[2].metrics_per_model

    def holders(self, key: str) -> dict[str, str]:
        with self._cond:
            return self.placement.holders(key)

    def members(self) -> list[str]:
        """The nodes whose caches have reported, sorted."""
        with self._cond:
            return self.placement.nodes()

    def sync(self) -> list[str]:
        """Checks membership now (creating caches for new nodes); returns the alive nodes."""
        return self._check_membership()

    # -- membership and copies -----------------------------------------------------------------

    def _watch_forever(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._check_membership()
                self._scale_copies()
            except Exception:  # keep watching: one bad round must not end membership checks
                log.exception("trims_ray: placement check failed")

    def _check_membership(self) -> list[str]:
        alive = alive_nodes()
        with self._cond:
            known = set(self.placement.nodes())
        for node in alive - known:
            with self._cond:
                self.placement.node_alive(node)  # Ray lists it: its reports count (again)
            # It reports once it is up; its handle replaces that of a cache that died there.
            remember_node_cache_actors({node: start_node_cache_actor(node, *self._node_args)})
        dead = known - alive
        if dead:
            with self._cond:
                for node in dead:
                    self.placement.node_left(node)
                self._cond.notify_all()
            for node in dead:
                _kill_quietly(node_cache_actor_name(node))
        return sorted(alive)

    def _scale_copies(self) -> None:
        proposed = []
        with self._cond:
            for key in self.placement.keys():
                model = self.placement.model_of(key)
                if model is None:
                    continue
                proposed += [(True, node, key, model) for node in self.placement.copies_wanted(key, model[2])]
                proposed += [(False, node, key, model) for node in self.placement.copies_unwanted(key)]
        # Copies and drops name the blob (its cache key), so a node never loads or evicts
        # another blob than this one, whatever the name means by then ("stale": nothing done).
        # A copy is asked for only once the name has meant this blob for manifest_ttl_s (a name
        # re-registered to another blob gets no copy of the old one: its demand drains, since
        # callers route by the new one). A drop is exact by key, so it needs no such wait.
        for copy, node, key, (tenant, name, _) in proposed:
            if copy:
                if self._names.meaning(tenant, name, key) is _SAME:
                    with self._cond:
                        self.placement.copy_made(key, node)
                    log.info("trims_ray: %s/%s is hot: loading a copy on node %s", tenant, name, node)
                    node_cache_actor(node).prefetch.remote(name, tenant, "host", key)
                    record_decision(node, "copy", "host", tenant, name)
                continue
            with self._cond:
                self.placement.copy_dropped(key, node)
            log.info("trims_ray: demand for %s/%s fell: dropping its copy on node %s", tenant, name, node)
            node_cache_actor(node).evict.remote(name, tenant, "host", key)
            record_decision(node, "drop", "host", tenant, name)


_SAME, _OTHER, _LATER = "same", "other", "later"


class _SettledNames:
    """What each model name means in the store now, and since when this placement has seen it
    mean that: copy scaling asks nodes by name, and a node trusts its own resolution of a name
    for ``manifest_ttl_s``. So a name is acted on only once it has meant the same blob for that
    long: by then every node resolves it to that blob too (unless it is re-registered in the
    moment between this check and the node's own resolution)."""

    def __init__(self, store_uri: str, storage_options: dict | None, ttl_s: float) -> None:
        self._spec = (store_uri, storage_options)
        self._store: ModelStore | None = None
        self._ttl_s = ttl_s
        self._seen: dict[tuple[str, str], tuple[str, float]] = {}  # -> (key, first seen)

    def store(self) -> ModelStore:
        if self._store is None:
            self._store = ModelStore(self._spec[0], storage_options=self._spec[1])
        return self._store

    def meaning(self, tenant: str, name: str, key: str) -> str:
        """_SAME: ``name`` means ``key`` and has for ``ttl_s``; _LATER: not for long enough yet
        (or the store cannot say now); _OTHER: it means another blob, or nothing."""
        try:
            now_key = cache_key(self.store().manifest(name, tenant=tenant))
        except ModelNotFoundError:
            self._seen.pop((tenant, name), None)
            return _OTHER
        except Exception as exc:  # the store is unreachable, say: ask again next round
            log.debug("trims_ray: placement could not resolve %s/%s: %s", tenant, name, exc)
            return _LATER
        now = time.monotonic()
        seen_key, since = self._seen.get((tenant, name), (None, now))
        if seen_key != now_key:
            self._seen[(tenant, name)] = (now_key, now)
            since = now
        if now_key != key:
            return _OTHER
        return _SAME if now - since >= self._ttl_s else _LATER


def _kill_quietly(name: str) -> None:
    """Frees a dead node's actor name (its actor can never run again: it is pinned there)."""
    try:
        kill_actor(name)
    except Exception as exc:  # Ray's own errors: the name stays taken until Ray frees it
        log.debug("trims_ray: could not kill %s: %s", name, exc)
