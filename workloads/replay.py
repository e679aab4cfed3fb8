"""Replay harness: one multi-model trace through trims_ray and the systems a user would pick
instead, on a local multi-node Ray cluster, measured side by side in one run
(docs/benchmarks.md: replay).

    python -m workloads.replay [--trace azure|zipf] [--requests 300] [--speedup 2]
        [--systems lru,fifo,lfu,gdsf,cost,nocache,serve] [--out results/replay.parquet]

The trace: the real Azure LLM arrivals (read from ../shared/data/azure_llm_2023/ when present,
CC-BY 4.0) or Poisson arrivals, each request naming a model drawn from a seeded Zipf popularity
over a catalog of synthetic MLPs of a few MiB each whose bytes exceed the cluster's cache. The
store is an S3 server on loopback (moto) by default: every system loads its misses from it.
Requests are sent at their arrival times (divided by --speedup), concurrently, to:

- trims_ray with each online policy (``@trims_ray.function``, host tier of --host-mb per node);
- no cache: a plain Ray task that loads the model from the store inside the task;
- Ray Serve model multiplexing, one replica per node, holding as many models as fit the same
  per-node budget at the catalog's mean model size (workloads.serve_baseline).

Every request runs a forward pass whose checksum is compared with one computed in the driver
from the original weights. The simulator (workloads.simulate) replays the same trace with the
same total cache bytes for Belady's hit ratio and each online policy's. Per-request results go to
a Parquet file (workloads.traces.RESULT_SCHEMA); simulator curves and the trace go beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import trims_ray
from trims_ray import _lease
from trims_ray._api import store_for
from trims_ray._protect import GUARD_BYTES
from trims_ray.policy import available_policies, online_policies
from workloads import local_ray, traces
from workloads.bench import synthetic
from workloads.simulate import Requests, SimResult, simulate

__all__ = [
    "DEFAULT_OUT",
    "ReplayConfig",
    "ReplayModel",
    "ReplayResult",
    "SystemSummary",
    "forward_checksum",
    "main",
    "print_report",
    "run_replay",
    "simulator_curves",
]

MiB = 1024 * 1024
DEFAULT_OUT = "results/replay.parquet"
NOCACHE, SERVE, TRIMS = "nocache", "serve", "trims_ray"
# "process": a worker's own kept model (trims_ray._process_tier), a hit on the node's host copy.
TIERS = ("gpu", "process", "host", "disk", "peer", "store", "bypass", "unknown")
BATCH = 4  # rows of the input of every request's forward pass
CHECK_REL_TOL = 1e-4  # checksums differ in the last bits with the thread count
CURVE_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75)  # cache sizes, share of catalog bytes
# The catalog does not change during a replay, so names are trusted longer than the default 2 s
# (which suits a cluster where models are re-registered in place): a model used less often than
# the ttl would otherwise pay a store read of its name on the caller and on the node.
MANIFEST_TTL_S = 30.0
WARMUP_MODEL = "replay-warmup"


@dataclass(frozen=True, kw_only=True)
class ReplayConfig:
    """What to replay, on what, against which systems.

    Args:
        trace: "azure" (real arrivals; the data must be present) or "zipf" (Poisson arrivals).
        requests: requests replayed (the trace's first ones).
        speedup: arrival times are divided by this (the Azure trace runs in real time at 1).
        rate: Poisson arrivals per second ("zipf" trace, before the speedup).
        zipf: Zipf exponent of model popularity.
        models: models in the catalog.
        min_mb, max_mb: model sizes in MiB (seeded, log-uniform, integers).
        nodes: nodes of the local cluster (``ray.cluster_utils.Cluster``).
        cpus: CPUs per node.
        host_mb: trims_ray's host tier per node, and Serve's per-replica memory budget.
        disk_mb: trims_ray's disk tier per node; 0 (the default) compares memory alone (on one
            machine every node's disk tier shares one page cache, which would be free memory).
        object_store_mb: Ray object store per node.
        systems: what to run: online policy names (trims_ray with that policy), "nocache",
            "serve".
        store: "s3" (a moto server on loopback) or "file" (a local directory).
        seed: seed of the catalog and the trace.
        timeout_s: a request not answered within this is counted as failed.
        trace_dir: the Azure trace's directory (default: the shared data).
    """

    trace: str = "azure"
    requests: int = 300
    speedup: float = 2.0
    rate: float = 4.0
    zipf: float = 0.9
    models: int = 30
    min_mb: int = 2
    max_mb: int = 12
    nodes: int = 3
    cpus: int = 2
    host_mb: int = 32
    disk_mb: int = 0
    object_store_mb: int = 128
    systems: tuple[str, ...] = (*online_policies(), NOCACHE, SERVE)
    store: str = "s3"
    seed: int = 0
    timeout_s: float = 120.0
    trace_dir: str | None = None

    def __post_init__(self) -> None:
        if self.trace not in ("azure", "zipf"):
            raise ValueError(f"trace must be 'azure' or 'zipf', got {self.trace!r}")
        if self.store not in ("s3", "file"):
            raise ValueError(f"store must be 's3' or 'file', got {self.store!r}")
        counts = {"requests": self.requests, "models": self.models, "nodes": self.nodes}
        counts.update(cpus=self.cpus, min_mb=self.min_mb, host_mb=self.host_mb)
        for label, value in counts.items():
            if type(value) is not int or value < 1:
                raise ValueError(f"{label} must be an int >= 1, got {value!r}")
        if type(self.max_mb) is not int or self.max_mb < self.min_mb:
            raise ValueError(f"max_mb must be an int >= min_mb, got {self.max_mb!r}")
        if self.max_mb * MiB + 2 * GUARD_BYTES > self.host_mb * MiB:
            raise ValueError(f"max_mb {self.max_mb} does not fit host_mb {self.host_mb}")
        if self.object_store_mb < 2 * self.host_mb:
            raise ValueError("object_store_mb must be at least 2 * host_mb (room for tasks)")
        if not (self.speedup > 0 and self.rate > 0 and self.timeout_s > 0 and self.zipf >= 0):
            raise ValueError("speedup, rate and timeout_s must be > 0, zipf >= 0")
        known = {*online_policies(), NOCACHE, SERVE}
        unknown = [s for s in self.systems if s not in known]
        if unknown or not self.systems:
            raise ValueError(f"unknown systems {unknown}; choose from {', '.join(sorted(known))}")

    @property
    def host_bytes(self) -> int:
        return self.host_mb * MiB


@dataclass(frozen=True)
class ReplayModel:
    """One model of the catalog: a synthetic MLP (workloads.bench.synthetic) of ``mb`` MiB."""

    name: str
    mb: int
    seed: int  # of its weights, and of its requests' input
    nbytes: int  # of its registered blob
    expected: float  # forward_checksum of the original weights


@dataclass
class SystemSummary:
    """One system's line of the table."""

    label: str
    system: str
    policy: str
    requests: int
    failed: int
    p50_s: float
    p99_s: float
    throughput: float  # requests answered per second of the replay
    tiers: dict[str, float]  # share of requests served from each tier
    resident_bytes: int  # model bytes held in memory at the end, all nodes
    simulated_hit: float | None = None  # the simulator's object hit ratio, same policy


@dataclass
class ReplayResult:
    """Everything one replay measured, and what it replayed."""

    config: ReplayConfig
    catalog: list[ReplayModel]
    trace: pa.Table
    results: pa.Table  # RESULT_SCHEMA
    summaries: list[SystemSummary]
    simulated: dict[str, SimResult]  # policy -> the simulator's result at the cluster's bytes
    serve_models: int  # Serve's max_num_models_per_replica
    failures: list[str] = field(default_factory=list)  # one line per failed request


# -- the work every system does ----------------------------------------------------------------


def build_weights(mb: int, seed: int) -> torch.nn.Module:
    """The ``mb`` MiB synthetic MLP with weights seeded by ``seed`` (torch's default init)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return synthetic(mb)()


def forward_checksum(model: torch.nn.Module, seed: int) -> float:
    """One forward pass of a seeded batch; the sum of the absolute outputs (a checksum that a
    wrong or corrupted weight changes)."""
    width = model.layers[0].in_features
    x = torch.randn(BATCH, width, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return float(model(x).double().abs().sum())


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def _host_hits(summary) -> float:
    """The share of requests served from a node's host copy: by lease, or by the model a worker
    kept built (the process tier, which only a host copy feeds)."""
    return sum(summary.tiers[tier] for tier in traces.HOST_HIT_TIERS)


def _served_tier() -> str:
    """The tier the current ``@trims_ray.function`` invocation's model came from."""
    tier = _lease.served_tier()
    return tier if tier in TIERS else "unknown"


def trims_request(model, seed: int) -> tuple[str, str, float, int]:
    """The body of the trims_ray function: (node, tier, checksum, 0)."""
    return _node_id(), _served_tier(), forward_checksum(model, seed), 0


def nocache_request(
    uri: str, storage_options: dict | None, name: str, tenant: str, seed: int
) -> tuple[str, str, float, int]:
    """The no-cache baseline: load the model from the store in the task, as a FaaS function
    does (one store client per worker process, as a warm container keeps it)."""
    model = store_for(uri, storage_options).load(name, tenant=tenant)
    return _node_id(), "store", forward_checksum(model, seed), 0


def _warm_worker() -> str:
    """Starts a worker and imports what requests need there (torch, trims_ray, this module)."""
    torch.ones(1).sum()
    return _node_id()


# -- catalog, trace, simulator -----------------------------------------------------------------


def model_plan(config: ReplayConfig) -> list[tuple[str, int, int]]:
    """(name, MiB, seed) of each catalog model: sizes seeded, log-uniform in [min_mb, max_mb]."""
    rng = np.random.default_rng([config.seed, 11])
    logs = rng.uniform(math.log(config.min_mb), math.log(config.max_mb + 1), config.models)
    sizes = np.clip(np.floor(np.exp(logs)), config.min_mb, config.max_mb).astype(int)
    return [(f"replay-{i:03d}", int(mb), config.seed * 1000 + i) for i, mb in enumerate(sizes)]


def register_models(
    store: trims_ray.ModelStore, plan: Sequence[tuple[str, int, int]]
) -> list[ReplayModel]:
    """Registers each planned model as a public model (every tenant's requests share the
    catalog) and computes its expected checksum from the original weights."""
    catalog = []
    for name, mb, seed in plan:
        module = build_weights(mb, seed)
        info = store.register(
            name, module, tenant="public", factory=f"workloads.bench:synthetic_{mb}"
        )
        catalog.append(ReplayModel(name, mb, seed, info.nbytes, forward_checksum(module, seed)))
    return catalog


def make_trace(config: ReplayConfig, catalog: Sequence[ReplayModel]) -> tuple[pa.Table, str]:
    """The trace (TRACE_SCHEMA, times already divided by the speedup) and a line saying what it
    is. Falls back to "zipf" when the Azure data is missing."""
    models = traces.Catalog(tuple(m.name for m in catalog), np.array([m.nbytes for m in catalog]))
    kind = config.trace
    if kind == "azure":
        try:
            table = traces.azure_trace(
                models,
                seed=config.seed,
                exponent=config.zipf,
                trace_dir=config.trace_dir,
                limit=config.requests,
            )
            what = (
                f"Azure LLM arrivals 2023, first {table.num_rows} requests (conv and code services "
                f"as tenants, each a seeded Zipf {config.zipf} over the catalog); "
                f"{traces.AZURE_ATTRIBUTION}"
            )
        except FileNotFoundError as exc:
            print(f"azure trace unavailable, replaying a Zipf trace instead: {exc}", flush=True)
            kind = "zipf"
    if kind == "zipf":
        table = traces.synthetic_trace(
            config.requests, models, seed=config.seed, exponent=config.zipf, rate=config.rate
        )
        what = f"Poisson arrivals at {config.rate:g}/s, seeded Zipf {config.zipf} popularity"
    times = pc.divide(table["time"], config.speedup)
    table = table.set_column(table.schema.get_field_index("time"), "time", times)
    return traces.validate_trace(table), f"{what}; times / {config.speedup:g}"


def _as_cached(trace: pa.Table) -> Requests:
    """The trace as the simulator sees it, each model's size counted as the host tier counts it
    (guard pages included), so that budgets in bytes mean the same in both."""
    sizes = pc.add(trace["size"], 2 * GUARD_BYTES)
    return Requests.from_table(
        trace.set_column(trace.schema.get_field_index("size"), "size", sizes)
    )


def simulate_policies(trace: pa.Table, budget: int) -> dict[str, SimResult]:
    """Every policy (Belady included) on the trace with one cache of ``budget`` bytes."""
    requests = _as_cached(trace)
    return {policy: simulate(requests, budget, policy) for policy in available_policies()}


def simulator_curves(
    trace: pa.Table, catalog_bytes: int, cluster_bytes: int | None = None
) -> pa.Table:
    """Hit ratio against cache size for every policy on the trace: columns policy,
    cache_fraction (of ``catalog_bytes``), cache_bytes, object_hit_ratio, byte_hit_ratio. The
    schema's metadata holds catalog_bytes and, when given, the replay's cluster_bytes."""
    requests = _as_cached(trace)
    rows: dict[str, list] = {
        k: []
        for k in ("policy", "cache_fraction", "cache_bytes", "object_hit_ratio", "byte_hit_ratio")
    }
    for fraction in CURVE_FRACTIONS:
        budget = int(fraction * catalog_bytes)
        for policy in available_policies():
            result = simulate(requests, budget, policy)
            for key, value in zip(
                rows, (policy, fraction, budget, result.object_hit_ratio, result.byte_hit_ratio)
            ):
                rows[key].append(value)
    metadata = {"catalog_bytes": str(catalog_bytes)}
    if cluster_bytes is not None:
        metadata["cluster_bytes"] = str(cluster_bytes)
    return pa.table(rows).replace_schema_metadata(metadata)


# -- driving a system --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Requests:
    """The trace as lists, with what each request needs and what its answer must be."""

    times: list[float]
    models: list[str]
    tenants: list[str]
    seeds: list[int]
    expected: dict[str, float]  # model -> checksum

    @classmethod
    def of(cls, trace: pa.Table, catalog: Sequence[ReplayModel]) -> _Requests:
        models = trace["model"].to_pylist()
        seed = {m.name: m.seed for m in catalog}
        return cls(
            trace["time"].to_pylist(),
            models,
            trace["tenant"].to_pylist(),
            [seed[name] for name in models],
            {m.name: m.expected for m in catalog},
        )


@dataclass
class _Outcome:
    node: str
    tier: str
    latency_s: float
    ok: bool
    resident: int = 0  # bytes the serving replica held (Serve only)
    error: str = ""
    late_s: float = 0.0  # how long after its due time the driver got to submit it


def _describe(exc: BaseException) -> str:
    """One line for a failed request: a task's own error rather than Ray's wrapper (whose
    message is the remote traceback)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


async def _drive(
    requests: _Requests, submit: Callable[[int], Awaitable], timeout_s: float
) -> list[_Outcome]:
    """Sends request i at its trace time, concurrently with those in flight; ``submit(i)``
    returns an awaitable of (node, tier, checksum, resident bytes). Latency runs from the
    request's due time, so a late submission counts against the system that was slow to take
    it. Every failure (error, timeout, wrong checksum) is an outcome, none stops the replay."""
    start = time.perf_counter() + 0.05

    async def one(i: int) -> _Outcome:
        due = start + requests.times[i]
        late = time.perf_counter() - due
        try:
            node, tier, value, resident = await asyncio.wait_for(submit(i), timeout_s)
        except Exception as exc:  # counted and reported, whatever it is
            elapsed = time.perf_counter() - due
            return _Outcome("", "failed", elapsed, False, error=_describe(exc)[:300], late_s=late)
        latency = time.perf_counter() - due
        expected = requests.expected[requests.models[i]]
        if math.isclose(value, expected, rel_tol=CHECK_REL_TOL):
            return _Outcome(node, tier, latency, True, resident, late_s=late)
        wrong = f"checksum {value!r}, expected {expected!r}"
        return _Outcome(node, tier, latency, False, resident, error=wrong, late_s=late)

    pending = []
    for i, t in enumerate(requests.times):
        delay = start + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(one(i)))
    return list(await asyncio.gather(*pending))


def _results_table(trace: pa.Table, outcomes: list[_Outcome], system: str, policy: str) -> pa.Table:
    n = trace.num_rows
    return pa.table(
        {
            "request_id": pa.array(range(n), pa.int64()),
            "time": trace["time"],
            "tenant": trace["tenant"],
            "model": trace["model"],
            "size": trace["size"],
            "system": pa.array([system] * n, pa.string()),
            "policy": pa.array([policy] * n, pa.string()),
            "node": pa.array([o.node for o in outcomes], pa.string()),
            "tier": pa.array([o.tier for o in outcomes], pa.string()),
            "latency_s": pa.array([o.latency_s for o in outcomes], pa.float64()),
            "ok": pa.array([o.ok for o in outcomes], pa.bool_()),
        },
        schema=traces.RESULT_SCHEMA,
    )


def _summarize(
    label: str,
    system: str,
    policy: str,
    requests: _Requests,
    outcomes: list[_Outcome],
    resident: int,
) -> SystemSummary:
    good = [(t, o) for t, o in zip(requests.times, outcomes) if o.ok]
    latencies = np.array([o.latency_s for _, o in good]) if good else np.array([math.nan])
    # Throughput: correct answers per second, from the first request's due time to the last answer.
    last = max((t + o.latency_s for t, o in good), default=0.0)
    span = last - requests.times[0]
    return SystemSummary(
        label=label,
        system=system,
        policy=policy,
        requests=len(outcomes),
        failed=len(outcomes) - len(good),
        p50_s=float(np.percentile(latencies, 50)),
        p99_s=float(np.percentile(latencies, 99)),
        throughput=len(good) / span if span > 0 else 0.0,
        tiers={t: sum(o.tier == t for o in outcomes) / len(outcomes) for t in TIERS},
        resident_bytes=resident,
    )


@dataclass
class _Setup:
    """What every system's run shares."""

    config: ReplayConfig
    store_uri: str
    storage_options: dict | None
    tmp: str
    nodes: list[str]
    catalog: list[ReplayModel]
    requests: _Requests

    def warm_requests(self) -> int:
        """Requests that warm a system up before the timed run: two per CPU of the cluster."""
        return 2 * self.config.nodes * self.config.cpus


def _run_trims(setup: _Setup, policy: str) -> tuple[list[_Outcome], int]:
    """trims_ray with ``policy``, its caches empty at the start; returns the outcomes and the
    bytes in the host tiers at the end."""
    config = setup.config
    cache = trims_ray.CacheConfig(
        host_bytes=config.host_bytes,
        disk_bytes=config.disk_mb * MiB,
        disk_dir=os.path.join(setup.tmp, f"disk-{policy}"),
        policy=policy,
        manifest_ttl_s=MANIFEST_TTL_S,
    )
    trims_ray.init(store=setup.store_uri, config=cache, storage_options=setup.storage_options)
    try:
        base = trims_ray.function(trims_request, num_cpus=1)
        warm = base.options(model=WARMUP_MODEL)
        ray.get([warm.remote(0) for _ in range(setup.warm_requests())])
        trims_ray.evict(WARMUP_MODEL)
        # One remote function per model, made before the clock starts (each .options(model=)
        # is a new Ray function, exported on its first call).
        functions = {m.name: base.options(model=m.name) for m in setup.catalog}
        requests = setup.requests

        def submit(i: int) -> ray.ObjectRef:
            return functions[requests.models[i]].remote(requests.seeds[i])

        outcomes = asyncio.run(_drive(requests, submit, config.timeout_s))
        host = sum(n.tiers["host"].bytes_used for n in trims_ray.stats().nodes.values())
        return outcomes, host
    finally:
        trims_ray.shutdown()


def _run_nocache(setup: _Setup) -> tuple[list[_Outcome], int]:
    """Plain Ray tasks that load their model from the store each time."""
    task = ray.remote(num_cpus=1)(nocache_request)
    uri, options = setup.store_uri, setup.storage_options
    # Warm each worker's store client (a warm FaaS container keeps its own).
    ray.get(
        [
            task.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
            ).remote(uri, options, WARMUP_MODEL, "default", 0)
            for node in setup.nodes
            for _ in range(setup.config.cpus)
        ]
    )
    requests = setup.requests

    def submit(i: int) -> ray.ObjectRef:
        return task.remote(uri, options, requests.models[i], requests.tenants[i], requests.seeds[i])

    return asyncio.run(_drive(requests, submit, setup.config.timeout_s)), 0


