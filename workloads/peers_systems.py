"""The four systems of the peers benchmark (workloads.peers), each serving the same requests on
the same Ray cluster: Ray Serve model multiplexing, an LRU actor per node, no cache (an mmap load
inside a plain task) and trims_ray. Every request runs one forward pass and answers an ``Answer``:
the output's checksum, whether the model was already in memory, and where the time went.

The three peers read the model from the same file trims_ray's store holds (its safetensors blob)
and build the module the same way trims_ray does (on meta, the loaded tensors assigned, no
initialisers): the comparison is about where the weights come from, not how modules are built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import ray
import safetensors.torch
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import trims_ray
from trims_ray._factory import assemble_module, resolve_factory
from trims_ray.cache.placement import NodeInfo, task_slots

__all__ = [
    "SYSTEMS",
    "Answer",
    "ByteLRU",
    "LRUStats",
    "ModelSpec",
    "Setup",
    "forward_checksum",
    "load_from_file",
    "serving",
]

SERVE, LRU, NOCACHE, TRIMS = "serve", "lru", "nocache", "trims"
SYSTEMS = {SERVE: "Ray Serve mux", LRU: "LRU actor", NOCACHE: "no cache", TRIMS: "trims_ray"}
# Tiers trims_ray reports for a model that was in the node's memory when the task asked for it.
TRIMS_HIT_TIERS = frozenset({"gpu", "host", "process"})
BATCH = 4  # rows of a synthetic model's input
SEQ_LEN = 32  # tokens of a zoo language model's input
SERVE_APP = "trims-peers-multiplexed"


@dataclass(frozen=True)
class ModelSpec:
    """What serving one model takes; sent with every request (a few hundred bytes).

    ``factory`` and ``aliases`` come from the model's manifest; ``zoo`` names the zoo entry whose
    example input the request feeds (None: a synthetic MLP fed ``BATCH`` rows of ``width``).
    """

    name: str
    path: str  # the safetensors blob in the local store directory
    factory: Any
    aliases: tuple[tuple[str, str], ...]
    nbytes: int
    seed: int  # of the request's input
    zoo: str | None = None
    width: int = 0


@dataclass(frozen=True)
class Answer:
    """A request's answer, with what the serving process measured (perf_counter seconds)."""

    checksum: float
    hit: bool  # the model was in this system's memory when the request asked for it
    tier: str  # trims_ray: the tier it was served from; peers: "memory" or "file"
    load_s: float  # request start in the serving process to a usable module
    forward_s: float
    # Model bytes the serving process held in memory once it had this request's model (Serve's
    # replica, the LRU actor; None: not measured there): what "same memory per node" is checked by.
    held_bytes: int | None = None


# -- the work -----------------------------------------------------------------------------------


def _one_thread() -> None:
    # Every system, and the driver's expected outputs, run each forward on one thread: float
    # sums then add in one order everywhere, so a right answer is bit-for-bit equal.
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def forward_checksum(model: torch.nn.Module, spec: ModelSpec) -> float:
    """One forward pass of the request's seeded input; the sum of the absolute outputs."""
    _one_thread()
    generator = torch.Generator().manual_seed(spec.seed)
    if spec.zoo is None:
        with torch.inference_mode():
            out = model(torch.randn(BATCH, spec.width, generator=generator))
    else:
        from workloads import zoo

        example = zoo.zoo_model(spec.zoo).example_input(1, seq_len=SEQ_LEN, generator=generator)
        out = zoo.forward(model, example)
    return float(out.double().abs().sum())


def _timed_forward(model: torch.nn.Module, spec: ModelSpec) -> tuple[float, float]:
    started = time.perf_counter()
    return forward_checksum(model, spec), time.perf_counter() - started


def load_from_file(spec: ModelSpec) -> torch.nn.Module:
    """The peers' load: ``safetensors.torch.load_file`` (an mmap; pages are read when the
    forward touches them) and the module assembled on meta around those tensors."""
    tensors = safetensors.torch.load_file(spec.path)
    return assemble_module(resolve_factory(spec.factory), tensors, dict(spec.aliases), source=spec.name)


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def _warm_process() -> str:
    """Starts a worker and imports what a request needs there."""
    _one_thread()
    torch.ones(1).sum()
    return _node_id()


# -- the LRU cache (pure Python, tested without Ray) --------------------------------------------

V = TypeVar("V")


@dataclass
class LRUStats:
    hits: int = 0
    misses: int = 0  # waiters on another request's load included
    loads: int = 0
    evictions: int = 0
    uncached: int = 0  # loads that did not fit next to the loads in flight and were not kept


