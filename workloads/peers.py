"""The peers benchmark (docs/benchmarks.md: peers): one multi-model workload through trims_ray
and what a Ray user would pick instead (workloads.peers_systems: Ray Serve multiplexing, an LRU
actor per node, no cache), side by side in one run, same memory per node and same CPUs.

    python -m workloads.bench peers [--models 12] [--mb 100 | --zoo resnet50,bert_base]
        [--requests 400] [--clients 2] [--cache-models 4] [--regimes warm,cold] [--nodes 1,3]
    python -m workloads.bench peers --sweep [--sweep-mb 10,100,1000] [--calls 100]

Requests name models drawn from a seeded Zipf popularity and come from closed-loop clients (each
sends its next request when its last is answered); every answer's checksum is compared with one
computed in the driver. Regimes: "warm" (every blob read once before the run) and "cold" (the
blob's page cache dropped before every request). Nodes: 1 node of 2 CPUs, or n nodes of 1 CPU
(``ray.cluster_utils.Cluster``). ``--sweep``: the hit overhead of a decorated call against a plain
task, for one resident model of each size (the approach of ``bench overhead``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

import trims_ray
from trims_ray._protect import GUARD_BYTES
from workloads import bench, local_ray
from workloads.bench import MiB, _ms
from workloads.peers_systems import (
    NOCACHE,
    SERVE,
    SYSTEMS,
    TRIMS,
    Answer,
    ModelSpec,
    Setup,
    forward_checksum,
    serving,
)

__all__ = ["PeersConfig", "SystemRow", "goal_lines", "main", "run_peers", "zipf_sequence"]

REGIMES = ("warm", "cold")
SYSTEM_ORDER = ("serve", "lru", "nocache", "trims")


@dataclass(frozen=True, kw_only=True)
class PeersConfig:
    """One invocation of the benchmark; raises ValueError on nonsense."""

    models: int = 12
    mb: int = 100
    zoo: tuple[str, ...] = ()  # zoo models instead of synthetic MLPs
    requests: int = 400
    clients: int = 2
    cache_models: int = 4  # memory per node, in models
    zipf: float = 1.0
    seed: int = 0
    regimes: tuple[str, ...] = REGIMES
    nodes: tuple[int, ...] = (1, 3)
    systems: tuple[str, ...] = SYSTEM_ORDER
    timeout_s: float = 120.0
    directory: str | None = None
    policy: str = trims_ray.CacheConfig.policy  # trims_ray's host-tier policy: its default unless chosen
    # CPUs each trims_ray task asks Ray for: 0.5 runs two invocations at once per CPU, as a Serve
    # replica runs several requests in threads.
    trims_cpus: float = 1.0

    def __post_init__(self) -> None:
        for label in ("models", "mb", "requests", "clients", "cache_models"):
            value = getattr(self, label)
            if type(value) is not int or value < 1:
                raise ValueError(f"--{label.replace('_', '-')} must be an integer >= 1, got {value!r}")
        catalog = len(self.zoo) or self.models
        if self.cache_models >= catalog:
            raise ValueError(f"--cache-models {self.cache_models} holds the whole catalog of {catalog}: nothing would miss")
        bad = [r for r in self.regimes if r not in REGIMES]
        if bad or not self.regimes:
            raise ValueError(f"--regimes: unknown {bad}; choose from {', '.join(REGIMES)}")
        if not self.nodes or any(type(n) is not int or not 1 <= n <= 8 for n in self.nodes):
            raise ValueError(f"--nodes must be node counts from 1 to 8, got {list(self.nodes)}")
        bad = [s for s in self.systems if s not in SYSTEMS]
        if bad or not self.systems:
            raise ValueError(f"--systems: unknown {bad}; choose from {', '.join(SYSTEMS)}")
        if not (self.zipf >= 0 and self.timeout_s > 0):
            raise ValueError("--zipf must be >= 0 and the timeout > 0")
        if not 0 < self.trims_cpus <= 1:
            # Above one CPU a three-node run (1 CPU a node) could never schedule the task.
            raise ValueError(f"--trims-cpus must be > 0 and <= 1, got {self.trims_cpus!r}")
        from trims_ray.policy import online_policies

        if self.policy not in online_policies():
            raise ValueError(f"--policy: unknown {self.policy!r}; choose from {', '.join(online_policies())}")
        if self.zoo:
            from workloads.zoo import ZOO

            unknown = [z for z in self.zoo if z not in ZOO]
            if unknown:
                raise ValueError(f"--zoo: unknown models {unknown}; known: {', '.join(ZOO)}")


def cpus_per_node(nodes: int) -> int:
    """One node gets the machine's two CPUs; several nodes get one each."""
    return 2 if nodes == 1 else 1