def serve_models_per_replica(config: ReplayConfig, catalog: Sequence[ReplayModel]) -> int:
    """Serve's cap is a count: as many models as fit the host budget at the mean model size."""
    return max(1, config.host_bytes // int(np.mean([m.nbytes for m in catalog])))


def _run_serve(setup: _Setup) -> tuple[list[_Outcome], int]:
    """Ray Serve multiplexing, one replica per node; returns the outcomes and the bytes the
    replicas held at the end (each node's last answer says what its replica held)."""
    from workloads.serve_baseline import multiplexed_serve  # needs ray[serve]

    requests = setup.requests
    with multiplexed_serve(
        store_uri=setup.store_uri,
        storage_options=setup.storage_options,
        max_models=serve_models_per_replica(setup.config, setup.catalog),
        replicas=setup.config.nodes,
        work=forward_checksum,
    ) as handle:
        # Start the handle's router (it learns the replicas) before the clock starts; a
        # multiplexed warm-up request would take one of a replica's model slots.
        for _ in range(setup.warm_requests()):
            handle.ping.remote().result()
        handles = {m.name: handle.options(multiplexed_model_id=m.name) for m in setup.catalog}

        def submit(i: int):
            return handles[requests.models[i]].remote(requests.seeds[i])

        outcomes = asyncio.run(_drive(requests, submit, setup.config.timeout_s))
    last: dict[str, tuple[float, int]] = {}
    for t, o in zip(requests.times, outcomes):
        if o.ok and t + o.latency_s >= last.get(o.node, (-math.inf, 0))[0]:
            last[o.node] = (t + o.latency_s, o.resident)
    return outcomes, sum(resident for _, resident in last.values())


# -- the whole replay --------------------------------------------------------------------------


@contextlib.contextmanager
def local_cluster(nodes: int, cpus: int, object_store_mb: int) -> Iterator[list[str]]:
    """A ``ray.cluster_utils.Cluster`` of ``nodes`` nodes on this machine and a driver connected
    to it; yields the node ids (the head first). Both are shut down on exit."""
    if ray.is_initialized():
        raise RuntimeError(
            "the replay starts its own Ray cluster: run it where Ray is not initialized"
        )
    with local_ray.local_cluster(nodes, num_cpus=cpus, object_store_memory=object_store_mb * MiB) as cluster:
        yield [n.node_id for n in cluster.list_all_nodes()]


@contextlib.contextmanager
def _model_store(kind: str, tmp: str) -> Iterator[tuple[str, dict | None]]:
    """(URI, storage options) of an empty store: a bucket on a moto server on loopback, or a
    directory under ``tmp``."""
    if kind == "file":
        yield os.path.join(tmp, "store"), None
        return
    from workloads.s3server import create_bucket, moto_server, s3_storage_options

    with moto_server() as endpoint:
        bucket = f"replay-{uuid.uuid4().hex[:8]}"
        create_bucket(endpoint, bucket)
        yield f"s3://{bucket}/store", s3_storage_options(endpoint)


def companion_path(out: str | os.PathLike, kind: str) -> Path:
    """Where the replay writes its ``kind`` ("trace" or "curves") beside the results file."""
    out = Path(out)
    return out.with_name(f"{out.stem}.{kind}.parquet")


def run_replay(config: ReplayConfig, out: str | os.PathLike | None = None) -> ReplayResult:
    """Runs the replay (see the module's docstring) and, when ``out`` is given, writes the
    results there (RESULT_SCHEMA) and the trace and simulator curves beside it.

    Raises:
        RuntimeError: Ray is already initialized in this process.
        ImportError: "serve" is asked for without ray[serve] installed.
    """
    if SERVE in config.systems:
        from ray import serve  # noqa: F401 - fail before minutes of set-up, not after
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="trims-replay-"))
        uri, options = stack.enter_context(_model_store(config.store, tmp))
        store = trims_ray.ModelStore(uri, storage_options=options)
        started = time.perf_counter()
        catalog = register_models(store, model_plan(config))
        store.register(
            WARMUP_MODEL,
            build_weights(1, 0),
            tenant="public",
            factory="workloads.bench:synthetic_1",
        )
        trace, what = make_trace(config, catalog)
        catalog_bytes = sum(m.nbytes for m in catalog)
        print(
            f"replay: {len(catalog)} models of {config.min_mb}-{config.max_mb} MiB "
            f"({catalog_bytes / MiB:.0f} MiB) registered in {config.store} in "
            f"{time.perf_counter() - started:.1f} s; trace: {trace.num_rows} requests over "
            f"{trace['time'][-1].as_py():.1f} s: {what}",
            flush=True,
        )
        nodes = stack.enter_context(
            local_cluster(config.nodes, config.cpus, config.object_store_mb)
        )
        warm = ray.remote(num_cpus=1)(_warm_worker)
        ray.get(
            [
                warm.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
                ).remote()
                for node in nodes
                for _ in range(config.cpus)
            ]
        )
        setup = _Setup(config, uri, options, tmp, nodes, catalog, _Requests.of(trace, catalog))
        tables, summaries, failures = [], [], []
        for system in config.systems:
            began = time.perf_counter()
            if system == NOCACHE:
                label, kind, policy = NOCACHE, NOCACHE, ""
                outcomes, resident = _run_nocache(setup)
            elif system == SERVE:
                label, kind, policy = (
                    f"serve (K={serve_models_per_replica(config, catalog)})",
                    SERVE,
                    "lru",
                )
                outcomes, resident = _run_serve(setup)
            else:
                label, kind, policy = f"{TRIMS}/{system}", TRIMS, system
                outcomes, resident = _run_trims(setup, system)
            tables.append(_results_table(trace, outcomes, kind, policy))
            summaries.append(_summarize(label, kind, policy, setup.requests, outcomes, resident))
            failed = [
                f"{label} request {i} ({setup.requests.models[i]}): {o.error}"
                for i, o in enumerate(outcomes)
                if not o.ok
            ]
            failures += failed
            # The driver's own lateness: if it is large, the driver, not the system, set the pace.
            late = max(o.late_s for o in outcomes)
            print(
                f"  {label}: {len(outcomes)} requests in {time.perf_counter() - began:.1f} s, "
                f"{len(failed)} failed; driver submitted at most {late * 1e3:.0f} ms late",
                flush=True,
            )
    cluster_bytes = config.nodes * config.host_bytes
    simulated = simulate_policies(trace, cluster_bytes)
    for summary in summaries:
        if summary.system == TRIMS:
            summary.simulated_hit = simulated[summary.policy].object_hit_ratio
    results = traces.validate_results(pa.concat_tables(tables))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        traces.write_results(results, out)
        traces.write_trace(trace, companion_path(out, "trace"))
        import pyarrow.parquet as pq

        pq.write_table(
            simulator_curves(trace, catalog_bytes, cluster_bytes), companion_path(out, "curves")
        )
    return ReplayResult(
        config,
        catalog,
        trace,
        results,
        summaries,
        simulated,
        serve_models_per_replica(config, catalog),
        failures,
    )


