"""Soak: trims_ray serving a seeded multi-tenant trace on a three-node local Ray for minutes,
through a node removed and re-added and a node cache actor killed, with every result checked and
memory measured before and after (issue 8, item 5).

    python -m workloads.soak [--minutes 10] [--seed 0] [--rate 4] [--store s3|file]

Three tenants share the cluster. "alpha" is this driver's own tenant (``trims_ray.init(tenant=)``)
and invokes ``@trims_ray.function`` (routed, leased at submit time); "beta" and "gamma" each run a
server actor per node (as Ray Serve replicas would) that leases with ``trims_ray.open`` and acts
as its tenant through TRIMS_RAY_TENANT in the actor's runtime_env. (Long-lived actors, not a task
per request: a task per request with its own runtime_env makes Ray start a fresh worker for most
of them, since each runtime_env needs workers of its own.) Each tenant has private models and all
share public ones: synthetic MLPs of a few MiB, registered in a moto S3 server on loopback by
default. Requests arrive as a seeded Poisson process, each naming a model by its tenant's seeded
Zipf popularity (workloads.traces). Every request runs a forward pass and returns the sha256 of
the weights it was given, compared with the original weights'. A request that fails with a Ray
error (its node died, say) or a CapacityError (every byte of the host tier leased at that moment)
is sent again, up to six times (``SoakConfig.resends``), after a backoff (to the tenant's next
server); one that still fails, or is wrong, is lost. The servers are the soak's own actors, not
trims_ray's: while Ray reports one restarting (its node went), a request goes on being sent for up
to ``SoakConfig.restart_wait_s``, since a restart on two loaded cores once outlasted the six.

Reported: requests served, retried (by Ray, or sent again here) and failed, and p99 latency per
minute; each node's object-store bytes (Ray's own per-node stats) and the memory of trims_ray's
actors (RSS, and private memory: RSS less the pages they share, such as the object store's) at
the start and after a final evict of everything. Both points are measured with the caches empty,
so a difference is memory the run leaked. The last lines are the verdicts.

When a node's store is not back, the report also says what holds it, so that no debugger is
needed to start: every object of a model's size still referenced, with each process that holds
it (pid, what it is, its node), how (Ray's reference type, as ``ray memory`` names it) and, with
RAY_record_ref_creation_sites=1 in the environment, where that reference was made there; then
the stores once more after a ``gc.collect()`` in every Ray process. Back then means the holders
were reference cycles, which only Python's cyclic collector frees (in an idle worker, perhaps
never): such cycles made the residue of issue 8 (see ``trims_ray._raycalls.get`` and
``trims_ray._fsio.forget_frames``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import math
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import trims_ray
from trims_ray._cluster import node_cache_actor
from trims_ray.actors._naming import NAMESPACE
from workloads import local_ray, traces
from workloads.replay import build_weights, forward_checksum

__all__ = ["SoakConfig", "SoakResult", "run_soak", "print_report", "main"]

MiB = 1024 * 1024
DRIVER_TENANT = "alpha"  # invokes @trims_ray.function from this driver
SERVER_TENANTS = ("beta", "gamma")  # server actors with trims_ray.open, tenant from runtime_env
TENANTS = (DRIVER_TENANT, *SERVER_TENANTS)
PUBLIC = "public"
CHECK_REL_TOL = 1e-4  # forward-pass checksums differ in the last bits with the thread count
STORE_SLACK = 1 * MiB  # object-store bytes the end may exceed the start by (Ray's own objects)
HELD_MIN = 64 * 1024  # a held object this big or bigger is named in the report (models are MiBs)
PRIVATE_SLACK = 32 * MiB  # an actor's private memory may grow by this (allocator arenas, caches)


@dataclass(frozen=True, kw_only=True)
class SoakConfig:
    """What to soak, for how long, and when the faults come.

    Args:
        minutes: how long requests arrive.
        seed: seed of the catalog and the trace.
        rate: requests per second (Poisson), all tenants together.
        nodes: nodes of the local cluster (the last is removed and a new one added; the
            second's node cache is killed).
        cpus: CPUs per node.
        object_store_mb: each node's object store.
        host_mb, disk_mb: each node's host and disk tier budgets (the host tier smaller than
            the catalog, so models are evicted and reloaded all along).
        private_models: models of each tenant; public_models: models every tenant uses.
        min_mb, max_mb: model sizes (seeded, log-uniform, whole MiB).
        zipf: exponent of each tenant's model popularity.
        remove_at, readd_at, kill_cache_at: when (share of the run) the last node is removed,
            a new node is added, and the second node's cache actor is killed.
        bucket_s: the report's time buckets (a minute; shorter for short runs).
        timeout_s: a request not answered within this is sent again (or lost).
        resends: how many times a request that failed with a Ray error is sent again (after
            0.5, 1, 2, ... s).
        restart_wait_s: how long from its first send a request is sent again while the soak's
            own server actors are restarting (ActorUnavailableError), beyond ``resends``.
    """

    minutes: float = 10.0
    seed: int = 0
    rate: float = 4.0
    nodes: int = 3
    cpus: int = 2
    object_store_mb: int = 192
    host_mb: int = 12
    disk_mb: int = 48
    private_models: int = 2
    public_models: int = 2
    min_mb: int = 1
    max_mb: int = 4
    zipf: float = 0.9
    remove_at: float = 0.3
    readd_at: float = 0.45
    kill_cache_at: float = 0.65
    bucket_s: float = 60.0
    timeout_s: float = 60.0
    resends: int = 6
    restart_wait_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.minutes > 0 or not self.rate > 0:
            raise ValueError("minutes and rate must be > 0")
        if self.nodes < 3:
            raise ValueError("the soak needs 3 or more nodes: one is removed, one loses its cache")
        if not 0 < self.remove_at < self.readd_at < 1 or not 0 < self.kill_cache_at < 1:
            raise ValueError("need 0 < remove_at < readd_at < 1 and 0 < kill_cache_at < 1")
        if not 1 <= self.min_mb <= self.max_mb:
            raise ValueError("need 1 <= min_mb <= max_mb")


@dataclass(frozen=True)
class SoakModel:
    name: str
    tenant: str  # its owner: a tenant, or "public"
    mb: int
    seed: int
    digest: str  # sha256 of its weights, as every request must see them
    checksum: float  # forward_checksum of the original module


@dataclass
class Outcome:
    """One request: when it was due (trace seconds), how it went."""

    due: float
    tenant: str
    model: str
    latency_s: float = math.nan
    ok: bool = False
    node: str = ""
    sends: int = 0  # times this driver sent it (1: no resend)
    ray_attempt: int = 0  # the attempt of the task that answered (0: Ray did not retry it)
    error: str = ""

    @property
    def retried(self) -> bool:
        return self.sends > 1 or self.ray_attempt > 0


@dataclass
class Memory:
    """A snapshot: object-store bytes per node, per trims_ray actor (pid, rss, private), and per
    node what trims_ray itself held then (host-tier bytes, disk-tier bytes, leases)."""

    store: dict[str, int]
    actors: dict[str, tuple[int, int, int]]
    cache: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def store_total(self) -> int:
        return sum(self.store.values())


@dataclass
class SoakResult:
    config: SoakConfig
    catalog: list[SoakModel]
    outcomes: list[Outcome]
    start: Memory
    end: Memory
    events: list[tuple[float, str]] = field(default_factory=list)  # (run seconds, what happened)
    removed_node: str = ""
    added_node: str = ""
    seconds: float = 0.0
    # Only when a node's store is not back at the end: what holds it (store_holders), and the
    # stores after a gc.collect() in every Ray process (store_after_gc).
    held: list[str] = field(default_factory=list)
    store_after_gc: dict[str, int] = field(default_factory=dict)


# -- the work of a request --------------------------------------------------------------------------


def weights_digest(model) -> str:
    """sha256 of a module's (or state dict's) tensors in name order: any changed bit shows."""
    state = model.state_dict() if hasattr(model, "state_dict") else model
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(memoryview(state[name].detach().contiguous().numpy()).cast("B"))
    return h.hexdigest()


def _attempt() -> int:
    # Ray keeps the attempt number of the running task only in its core worker (no public API).
    try:
        return int(ray._private.worker.global_worker.core_worker.get_current_task_attempt_number())
    except Exception:
        return 0


def serve(model, seed: int) -> tuple[str, str, float, int]:
    """What every request does with its model: (node, weights digest, forward checksum, attempt)."""
    node = ray.get_runtime_context().get_node_id()
    return node, weights_digest(model), forward_checksum(model, seed), _attempt()


def evict_as_tenant(names: Sequence[str]) -> None:
    """Evicts ``names`` from every tier of every node, as the caller's tenant."""
    for name in names:
        trims_ray.evict(name)


