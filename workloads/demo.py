"""The demo (README's main-job command): trims_ray on an embedded local Ray with a local store.

1. Registers a few zoo models (real torchvision and transformers architectures, seeded random
   weights) into the store; transformers models need no factory (their config is one).
2. For each model, invokes a ``@trims_ray.function`` that runs one inference, from each tier in
   turn: cold (from the store), disk-tier hit, host-tier hit; and, as the baseline, a plain Ray
   task that loads the model from the store inside the task, as a serverless function does today,
   and as the floor, a plain task whose process holds the model already (the host hit and the
   floor as medians of a few warm calls). Page caches of the blob files are dropped before
   every read from a file, so the store and the disk tier are read from the disk, and every
   output is checked against the original model.
3. Replays a short seeded sequence of invocations over the models and reports the tier hits.

    python -m workloads.demo [--models resnet50,bert_base,llama] [--invocations 30] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

import trims_ray
from trims_ray import ModelStore
from trims_ray._cluster import node_cache_actor
from trims_ray._fsio import is_local
from workloads.bench import drop_page_cache
from workloads.local_ray import init_local
from workloads import zoo
from workloads.zoo import ZOO, build, zoo_model

DEFAULT_MODELS = "resnet50,bert_base,llama"
WARM_CALLS = 5  # warm calls per model whose median the table gives (host hit, held)


def forward(model, x) -> tuple[torch.Tensor, float]:
    """The model's main output (logits, last hidden state) and the compute time in ms."""
    started = time.perf_counter()
    out = zoo.forward(model, x)
    return out, (time.perf_counter() - started) * 1000


@trims_ray.function(num_cpus=1)
def infer(model, x):
    """One inference on a leased model (the model arrives as the first argument)."""
    return forward(model, x)


@ray.remote(num_cpus=1)
def infer_loading_in_task(store_uri: str, name: str, tenant: str, x):
    """The baseline: load the model from the store inside the task, then infer."""
    return forward(ModelStore(store_uri).load(name, tenant=tenant), x)


_held: dict[str, torch.nn.Module] = {}


@ray.remote(num_cpus=1)
def infer_held_in_process(store_uri: str, name: str, tenant: str, x):
    """The floor for any cache on Ray: a plain task whose worker process already holds the
    model (loaded by an earlier call in the same process), so that only Ray's own cost of a
    task, its argument and its result are left beside the compute."""
    if name not in _held:
        _held.clear()  # one model at a time: the table measures one after the other
        _held[name] = ModelStore(store_uri).load(name, tenant=tenant)
    return forward(_held[name], x)


def timed(ref_fn):
    """(output, compute ms inside the task, end-to-end ms from the driver)."""
    started = time.perf_counter()
    out, compute_ms = ray.get(ref_fn())
    return out, compute_ms, (time.perf_counter() - started) * 1000


def timed_warm(ref_fns, calls: int) -> list[tuple[object, float, float]]:
    """``timed`` for each of ``ref_fns``, medians over ``calls`` rounds that take them in turn
    (one warm call can be a few ms off: a median shows what a warm call costs); the outputs
    of the last round."""
    rounds = [[timed(fn) for fn in ref_fns] for _ in range(calls)]
    return [
        (rounds[-1][i][0], statistics.median(r[i][1] for r in rounds), statistics.median(r[i][2] for r in rounds))
        for i in range(len(ref_fns))
    ]