# -- the report --------------------------------------------------------------------------------


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def _goal_lines(result: ReplayResult) -> list[str]:
    summaries = result.summaries
    trims = [s for s in summaries if s.system == TRIMS and s.requests > s.failed]
    by_system = {s.system: s for s in summaries if s.system != TRIMS}
    lines = []
    best = min(trims, key=lambda s: s.p99_s) if trims else None
    for system, name, goal in ((SERVE, "Ray Serve multiplexing", 5.0), (NOCACHE, "no cache", None)):
        head = f"p99 latency, best trims_ray vs {name}"
        other = by_system.get(system)
        if best is None or other is None:
            lines.append(f"{head}: n/a ({'trims_ray' if best is None else system} not run)")
            continue
        ratio = other.p99_s / best.p99_s
        line = (
            f"{head}: {best.label} {best.p99_s * 1e3:.1f} ms vs {other.p99_s * 1e3:.1f} ms: "
            f"{ratio:.2f}x lower"
        )
        if goal:
            # Latencies are of correct answers only: a system that failed requests has not met it.
            met = ratio >= goal and best.failed == 0
            failed = f", {best.failed} requests failed" if best.failed else ""
            line += f" (goal >= {goal:g}x): {_verdict(met)}{failed}"
        lines.append(line)
    belady = result.simulated["belady"].object_hit_ratio
    budget = result.config.nodes * result.config.host_mb
    if trims:
        top = max(trims, key=_host_hits)
        share = _host_hits(top) / belady if belady else math.nan
        lines.append(
            f"hit ratio, best online policy measured ({top.label}, host hits, kept ones included) vs "
            f"Belady simulated at the same {budget} MiB: {_host_hits(top):.3f} / {belady:.3f} = {share:.2f} "
            f"(goal >= 0.90): {_verdict(share >= 0.9)}"
        )
    online = {p: r for p, r in result.simulated.items() if p in online_policies()}
    top_sim = max(online, key=lambda p: online[p].object_hit_ratio)
    share = online[top_sim].object_hit_ratio / belady if belady else math.nan
    lines.append(
        f"hit ratio, best online policy simulated ({top_sim}) vs Belady simulated: "
        f"{online[top_sim].object_hit_ratio:.3f} / {belady:.3f} = {share:.2f} (goal >= 0.90): "
        f"{_verdict(share >= 0.9)}"
    )
    total = sum(s.requests for s in summaries)
    lines.append(f"failed requests: {sum(s.failed for s in summaries)} of {total}")
    return lines