class TenantServer:
    """A tenant's long-lived server on one node: leases each request's model from the cache of
    the node it runs on, acting as the tenant its runtime_env names (TRIMS_RAY_TENANT)."""

    def handle(self, name: str, seed: int) -> tuple[str, str, float, int]:
        with trims_ray.open(name) as model:
            return serve(model, seed)

    def evict(self, names: Sequence[str]) -> None:
        evict_as_tenant(names)


# -- catalog and trace ------------------------------------------------------------------------------


def model_plan(config: SoakConfig) -> list[tuple[str, str, int, int]]:
    """(name, owner, MiB, seed) of every model: each tenant's private ones, then the public ones."""
    owners = [t for t in TENANTS for _ in range(config.private_models)] + [PUBLIC] * config.public_models
    rng = np.random.default_rng([config.seed, 21])
    logs = rng.uniform(math.log(config.min_mb), math.log(config.max_mb + 1), len(owners))
    sizes = np.clip(np.floor(np.exp(logs)), config.min_mb, config.max_mb).astype(int)
    plan, count = [], {}
    for i, (owner, mb) in enumerate(zip(owners, sizes)):
        count[owner] = count.get(owner, 0) + 1
        plan.append((f"{owner}-m{count[owner]}", owner, int(mb), config.seed * 1000 + i))
    return plan