def run_demo(names: list[str], invocations: int, seed: int, store: ModelStore, tmp: Path) -> bool:
    tenant = trims_ray._api.caller_tenant()
    inputs, expected, blobs = {}, {}, {}
    print(f"registering {len(names)} zoo models into {store.uri}")
    for name in names:
        entry = zoo_model(name)
        model = build(name, seed=0)
        inputs[name] = entry.example_input(1, seq_len=32, generator=torch.Generator().manual_seed(seed))
        # One thread, as in a num_cpus=1 Ray worker: float sums then run in the same order, so
        # the workers' outputs must equal this bit for bit.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            expected[name], _ = forward(model, inputs[name])
        finally:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        # A transformers model brings its own factory (its config); the others name the zoo's.
        factory = None if entry.library == "transformers" else entry.factory
        info = trims_ray.register(name, model, factory=factory)
        print(
            f"  {name:10} {info.nbytes / 1e6:8.1f} MB  {info.factory:38} registered in "
            f"{time.perf_counter() - started:5.2f} s"
        )
        blobs[name] = store.blob_path(info.sha256)
        del model

    def drop_file_caches(name: str) -> None:
        if is_local(store.fs):
            drop_page_cache(blobs[name])
        disk_copy = next(tmp.glob(f"disk/*/{Path(blobs[name]).name}"), None)
        if disk_copy is not None:
            drop_page_cache(str(disk_copy))

    # Start both workers first, so no row pays for a worker process starting.
    ray.get([infer_loading_in_task.options(num_cpus=1).remote(store.uri, names[0], tenant, inputs[names[0]]) for _ in range(2)])

    ok = True
    header = (
        f"{'model':10} {'MB':>7} {'load in task':>13} {'cold (store)':>13} {'disk hit':>9} "
        f"{'host hit':>9} {'compute':>8} {'speedup':>8} {'of ideal':>9} {'held':>7} {'of held':>8}"
    )
    print("\nlatency of one inference, end to end from the driver, ms (page caches dropped before file reads)")
    print(
        f"host hit, compute and held: medians of {WARM_CALLS} calls; held: a plain task whose process "
        "already holds the model (Ray's cost of a task, the floor for any cache)"
    )
    print(header)
    print("-" * len(header))
    for name in names:
        fn = infer.options(model=name)
        x = inputs[name]
        drop_file_caches(name)
        baseline, _, base_ms = timed(lambda: infer_loading_in_task.remote(store.uri, name, tenant, x))
        trims_ray.evict(name)
        drop_file_caches(name)
        cold, _, cold_ms = timed(lambda: fn.remote(x))
        ray.get(node_cache_actor().drain.remote())  # the disk copy is written after the cold call
        trims_ray.evict(name, tier="host")
        drop_file_caches(name)
        disk, _, disk_ms = timed(lambda: fn.remote(x))
        # Both workers load the model for the "held" column, two tasks at once on two CPUs.
        ray.get([infer_held_in_process.remote(store.uri, name, tenant, x) for _ in range(2)])
        (host, compute_ms, host_ms), (held, _, held_ms) = timed_warm(
            [lambda: fn.remote(x), lambda: infer_held_in_process.remote(store.uri, name, tenant, x)], WARM_CALLS
        )
        same = all(torch.equal(out, expected[name]) for out in (baseline, cold, disk, host, held))
        ok &= same
        mb = Path(blobs[name]).stat().st_size / 1e6 if is_local(store.fs) else 0
        # TrIMS's figure of merit: the speedup reached against the ideal, where all that is
        # left is the compute (the ideal speedup is load-in-task over compute alone). A Ray
        # task costs more than its compute even with the model in its process ("held"): "of
        # held" is how close a host hit comes to that floor.
        speedup, ideal = base_ms / host_ms, base_ms / compute_ms
        print(
            f"{name:10} {mb:7.1f} {base_ms:13.1f} {cold_ms:13.1f} {disk_ms:9.1f} {host_ms:9.1f} "
            f"{compute_ms:8.1f} {speedup:7.1f}x {speedup / ideal:8.0%} {held_ms:7.1f} {held_ms / host_ms:8.0%}"
            + ("" if same else "  OUTPUT DIFFERS")
        )

    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(names))]  # Zipf-like popularity
    sequence = rng.choices(names, weights=weights, k=invocations)
    # Hits the workers served from the models they keep reach their node within a second: wait
    # for those of the table above, so that they are not counted as the sequence's.
    time.sleep(1.5)
    before = trims_ray.stats()
    latencies: dict[str, list[float]] = {n: [] for n in names}
    for name in sequence:
        out, _, ms = timed(lambda: infer.options(model=name).remote(inputs[name]))
        ok &= torch.equal(out, expected[name])
        latencies[name].append(ms)
    # Hits the workers served from the models they keep reach their node within a second.
    time.sleep(1.5)
    after = trims_ray.stats()
    hits = sum(s.tiers["host"].hits for s in after.nodes.values()) - sum(s.tiers["host"].hits for s in before.nodes.values())
    loads = sum(s.tiers["host"].loads for s in after.nodes.values()) - sum(s.tiers["host"].loads for s in before.nodes.values())
    print(f"\nseeded sequence of {invocations} invocations (seed {seed}): {hits} host hits, {loads} loads")
    for name in names:
        if latencies[name]:
            print(f"  {name:10} {len(latencies[name]):3} calls, median {statistics.median(latencies[name]):7.1f} ms")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workloads.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated zoo models (default {DEFAULT_MODELS}; known: {', '.join(ZOO)})")
    parser.add_argument("--invocations", type=int, default=30, help="length of the seeded sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--store", default=None, help="store URI (default: $TRIMS_RAY_STORE or ~/.cache/trims_ray/store)")
    parser.add_argument("--object-store-mb", type=int, default=3072, help="the local Ray's object store")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in ZOO]
    if unknown or not names:
        parser.error(f"unknown zoo models {unknown}; known: {', '.join(ZOO)}")
    if args.invocations < 0:
        parser.error("--invocations must be >= 0")

    with tempfile.TemporaryDirectory(prefix="trims-demo-") as tmp:
        init_local(
            num_cpus=2,
            object_store_memory=args.object_store_mb * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
        )
        try:
            config = trims_ray.CacheConfig(host_fraction=0.8, disk_dir=str(Path(tmp) / "disk"))
            cluster = trims_ray.init(store=args.store, config=config)
            store = trims_ray._api.current_store()
            print(f"trims_ray demo on a local Ray ({len(cluster.nodes)} node), store {cluster.store}, tenant {cluster.tenant!r}")
            ok = run_demo(names, args.invocations, args.seed, store, Path(tmp))
        finally:
            trims_ray.shutdown()
            ray.shutdown()
    if not ok:
        print("demo: an output differs from the original model's", file=sys.stderr)
        return 1
    print("\nevery output equals the original model's.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