def zipf_sequence(models: int, requests: int, *, exponent: float, seed: int) -> list[int]:
    """Model indices of ``requests`` requests: model i is drawn with weight 1 / (i + 1)^exponent."""
    weights = 1.0 / np.arange(1, models + 1) ** exponent
    rng = np.random.default_rng([seed, 7])
    return [int(i) for i in rng.choice(models, size=requests, p=weights / weights.sum())]


# -- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    latency_s: float
    answer: Answer | None
    ok: bool
    error: str = ""


@dataclass
class SystemRow:
    """One system's line of a regime's table (latencies of right answers only)."""

    system: str
    requests: int
    wrong: int
    failed: int
    p50_s: float
    p90_s: float
    p99_s: float
    throughput: float  # right answers per second of the run
    hit_ratio: float | None  # None: the system holds nothing
    load_s: float  # means over answered requests, measured in the serving process
    forward_s: float
    e2e_s: float
    tiers: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    held_bytes: int | None = None  # the most model bytes its serving processes said they held

    @property
    def label(self) -> str:
        return SYSTEMS[self.system]


def summarize(system: str, outcomes: Sequence[Outcome], wall_s: float) -> SystemRow:
    answered = [o for o in outcomes if o.answer is not None]
    right = np.array([o.latency_s for o in outcomes if o.ok] or [math.nan])

    def mean(values: list[float]) -> float:
        return statistics.fmean(values) if values else math.nan

    return SystemRow(
        system=system,
        requests=len(outcomes),
        wrong=sum(o.answer is not None and not o.ok for o in outcomes),
        failed=len(outcomes) - len(answered),
        p50_s=float(np.percentile(right, 50)),
        p90_s=float(np.percentile(right, 90)),
        p99_s=float(np.percentile(right, 99)),
        throughput=int(np.isfinite(right).sum()) / wall_s if wall_s > 0 else 0.0,
        hit_ratio=None if system == NOCACHE else mean([float(o.answer.hit) for o in answered]),
        load_s=mean([o.answer.load_s for o in answered]),
        forward_s=mean([o.answer.forward_s for o in answered]),
        e2e_s=mean([o.latency_s for o in answered]),
        tiers=dict(Counter(o.answer.tier for o in answered)),
        errors=[o.error for o in outcomes if o.error][:5],
        held_bytes=max((o.answer.held_bytes for o in answered if o.answer.held_bytes is not None), default=None),
    )


def verdict(met: bool) -> str:
    return "MET" if met else "NOT MET"