def register_models(store_uri: str, storage_options: dict | None, config: SoakConfig) -> list[SoakModel]:
    """Registers the catalog: each private model under its tenant, the public ones as public.

    The store object (``trims_ray.ModelStore``) takes the owner explicitly, as a tenant's own
    set-up job would; ``trims_ray.register`` in this driver could name only "alpha" or "public".
    """
    store = trims_ray.ModelStore(store_uri, storage_options=storage_options)
    catalog = []
    for name, owner, mb, seed in model_plan(config):
        module = build_weights(mb, seed)
        store.register(name, module, tenant=owner, factory=f"workloads.bench:synthetic_{mb}")
        catalog.append(SoakModel(name, owner, mb, seed, weights_digest(module), forward_checksum(module, seed)))
    return catalog


def make_trace(config: SoakConfig, catalog: Sequence[SoakModel]):
    """The trace (workloads.traces schema): Poisson arrivals over the run, each from a tenant
    drawn uniformly, naming one of the models it can see by that tenant's Zipf popularity."""
    duration = config.minutes * 60
    count = max(1, int(config.rate * duration * 1.2) + 10)
    times = traces.poisson_arrivals(count, rate=config.rate, seed=config.seed)
    times = times[times < duration]
    rng = np.random.default_rng([config.seed, 22])
    requester = rng.integers(len(TENANTS), size=len(times))
    index = {m.name: i for i, m in enumerate(catalog)}
    models = np.empty(len(times), dtype=np.int64)
    for k, tenant in enumerate(TENANTS):
        visible = [index[m.name] for m in catalog if m.tenant in (tenant, PUBLIC)]
        weights = traces.popularity("zipf", len(visible), seed=config.seed * 10 + k, exponent=config.zipf)
        mine = requester == k
        models[mine] = np.asarray(visible)[rng.choice(len(visible), size=int(mine.sum()), p=weights)]
    names = traces.Catalog(tuple(m.name for m in catalog), np.array([m.mb * MiB for m in catalog]))
    tenants = np.array(TENANTS, dtype=object)[requester]
    return traces.build_trace(times, models, names, tenants=tenants)


# -- cluster and memory -----------------------------------------------------------------------------


@contextlib.contextmanager
def local_cluster(config: SoakConfig) -> Iterator[Cluster]:
    """A ``ray.cluster_utils.Cluster`` of ``config.nodes`` nodes on this machine and a driver
    connected to it; both shut down on exit."""
    if ray.is_initialized():
        raise RuntimeError("the soak starts its own Ray cluster: run it where Ray is not initialized")
    node_args = {"num_cpus": config.cpus, "object_store_memory": config.object_store_mb * MiB}
    with local_ray.local_cluster(config.nodes, **node_args) as cluster:
        try:
            yield cluster
        finally:
            with contextlib.suppress(Exception):
                trims_ray.shutdown()


def trims_actors() -> dict[str, ray.actor.ActorHandle]:
    """trims_ray's live named actors: placement and the node caches (and GPU holders if any)."""
    found = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == NAMESPACE and entry["name"].startswith("trims_ray:"):
            with contextlib.suppress(ValueError):
                found[entry["name"]] = ray.get_actor(entry["name"], namespace=NAMESPACE)
    return found