def print_report(result: ReplayResult) -> None:
    """Prints the one table (every system side by side) and the goal lines."""
    config = result.config
    rare = ("gpu", "unknown")  # columns shown only when some request had them
    tiers = [t for t in TIERS if t not in rare or any(s.tiers[t] for s in result.summaries)]
    print(
        f"\nreplay: {result.trace.num_rows} requests per system on {config.nodes} nodes of "
        f"{config.cpus} CPUs ({config.store} store); trims_ray host tier {config.host_mb} MiB per "
        f"node (disk tier {config.disk_mb} MiB, names trusted {MANIFEST_TTL_S:g} s), Serve {result.serve_models} models per replica "
        f"(x mean model {np.mean([m.nbytes for m in result.catalog]) / MiB:.1f} MiB); latency from "
        "each request's due time to its checked answer; tier columns: share of requests served "
        "from there (Serve: host = the replica held the model); sim hit: the simulator's object "
        f"hit ratio for the same trace and {config.nodes * config.host_mb} MiB in one cache"
    )

    def row(label, reqs, fail, p50, p99, rate, shares, sim, held) -> str:
        return (
            f"{label:20} {reqs:>5} {fail:>5} {p50:>9} {p99:>9} {rate:>6} "
            + " ".join(f"{x:>6}" for x in shares)
            + f" {sim:>7} {held:>9}"
        )

    header = row(
        "system", "reqs", "fail", "p50 ms", "p99 ms", "req/s", tiers, "sim hit", "MiB held"
    )
    print(header)
    print("-" * len(header))
    for s in result.summaries:
        print(
            row(
                s.label,
                s.requests,
                s.failed,
                f"{s.p50_s * 1e3:.1f}",
                f"{s.p99_s * 1e3:.1f}",
                f"{s.throughput:.2f}",
                [f"{s.tiers[t]:.3f}" for t in tiers],
                "" if s.simulated_hit is None else f"{s.simulated_hit:.3f}",
                f"{s.resident_bytes / MiB:.1f}",
            )
        )
    belady = f"{result.simulated['belady'].object_hit_ratio:.3f}"
    print(row("belady (simulated)", "", "", "", "", "", [""] * len(tiers), belady, ""))
    print("\ngoals (the issue's), measured in this run:")
    for line in _goal_lines(result):
        print(line)
    for line in result.failures[:20]:
        print(f"  FAILED {line}")
    if len(result.failures) > 20:
        print(f"  ... and {len(result.failures) - 20} more failures")