class ByteLRU(Generic[V]):
    """A byte-bounded LRU of loaded models with single flight: concurrent misses for one key
    run one load and share its value. Bytes of loads in flight are reserved when they start,
    so the cache never holds more than ``capacity`` bytes; a load that cannot fit even after
    evicting everything resident is served but not kept. Thread-safe.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0 bytes, got {capacity}")
        self.capacity = capacity
        self.stats = LRUStats()
        self._entries: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._flights: dict[str, Future] = {}
        self._reserved = 0
        self._lock = threading.Lock()

    @property
    def bytes_used(self) -> int:
        """Bytes resident plus bytes reserved by loads in flight."""
        with self._lock:
            return self._resident_bytes() + self._reserved

    def keys(self) -> list[str]:
        """Resident keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def get(self, key: str, nbytes: int, load: Callable[[], V]) -> tuple[V, bool]:
        """(value, hit): the resident value, or the one ``load()`` returns (run once however
        many threads miss ``key`` at the same time). ``load``'s exception reaches every waiter
        and nothing is kept."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return entry[0], True
            self.stats.misses += 1
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = Future()
                keep = self._make_room(nbytes)
                self._reserved += nbytes if keep else 0
        if not leader:
            return flight.result(), False
        try:
            value = load()
        except BaseException as exc:
            with self._lock:
                del self._flights[key]
                self._reserved -= nbytes if keep else 0
            flight.set_exception(exc)
            raise
        with self._lock:
            del self._flights[key]
            self.stats.loads += 1
            if keep:
                self._reserved -= nbytes
                self._entries[key] = (value, nbytes)
            else:
                self.stats.uncached += 1
        flight.set_result(value)
        return value, False

    def _resident_bytes(self) -> int:
        return sum(n for _, n in self._entries.values())

    def _make_room(self, nbytes: int) -> bool:
        """Evicts least recently used entries until ``nbytes`` more fit; False if they cannot
        (then nothing is evicted). Called with the lock held."""
        if self._resident_bytes() + self._reserved + nbytes <= self.capacity:
            return True
        if self._reserved + nbytes > self.capacity:
            return False
        while self._resident_bytes() + self._reserved + nbytes > self.capacity:
            self._entries.popitem(last=False)  # a request using it keeps its own reference
            self.stats.evictions += 1
        return True


class LRUModelServer:
    """The LRU actor: one per node, holding the node's CPUs, ``max_concurrency`` = CPUs."""

    def __init__(self, capacity: int) -> None:
        _one_thread()
        self._cache: ByteLRU[torch.nn.Module] = ByteLRU(capacity)

    def ping(self) -> str:
        return _node_id()

    def infer(self, spec: ModelSpec) -> Answer:
        started = time.perf_counter()
        model, hit = self._cache.get(spec.name, spec.nbytes, lambda: load_from_file(spec))
        loaded = time.perf_counter()
        held = self._cache.bytes_used
        checksum, forward_s = _timed_forward(model, spec)
        return Answer(checksum, hit, "memory" if hit else "file", loaded - started, forward_s, held)

    def stats(self) -> LRUStats:
        return self._cache.stats


# -- no cache and trims_ray ---------------------------------------------------------------------


def nocache_infer(spec: ModelSpec) -> Answer:
    """The no-cache baseline: load inside the task, every time."""
    started = time.perf_counter()
    model = load_from_file(spec)
    loaded = time.perf_counter()
    checksum, forward_s = _timed_forward(model, spec)
    return Answer(checksum, False, "file", loaded - started, forward_s)


def trims_infer(model: torch.nn.Module, spec: ModelSpec) -> Answer:
    """The body of the ``@trims_ray.function``: the model arrives leased."""
    from trims_ray import _lease

    entered = time.perf_counter()
    # task_started and served_tier are benchmark hooks of the decorator (not API): the lease's
    # wait and the module's build happened between the task's start and this line.
    load_s = entered - getattr(_lease, "task_started", entered)
    tier = getattr(_lease, "served_tier", lambda: "unknown")() or "unknown"
    checksum, forward_s = _timed_forward(model, spec)
    return Answer(checksum, tier in TRIMS_HIT_TIERS, tier, load_s, forward_s)


# -- Ray Serve multiplexing ---------------------------------------------------------------------


class _ServeReplica:
    """The replica's logic; ``_serve_deployment`` adds the multiplexed loader and its cap."""

    def __init__(self, catalog: dict[str, ModelSpec]) -> None:
        from workloads.serve_baseline import _Held  # noqa: F401 - fail at start, not per load

        _one_thread()
        self._catalog = catalog
        self._resident: dict[str, Any] = {}  # model id -> _Held, until Serve unloads it

    async def _load(self, model_id: str):
        from workloads.serve_baseline import _Held

        # In a thread, as Serve advises: requests for held models go on during a load.
        model = await asyncio.to_thread(load_from_file, self._catalog[model_id])
        return _Held(model, model_id, self._resident)

    async def ping(self) -> str:
        return _node_id()

    async def __call__(self, spec: ModelSpec) -> Answer:
        started = time.perf_counter()
        hit = spec.name in self._resident
        held = await self.get_model(spec.name)
        loaded = time.perf_counter()
        # Serve caps a replica's models by count, not bytes: what it holds is measured here.
        held_bytes = sum(h.nbytes for h in list(self._resident.values()))
        checksum, forward_s = await asyncio.to_thread(_timed_forward, held.model, spec)
        return Answer(checksum, hit, "memory" if hit else "file", loaded - started, forward_s, held_bytes)