def measure_memory() -> Memory:
    """Each node's object-store bytes (Ray's per-node stats, through trims_ray.stats) and each
    trims_ray actor's RSS and private memory (USS: its pages no other process maps; RSS also
    counts the object-store pages it once wrote, which stay mapped after the objects are freed)."""
    stats = trims_ray.stats().nodes
    store = {node: s.object_store_bytes_used for node, s in stats.items()}
    cache = {
        node: (s.tiers["host"].bytes_used, s.tiers["disk"].bytes_used, s.leases) for node, s in stats.items()
    }
    actors = {}
    for name, handle in sorted(trims_actors().items()):
        with contextlib.suppress(Exception):
            pid = ray.get(handle.__ray_call__.remote(lambda _: os.getpid()), timeout=10)
            actors[name] = (pid, *process_memory(pid))
    return Memory(store, actors, cache)


def process_memory(pid: int) -> tuple[int, int]:
    """(RSS, private bytes) of a process on this machine, from /proc/<pid>/smaps_rollup; private
    is Private_Clean + Private_Dirty, the pages no other process maps (psutil's "USS")."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            value = rest.split()
            if len(value) == 2 and value[1] == "kB":
                fields[key] = int(value[0]) * 1024
    return fields["Rss"], fields["Private_Clean"] + fields["Private_Dirty"]


def evict_everything(catalog: Sequence[SoakModel], servers: dict[str, list]) -> None:
    """Every tenant evicts its models (this driver also the public ones) from every tier, then
    waits until no lease is left and the freed objects have left the node stores."""
    evict_as_tenant([m.name for m in catalog if m.tenant in (DRIVER_TENANT, PUBLIC)])
    for tenant in SERVER_TENANTS:
        call_any_server(servers[tenant], "evict", [m.name for m in catalog if m.tenant == tenant])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        nodes = trims_ray.stats().nodes.values()
        if all(n.leases == 0 and n.tiers["host"].bytes_used == 0 and n.tiers["disk"].bytes_used == 0 for n in nodes):
            break
        time.sleep(0.2)
    settled_store()


def call_any_server(group: Sequence, method: str, *args, wait_s: float = 120.0):
    """Calls ``method`` on one of a tenant's servers and returns its answer: the first, or while
    Ray reports it restarting (its node went: a restart on two loaded cores takes seconds), the
    next, until ``wait_s`` has passed. For calls any of the tenant's servers can answer."""
    deadline = time.monotonic() + wait_s
    for attempt in itertools.count():
        server = group[attempt % len(group)]
        try:
            return ray.get(getattr(server, method).remote(*args))
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            if attempt % len(group) == len(group) - 1:  # every one restarting: give them a moment
                time.sleep(0.5)


def settled_store() -> dict[str, int]:
    """Each node's object-store bytes once they stop moving. The raylets count a freed object
    out a moment after its last reference goes: waits until two readings a second apart agree,
    at most 15 s."""
    last = None
    for _ in range(15):
        time.sleep(1.0)
        now = {node: s.object_store_bytes_used for node, s in trims_ray.stats().nodes.items()}
        if now == last:
            break
        last = now
    return now


def store_holders(actors: dict[str, tuple[int, int, int]]) -> list[str]:
    """What holds the objects of ``HELD_MIN`` bytes or more still referenced in the cluster, from
    Ray's reference table (what ``ray memory`` prints): a line per object, biggest first, with
    its size and every process that references it, and when it is captured in another object
    (a lease's grant holds its model's ref), what holds that one. ``actors``: trims_ray's actors
    (name -> (pid, ...)), to call them by name; another process goes by its title (Ray titles a
    worker "ray::<actor class>", or "ray::IDLE" between tasks; the soak's nodes all run here)."""
    from ray._private.internal_api import node_stats  # no public API: what `ray memory` calls
    from ray.core.generated import common_pb2

    names = {pid: name.replace("trims_ray:", "").replace("node:", "cache ")[:14] for name, (pid, *_) in actors.items()}
    sizes: dict[bytes, int] = {}
    holders: dict[bytes, list[str]] = {}
    captured_in: dict[bytes, set[bytes]] = {}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        reply = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"], include_memory_info=True)
        for worker in reply.core_workers_stats:
            driver = worker.worker_type == common_pb2.WorkerType.DRIVER
            who = names.get(worker.pid) or ("this driver" if driver else _process_title(worker.pid))
            for ref in worker.object_refs:
                how = _reference_type(ref)
                if how is None:
                    continue
                oid = ref.object_id
                sizes[oid] = max(sizes.get(oid, -1), ref.object_size)
                site = _call_site(ref.call_site)
                holders.setdefault(oid, []).append(f"pid {worker.pid} ({who}) on {node['NodeID'][:8]}: {how}{site}")
                captured_in.setdefault(oid, set()).update(ref.contained_in_owned)
    lines = []
    for oid in sorted((o for o, size in sizes.items() if size >= HELD_MIN), key=sizes.get, reverse=True):
        line = f"{_mib(sizes[oid])} MiB object {oid.hex()[:16]}: " + "; ".join(holders[oid])
        for outer in sorted(captured_in[oid]):
            line += f"; it is captured in object {outer.hex()[:16]}, held by " + (
                "; ".join(holders.get(outer, [])) or "no process"
            )
        lines.append(line)
    return lines


