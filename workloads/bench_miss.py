"""``python -m workloads.bench miss``: what a host-tier miss costs against the same load done in
a plain Ray task, on one node, side by side in one run (issue 17: "a miss is no slower than the
same load done in a plain task").

One synthetic model of ``--mb`` MiB is registered in a local store (its blob stays in the page
cache: this measures trims_ray's own work, not the disk). Rounds alternate, each timed in the
driver from submit to result, every task touching every page of the weights (as a first
forward pass would):

- trims_ray miss: the model is evicted from the node's host tier first (no disk tier), so the
  node cache reads the blob from the store, verifies every chunk, puts it in the object store,
  and the task maps and builds it;
- trims_ray hit: the same call again (the model now kept by the worker or the node);
- plain task, verified: the task reads the same blob and verifies its sha256 chunks (what
  trims_ray must do for every byte it reads: DESIGN's invariant 5), then builds the module;
- plain task, mmap: safetensors' lazy mmap of the same file, no verification (what the peers
  benchmark's "no cache" does; the pages are read by the touch).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import ray

import trims_ray
from trims_ray._store import materialize

from .bench import MiB, _ms, _verdict, ray_with_trims, synthetic, touch_every_page
from .local_ray import preallocated_object_store

__all__ = ["MissResult", "bench_miss", "print_miss"]

TRIMS_MISS, TRIMS_HIT, PLAIN_VERIFIED, PLAIN_MMAP = "trims miss", "trims hit", "plain verified", "plain mmap"
LABELS = {
    TRIMS_MISS: "trims_ray miss (host tier evicted first)",
    TRIMS_HIT: "trims_ray hit",
    PLAIN_VERIFIED: "plain task: read + sha256 chunks + build",
    PLAIN_MMAP: "plain task: safetensors mmap, unverified",
}


@dataclass
class MissResult:
    mb: int
    nbytes: int
    chunks: int
    rounds: int
    seconds: dict[str, list[float]] = field(default_factory=dict)  # method -> end to end, s
    tiers: list[str] = field(default_factory=list)  # where each trims_ray miss was served from


def _plain_verified(store_dir: str, name: str) -> float:
    """The same load as trims_ray's, in the task: read and verify the blob, build the module."""
    store = trims_ray.ModelStore(store_dir)
    manifest = store.manifest(name, tenant="default")
    buffer, _ = store.read(manifest)
    return touch_every_page(materialize(manifest, buffer))


def _plain_mmap(path: str, mb: int) -> float:
    """The peers benchmark's "no cache": the module built on meta, the mmap'd tensors assigned."""
    import safetensors.torch

    from trims_ray._factory import assemble_module

    model = assemble_module(synthetic(mb), safetensors.torch.load_file(path), {}, source=path)
    return touch_every_page(model)


def bench_miss(mb: int, rounds: int, directory: str | None = None) -> MissResult:
    """Runs the rounds (see the module's docstring) on a one-node Ray of 2 CPUs."""
    with tempfile.TemporaryDirectory(prefix="trims-miss-", dir=directory) as tmp:
        store_dir = os.path.join(tmp, "store")
        with preallocated_object_store(), ray_with_trims(tmp, max(128, 4 * mb + 64), 2 * mb * MiB + 8 * MiB, disk_bytes=0):
            info = trims_ray.register("miss-model", synthetic(mb)(), factory=synthetic(mb))
            store = trims_ray.ModelStore(store_dir)
            manifest = store.manifest("miss-model", tenant="default")
            blob = store.blob_path(manifest.sha256)
            result = MissResult(mb, info.nbytes, len(manifest.chunks.digests), rounds)

            @trims_ray.function(model="miss-model", num_cpus=1)
            def served(model) -> tuple[float, str]:
                from trims_ray import _lease

                return touch_every_page(model), _lease.served_tier()

            verified = ray.remote(num_cpus=1)(_plain_verified)
            mmap = ray.remote(num_cpus=1)(_plain_mmap)
            # Warm: a worker for each kind has imported torch and run once.
            ray.get([served.remote(), verified.remote(store_dir, "miss-model"), mmap.remote(blob, mb)])
            methods = {
                TRIMS_MISS: lambda: served.remote(),
                TRIMS_HIT: lambda: served.remote(),
                PLAIN_VERIFIED: lambda: verified.remote(store_dir, "miss-model"),
                PLAIN_MMAP: lambda: mmap.remote(blob, mb),
            }
            for _ in range(rounds):
                for method, submit in methods.items():
                    if method == TRIMS_MISS:
                        trims_ray.evict("miss-model", tier="host")
                        time.sleep(0.2)  # the evict's frees and the worker's give-back settle
                    started = time.perf_counter()
                    answer = ray.get(submit())
                    result.seconds.setdefault(method, []).append(time.perf_counter() - started)
                    if method == TRIMS_MISS:
                        result.tiers.append(answer[1])
    return result


def print_miss(r: MissResult) -> None:
    print(
        f"\nmiss: a {r.nbytes / MiB:.1f} MiB synthetic model ({r.chunks} sha256 chunks), one node of 2 CPUs, "
        f"{r.rounds} rounds; ms from submit to result, every task touching every weight page"
    )
    print(f"{'':44} {'median ms':>10} {'p90 ms':>8}")
    print("-" * 64)
    for method, label in LABELS.items():
        xs = sorted(r.seconds[method])
        p90 = xs[min(len(xs) - 1, int(0.9 * len(xs)))]
        print(f"{label:44} {_ms(statistics.median(xs)):10.1f} {_ms(p90):8.1f}")
    tiers = {t: r.tiers.count(t) for t in sorted(set(r.tiers))}
    print(f"trims_ray misses were served from: {tiers}")
    miss = statistics.median(r.seconds[TRIMS_MISS])
    same = statistics.median(r.seconds[PLAIN_VERIFIED])
    lazy = statistics.median(r.seconds[PLAIN_MMAP])
    print(
        f"goal: a miss no slower than the same load in a plain task: {_ms(miss):.1f} ms vs {_ms(same):.1f} ms "
        f"(verified): {_verdict(miss <= same)}; against the unverified mmap: {_ms(miss):.1f} vs {_ms(lazy):.1f} ms"
    )