def _serve_deployment(max_models: int, replicas: int, cpus: int):
    from ray import serve

    class MultiplexedPeers(_ServeReplica):
        # The cap is fixed when the class is made, hence a class per deployment.
        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, model_id: str):
            return await self._load(model_id)

    return serve.deployment(
        MultiplexedPeers,
        name="multiplexed-peers",
        num_replicas=replicas,
        max_replicas_per_node=1,
        ray_actor_options={"num_cpus": cpus},
    )


# -- running a system ---------------------------------------------------------------------------


@dataclass
class Setup:
    """What every system's run shares: the cluster, the catalog and the memory per node."""

    nodes: list[str]  # Ray node ids, the head first
    cpus: int  # per node
    store_dir: str
    tmp: str
    catalog: dict[str, ModelSpec]
    cache_models: int  # models per node (Serve's cap; the others' bytes follow from it)
    budget_bytes: int  # LRU actor's bytes per node; trims_ray's host tier adds guard pages
    host_bytes: int  # trims_ray's host tier per node
    extra: dict = field(default_factory=dict)
    policy: str = trims_ray.CacheConfig.policy  # trims_ray's host-tier policy
    trims_cpus: float = 1.0  # CPUs each trims_ray task asks for


Submit = Callable[[ModelSpec], Awaitable[Answer]]


def _pinned(node: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node, soft=False)


def workers_per_node(cpus: int, task_cpus: float) -> int:
    """How many tasks asking for ``task_cpus`` CPUs Ray runs at once on a node of ``cpus``: the
    slots trims_ray's routing counts (``task_slots``), so that each slot has a warm worker."""
    if task_cpus <= 0:
        raise ValueError(f"task_cpus must be > 0, got {task_cpus!r}")
    return int(task_slots(NodeInfo(host_capacity=0, slots=cpus), cpus=task_cpus))


def _start_workers(setup: Setup, task_cpus: float = 1.0) -> None:
    """Starts as many workers on each node as tasks asking for ``task_cpus`` run there at once
    (sent together, so that each starts a process of its own)."""
    warm = ray.remote(num_cpus=task_cpus)(_warm_process)
    per_node = workers_per_node(setup.cpus, task_cpus)
    ray.get([warm.options(scheduling_strategy=_pinned(n)).remote() for n in setup.nodes for _ in range(per_node)])


@contextlib.contextmanager
def serving(system: str, setup: Setup) -> Iterator[Submit]:
    """Starts ``system`` on the connected cluster with empty caches; yields ``submit(spec)``,
    an awaitable of the request's Answer; stops the system on exit."""
    if system == NOCACHE:
        _start_workers(setup)
        task = ray.remote(num_cpus=1)(nocache_infer)
        yield task.remote
    elif system == TRIMS:
        yield from _trims(setup)
    elif system == LRU:
        yield from _lru(setup)
    elif system == SERVE:
        yield from _serve(setup)
    else:
        raise ValueError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")


def _trims(setup: Setup) -> Iterator[Submit]:
    config = trims_ray.CacheConfig(
        host_bytes=setup.host_bytes,
        disk_bytes=0,  # memory against memory: on one machine a disk tier is the page cache
        disk_dir=os.path.join(setup.tmp, "disk"),
        manifest_ttl_s=30.0,  # the catalog does not change during a run
        policy=setup.policy,
    )
    trims_ray.init(setup.store_dir, address=None, config=config)
    try:
        _start_workers(setup, setup.trims_cpus)
        infer = trims_ray.function(trims_infer, num_cpus=setup.trims_cpus)
        # One function per model, made before the clock starts.
        functions = {name: infer.options(model=name) for name in setup.catalog}
        yield lambda spec: functions[spec.name].remote(spec)
    finally:
        trims_ray.shutdown()


def _lru(setup: Setup) -> Iterator[Submit]:
    server = ray.remote(LRUModelServer)
    actors = [
        server.options(num_cpus=setup.cpus, max_concurrency=setup.cpus, scheduling_strategy=_pinned(n)).remote(
            setup.budget_bytes
        )
        for n in setup.nodes
    ]
    try:
        ray.get([a.ping.remote() for a in actors])
        # A user's static sharding: model i of the catalog always goes to node i mod n, so each
        # node caches its own share of the catalog.
        shard = {name: actors[i % len(actors)] for i, name in enumerate(setup.catalog)}
        yield lambda spec: shard[spec.name].infer.remote(spec)
    finally:
        for actor in actors:
            ray.kill(actor)


def _serve(setup: Setup) -> Iterator[Submit]:
    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines would cut the tables
    deployment = _serve_deployment(setup.cache_models, len(setup.nodes), setup.cpus)
    serve.start(proxy_location="Disabled")  # requests come through handles, not HTTP
    try:
        handle = serve.run(deployment.bind(setup.catalog), name=SERVE_APP, route_prefix=None)
        for _ in range(2 * len(setup.nodes)):  # the handle's router learns the replicas
            handle.ping.remote().result()
        handles = {name: handle.options(multiplexed_model_id=name) for name in setup.catalog}
        yield lambda spec: handles[spec.name].remote(spec)
    finally:
        serve.shutdown()