def _call_site(site: str) -> str:
    """Where a reference was made, as Ray records it with RAY_record_ref_creation_sites=1 (""
    when it does not): its kind ("(put object)", ...) and the innermost frames outside Ray and
    Python's own library (else the outermost frame)."""
    if site in ("", "disabled"):
        return ""
    parts = [p.strip() for p in site.split("|") if p.strip()]
    kind = [parts.pop(0)] if parts[0].startswith("(") else []
    ours = [p for p in parts if "/site-packages/ray/" not in p and "/lib/python3." not in p]
    return ", made at " + " < ".join(kind + (ours[:2] or parts[-1:]))


def _reference_type(ref) -> str | None:
    """How a process references an object, named and ranked as ``ray memory`` does
    (PINNED_IN_MEMORY: the process has the object's buffer mapped, a view of it is alive
    there); None when it no longer does."""
    if ref.pinned_in_memory:
        return "PINNED_IN_MEMORY"
    if ref.submitted_task_ref_count > 0:
        return "USED_BY_PENDING_TASK"
    if ref.local_ref_count > 0:
        return "LOCAL_REFERENCE"
    if ref.contained_in_owned:
        return "CAPTURED_IN_OBJECT"
    return None


def _process_title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:40] or "?"
    except OSError:
        return "gone"


def store_after_gc() -> dict[str, int]:
    """Each node's object-store bytes after a ``gc.collect()`` in every Ray process."""
    from ray._private.internal_api import global_gc  # what Ray itself does when its store fills

    global_gc()
    return settled_store()


# -- driving the trace ------------------------------------------------------------------------------


def start_servers(nodes: Sequence[str]) -> dict[str, list]:
    """One TenantServer per node for each server tenant (soft affinity: a server whose node dies
    restarts elsewhere); returns them per tenant, started."""
    servers = {}
    for tenant in SERVER_TENANTS:
        servers[tenant] = [
            ray.remote(TenantServer)
            .options(
                runtime_env={"env_vars": {"TRIMS_RAY_TENANT": tenant}},
                num_cpus=0,  # the CPUs stay for the driver tenant's tasks; the OS shares the cores
                max_concurrency=2,
                max_restarts=-1,
                # No retries by Ray: a call that met a restart fails, and the soak sends it
                # again; a retry by Ray could run it late, after the final evict.
                max_task_retries=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
            )
            .remote()
            for node in nodes
        ]
    ray.get([s.__ray_ready__.remote() for group in servers.values() for s in group], timeout=300)
    return servers


class _Submitter:
    """Sends request ``i``: through @trims_ray.function for this driver's tenant, or to one of
    the tenant's servers for the others (spread by ``i``; a resend goes to the next server)."""

    def __init__(self, catalog: Sequence[SoakModel], servers: dict[str, list]) -> None:
        function = trims_ray.function(serve, num_cpus=1, max_retries=5)
        self.seeds = {m.name: m.seed for m in catalog}
        self.functions = {m.name: function.options(model=m.name) for m in catalog if m.tenant in (DRIVER_TENANT, PUBLIC)}
        self.servers = servers

    def __call__(self, i: int, tenant: str, model: str, send: int = 0) -> ray.ObjectRef:
        if tenant == DRIVER_TENANT:
            return self.functions[model].remote(self.seeds[model])
        group = self.servers[tenant]
        return group[(i + send) % len(group)].handle.remote(model, self.seeds[model])


def _server_restarting(outcome: Outcome, first_send: float, config: SoakConfig) -> bool:
    """Whether the last send met one of the soak's servers restarting, early enough to wait on."""
    return (
        outcome.error.startswith("ActorUnavailableError")
        and time.perf_counter() - first_send < config.restart_wait_s
    )


