"""Trace-driven cache simulator: one byte budget, one eviction policy, no Ray.

It replays a trace (workloads.traces) through a policy exactly as a node cache tier uses it
(the one admission sequence, ``trims_ray.policy.decide_admission``, then evict and insert), so
hit-ratio-vs-size curves for every policy, Belady included, take seconds.
``python -m workloads.simulate curves|speed``. ``nodes`` replays a trace through several node
caches, each with its own budget and policy, with every miss sent where trims_ray's placement
routes it (``Placement.route`` on the nodes' reports), against one cache of their bytes; with
``--zoo`` it does so for the request sequence the peers benchmark sends real zoo models.
``routes`` replays a replay's requests through one cache per node, each request sent where the
measured run sent it, to tell a loss in routing from a loss in what the nodes kept.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import zlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from trims_ray.policy import (
    Outcome,
    available_policies,
    decide_admission,
    make_policy,
    policy_class,
)
from workloads import traces

__all__ = ["Requests", "SimResult", "main", "simulate", "simulate_nodes", "simulate_routes"]


@dataclass(frozen=True, eq=False)
class Requests:
    """A trace in the simulator's form: per-request lists, keys interned.

    Attributes:
        keys: Each request's key (its model).
        sizes: Each request's bytes; one size per key.
        costs: Each request's miss cost in seconds.
        times: Each request's time in seconds, non-decreasing (time-aware policies' clock).
    """

    keys: list[Hashable]
    sizes: list[int]
    costs: list[float]
    times: list[float]

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def from_table(cls, table: pa.Table) -> Requests:
        """Takes a trace table (TRACE_SCHEMA; validated); keys are model names as int codes.

        Raises:
            ValueError: If the table is not a valid trace, or a model has two sizes.
        """
        table = traces.validate_trace(table)
        codes = table["model"].combine_chunks().dictionary_encode().indices.to_numpy()
        sizes = table["size"].to_numpy()
        first = np.zeros(int(codes.max()) + 1 if len(codes) else 0, dtype=np.int64)
        first[codes] = sizes
        if (first[codes] != sizes).any():
            raise ValueError("a model appears with two different sizes in the trace")
        return cls(
            codes.tolist(),
            sizes.tolist(),
            table["cost"].to_numpy().tolist(),
            table["time"].to_numpy().tolist(),
        )

    @classmethod
    def from_keys(
        cls,
        keys: Sequence[Hashable],
        sizes: Mapping[Hashable, int],
        costs: Mapping[Hashable, float] | None = None,
        times: Sequence[float] | None = None,
    ) -> Requests:
        """A hand-made trace: keys in request order, size (and cost) per key.

        Args:
            keys: The requests.
            sizes: Bytes of each key.
            costs: Miss cost of each key in seconds (1.0 each when None).
            times: Request times (the request index when None).

        Raises:
            KeyError: If a key has no size (or no cost when costs is given).
            ValueError: If times has the wrong length.
        """
        keys = list(keys)
        if times is not None and len(times) != len(keys):
            raise ValueError(f"times has {len(times)} entries for {len(keys)} requests")
        return cls(
            keys,
            [sizes[k] for k in keys],
            [1.0 if costs is None else costs[k] for k in keys],
            [float(i) for i in range(len(keys))] if times is None else [float(t) for t in times],
        )


@dataclass(frozen=True)
class SimResult:
    """What one replay of a trace through one policy and budget measured.

    Attributes:
        policy: The policy's name.
        budget: The byte budget.
        requests: Requests replayed.
        hits: Requests whose key was resident.
        bytes_requested: Sum of every request's size.
        bytes_hit: Sum of the sizes of the hits.
        load_seconds: Sum of the misses' costs: the time spent loading (every miss loads,
            whether it is kept or not).
        evictions: Keys evicted.
        refused: Misses the policy's admission rule served without keeping.
        oversize: Misses larger than the whole budget, served without keeping (the node
            cache would raise CapacityError).
        peak_bytes: The most bytes ever resident.
    """

    policy: str
    budget: int
    requests: int
    hits: int
    bytes_requested: int
    bytes_hit: int
    load_seconds: float
    evictions: int
    refused: int
    oversize: int
    peak_bytes: int

    @property
    def object_hit_ratio(self) -> float:
        """Hits over requests (0 for an empty trace)."""
        return self.hits / self.requests if self.requests else 0.0

    @property
    def byte_hit_ratio(self) -> float:
        """Bytes served by hits over bytes requested (0 when nothing was requested)."""
        return self.bytes_hit / self.bytes_requested if self.bytes_requested else 0.0


class _Cursor:
    """The simulator's position: the clock of time-aware policies and Belady's oracle."""

    __slots__ = ("index", "now")

    def __init__(self) -> None:
        self.index = 0
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _next_use_oracle(keys: list[Hashable], cursor: _Cursor) -> Callable[[Hashable], float]:
    """Belady's oracle: the index of the current key's next request (math.inf if none)."""
    following: list[float] = [math.inf] * len(keys)
    last: dict[Hashable, int] = {}
    for i in range(len(keys) - 1, -1, -1):
        following[i] = last.get(keys[i], math.inf)
        last[keys[i]] = i

    def next_use(key: Hashable) -> float:
        i = cursor.index
        if keys[i] != key:
            raise ValueError(f"Belady asked about {key!r} while the simulator serves {keys[i]!r}")
        return following[i]

    return next_use


def simulate(trace: Requests | pa.Table, budget: int, policy: str, **policy_kwargs) -> SimResult:
    """Replays trace through a cache of budget bytes run by the named policy.

    Each request is a hit if its key is resident; otherwise it loads (its cost counts as
    load time) and, unless larger than the budget, the cache asks decide_admission whether to
    keep it and what to evict for it (the policy's admit weighs a key against its victims
    when there are any), then evicts the victims and inserts the key, as the node cache does.
    Leases are not modelled (nothing is in use between requests). The policy's clock is the
    trace's time; Belady is given the trace's future.

    Args:
        trace: Requests, or a trace table (TRACE_SCHEMA).
        budget: Cache size in bytes, >= 0.
        policy: A registered policy name (see trims_ray.policy.available_policies()).
        **policy_kwargs: Passed to the policy (e.g. admission=False); not clock or next_use.

    Returns:
        The SimResult.

    Raises:
        ValueError: On a negative budget, an unknown policy or a bad trace.
        TypeError: If budget is not an int.
    """
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"budget must be an int of bytes, got {budget!r}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0 bytes, got {budget}")
    requests = trace if isinstance(trace, Requests) else Requests.from_table(trace)
    keys, sizes, costs, times = requests.keys, requests.sizes, requests.costs, requests.times
    cursor = _Cursor()
    if policy_class(policy).offline:
        policy_kwargs["next_use"] = _next_use_oracle(keys, cursor)
    cache = make_policy(policy, clock=cursor, **policy_kwargs)
    on_access, on_insert, on_remove = cache.on_access, cache.on_insert, cache.on_remove

    resident: dict[Hashable, int] = {}
    used = peak = hits = bytes_hit = evictions = refused = oversize = 0
    load_seconds = 0.0
    for i, key in enumerate(keys):
        cursor.index = i
        cursor.now = times[i]
        size = sizes[i]
        if key in resident:
            hits += 1
            bytes_hit += size
            on_access(key)
            continue
        cost = costs[i]
        load_seconds += cost
        decision = decide_admission(
            cache, key, size, cost, budget=budget, used=used, sizes=resident
        )
        if not decision.kept:
            if decision.outcome is Outcome.TOO_BIG:
                oversize += 1
            elif decision.outcome is Outcome.REFUSED:
                refused += 1
            else:  # impossible without leases or quotas: every key is evictable
                raise RuntimeError(
                    f"no room for {size} bytes in a budget of {budget} with nothing leased"
                )
            continue
        victims = decision.victims
        for victim in victims:
            on_remove(victim)
            used -= resident.pop(victim)
        evictions += len(victims)
        on_insert(key, size, cost)
        resident[key] = size
        used += size
        peak = max(peak, used)
    return SimResult(
        policy=policy,
        budget=budget,
        requests=len(keys),
        hits=hits,
        bytes_requested=sum(sizes),
        bytes_hit=bytes_hit,
        load_seconds=load_seconds,
        evictions=evictions,
        refused=refused,
        oversize=oversize,
        peak_bytes=peak,
    )


# -- command line ------------------------------------------------------------------------------

CACHE_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # of the catalog's bytes


class _SimNode:
    """One simulated node cache: its policy, budget, resident keys and their recent uses, as a
    node cache keeps them; ``simulate_nodes`` and ``simulate_routes`` send it requests."""

    def __init__(self, policy: str, clock: Callable[[], float], budget: int) -> None:
        self.policy = make_policy(policy, clock=clock)
        self.budget = budget
        self.resident: dict[Hashable, int] = {}
        self.uses: dict[Hashable, object] = {}  # key -> RecentUses

    def request(self, key: Hashable, size: int, cost: float, now: float) -> bool:
        """Serves one request at ``now``: a hit, or a miss that is kept if admission says so
        (its victims evicted); returns whether it hit."""
        from trims_ray._protocol import RecentUses

        self.uses[key] = self.uses.get(key, RecentUses()).used(now)
        if key in self.resident:
            self.policy.on_access(key)
            return True
        decision = decide_admission(
            self.policy, key, size, cost, budget=self.budget, used=sum(self.resident.values()), sizes=self.resident
        )
        if decision.kept:
            for victim in decision.victims:
                self.policy.on_remove(victim)
                del self.resident[victim]
                self.uses.pop(victim, None)
            self.policy.on_insert(key, size, cost)
            self.resident[key] = size
        return False

    def report(self):
        """What the node cache reports to placement: residency, bytes used, and what a load
        would evict in the policy's order with recent uses (placement's keys are strings)."""
        from trims_ray._protocol import HOST
        from trims_ray.cache.placement import NodeReport

        evictable = [
            (str(key), self.resident[key], self.uses[key].count, self.uses[key].at)
            for key in self.policy.victims(lambda _key: True)
        ]
        residency = {str(key): HOST for key in self.resident}
        return NodeReport(residency, self.budget, sum(self.resident.values()), evictable=evictable)


def simulate_nodes(
    trace: Requests, nodes: int, node_budget: int, policy: str, routing: str = "placement"
) -> tuple[float, list[int]]:
    """Replays ``trace`` through ``nodes`` caches of ``node_budget`` bytes each, run by the named
    online policy; returns the hit ratio and the misses per node.

    ``routing``: "placement", each request goes where ``trims_ray.cache.placement.Placement``
    routes it, from reports the simulated nodes make as node caches do (residency, bytes used,
    what a load would evict in the policy's order with recent uses; nothing in flight), so
    that a hit goes to a holder and a miss to the node whose eviction costs least; "hash",
    each model always to the same node (a CRC of its key modulo ``nodes``, as a partition by model
    does). The policies' clock and the recent uses' wall clock are the trace's time. A model
    bigger than a node misses on no node with placement (the cluster refuses it) and on its
    node by hash (served, never kept).
    """
    from trims_ray._errors import CapacityError
    from trims_ray.cache.placement import Placement

    if routing not in ("placement", "hash"):
        raise ValueError(f"routing must be 'placement' or 'hash', got {routing!r}")
    if policy_class(policy).offline:
        raise ValueError(f"{policy} is offline: simulate_nodes runs online policies")
    cursor = _Cursor()
    names = [f"node-{i}" for i in range(nodes)]
    sims = {n: _SimNode(policy, cursor, node_budget) for n in names}
    placement = Placement(clock=cursor, wall_clock=cursor)
    for node in names:
        placement.report(node, sims[node].report())
    hits, misses = 0, dict.fromkeys(names, 0)
    for i, key in enumerate(trace.keys):
        cursor.index, cursor.now = i, trace.times[i]
        size = trace.sizes[i]
        if routing == "hash":
            node = names[zlib.crc32(str(key).encode()) % nodes]  # stable across processes
        else:
            try:
                node = placement.route(str(key), size).node
            except CapacityError:
                continue  # bigger than any node: the cluster refuses it (a miss, on no node)
        if sims[node].request(key, size, trace.costs[i], cursor.now):
            hits += 1
        else:
            misses[node] += 1
        if routing == "placement":
            placement.report(node, sims[node].report())
    return hits / len(trace) if len(trace) else 0.0, list(misses.values())


def simulate_routes(trace: Requests, nodes: Sequence[str], node_budget: int, policy: str) -> tuple[float, dict[str, int]]:
    """Replays ``trace`` with request i sent to ``nodes[i]`` (where a measured run sent it)
    through one cache of ``node_budget`` bytes per node, run by the named online policy;
    returns the hit ratio and the misses per node. Set beside the run's measured hit ratio and
    ``simulate_nodes``' routed one, it tells a loss in where requests went (the routes) from a
    loss in what the nodes kept of them (their timing: concurrency, reports a moment old).

    Raises:
        ValueError: ``nodes`` is not one node per request, or the policy is offline.
    """
    if len(nodes) != len(trace):
        raise ValueError(f"{len(nodes)} nodes for {len(trace)} requests: one node per request")
    if policy_class(policy).offline:
        raise ValueError(f"{policy} is offline: simulate_routes runs online policies")
    cursor = _Cursor()
    sims = {node: _SimNode(policy, cursor, node_budget) for node in dict.fromkeys(nodes)}
    hits, misses = 0, dict.fromkeys(sims, 0)
    for i, (key, node) in enumerate(zip(trace.keys, nodes)):
        cursor.index, cursor.now = i, trace.times[i]
        if sims[node].request(key, trace.sizes[i], trace.costs[i], cursor.now):
            hits += 1
        else:
            misses[node] += 1
    return hits / len(trace) if len(trace) else 0.0, misses


def zoo_requests(names: Sequence[str], requests: int, *, seed: int, zipf: float = 1.0, per_s: float = 8.0) -> Requests:
    """The requests ``python -m workloads.bench peers --zoo NAMES`` sends, as the simulator sees
    them: every model once (the untimed warm-up, in order), then ``requests`` drawn by the same
    seeded Zipf (``workloads.peers.zipf_sequence``), ``per_s`` a second. Sizes are the weights'
    bytes (4 a parameter) with the host tier's guard pages; a miss costs what placement assumes a
    store load costs (its fixed overhead and the bytes at the assumed store rate)."""
    from trims_ray._protect import GUARD_BYTES
    from trims_ray._protocol import ASSUMED_LOAD_RATES, STORE
    from trims_ray.cache.placement import Placement
    from workloads.peers import zipf_sequence

    sizes = {i: nbytes + 2 * GUARD_BYTES for i, nbytes in enumerate(zoo_weight_bytes(names))}
    costs = {i: Placement.load_overhead_s + size / ASSUMED_LOAD_RATES[STORE] for i, size in sizes.items()}
    keys = list(range(len(names))) + zipf_sequence(len(names), requests, exponent=zipf, seed=seed)
    return Requests.from_keys(keys, sizes, costs, [i / per_s for i in range(len(keys))])


def zoo_weight_bytes(names: Sequence[str]) -> list[int]:
    """Each zoo model's weights in bytes (4 a parameter), without building it."""
    from workloads.zoo import zoo_model

    return [4 * zoo_model(name).params for name in names]


def zoo_node_budget(names: Sequence[str], cache_models: int) -> int:
    """A node's host tier in the peers benchmark for these zoo models (its ``memory_per_node``)."""
    from workloads.peers import memory_per_node

    return memory_per_node(zoo_weight_bytes(names), cache_models)[1]


def _zoo_nodes(args: argparse.Namespace) -> int:
    names = [n for n in args.zoo.split(",") if n]
    if len(names) < 2 or min(args.cache_models, args.requests, args.seeds, args.nodes) < 1:
        print("--zoo needs two model names or more, and --cache-models, --requests, --seeds and --nodes >= 1", file=sys.stderr)
        return 2
    budget = zoo_node_budget(names, args.cache_models)
    print(
        f"the peers benchmark's zoo requests ({', '.join(names)}: each once, then {args.requests} by "
        f"Zipf 1, seeds 0-{args.seeds - 1}); {args.nodes} nodes of {budget / 2**20:.0f} MiB "
        f"({args.cache_models} models of the mean size) against one cache of their bytes; object hit ratio, mean over the seeds:"
    )
    print(f"{'policy':<8} {'one cache':>10} {'placement':>10} {'by hash':>8}  placement per seed")
    seeded = [zoo_requests(names, args.requests, seed=seed) for seed in range(args.seeds)]
    for policy in args.policies.split(","):
        one, routed, hashed = [], [], []
        for trace in seeded:
            one.append(simulate(trace, args.nodes * budget, policy).object_hit_ratio)
            routed.append(simulate_nodes(trace, args.nodes, budget, policy, "placement")[0])
            hashed.append(simulate_nodes(trace, args.nodes, budget, policy, "hash")[0])
        per_seed = " ".join(f"{h:.3f}" for h in routed)
        print(f"{policy:<8} {np.mean(one):>10.3f} {np.mean(routed):>10.3f} {np.mean(hashed):>8.3f}  {per_seed}")
    return 0


def _replay_trace(path: str) -> Requests | None:
    """The replay's trace at ``path`` with sizes as the host tier counts them (guard pages
    included, as the replay's simulation does); None, said on stderr, when there is none."""
    import pyarrow.parquet as pq

    from trims_ray._protect import GUARD_BYTES

    try:
        table = traces.validate_trace(pq.read_table(path))
    except FileNotFoundError:
        print(
            f"no trace at {path}: run `python -m workloads.replay` first (it writes one beside "
            "its results), or name a trace Parquet with --trace",
            file=sys.stderr,
        )
        return None
    sizes = pa.compute.add(table["size"], 2 * GUARD_BYTES)
    return Requests.from_table(table.set_column(table.schema.get_field_index("size"), "size", sizes))


def _nodes(args: argparse.Namespace) -> int:
    if args.zoo:
        return _zoo_nodes(args)
    requests = _replay_trace(args.trace)
    if requests is None:
        return 2
    node_budget = args.node_mb << 20
    total = args.nodes * node_budget
    belady = simulate(requests, total, "belady").object_hit_ratio
    print(
        f"{len(requests)} requests of {args.trace}; {args.nodes} nodes of {args.node_mb} MiB against "
        f"one cache of {args.nodes * args.node_mb} MiB (Belady there: {belady:.3f}); object hit ratio:"
    )
    print(f"{'policy':<8} {'one cache':>10} {'placement':>10} {'by hash':>8}  misses per node (placement)")
    for policy in args.policies.split(","):
        one = simulate(requests, total, policy).object_hit_ratio
        routed, per_node = simulate_nodes(requests, args.nodes, node_budget, policy, "placement")
        hashed, _ = simulate_nodes(requests, args.nodes, node_budget, policy, "hash")
        print(f"{policy:<8} {one:>10.3f} {routed:>10.3f} {hashed:>8.3f}  {per_node}")
    return 0


def _routes(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    trace_path = args.trace or args.results.removesuffix(".parquet") + ".trace.parquet"
    requests = _replay_trace(trace_path)
    if requests is None:
        return 2
    try:
        rows = traces.validate_results(pq.read_table(args.results)).to_pylist()
    except FileNotFoundError:
        print(f"no results at {args.results}: run `python -m workloads.replay` first, or name them with --results", file=sys.stderr)
        return 2
    node_budget = args.node_mb << 20
    runs: dict[str, list[dict]] = {}
    for row in rows:
        if row["system"] == "trims_ray":
            runs.setdefault(row["policy"], []).append(row)
    if not runs:
        print(f"{args.results} has no trims_ray requests", file=sys.stderr)
        return 2
    print(
        f"routes: each trims_ray run of {args.results} replayed through one cache of {args.node_mb} MiB "
        f"per node, every request sent where that run sent it ({trace_path}); object hit ratio:"
    )
    print(f"{'policy':<8} {'measured':>9} {'its routes':>11} {'placement':>10} {'one cache':>10}  misses per node (its routes)")
    for policy, run in sorted(runs.items()):
        run.sort(key=lambda row: row["request_id"])
        ids = [row["request_id"] for row in run]
        if ids != list(range(len(requests))):
            print(f"{policy}: its requests are not the trace's {len(requests)}, in order: skipped", file=sys.stderr)
            continue
        nodes = [row["node"] for row in run]
        measured = sum(row["tier"] in traces.HOST_HIT_TIERS for row in run) / len(run)
        routed, misses = simulate_routes(requests, nodes, node_budget, policy)
        count = len(set(nodes))
        placed, _ = simulate_nodes(requests, count, node_budget, policy, "placement")
        one = simulate(requests, count * node_budget, policy).object_hit_ratio
        print(f"{policy:<8} {measured:>9.3f} {routed:>11.3f} {placed:>10.3f} {one:>10.3f}  {list(misses.values())}")
    return 0


def _workloads(
    n_requests: int, seed: int, trace_dir: str | None
) -> list[tuple[str, str, pa.Table, int]]:
    """The three workloads of the curves: (name, description, trace, catalog bytes)."""
    zoo = traces.zoo_catalog(200, seed=seed)
    heavy = traces.pareto_catalog(200, seed=seed)
    out = [
        (
            "zipf",
            (
                f"Zipf 0.9 popularity over 200 zoo-size models ({zoo.total_bytes / 1e9:.1f} GB), "
                f"Poisson arrivals, {n_requests} requests"
            ),
            traces.synthetic_trace(n_requests, zoo, seed=seed, exponent=0.9),
            zoo.total_bytes,
        ),
        (
            "pareto",
            (
                f"Pareto popularity and Pareto sizes (200 models, {heavy.total_bytes / 1e9:.1f} "
                f"GB), bursty on/off arrivals, {n_requests} requests"
            ),
            traces.synthetic_trace(
                n_requests, heavy, seed=seed, popularity_kind="pareto", arrivals="onoff"
            ),
            heavy.total_bytes,
        ),
    ]
    try:
        azure = traces.azure_trace(zoo, seed=seed, trace_dir=trace_dir)
    except FileNotFoundError as exc:
        print(f"azure workload skipped: {exc}")
    else:
        out.append(
            (
                "azure",
                (
                    f"real Azure LLM arrivals (conv + code, {azure.num_rows} requests, "
                    f"{azure['time'][-1].as_py() / 60:.0f} min), each service a tenant with its "
                    f"own seeded Zipf 0.9 over the 200 zoo-size models. "
                    f"Data: {traces.AZURE_ATTRIBUTION}"
                ),
                azure,
                zoo.total_bytes,
            )
        )
    return out


def _curves(args: argparse.Namespace) -> int:
    # Every policy, plus GDSF and cost-aware with admission off, to show what admission does.
    variants = [(name, name, {}) for name in available_policies()]
    for name in ("cost", "gdsf"):
        at = next(i for i, v in enumerate(variants) if v[0] == name)
        variants.insert(at + 1, (f"{name}-na", name, {"admission": False}))
    started = time.perf_counter()
    print(
        "hit ratio vs cache size (cache: share of the catalog's bytes). belady is offline; "
        "-na: admission off"
    )
    for name, description, table, catalog_bytes in _workloads(
        args.requests, args.seed, args.trace_dir
    ):
        requests = Requests.from_table(table)
        no_cache = sum(requests.costs)
        rows = []
        for fraction in CACHE_FRACTIONS:
            budget = int(fraction * catalog_bytes)
            results = {
                label: simulate(requests, budget, policy, **kw) for label, policy, kw in variants
            }
            rows.append((fraction, budget, results))
        print(f"\n== {name}: {description}")
        for title, metric in (
            ("object hit ratio", lambda r: f"{r.object_hit_ratio:.3f}"),
            ("byte hit ratio", lambda r: f"{r.byte_hit_ratio:.3f}"),
            (
                "load time, share of no cache's",
                lambda r, base=no_cache: f"{r.load_seconds / base:.3f}",
            ),
            ("admissions refused", lambda r: f"{r.refused}"),
        ):
            print(f"{title}:")
            print(f"{'cache':>6} {'GB':>6} " + " ".join(f"{label:>7}" for label, _, _ in variants))
            for fraction, budget, results in rows:
                cells = " ".join(f"{metric(results[label]):>7}" for label, _, _ in variants)
                print(f"{fraction:>6.0%} {budget / 1e9:>6.1f} {cells}")
    print(f"\n{len(variants)} variants, seed {args.seed}, in {time.perf_counter() - started:.1f} s")
    return 0


def _speed(args: argparse.Namespace) -> int:
    catalog = traces.zoo_catalog(200, seed=args.seed)
    table = traces.synthetic_trace(args.requests, catalog, seed=args.seed, exponent=0.9)
    budget = int(0.1 * catalog.total_bytes)
    start = time.perf_counter()
    requests = Requests.from_table(table)
    prepare = time.perf_counter() - start
    print(
        f"{args.requests} requests (Zipf 0.9 over 200 zoo-size models), cache 10% of "
        f"{catalog.total_bytes / 1e9:.1f} GB, one core; trace to lists once: {prepare:.2f} s"
    )
    print(f"{'policy':<8} {'seconds':>8} {'requests/s':>11} {'obj hit':>8} {'goal < 60 s':>12}")
    for policy in available_policies():
        start = time.perf_counter()
        result = simulate(requests, budget, policy)
        seconds = time.perf_counter() - start
        verdict = "met" if seconds < 60 else "NOT met"
        print(
            f"{policy:<8} {seconds:>8.3f} {args.requests / seconds:>11,.0f} "
            f"{result.object_hit_ratio:>8.3f} {verdict:>12}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``curves`` (hit ratio vs cache size) or ``speed`` (1M requests)."""
    parser = argparse.ArgumentParser(prog="python -m workloads.simulate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    curves = sub.add_parser("curves", help="hit ratio vs cache size, every policy, three workloads")
    curves.add_argument("--requests", type=int, default=100_000, help="per synthetic workload")
    curves.add_argument("--seed", type=int, default=0)
    curves.add_argument(
        "--trace-dir", default=None, help="Azure trace directory (default: shared data)"
    )
    speed = sub.add_parser("speed", help="time 1M requests through every policy")
    speed.add_argument("--requests", type=int, default=1_000_000)
    speed.add_argument("--seed", type=int, default=0)
    nodes = sub.add_parser("nodes", help="a trace through several node caches routed by placement")
    nodes.add_argument(
        "--trace", default="results/replay.trace.parquet", help="a trace Parquet (default: the replay's)"
    )
    nodes.add_argument("--nodes", type=int, default=3)
    nodes.add_argument("--node-mb", type=int, default=32, help="host tier per node, MiB (default 32)")
    nodes.add_argument("--policies", default="gdsf,cost,lru,lfu,fifo")
    nodes.add_argument(
        "--zoo", default="", help="zoo model names: the peers benchmark's requests for them instead of a trace"
    )
    nodes.add_argument("--cache-models", type=int, default=2, help="with --zoo: host tier per node, in models")
    nodes.add_argument("--requests", type=int, default=300, help="with --zoo: requests after the warm-up")
    nodes.add_argument("--seeds", type=int, default=12, help="with --zoo: seeds 0 to N-1, averaged")
    routes = sub.add_parser(
        "routes", help="a replay's requests through one cache per node, each sent where the run sent it"
    )
    routes.add_argument("--results", default="results/replay.parquet", help="a replay's results Parquet")
    routes.add_argument("--trace", default=None, help="its trace (default: the one beside the results)")
    routes.add_argument("--node-mb", type=int, default=32, help="host tier per node, MiB (default 32)")
    args = parser.parse_args(argv)
    return {"curves": _curves, "speed": _speed, "nodes": _nodes, "routes": _routes}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