def goal_lines(rows: Sequence[SystemRow], *, regime: str, nodes: int) -> list[str]:
    """The goal lines printed under a table, from the numbers in it."""
    by = {r.system: r for r in rows}
    trims, peers = by.get(TRIMS), [r for r in rows if r.system != TRIMS]
    if trims is None or not peers:
        return ["GOAL: n/a (trims_ray and at least one peer must run)"]
    flawed = trims.wrong + trims.failed
    if flawed == trims.requests:
        return [f"GOAL: n/a (no right trims_ray answer: {trims.wrong} wrong, {trims.failed} failed)"]
    note = f" ({flawed} trims_ray requests wrong or failed)" if flawed else ""
    lines = []
    for name, attr in (("p50", "p50_s"), ("p99", "p99_s")):
        best = min(peers, key=lambda r: getattr(r, attr))
        ours, theirs = getattr(trims, attr), getattr(best, attr)
        lines.append(
            f"GOAL {name}: trims_ray {_ms(ours):.1f} ms vs best peer ({best.label}) {_ms(theirs):.1f} ms: "
            f"{ours / theirs:.2f}x, {verdict(ours <= theirs and not flawed)}{note}"
        )
    best = max(peers, key=lambda r: r.throughput)
    ratio = trims.throughput / best.throughput if best.throughput else math.inf
    lines.append(
        f"GOAL throughput: trims_ray {trims.throughput:.2f} req/s vs best peer ({best.label}) "
        f"{best.throughput:.2f} req/s: {ratio:.2f}x, {verdict(ratio >= 1 and not flawed)}{note}"
    )
    serve = by.get(SERVE)
    if (regime == "cold" or nodes > 1) and serve is not None:
        lower = serve.p99_s / trims.p99_s
        lines.append(
            f"GOAL p99 vs Serve ({regime}, {nodes} node{'s' if nodes > 1 else ''}): trims_ray {_ms(trims.p99_s):.1f} ms "
            f"vs {serve.label} {_ms(serve.p99_s):.1f} ms: {lower:.2f}x lower (goal >= 2x), {verdict(lower >= 2 and not flawed)}{note}"
        )
    return lines


def print_table(rows: Sequence[SystemRow], *, title: str, regime: str, nodes: int) -> None:
    print(f"\n{title}")
    header = (
        f"{'system':14} {'ok':>5} {'wrong':>5} {'fail':>4} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'req/s':>7} {'hit':>5} {'load ms':>8} {'fwd ms':>8} {'other ms':>8}"
    )
    print(header)
    print("-" * len(header))
    def ms(seconds: float) -> str:
        return "-" if math.isnan(seconds) else f"{_ms(seconds):.1f}"

    for r in rows:
        hit = "-" if r.hit_ratio is None or math.isnan(r.hit_ratio) else f"{r.hit_ratio:.2f}"
        other = r.e2e_s - r.load_s - r.forward_s
        print(
            f"{r.label:14} {r.requests - r.wrong - r.failed:>5} {r.wrong:>5} {r.failed:>4} {ms(r.p50_s):>8} "
            f"{ms(r.p90_s):>8} {ms(r.p99_s):>8} {r.throughput:>7.2f} {hit:>5} {ms(r.load_s):>8} "
            f"{ms(r.forward_s):>8} {ms(other):>8}"
        )
    for r in rows:
        if r.system == TRIMS:
            tiers = ", ".join(f"{t} {n}" for t, n in sorted(r.tiers.items()))
            print(f"trims_ray tiers served: {tiers or 'none (no answer)'}")
        for error in r.errors:
            print(f"  {r.label}: {error}")
    held = [f"{r.label} {r.held_bytes / MiB:.1f} MiB" for r in rows if r.held_bytes is not None]
    if held:  # trims_ray's host tier is held to its budget by the node's cache (invariant 3)
        print(f"most model bytes one serving process held (memory per node above): {', '.join(held)}")
    for line in goal_lines(rows, regime=regime, nodes=nodes):
        print(line)


# -- the run ------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    exc = cause if isinstance(cause, BaseException) else exc
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


async def _closed_loop(specs: Sequence[ModelSpec], clients: int, submit, before: Callable, expected: dict[str, float], timeout_s: float) -> tuple[list[Outcome], float]:
    """Runs the requests from ``clients`` closed-loop clients sharing one queue; returns the
    outcomes in request order and the run's wall seconds."""
    queue = iter(range(len(specs)))
    outcomes: list[Outcome | None] = [None] * len(specs)

    async def client() -> None:
        for i in queue:  # each client takes the next request when its last one is answered
            spec = specs[i]
            before(spec)
            started = time.perf_counter()
            try:
                answer = await asyncio.wait_for(submit(spec), timeout_s)
            except Exception as exc:  # noqa: BLE001 - counted and reported; none stops the run
                outcomes[i] = Outcome(time.perf_counter() - started, None, False, _describe(exc))
                continue
            latency = time.perf_counter() - started
            ok = answer.checksum == expected[spec.name]
            error = "" if ok else f"{spec.name}: checksum {answer.checksum!r}, expected {expected[spec.name]!r}"
            outcomes[i] = Outcome(latency, answer, ok, error)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return outcomes, time.perf_counter() - started