async def _drive(trace, catalog: Sequence[SoakModel], submit: _Submitter, config: SoakConfig, start: float) -> list[Outcome]:
    """Sends every request at its time (concurrently with those in flight), checks each answer,
    sends again what failed with a Ray error; returns one outcome per request."""
    expected = {m.name: m for m in catalog}
    rows = list(zip(trace["time"].to_pylist(), trace["tenant"].to_pylist(), trace["model"].to_pylist()))

    async def one(i: int, due: float, tenant: str, name: str) -> Outcome:
        outcome = Outcome(due, tenant, name)
        first_send = time.perf_counter()
        while outcome.sends <= config.resends or _server_restarting(outcome, first_send, config):
            if outcome.sends:  # what failed may be restarting: give it a moment
                await asyncio.sleep(min(0.5 * 2 ** (outcome.sends - 1), 4.0))
            outcome.sends += 1
            try:
                ref = submit(i, tenant, name, outcome.sends - 1)
                node, digest, value, attempt = await asyncio.wait_for(ref, config.timeout_s)
            except trims_ray.CapacityError as exc:  # every byte of the node leased now: later
                outcome.error = _describe(exc)
                continue
            except trims_ray.TrimsError as exc:  # the model's own fault: the same on a resend
                outcome.error = _describe(exc)
                break
            except (ray.exceptions.RayError, asyncio.TimeoutError) as exc:
                outcome.error = _describe(exc)
                if isinstance(exc, asyncio.TimeoutError):
                    with contextlib.suppress(Exception):  # given up on: let it free its lease
                        ray.cancel(ref)
                continue
            want = expected[name]
            outcome.node, outcome.ray_attempt = node, attempt
            outcome.latency_s = time.perf_counter() - (start + due)
            outcome.ok = digest == want.digest and math.isclose(value, want.checksum, rel_tol=CHECK_REL_TOL)
            outcome.error = "" if outcome.ok else f"wrong result: digest {digest[:12]}, checksum {value!r}"
            break
        return outcome

    pending = []
    for i, (due, tenant, name) in enumerate(rows):
        delay = start + due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(one(i, due, tenant, name)))
    return list(await asyncio.gather(*pending))