def _systems(text: str) -> tuple[str, ...]:
    """--systems: "all", or names separated by commas ("trims" stands for every online policy)."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if names == ["all"]:
        return ReplayConfig().systems
    systems: list[str] = []
    for name in names:
        systems += online_policies() if name == "trims" else [name]
    return tuple(systems)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exits 1 when a request failed or gave a wrong answer."""
    defaults = ReplayConfig()
    parser = argparse.ArgumentParser(
        prog="python -m workloads.replay", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--trace", choices=("azure", "zipf"), default=defaults.trace)
    parser.add_argument("--requests", type=int, default=defaults.requests)
    parser.add_argument(
        "--speedup", type=float, default=defaults.speedup, help="arrival times are divided by this"
    )
    parser.add_argument(
        "--rate", type=float, default=defaults.rate, help="zipf trace: Poisson arrivals per second"
    )
    parser.add_argument(
        "--zipf", type=float, default=defaults.zipf, help="Zipf exponent of model popularity"
    )
    parser.add_argument("--models", type=int, default=defaults.models)
    parser.add_argument("--min-mb", type=int, default=defaults.min_mb)
    parser.add_argument("--max-mb", type=int, default=defaults.max_mb)
    parser.add_argument("--nodes", type=int, default=defaults.nodes)
    parser.add_argument(
        "--host-mb",
        type=int,
        default=defaults.host_mb,
        help="host tier per node (and Serve's budget)",
    )
    parser.add_argument(
        "--disk-mb",
        type=int,
        default=defaults.disk_mb,
        help="disk tier per node (default 0: memory only)",
    )
    parser.add_argument("--object-store-mb", type=int, default=defaults.object_store_mb)
    parser.add_argument(
        "--systems",
        default="all",
        help=f"comma-separated: policy names ({', '.join(online_policies())}; 'trims' for all), nocache, serve",
    )
    parser.add_argument("--store", choices=("s3", "file"), default=defaults.store)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--trace-dir", default=None, help="Azure trace directory (default: the shared data)"
    )
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help=f"results Parquet (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    try:
        config = ReplayConfig(
            trace=args.trace,
            requests=args.requests,
            speedup=args.speedup,
            rate=args.rate,
            zipf=args.zipf,
            models=args.models,
            min_mb=args.min_mb,
            max_mb=args.max_mb,
            nodes=args.nodes,
            host_mb=args.host_mb,
            disk_mb=args.disk_mb,
            object_store_mb=args.object_store_mb,
            systems=_systems(args.systems),
            store=args.store,
            seed=args.seed,
            trace_dir=args.trace_dir,
        )
    except ValueError as exc:
        parser.error(str(exc))
    result = run_replay(config, args.out)
    print_report(result)
    print(f"\nresults: {args.out} (trace and simulator curves beside it)")
    return 1 if result.failures else 0


if __name__ == "__main__":
    # Run the importable module, not __main__: Ray workers and Serve replicas import the request
    # functions by their names in workloads.replay.
    from workloads import replay as _replay

    sys.exit(_replay.main())
