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

Then the miss is taken apart (``MISS_STEPS``): more rounds of the same miss, made by the calls
``@trims_ray.function`` makes (route, lease at submit, the task's grant, object, pin and build),
the caller's steps timed in the driver and the task's in the task; and the node cache's load
(``LOAD_STEPS``) done once more alone in its actor, so that the wait for the grant can be split
into the load's read + verify and its put into the object store.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import trims_ray
from trims_ray._store import materialize

from .bench import MiB, _ms, _verdict, ray_with_trims, synthetic, touch_every_page
from .local_ray import preallocated_object_store

__all__ = ["LOAD_STEPS", "MISS_STEPS", "MissResult", "bench_miss", "print_miss"]

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
    steps: dict[str, list[float]] = field(default_factory=dict)  # MISS_STEPS / LOAD_STEPS -> s


# A miss of a decorated call, step by step, in order: the caller's, then the task's (the path of
# ``trims_ray._lease._model_for_task`` when the caller leased at submit and the worker keeps
# nothing), then the result's way back. "task starts" runs from the submit to the task's first
# line (perf_counter is one clock for every process of a Linux machine).
MISS_STEPS = (
    "route (caller)",
    "lease at submit (caller)",
    "submit task (caller)",
    "task starts",
    "wait for the grant (task)",
    "map the object (task)",
    "ask for a pin (task)",
    "build, read-only (task)",
    "work: touch every page",
    "give it back (task)",
    "result reaches the caller",
)
# The node cache's load, done once more alone in its actor after a miss round: what the wait
# for the grant is mostly made of.
LOAD_STEPS = ("read + verify (node cache)", "put in the object store (node cache)")


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


def _miss_steps_task(tenant: str, boxed: list) -> tuple[list[float], str]:
    """The task side of a miss whose caller leased at submit (``boxed``: the grant's ref), as
    ``@trims_ray.function`` runs it; returns the marks (perf_counter) and the grant's tier."""
    from trims_ray import _lease
    from trims_ray._process_tier import process_tier
    from trims_ray._protocol import cache_key
    from trims_ray._raycalls import call, get, wait_in_task

    marks = [time.perf_counter()]
    grant = wait_in_task(call, boxed[0])
    marks.append(time.perf_counter())
    obj = wait_in_task(get, grant.ref)
    marks.append(time.perf_counter())
    actor = _lease._granting_actor(grant)
    tier, holder = process_tier(), _lease._this_holder()
    pin_id = tier.new_pin_id()
    confirm = actor.pin.remote(cache_key(grant.manifest), holder, pin_id)
    marks.append(time.perf_counter())
    kept = tier.keep(tenant, grant, obj, actor, pin_id, holder, confirm)
    marks.append(time.perf_counter())
    touch_every_page(kept.model)
    marks.append(time.perf_counter())
    tier.give(kept)
    marks.append(time.perf_counter())
    return marks, grant.tier


def _load_alone(cache_actor, name: str, tenant: str) -> list[float]:
    """Runs in the node cache's actor (``__ray_call__``): the load of a miss done once more, its
    read + verify and its put timed apart; the object is dropped at once, nothing is kept."""
    cache = cache_actor.cache
    manifest = cache.resolve(name, tenant)
    buffer = np.empty(manifest.nbytes, dtype=np.uint8)
    started = time.perf_counter()
    cache.loader.read(manifest, buffer, None)
    read = time.perf_counter()
    ref = cache.memory.publish(buffer)
    put = time.perf_counter()
    del ref
    return [read - started, put - read]


def _evict_host_tier(name: str) -> None:
    """Evicts ``name`` from the host tier, so that the next invocation misses, and lets the
    evict's frees and the worker's give-back settle before anything is timed."""
    trims_ray.evict(name, tier="host")
    time.sleep(0.2)


def _miss_steps(name: str, rounds: int, node: str) -> dict[str, list[float]]:
    """``rounds`` misses of ``name`` taken apart (``MISS_STEPS``), each after an evict of the host
    tier, and as many loads done alone in the node cache (``LOAD_STEPS``); seconds per step."""
    from trims_ray._api import caller_tenant
    from trims_ray._cluster import node_cache_actor
    from trims_ray._protocol import Caller, Resolved
    from trims_ray._routing import router

    placed = NodeAffinitySchedulingStrategy(node, soft=True)
    task = ray.remote(num_cpus=1)(_miss_steps_task).options(scheduling_strategy=placed)
    routes, tenant = router(), caller_tenant()
    samples: dict[str, list[float]] = {s: [] for s in (*MISS_STEPS, *LOAD_STEPS)}
    for _ in range(rounds):
        _evict_host_tier(name)
        marks = [time.perf_counter()]
        manifest, route = routes.route(name, tenant)
        marks.append(time.perf_counter())
        actor = node_cache_actor(route.node)
        lease_id = routes.new_lease_id()
        grant = actor.acquire.remote(name, tenant, Caller(routes.id), lease_id, Resolved.of(manifest))
        marks.append(time.perf_counter())
        ref = task.remote(tenant, [grant])
        marks.append(time.perf_counter())
        inside, tier = ray.get(ref)
        ended = time.perf_counter()
        actor.release.remote(lease_id)
        if tier not in ("store", "disk", "peer"):
            raise RuntimeError(f"a step round was not a miss (served from {tier!r}): the evict did not take")
        marks += inside + [ended]
        for step, (a, b) in zip(MISS_STEPS, zip(marks, marks[1:])):
            samples[step].append(b - a)
        for step, seconds in zip(LOAD_STEPS, ray.get(actor.__ray_call__.remote(_load_alone, name, tenant))):
            samples[step].append(seconds)
    return samples


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
                        _evict_host_tier("miss-model")
                    started = time.perf_counter()
                    answer = ray.get(submit())
                    result.seconds.setdefault(method, []).append(time.perf_counter() - started)
                    if method == TRIMS_MISS:
                        result.tiers.append(answer[1])
            result.steps = _miss_steps("miss-model", rounds, ray.get_runtime_context().get_node_id())
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
    if r.steps:
        print(
            f"\nwhere a miss goes: {r.rounds} more misses made step by step as @trims_ray.function makes them "
            "(medians, ms; the caller's steps timed in the driver, the task's in the task):"
        )
        whole = 0.0
        for step in MISS_STEPS:
            median = statistics.median(r.steps[step])
            whole += median
            print(f"  {step:40} {_ms(median):8.1f}")
        print(f"  {'sum of the medians':40} {_ms(whole):8.1f}")
        print("the node cache's load done alone in its actor after each round (what the wait for the grant holds):")
        for step in LOAD_STEPS:
            print(f"  {step:40} {_ms(statistics.median(r.steps[step])):8.1f}")
    miss = statistics.median(r.seconds[TRIMS_MISS])
    same = statistics.median(r.seconds[PLAIN_VERIFIED])
    lazy = statistics.median(r.seconds[PLAIN_MMAP])
    print(
        f"goal: a miss no slower than the same load in a plain task: {_ms(miss):.1f} ms vs {_ms(same):.1f} ms "
        f"(verified): {_verdict(miss <= same)}; against the unverified mmap: {_ms(miss):.1f} vs {_ms(lazy):.1f} ms"
    )
