"""Cluster benchmarks on a local three-node Ray (``ray.cluster_utils.Cluster``).

``python -m workloads.bench peer``: what a node that misses pays for its first invocation when
another node holds the model in memory, copying it from that peer (Ray's object transfer, then a
verified copy) against reading it from the store, side by side in one run.

``python -m workloads.bench locality``: where invocations of a model resident on one node of
three run, sent a few at a time, for tasks asking for a fraction of a CPU and for a whole one:
routing must keep them with the model while its node has free slots (issue 17's goal: 95%).

Every run: the model is resident on node B only (evicted from C's host and disk tiers), then a
task pinned to node C invokes it, so C misses; C's cache has peer fetch on or off. The store is
the local disk (its page cache dropped before each store read) and, unless ``--no-s3``, an S3
server on loopback (moto).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import trims_ray
from trims_ray._cluster import node_cache_actor

from .bench import MiB, _ms, drop_page_cache, ray_with_trims, synthetic_weights

__all__ = ["bench_locality", "bench_peer", "print_locality", "print_peer"]


def _checksum(model) -> float:
    """The work of the timed task: touches every weight page (a first forward pass would)."""
    total = 0.0
    for t in model.values():
        flat = t.reshape(-1)
        total += float(flat[:: max(1, 4096 // t.element_size())].double().sum())
    return total


@dataclass
class PeerResult:
    repeats: int
    rows: dict[tuple[str, int, str], list[float]] = field(default_factory=dict)  # (store, MiB, source) -> s
    sizes: dict[int, int] = field(default_factory=dict)


def _first_invocation_on(fn, c: str, name: str, peer: bool, path: str | None) -> tuple[float, str]:
    """Seconds from submit to result of an invocation on node ``c`` that misses, and where its
    cache loaded from."""
    trims_ray.evict(name, nodes=[c])
    ray.get(node_cache_actor(c).configure.remote(peer_fetch="always" if peer else "never"))
    if path is not None:
        drop_page_cache(path)
    before = ray.get(node_cache_actor(c).stats.remote())["tiers"]["host"]["loads"]
    pinned = fn.options(model=name, scheduling_strategy=NodeAffinitySchedulingStrategy(c, soft=False))
    started = time.perf_counter()
    ray.get(pinned.remote())
    elapsed = time.perf_counter() - started
    after = ray.get(node_cache_actor(c).stats.remote())
    assert after["tiers"]["host"]["loads"] == before + 1, "the timed invocation did not miss"
    return elapsed, after["last_load_source"]


def bench_peer(sizes_mb: list[int], repeats: int, with_s3: bool, directory: str | None) -> PeerResult:
    result = PeerResult(repeats)
    stores = ["local disk"] + (["S3 (moto, loopback)"] if with_s3 else [])
    object_store_mb = max(512, int(max(sizes_mb) * 2.5) + 256)
    host_bytes = int(max(sizes_mb) * 1.2 * MiB) + 8 * MiB
    for store in stores:
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="trims-bench-", dir=directory))
            uri, options = os.path.join(tmp, "store"), None
            if store.startswith("S3"):
                from workloads.s3server import create_bucket, moto_server, s3_storage_options

                endpoint = stack.enter_context(moto_server())
                bucket = f"bench-{uuid.uuid4().hex[:8]}"
                create_bucket(endpoint, bucket)
                uri, options = f"s3://{bucket}/store", s3_storage_options(endpoint)
            nodes = stack.enter_context(
                ray_with_trims(tmp, object_store_mb, host_bytes, nodes=3, store=uri, storage_options=options)
            )
            b, c = nodes[1], nodes[2]
            fn = trims_ray.function(_checksum, num_cpus=1)
            # Start C's worker (and its first connection to C's cache) before any timing.
            trims_ray.register("warm-up", synthetic_weights(MiB))
            for _ in range(2):
                ray.get(fn.options(model="warm-up", scheduling_strategy=NodeAffinitySchedulingStrategy(c, soft=False)).remote())
            print(f"peer: {store} store; 3 nodes of {object_store_mb} MiB object store; host budget {host_bytes / MiB:.0f} MiB", flush=True)
            for mb in sizes_mb:
                name = f"peer-{mb}"
                info = trims_ray.register(name, synthetic_weights(mb * MiB, seed=mb))
                result.sizes[mb] = info.nbytes
                path = None
                if not store.startswith("S3"):
                    path = trims_ray._api.current_store().blob_path(info.sha256)
                trims_ray.prefetch(name, nodes=[b])
                for i in range(repeats):
                    for peer in (True, False) if i % 2 == 0 else (False, True):
                        seconds, source = _first_invocation_on(fn, c, name, peer, path)
                        expected = "peer" if peer else "store"
                        assert source == expected, f"{name}: loaded from {source}, expected {expected}"
                        result.rows.setdefault((store, mb, source), []).append(seconds)
                trims_ray.evict(name)
    return result


def print_peer(r: PeerResult) -> None:
    print(
        f"\npeer fetch: first invocation of a model on a node that misses while another node holds "
        f"it in memory; medians of {r.repeats} runs, interleaved; ms from submit to result, the "
        "task touching every weight page"
    )
    header = f"{'store':22} {'MiB':>6} {'from the store ms':>18} {'from a peer ms':>15} {'store / peer':>13}"
    print(header)
    print("-" * len(header))
    for store, mb in sorted({(s, m) for s, m, _ in r.rows}):
        from_store = statistics.median(r.rows[(store, mb, "store")])
        from_peer = statistics.median(r.rows[(store, mb, "peer")])
        print(f"{store:22} {mb:>6} {_ms(from_store):>18.1f} {_ms(from_peer):>15.1f} {from_store / from_peer:>12.2f}x")


def _node_of(model) -> str:
    return ray.get_runtime_context().get_node_id()


@dataclass
class LocalityResult:
    invocations: int
    concurrency: int
    mb: int
    runs: dict[float, tuple[int, int]] = field(default_factory=dict)  # num_cpus -> (on the holder, all)


def bench_locality(
    invocations: int, concurrency: int, cpus: list[float], mb: int, directory: str | None
) -> LocalityResult:
    """For each task size in ``cpus``: a ``mb`` MiB model resident on one node of three (1 CPU
    each, so the node runs 1 / num_cpus such tasks at once), ``invocations`` sent
    ``concurrency`` at a time; counts those that ran on that node."""
    result = LocalityResult(invocations, concurrency, mb)
    with tempfile.TemporaryDirectory(prefix="trims-bench-", dir=directory) as tmp:
        with ray_with_trims(tmp, 256, 64 * MiB, nodes=3, cpus=1) as nodes:
            holder = nodes[1]
            print(f"locality: 3 nodes of 1 CPU; a {mb} MiB model resident on node {holder[:12]} only", flush=True)
            for num_cpus in cpus:
                name = f"loc-{num_cpus:g}"
                trims_ray.register(name, synthetic_weights(mb * MiB, seed=int(num_cpus * 100)))
                trims_ray.prefetch(name, nodes=[holder])
                fn = trims_ray.function(_node_of, model=name, num_cpus=num_cpus)
                # Let the holder's report reach the callers' table before timing anything.
                time.sleep(1.5)
                ran = []
                for _ in range(0, invocations, concurrency):
                    ran += ray.get([fn.remote() for _ in range(concurrency)])
                result.runs[num_cpus] = (sum(n == holder for n in ran), len(ran))
                trims_ray.evict(name)
    return result


def print_locality(r: LocalityResult) -> None:
    print(
        f"\nlocality: {r.invocations} invocations of a {r.mb} MiB model resident on one node of three "
        f"(1 CPU each), sent {r.concurrency} at a time"
    )
    header = f"{'num_cpus':>9} {'tasks at once there':>20} {'ran there':>10} {'share':>7}"
    print(header)
    print("-" * len(header))
    for cpus, (there, total) in sorted(r.runs.items()):
        at_once = "any" if cpus <= 0 else f"{max(1, int(1 / cpus + 1e-9))}"
        print(f"{cpus:>9g} {at_once:>20} {there:>10} {there / total:>6.0%}")
    for cpus, (there, total) in sorted(r.runs.items()):
        if cpus > 0 and 1 / cpus >= r.concurrency:  # the node had a free slot for every one
            share = there / total
            print(
                f"goal: >= 95% of num_cpus={cpus:g} invocations on the model's node while it has free "
                f"slots: {share:.0%}: {'met' if share >= 0.95 else 'NOT met'}"
            )
