"""The driver's side of trims_ray on a Ray cluster: ``init``, ``shutdown``, ``stats``,
``prefetch`` and ``evict``; the actors' lookups (``node_cache_actor``, ``placement_actor``) are
``actors._naming``'s, re-exported.

``init`` connects to Ray if needed and creates the placement actor and one node cache actor per
alive node (or finds the ones another driver created: they are detached and named, so every job
on the cluster shares them); from then on placement gives nodes that join a cache of their own.
Everything else talks to those actors by name, as the caller's tenant (``_api.acting_tenant``).
The read-only views at the end (``is_running``, ``running_store``, ``cache_nodes``,
``residency``, with ``stats_of``) look the actors up and start none: the CLI's ``ls`` and
``status`` use them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import ray

from . import _api, _routing
from ._config import CacheConfig, check_budget
from ._errors import TrimsError
from ._fsio import translate_store_errors
from ._gc import quick_frees
from ._names import check_name, check_tenant
from ._raycalls import call, get  # re-exported: callers of the driver's side use them too
from ._protocol import TenantStats, TierStats
from ._store import ModelStore
from .actors._naming import (
    PLACEMENT_ACTOR_NAME,
    forget_all_actors,
    forget_node_cache_actor,
    kill_actor,
    node_cache_actor,
    our_actor_names,
    placement_actor,
    remember_node_cache_actors,
    require_running,
)
from .actors._budgets import TIERS, claim_turn, drop_overridden, forget_budgets, quota_subject, record_budget, unrecord
from .actors._node_info import alive_nodes, check_host_budget
from .actors.node_cache_actor import start_node_cache_actor
from .actors.placement_actor import start_placement_actor

__all__ = [
    "Cluster",
    "ClusterStats",
    "NodeStats",
    "init",
    "shutdown",
    "stats",
    "stats_of",
    "is_running",
    "running_store",
    "cache_nodes",
    "residency",
    "prefetch",
    "evict",
    "scrub",
    "set_budget",
    "set_quota",
    "node_cache_actor",
    "placement_actor",
    "forget_node_cache_actor",
    "get",
    "call",
]

log = logging.getLogger("trims_ray")


@dataclass(frozen=True)
class Cluster:
    """What ``init`` returns: the store, the caller's tenant and the nodes with a cache."""

    store: str
    tenant: str
    nodes: tuple[str, ...]


@dataclass
class NodeStats:
    """One node: its tiers, the leases held now (and the pins of processes that keep models
    built), its whole object store's bytes in use, and its
    GPU tier's state: {"enabled": bool, "reason": why it is off, "gpus": {Ray's GPU id: that
    GPU's stats}} (tiers["gpu"] sums the GPUs). ``tenants`` holds the caller's own tenant only:
    its bytes and quotas in the host and disk tiers, and the refusals it met on this node
    (``not_found``, ``denied``, ``quota_denials``); other tenants are in the tier totals, never
    by name."""

    tiers: dict[str, TierStats]
    leases: int = 0
    object_store_bytes_used: int = 0
    gpu: dict = field(default_factory=dict)
    tenants: dict[str, TenantStats] = field(default_factory=dict)
    # Models worker processes keep built between tasks (their pins on the node's host copies,
    # counted in tiers["host"] once, apart from ``leases``).
    pinned: int = 0