def _describe(exc: BaseException) -> str:
    """One line for an error: its type and the last line of its message (a task's error carries
    the remote traceback before it)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


def _faults(cluster: Cluster, config: SoakConfig, start: float, result: SoakResult, node_args: dict) -> None:
    """Removes the last node, adds a new one, and kills the second node's cache at their times,
    logging each in ``result.events``. Runs in the main thread: adding a node installs signal
    handlers, which Python allows only there."""
    duration = config.minutes * 60
    nodes = cluster.list_all_nodes()
    victim, cache_node = nodes[-1], nodes[1]
    plan = sorted(
        [(config.remove_at, "remove"), (config.readd_at, "add"), (config.kill_cache_at, "kill")]
    )

    def log(what: str) -> None:
        result.events.append((time.perf_counter() - start, what))

    for at, action in plan:
        delay = start + at * duration - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        try:
            if action == "remove":
                result.removed_node = victim.node_id
                cluster.remove_node(victim, allow_graceful=False)
                log(f"removed node {victim.node_id[:8]}")
            elif action == "add":
                added = cluster.add_node(**node_args)
                result.added_node = added.node_id
                log(f"added node {added.node_id[:8]}")
            else:
                ray.kill(node_cache_actor(cache_node.node_id), no_restart=False)
                log(f"killed the node cache of {cache_node.node_id[:8]} (it restarts)")
        except Exception as exc:  # a fault that could not be made is reported, not hidden
            log(f"FAILED to {action}: {type(exc).__name__}: {exc}")


def _warm_up(submit: _Submitter, catalog: Sequence[SoakModel], nodes: int) -> None:
    """Starts the driver tenant's workers and has every server serve once, before anything is
    measured."""
    models = {t: next(m.name for m in catalog if m.tenant in (t, PUBLIC)) for t in TENANTS}
    refs = [submit(i, t, models[t]) for t in TENANTS for i in range(2 * nodes)]
    ray.get(refs, timeout=300)


def run_soak(
    config: SoakConfig, *, store_uri: str | None = None, storage_options: dict | None = None, log=print
) -> SoakResult:
    """Runs the soak (see the module's docstring) on a cluster of its own.

    Args:
        config: what to run.
        store_uri, storage_options: the model store (default: a directory in a temp dir).
        log: where progress lines go.

    Raises:
        RuntimeError: Ray is already initialized in this process.
    """
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="trims-soak-"))
        store_uri = store_uri or os.path.join(tmp, "store")
        cluster = stack.enter_context(local_cluster(config))
        cache = trims_ray.CacheConfig(
            host_bytes=config.host_mb * MiB,
            disk_bytes=config.disk_mb * MiB,
            disk_dir=os.path.join(tmp, "disk"),
            lease_check_s=0.5,
            report_s=0.5,
        )
        trims_ray.init(store=store_uri, storage_options=storage_options, tenant=DRIVER_TENANT, config=cache)
        catalog = register_models(store_uri, storage_options, config)
        trace = make_trace(config, catalog)
        log(f"soak: {len(catalog)} models, {trace.num_rows} requests over {config.minutes:g} min on {config.nodes} nodes")
        servers = start_servers([n.node_id for n in cluster.list_all_nodes()])
        submit = _Submitter(catalog, servers)
        _warm_up(submit, catalog, config.nodes)
        evict_everything(catalog, servers)
        result = SoakResult(config, catalog, [], measure_memory(), Memory({}, {}))

        node_args = {"num_cpus": config.cpus, "object_store_memory": config.object_store_mb * MiB}
        start = time.perf_counter() + 0.5
        outcomes: list[Outcome] = []
        crashed: list[BaseException] = []

        def drive() -> None:
            try:
                outcomes.extend(asyncio.run(_drive(trace, catalog, submit, config, start)))
            except BaseException as exc:  # re-raised below, in the caller's thread
                crashed.append(exc)

        driver = threading.Thread(target=drive, name="soak-requests")
        driver.start()
        _faults(cluster, config, start, result, node_args)
        driver.join()
        if crashed:
            raise crashed[0]
        result.outcomes = outcomes
        result.seconds = time.perf_counter() - start
        log(f"soak: requests done after {result.seconds:.0f} s; evicting everything")
        evict_everything(catalog, servers)
        result.end = measure_memory()
        if not store_back_to_start(result)[0]:  # what holds it, asked while it still does
            result.held = store_holders(result.end.actors)
            result.store_after_gc = store_after_gc()
        return result


# -- the report ---------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / MiB:.1f}"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def store_back_to_start(result: SoakResult) -> tuple[bool, str]:
    """Every node's object store after the final evict against where it started (a node added
    during the run started at nothing)."""
    worst = max(
        (used - result.start.store.get(node, 0) for node, used in result.end.store.items()), default=0
    )
    line = (
        f"object store: {_mib(result.start.store_total)} MiB at start, {_mib(result.end.store_total)} MiB "
        f"at end over the nodes alive then; the most any node is above its start: {_mib(worst)} MiB "
        f"(allowed {_mib(STORE_SLACK)})"
    )
    return worst <= STORE_SLACK, line


def actors_back_to_start(result: SoakResult) -> tuple[bool, str]:
    """Private memory of each actor alive (same process) at both points."""
    growth = {
        name: end[2] - result.start.actors[name][2]
        for name, end in result.end.actors.items()
        if name in result.start.actors and result.start.actors[name][0] == end[0]
    }
    worst_name = max(growth, key=growth.get, default="")
    worst = growth.get(worst_name, 0)
    line = (
        f"actor memory: {len(growth)} actor(s) alive throughout; the most private memory grew is "
        f"{_mib(worst)} MiB ({worst_name or 'none'}; allowed {_mib(PRIVATE_SLACK)})"
    )
    return bool(growth) and worst <= PRIVATE_SLACK, line


def print_report(result: SoakResult, out=sys.stdout) -> bool:
    """Prints the report; returns whether every verdict passed."""
    config, outcomes = result.config, result.outcomes

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    say(
        f"trims_ray soak: {config.minutes:g} min, seed {config.seed}, {config.nodes} nodes x {config.cpus} CPUs, "
        f"{config.object_store_mb} MiB object store, host tier {config.host_mb} MiB, disk tier {config.disk_mb} MiB per node"
    )
    catalog_mb = sum(m.mb for m in result.catalog)
    say(f"catalog: {len(result.catalog)} models, {catalog_mb} MiB ({', '.join(TENANTS)} private, {PUBLIC} shared)")
    for at, what in result.events:
        say(f"  fault at {at:6.1f} s: {what}")
    say()
    say(f"{'from s':>7} {'requests':>9} {'served':>7} {'retried':>8} {'failed':>7} {'p50 ms':>8} {'p99 ms':>8}")
    buckets = max(1, math.ceil(config.minutes * 60 / config.bucket_s))
    for b in range(buckets):
        rows = [o for o in outcomes if b * config.bucket_s <= o.due < (b + 1) * config.bucket_s]
        good = [o.latency_s * 1000 for o in rows if o.ok]
        p50 = f"{np.percentile(good, 50):8.0f}" if good else f"{'-':>8}"
        p99 = f"{np.percentile(good, 99):8.0f}" if good else f"{'-':>8}"
        say(
            f"{b * config.bucket_s:7.0f} {len(rows):9d} {sum(o.ok for o in rows):7d} "
            f"{sum(o.retried for o in rows):8d} {sum(not o.ok for o in rows):7d} {p50} {p99}"
        )
    served = sum(o.ok for o in outcomes)
    wrong = sum(o.error.startswith("wrong result") for o in outcomes)
    lost = len(outcomes) - served - wrong
    ray_retried = sum(o.ray_attempt > 0 for o in outcomes)
    resent = sum(o.sends > 1 for o in outcomes)
    good = [o.latency_s * 1000 for o in outcomes if o.ok]
    say(
        f"{'all':>7} {len(outcomes):9d} {served:7d} {sum(o.retried for o in outcomes):8d} {len(outcomes) - served:7d} "
        + (f"{np.percentile(good, 50):8.0f} {np.percentile(good, 99):8.0f}" if good else "")
    )
    say(f"retried: {ray_retried} by Ray (the task's node or worker died), {resent} sent again by the soak")
    for tenant in TENANTS:
        mine = [o for o in outcomes if o.tenant == tenant]
        say(f"  tenant {tenant}: {len(mine)} requests, {sum(o.ok for o in mine)} served right")
    for o in [o for o in outcomes if not o.ok][:10]:
        say(f"  not served: t={o.due:.1f} s {o.tenant}/{o.model} after {o.sends} send(s): {o.error}")
    say()
    say("memory (MiB)          start        end")
    for node in sorted(set(result.start.store) | set(result.end.store)):
        start = result.start.store.get(node)
        end = result.end.store.get(node)
        label = {result.removed_node: " (removed)", result.added_node: " (added)"}.get(node, "")
        held = result.end.cache.get(node)
        still = f"   (trims_ray holds host {_mib(held[0])}, disk {_mib(held[1])}, {held[2]} leases)" if held else ""
        say(
            f"  object store {node[:8]}{label:10} "
            f"{_mib(start) if start is not None else '-':>8} {_mib(end) if end is not None else '-':>10}{still}"
        )
    for name in sorted(set(result.start.actors) | set(result.end.actors)):
        start, end = result.start.actors.get(name), result.end.actors.get(name)
        short = name.replace("trims_ray:", "").replace("node:", "cache ")[:16]

        def cell(v, i):
            return f"{_mib(v[i]):>8}" if v else f"{'-':>8}"

        restarted = " (new process)" if start and end and start[0] != end[0] else ""
        say(f"  {short:16} rss {cell(start, 1)} {cell(end, 1)}   private {cell(start, 2)} {cell(end, 2)}{restarted}")
    results_ok = served == len(outcomes)
    store_ok, store_line = store_back_to_start(result)
    actors_ok, actors_line = actors_back_to_start(result)
    if not store_ok:
        say(f"  what holds the stores (objects of {HELD_MIN // 1024} KiB or more still referenced):")
        for line in result.held or ["nothing: no process references one"]:
            say(f"    {line}")
        if result.store_after_gc:
            worst = max(used - result.start.store.get(node, 0) for node, used in result.store_after_gc.items())
            cycles = ": those holders were reference cycles" if worst <= STORE_SLACK else ""
            say(f"  after a gc.collect() in every Ray process, the most any node is above its start: {_mib(worst)} MiB{cycles}")
    say()
    say(f"VERDICT results: {_verdict(results_ok)}: {len(outcomes)} requests, {served} right, {wrong} wrong, {lost} lost")
    say(f"VERDICT memory: {_verdict(store_ok)}: {store_line}")
    say(f"VERDICT memory: {_verdict(actors_ok)}: {actors_line}")
    return results_ok and store_ok and actors_ok


# -- command line -------------------------------------------------------------------------------


@contextlib.contextmanager
def _store(kind: str) -> Iterator[tuple[str | None, dict | None]]:
    if kind == "file":
        yield None, None
        return
    from workloads.s3server import create_bucket, moto_server, s3_storage_options

    with moto_server() as endpoint:
        bucket = f"soak-{uuid.uuid4().hex[:8]}"
        create_bucket(endpoint, bucket)
        yield f"s3://{bucket}/store", s3_storage_options(endpoint)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workloads.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second, all tenants")
    parser.add_argument("--store", choices=("s3", "file"), default="s3", help="moto S3 on loopback, or a directory")
    args = parser.parse_args(argv)
    bucket_s = 60.0 if args.minutes >= 2 else 10.0
    config = SoakConfig(minutes=args.minutes, seed=args.seed, rate=args.rate, bucket_s=bucket_s)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    with _store(args.store) as (uri, options):
        result = run_soak(config, store_uri=uri, storage_options=options)
    return 0 if print_report(result) else 1


if __name__ == "__main__":
    sys.exit(main())