@dataclass
class Catalog:
    specs: list[ModelSpec]
    expected: dict[str, float]
    what: str


def _register(config: PeersConfig, store_dir: str) -> Catalog:
    """Registers the catalog with trims_ray's public API (into the local store directory) and
    computes each model's expected checksum on one thread in the driver."""
    trims_ray.init(store_dir, config=trims_ray.CacheConfig(disk_bytes=0, disk_dir=os.path.join(os.path.dirname(store_dir), "disk")))
    store = trims_ray.ModelStore(store_dir)
    specs, expected = [], {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        entries = list(config.zoo) or [f"peer-{i:02d}" for i in range(config.models)]
        for i, name in enumerate(entries):
            if config.zoo:
                from workloads import zoo

                module, factory, width, kind = zoo.build(name, seed=i), zoo.zoo_model(name).factory, 0, name
            else:
                with torch.random.fork_rng():
                    torch.manual_seed(config.seed * 1000 + i)
                    module = bench.synthetic(config.mb)()
                factory, width, kind = f"workloads.bench:synthetic_{config.mb}", bench.synthetic_shape(config.mb)[0], None
            info = trims_ray.register(name, module, factory=factory)
            manifest = store.manifest(name, tenant=info.tenant)
            spec = ModelSpec(name, store.blob_path(info.sha256), manifest.factory, tuple(manifest.aliases.items()), info.nbytes, seed=i, zoo=kind, width=width)
            specs.append(spec)
            expected[name] = forward_checksum(module.eval(), spec)
            del module
    finally:
        torch.set_num_threads(threads)
        trims_ray.shutdown()
    if config.zoo:
        what = ", ".join(f"{s.name} {s.nbytes / MiB:.0f} MiB" for s in specs)
    else:
        width, layers = bench.synthetic_shape(config.mb)
        what = f"{config.models} synthetic MLPs of {layers} x Linear({width}, {width}), {specs[0].nbytes / MiB:.1f} MiB each"
    return Catalog(specs, expected, what)


@dataclass
class RegimeResult:
    regime: str
    nodes: int
    cpus: int
    rows: list[SystemRow]


def memory_per_node(sizes: Sequence[int], cache_models: int) -> tuple[int, int]:
    """(bytes, trims_ray's host tier) of one node's memory for models of ``sizes`` bytes:
    ``cache_models`` models of the mean size, and at least the largest model (the LRU actor's
    bytes; Serve's cap is the count); trims_ray's host tier adds two guard pages a model."""
    budget = max(int(cache_models * statistics.fmean(sizes)), max(sizes))
    return budget, budget + cache_models * 2 * GUARD_BYTES


def _largest_estimate(config: PeersConfig) -> int:
    """Bytes of the largest model before it is built (to size the object store)."""
    if not config.zoo:
        return bench._host_need(config.mb)
    from workloads.zoo import ZOO

    return max(4 * ZOO[name].params for name in config.zoo) * 11 // 10 + 2 * MiB


def run_peers(config: PeersConfig, *, report: Callable[[RegimeResult, str], None] | None = None) -> list[RegimeResult]:
    """Runs every (node count, regime) of ``config``; ``report`` is called with each result and
    its table's title as soon as it is measured."""
    results: list[RegimeResult] = []
    catalog: Catalog | None = None
    # The object store holds trims_ray's host tier (cache_models models) and as much again for
    # task arguments, results and a miss the full host tier cannot keep.
    object_store = 2 * config.cache_models * _largest_estimate(config) + 256 * MiB
    with tempfile.TemporaryDirectory(prefix="trims-peers-", dir=config.directory) as tmp:
        store_dir = os.path.join(tmp, "store")
        for nodes in config.nodes:
            cpus = cpus_per_node(nodes)
            with local_ray.own_ray(nodes, cpus, object_store) as node_ids:
                if catalog is None:  # registration needs a Ray (trims_ray.init): the first one
                    started = time.perf_counter()
                    catalog = _register(config, store_dir)
                    print(f"peers: registered {catalog.what} in {time.perf_counter() - started:.1f} s", flush=True)
                budget, host = memory_per_node([s.nbytes for s in catalog.specs], config.cache_models)
                setup = Setup(
                    node_ids, cpus, store_dir, tmp, {s.name: s for s in catalog.specs}, config.cache_models, budget, host,
                    policy=config.policy, trims_cpus=config.trims_cpus,
                )  # fmt: skip
                order = zipf_sequence(len(catalog.specs), config.requests, exponent=config.zipf, seed=config.seed)
                timed = [catalog.specs[i] for i in order]
                for regime in config.regimes:
                    rows = [_run_system(system, setup, catalog, timed, regime, config) for system in SYSTEM_ORDER if system in config.systems]
                    result = RegimeResult(regime, nodes, cpus, rows)
                    results.append(result)
                    if report is not None:
                        report(result, _title(result, config, catalog, setup))
    return results


def _run_system(system: str, setup: Setup, catalog: Catalog, timed: list[ModelSpec], regime: str, config: PeersConfig) -> SystemRow:
    if regime == "warm":
        for spec in catalog.specs:
            bench.warm_page_cache(spec.path)

    def before(spec: ModelSpec) -> None:
        if regime == "cold":  # standing in for a cloud store or a fresh node
            bench.drop_page_cache(spec.path)

    began = time.perf_counter()
    with serving(system, setup) as submit:
        # Untimed warm-up: every model once, through the same clients: processes started,
        # memory touched once, each cache in the state the workload leaves it.
        asyncio.run(_closed_loop(catalog.specs, config.clients, submit, before, catalog.expected, config.timeout_s))
        outcomes, wall = asyncio.run(_closed_loop(timed, config.clients, submit, before, catalog.expected, config.timeout_s))
    row = summarize(system, outcomes, wall)
    print(f"  {regime}, {len(setup.nodes)} node(s): {row.label}: {len(outcomes)} requests in {wall:.1f} s ({time.perf_counter() - began:.1f} s with start and warm-up), {row.wrong} wrong, {row.failed} failed", flush=True)
    return row


def _title(r: RegimeResult, config: PeersConfig, catalog: Catalog, setup: Setup) -> str:
    regime = "warm page cache" if r.regime == "warm" else "cold: the blob's page cache dropped before every request"
    shards = f" (the LRU actor on node i mod {r.nodes} serves model i)" if r.nodes > 1 else ""
    text = (
        f"peers: {regime}; {r.nodes} node(s) x {r.cpus} CPU(s){shards}; {catalog.what}; Zipf {config.zipf:g} (seed {config.seed}); "
        f"{config.requests} requests from {config.clients} closed-loop clients after an untimed warm-up of each model once; "
        f"memory per node {config.cache_models} models ({setup.budget_bytes / MiB:.0f} MiB: Serve {config.cache_models} per replica, "
        f"LRU actor bytes, trims_ray host tier + guard pages; trims_ray's policy {config.policy}); "
        f"trims_ray tasks ask for {config.trims_cpus:g} CPU; Ray's object store "
        "preallocated; ms end to end from the "
        "driver; load/fwd: means measured in the "
        "serving process (load: request start there to a usable module; an mmap reads its pages in the forward); "
        "other: mean end to end - load - fwd (scheduling, queueing, transfer)"
    )
    return textwrap.fill(text, width=110)


# -- command line --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The peers sub-command's arguments (workloads.bench wires them)."""
    d = PeersConfig()
    parser.add_argument("--models", type=int, default=d.models, help=f"synthetic models (default {d.models})")
    parser.add_argument("--mb", type=int, default=d.mb, help=f"MiB per synthetic model (default {d.mb})")
    parser.add_argument("--zoo", default="", help="comma-separated zoo models instead of synthetic MLPs (e.g. resnet50,bert_base)")
    parser.add_argument("--requests", type=int, default=d.requests, help=f"timed requests per system and regime (default {d.requests})")
    parser.add_argument("--clients", type=int, default=d.clients, help=f"closed-loop clients (default {d.clients})")
    parser.add_argument("--cache-models", type=int, default=d.cache_models, help=f"memory per node, in models (default {d.cache_models})")
    parser.add_argument("--zipf", type=float, default=d.zipf, help=f"Zipf exponent of popularity (default {d.zipf:g})")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--regimes", default=",".join(d.regimes), help="warm, cold or both (default warm,cold)")
    parser.add_argument("--nodes", default="1,3", help="node counts to run, comma-separated (default 1,3)")
    parser.add_argument("--systems", default=",".join(d.systems), help=f"subset of {','.join(SYSTEMS)} (default all)")
    parser.add_argument("--timeout-s", type=float, default=d.timeout_s, help="a request not answered by then fails")
    parser.add_argument("--dir", default=None, help="directory for the store (default: system temp)")
    parser.add_argument(
        "--trims-cpus", type=float, default=d.trims_cpus,
        help=f"CPUs each trims_ray task asks Ray for (default {d.trims_cpus:g}; 0.5 runs two invocations at once per CPU)",
    )  # fmt: skip
    parser.add_argument("--policy", default=d.policy, help=f"trims_ray's host-tier policy, CacheConfig.policy (default {d.policy})")
    parser.add_argument("--sweep", action="store_true", help="measure the hit overhead by model size instead")
    parser.add_argument("--sweep-mb", default="10,100,1000", help="sweep sizes in MiB (default 10,100,1000)")
    parser.add_argument("--calls", type=int, default=100, help="sweep: timed calls of each kind per size (default 100)")


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _ints(parser: argparse.ArgumentParser, flag: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in _names(text))
    except ValueError:
        parser.error(f"{flag} must be integers separated by commas, got {text!r}")
    if not values or min(values) < 1:
        parser.error(f"{flag} must be positive integers, got {text!r}")
    return values


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Runs the sub-command; exits 1 when an answer was wrong or a request failed."""
    if args.sweep:
        sizes = sorted(set(_ints(parser, "--sweep-mb", args.sweep_mb)))
        if args.calls < 1:
            parser.error("--calls must be positive")
        from workloads.peers_sweep import print_sweep, sweep_overhead

        print_sweep(sweep_overhead(sizes, args.calls, args.dir), args.calls)
        return 0
    try:
        config = PeersConfig(
            models=args.models, mb=args.mb, zoo=_names(args.zoo), requests=args.requests, clients=args.clients,
            cache_models=args.cache_models, zipf=args.zipf, seed=args.seed, regimes=_names(args.regimes),
            nodes=_ints(parser, "--nodes", args.nodes), systems=_names(args.systems), timeout_s=args.timeout_s,
            directory=args.dir, policy=args.policy, trims_cpus=args.trims_cpus,
        )  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))
    print(f"peers: {os.cpu_count()} cores on this machine; systems run one after another on one Ray cluster per node count", flush=True)
    results = run_peers(config, report=lambda r, title: print_table(r.rows, title=title, regime=r.regime, nodes=r.nodes))
    flawed = sum(row.wrong + row.failed for r in results for row in r.rows)
    return 1 if flawed else 0


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m workloads.peers") -> int:
    """The command line (also ``python -m workloads.bench peers``, which passes its ``prog``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser, parser.parse_args(argv))


if __name__ == "__main__":
    import sys

    from workloads import peers as _peers  # noqa: PLW0406 - workers import functions by module name

    sys.exit(_peers.main())