@dataclass
class ClusterStats:
    nodes: dict[str, NodeStats] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The same as plain, JSON-able data."""
        return {"nodes": {node: asdict(s) for node, s in self.nodes.items()}}


def init(
    store: str | None = None,
    *,
    address: str | None = None,
    tenant: str | None = None,
    config: CacheConfig | None = None,
    storage_options: dict | None = None,
) -> Cluster:
    """Connects to Ray and makes sure every alive node has a node cache actor.

    Args:
        store: the model store URI; default ``$TRIMS_RAY_STORE`` or ``~/.cache/trims_ray/store``.
        address: passed to ``ray.init`` when Ray is not initialized yet (None: Ray's usual
            resolution, which starts a local cluster when there is none).
        tenant: the tenant this process acts as (default ``$TRIMS_RAY_TENANT`` or "default").
        config: tier budgets and policy for node caches this call creates (existing ones keep
            theirs); default ``CacheConfig.from_env()``.
        storage_options: fsspec options for the store (S3 endpoint, credentials).

    Raises:
        ValueError / TypeError: a bad store URI, tenant or config.
        StoreUnavailableError: the store cannot be reached.
        TrimsError: trims_ray already runs on this cluster with another store.
    """
    if tenant is not None:
        check_tenant(tenant)
    model_store = ModelStore(store, storage_options=storage_options) if store is not None else _api.current_store()
    with translate_store_errors(model_store.fs, model_store.uri):  # botocore's errors -> ours
        model_store._check_reachable()
    config = config if config is not None else CacheConfig.from_env()
    if not ray.is_initialized():
        env = {"TRIMS_RAY_STORE": model_store.uri}
        if tenant is not None:
            env["TRIMS_RAY_TENANT"] = tenant
        with quick_frees():  # a Ray this call starts frees evicted copies every 100 ms (``_gc``)
            ray.init(address=address, runtime_env={"env_vars": env})
    if not our_actor_names():
        forget_budgets()  # of an earlier start that ended without shutdown(): this config holds
    if not is_running():
        # Nothing runs yet: start every alive node's cache now, beside placement, whose start
        # would otherwise start them only once its own process is up (two actor starts, each a
        # new process importing torch, one after the other). Placement finds them by name.
        for node in alive_nodes():
            start_node_cache_actor(node, model_store.uri, storage_options, config)
    placement = start_placement_actor(model_store.uri, storage_options, config)
    running_uri, _ = call(placement.store_spec.remote())
    if running_uri != model_store.uri:
        raise TrimsError(
            f"trims_ray already runs on this cluster with store {running_uri}, not {model_store.uri}: "
            f"call trims_ray.init(store={running_uri!r}), or trims_ray.shutdown() first to restart "
            "it with another store (its caches are emptied)"
        )
    _api.set_session(model_store, tenant)
    # The job's workers act as this tenant too, even when Ray was initialized before us and the
    # job's runtime_env does not carry it (else they would act as "default").
    _api.publish_job_tenant(tenant)
    handles = {
        node: start_node_cache_actor(node, model_store.uri, storage_options, config)
        for node in ray.get(placement.sync.remote())
    }
    ray.get([h.ping.remote() for h in handles.values()])
    remember_node_cache_actors(handles)
    # Routing needs every cache's first report: wait for them (they come within report_s).
    deadline = time.monotonic() + 30
    while set(ray.get(placement.members.remote())) < set(handles) and time.monotonic() < deadline:
        time.sleep(0.02)
    return Cluster(model_store.uri, _api.caller_tenant(), tuple(sorted(handles)))


def shutdown() -> None:
    """Kills this library's actors (their cached objects go with them) and forgets what this
    process kept of them: actor handles, the router, the session and the stores. Ray keeps running."""
    forget_all_actors()
    _routing.reset()
    _api.set_session(None, None)
    if not ray.is_initialized():
        return
    _api.publish_job_tenant(None)
    forget_budgets()  # the next init starts with the config it is given
    # Placement first: it gives caches to nodes without one, and must not replace those killed.
    for name in sorted(our_actor_names(), key=lambda n: n != PLACEMENT_ACTOR_NAME):
        kill_actor(name)  # False: already gone
    # ray.kill is asynchronous: wait until the names are free, or a following init() would
    # get the dying actors back from get_if_exists.
    deadline = time.monotonic() + 30
    while our_actor_names() and time.monotonic() < deadline:
        time.sleep(0.05)


def _nodes(nodes: list[str] | None) -> list[str]:
    if not ray.is_initialized():
        raise TrimsError("Ray is not initialized: call trims_ray.init() first")
    if nodes is None:
        # The alive nodes (placement gives a cache to any that lacks one); a dead node's cache
        # is not asked, and so not reported.
        return call(placement_actor().sync.remote())
    if isinstance(nodes, str) or not all(isinstance(n, str) for n in nodes):
        raise TypeError("nodes must be a list of node ids (hex strings) or None")
    return list(nodes)


def _on_each_node(nodes: list[str] | None, method: str, *args) -> dict[str, object]:
    """Calls ``method`` on the cache actor of every node in ``nodes`` (default: all) at once."""
    refs = {n: getattr(node_cache_actor(n), method).remote(*args) for n in _nodes(nodes)}
    return {n: call(ref) for n, ref in refs.items()}


def prefetch(
    name: str, tier: str = "host", nodes: list[str] | None = None, *, tenant: str | None = None
) -> dict[str, str]:
    """Warms ``tier`` ("gpu", "host" or "disk") with a model on ``nodes`` (default: every node).
    "gpu" swaps it onto the node's GPU with the most room (through its host tier).

    ``tenant``: None for the caller's own (the name resolves there, then in "public"), or
    "public". Returns, per node, where the model was found: "gpu", "host", "disk" or "store".

    Raises:
        ModelNotFoundError, CapacityError, IntegrityError, ValueError: as for an invocation.
        TrimsError: tier="gpu" on a node whose GPU tier is off (the message says why).
        AccessDeniedError: ``tenant`` names another tenant.
    """
    check_name(name)
    tenant = _api.acting_tenant(tenant, "prefetch models")
    result = _on_each_node(nodes, "prefetch", name, tenant, tier)
    _routing.refresh()
    return result


def evict(
    name: str, tier: str | None = None, nodes: list[str] | None = None, *, tenant: str | None = None
) -> dict[str, dict[str, str]]:
    """Evicts a model from ``tier`` (default: all tiers) on ``nodes`` (default: every node).

    A copy in use is evicted when its last lease ends. ``tenant`` as for ``prefetch``. Returns,
    per node and tier, "evicted", "deferred" or "absent".

    Raises:
        ModelNotFoundError: no such model for the caller's tenant.
        AccessDeniedError: ``tenant`` names another tenant.
    """
    check_name(name)
    tenant = _api.acting_tenant(tenant, "evict models")
    result = _on_each_node(nodes, "evict", name, tenant, tier)
    _routing.refresh()
    return result


def scrub(nodes: list[str] | None = None) -> dict[str, dict[str, int]]:
    """Re-hashes the host-tier copies on ``nodes`` (default: every node) against their manifests
    now, as ``CacheConfig.scrub_s`` does periodically; a corrupt copy is dropped (when its last
    lease ends, if leased; no new lease gets it) and reloaded from the disk tier or the store.

    Returns, per node, {"scrubbed": copies hashed, "corrupt": copies dropped, "reloaded": ...}.
    """
    return _on_each_node(nodes, "scrub")


def set_budget(tier: str, nbytes: int, nodes: list[str] | None = None) -> dict[str, dict[str, int]]:
    """Changes the byte budget of ``tier`` ("host", "disk", or "gpu": per GPU) on ``nodes``
    (default: every node), now and for caches that start there later.

    A higher budget only lets more in. A lower one evicts idle models in the policy's eviction
    order until the tier fits (models that worker processes keep built are asked back); what
    is leased stays until released, and the tier frees it then. Each tenant's share
    (``CacheConfig.tenant_share``) follows the budget. With ``nodes`` None the budget also
    holds for caches that start later: on nodes that join, and caches Ray restarts; with a
    list, for those nodes' caches. ``shutdown()`` forgets it: the next ``init`` starts with
    its config.

    Returns, per node: {"budget", "bytes_used" (after the evictions), "evicted" (models this
    call evicted), "over_budget" (bytes held beyond the budget by leases, or for the disk
    tier by copies queued before the change; 0 when the tier fits)};
    for "gpu", summed over the node's GPUs, and "gpus": how many (0 where the tier is off).

    A node that joins with an object store (or a GPU) too small for a budget set for the
    cluster keeps its own, and its cache logs why. Concurrent calls for one tier are ordered:
    the one that began last (it claims the later turn) holds on every node both asked, and in
    the record, whatever order their calls reach the nodes in. An earlier call's result then
    shows, for a node the later one reached first, the budget the later one set there.

    Raises:
        ValueError: an unknown tier, a budget that is not a non-negative int, a host budget
            above the object store of a node asked, or a GPU budget above the memory of one
            of their GPUs (nothing changes anywhere). A node that joins during the call and
            cannot hold the budget is left out of the result, and keeps its own; one whose
            cache cannot be reached then is left out too (logged), and its cache takes the
            record when it starts.
        ray.exceptions.RayActorError: a node's cache died during the call (or any error that
            ends the call midway, as an interrupt): the nodes it reached keep the budget, and
            a call that began earlier changes nothing there; its record is taken back, so
            that the one before holds for caches that start later. Call it again.
        TrimsError: Ray is not initialized, or trims_ray is not running.
    """
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
    check_budget(nbytes, f"the {tier} budget")
    asked = _nodes(nodes)
    _check_host_budget(tier, nbytes, asked)
    if tier == "gpu":  # each node checks its GPUs' memory: a budget one refuses changes none
        _on_each_node(asked, "check_budget_fits", tier, nbytes)
    return _recorded_change(tier, nbytes, nodes, asked, "set_budget", (tier, nbytes))


def set_quota(
    tenant: str, tier: str, nbytes: int | None, nodes: list[str] | None = None
) -> dict[str, dict[str, int | None]]:
    """Sets ``tenant``'s byte quota in ``tier`` ("host" or "disk") on ``nodes`` (default: every
    node), now and for caches that start there later: what ``CacheConfig.tenant_quotas`` gives
    at start. ``nbytes`` None drops the tenant's explicit quota, so that its share of the
    budget (``CacheConfig.tenant_share``) holds again.

    A higher quota only lets more of the tenant's models in. A lower one evicts the tenant's
    idle models in the policy's eviction order until it fits (models that worker processes
    keep built are asked back); its models in use stay until released, and go then. Other
    tenants' models never go for it. Calls are recorded and ordered as ``set_budget``'s are,
    and ``shutdown()`` forgets them. Quotas are the cluster's, as budgets are: any caller may
    change any tenant's.

    Returns, per node: {"quota" (the bytes the tenant may hold there now; None: only the budget
    limits it), "bytes_used" (the tenant's, after the evictions), "evicted", "over_quota"
    (bytes held beyond the quota: by leases, copies on their way out, loads or disk copies
    being written; 0 when it fits)}. A disk copy being written goes when it lands, if the quota
    cannot take it then.

    Raises:
        ValueError: a tier other than "host" or "disk", a quota that is neither None nor a
            non-negative int, or an invalid tenant id (nothing changes anywhere).
        TypeError: a tenant id that is not a str.
        ray.exceptions.RayActorError: a node's cache died during the call, as for ``set_budget``.
        TrimsError: Ray is not initialized, or trims_ray is not running.
    """
    check_tenant(tenant)
    if tier not in ("host", "disk"):
        raise ValueError(f"tier must be 'host' or 'disk' (the GPU tier has no per-tenant quota), got {tier!r}")
    if nbytes is not None:
        check_budget(nbytes, f"the {tier} quota of tenant {tenant!r}")
    asked = _nodes(nodes)
    return _recorded_change(quota_subject(tenant, tier), nbytes, nodes, asked, "set_quota", (tenant, tier, nbytes))


def _recorded_change(
    subject: str, nbytes: int | None, nodes: list[str] | None, asked: list[str], method: str, args: tuple
) -> dict[str, dict]:
    """Records ``subject``'s new bytes (a tier's budget or a tenant's quota, see ``_budgets``)
    under a turn of its own, then calls ``method(*args, turn)`` on the cache of every node in
    ``asked`` (and, with ``nodes`` None, of every node that joined meanwhile)."""
    turn = claim_turn()
    only = None if nodes is None else asked  # None: recorded for every node, now and later
    # Recorded first: a cache that starts (or restarts) while the running ones are changed
    # reads the new value; the nodes that joined before the record get it below.
    recorded = record_budget(subject, nbytes, only, turn)
    try:
        result = _on_each_node(asked, method, *args, turn)
    except BaseException:
        unrecord(recorded)
        raise
    drop_overridden(subject, only, turn)
    if nodes is None:
        # Nodes that joined during the call may have started with the old record. One that
        # cannot hold a budget keeps its own, as a cache that starts there later does.
        for node in (n for n in _nodes(None) if n not in result):
            try:
                if method == "set_budget":
                    _check_host_budget(subject, nbytes, [node])
                result[node] = call(getattr(node_cache_actor(node), method).remote(*args, turn))
            except ValueError as exc:
                log.warning("trims_ray: node %s joined during %s and keeps its own %s: %s", node, method, subject, exc)
            except Exception as exc:  # its cache is not up yet, or died: it reads the record when it starts
                log.warning("trims_ray: node %s joined during %s and could not be told of %s: %s", node, method, subject, exc)
    _routing.refresh()
    return result


def _check_host_budget(tier: str, nbytes: int, nodes: list[str]) -> None:
    """Raises ValueError when a host budget of ``nbytes`` cannot fit one of ``nodes``."""
    if tier == "host" and nodes:
        for node in ray.nodes():
            if node["NodeID"] in nodes:
                check_host_budget(node, nbytes)


def stats() -> ClusterStats:
    """Per node and tier: bytes used and capacity, models, hits, misses, loads, evictions; per
    node, the caller's own tenant's use, quotas and refusals (``NodeStats.tenants``)."""
    return stats_of(None)


def stats_of(nodes: list[str] | None) -> ClusterStats:
    """``stats()`` of ``nodes`` only (None: every alive node, after placement has checked
    membership, which gives a node without a cache one). ``stats_of(cache_nodes())`` starts
    nothing: what read-only commands call."""
    out = ClusterStats()
    for n, raw in _on_each_node(nodes, "stats", _api.caller_tenant()).items():
        out.nodes[n] = NodeStats(
            {t: TierStats(**s) for t, s in raw["tiers"].items()},
            raw["leases"],
            raw["object_store_bytes_used"],
            raw["gpu"],
            {t: TenantStats(**s) for t, s in raw.get("tenants", {}).items()},
            raw.get("pinned", 0),
        )
    return out


# -- read-only views (the CLI's ls and status): they look actors up, never start one ----------


def is_running() -> bool:
    """Whether trims_ray runs on the cluster Ray is connected to (its placement actor exists).
    Asks Ray, not this process's handle cache; starts nothing.

    Raises:
        TrimsError: Ray is not initialized.
    """
    try:
        require_running()
    except TrimsError:
        if not ray.is_initialized():
            raise
        return False
    return True


def running_store() -> tuple[str, dict | None]:
    """The store trims_ray runs with on this cluster: (URI, storage options), as placement was
    started with it.

    Raises:
        TrimsError: Ray is not initialized, or trims_ray is not running.
    """
    return call(placement_actor().store_spec.remote())


def cache_nodes() -> list[str]:
    """The nodes whose caches have reported to placement, sorted (a node that joined a moment
    ago may not be there yet; ``stats()`` waits for it by starting its cache).

    Raises:
        TrimsError: Ray is not initialized, or trims_ray is not running.
    """
    return call(placement_actor().members.remote())


def residency(keys: Iterable[str]) -> dict[str, dict[str, tuple[str, ...]]]:
    """Where the blobs ``keys`` (``cache_key``s: ``<tenant>/<sha256>``) are, from placement's
    table: key -> {node: tiers there, best first}; keys resident nowhere are left out.

    Per node, the tiers are "gpu" when one of its GPUs holds the blob, and the best host-side
    tier: "host", "loading" (its host load is under way) or "disk". A blob in both the host and
    the disk tier shows as "host": placement is told the best tier only.

    The caller names its own keys: placement's table holds every tenant's blobs, and only the
    ones asked for are read from it.

    Raises:
        TrimsError: Ray is not initialized, or trims_ray is not running.
    """
    snapshot = call(placement_actor().snapshot.remote())
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for key in dict.fromkeys(keys):
        per_node: dict[str, list[str]] = {}
        for node in snapshot.gpu.get(key, ()):
            per_node.setdefault(node, []).append("gpu")
        for node, tier in snapshot.where.get(key, {}).items():
            per_node.setdefault(node, []).append(tier)
        if per_node:
            out[key] = {node: tuple(tiers) for node, tiers in sorted(per_node.items())}
    return out
