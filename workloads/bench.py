"""Benchmarks that print side-by-side ratios measured in one run (docs/benchmarks.md).

    python -m workloads.bench load [--mb 500] [--repeats 3] [--dir DIR] [--no-s3]
    python -m workloads.bench handoff [--sizes-mb 100,500,1000] [--repeats 3] [--object-store-mb 3072]
    python -m workloads.bench routing [--models 1000] [--nodes 64] [--calls 100000]
    python -m workloads.bench overhead [--calls 200] [--object-store-mb 256] [--nodes 3]
    python -m workloads.bench peer [--sizes-mb 100,400] [--repeats 3] [--no-s3]
    python -m workloads.bench build [--models resnet50,bert_base,...] [--repeats 5]
    python -m workloads.bench miss [--mb 20] [--rounds 15]

``load``: the store reader's rate for one blob from local disk (page cache dropped for the file
before every read with POSIX_FADV_DONTNEED) and from an S3 server on loopback (moto), against the
raw sequential read of the same bytes measured the same way in the same run.

``handoff``: time from a task's first line to a usable module, and to a module whose every weight
page has been touched (as a first forward pass does), in a fresh worker process each time: a
trims_ray host-tier hit against torch.load and against safetensors from a cold and a warm page
cache, for synthetic models of 100 MiB to 1000 MiB.

``overhead``: a ``@trims_ray.function`` call on a host-resident tiny model against a plain Ray
task doing the same work, timed end to end from the driver.

``miss``: a host-tier miss against the same load done in a plain task (workloads/bench_miss.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import itertools
import math
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
import safetensors.torch
import torch
from torch import nn

import trims_ray
from trims_ray import ModelStore
from trims_ray._api import caller_tenant
from trims_ray._cluster import call, node_cache_actor
from trims_ray._factory import build_on_meta, resolve_factory
from trims_ray._protect import GUARD_BYTES, protect_array
from trims_ray._protect import release as release_protection
from trims_ray._reader import read_blob
from trims_ray._safetensors import tensors_from_buffer
from trims_ray._protocol import Holder
from workloads import local_ray

RAW_BLOCK = 16 * 1024 * 1024
MiB = 1024 * 1024


def synthetic_weights(nbytes: int, *, seed: int = 0, tensors: int = 8) -> dict[str, torch.Tensor]:
    """``tensors`` float32 tensors of random bits adding up to about ``nbytes``."""
    rng = np.random.default_rng(seed)
    per = max(nbytes // tensors // 4, 1)
    return {
        f"layer{i}.weight": torch.from_numpy(rng.integers(0, 2**31, per, dtype=np.int32)).view(torch.float32)
        for i in range(tensors)
    }


def drop_page_cache(path: str) -> None:
    """Evicts a file's clean pages from the page cache, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_local_read(path: str, out: np.ndarray) -> float:
    """Seconds to read the file sequentially in 16 MiB blocks into ``out`` (the disk's rate)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        view, offset = memoryview(out), 0
        started = time.perf_counter()
        while offset < len(out):
            n = os.preadv(fd, [view[offset : offset + RAW_BLOCK]], offset)
            if n == 0:
                raise EOFError(path)
            offset += n
        return time.perf_counter() - started
    finally:
        os.close(fd)


@dataclass
class LoadRow:
    source: str
    nbytes: int
    raw: list[float]
    verified: list[float]
    unverified: list[float]

    def rate(self, samples: list[float]) -> float:
        return self.nbytes / statistics.median(samples)


def measure(repeats: int, steps: dict[str, Callable[[], float]], before: Callable[[], None]) -> dict[str, list[float]]:
    """Runs each step ``repeats`` times, interleaved so drift hits all alike; returns seconds."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            before()
            samples[name].append(step())
    return samples


def bench_load(mb: int, repeats: int, directory: str | None, with_s3: bool) -> list[LoadRow]:
    weights = synthetic_weights(mb * 1024 * 1024)
    rows: list[LoadRow] = []
    with tempfile.TemporaryDirectory(prefix="trims-bench-", dir=directory) as tmp:
        store = ModelStore(tmp)
        started = time.perf_counter()
        info = store.register("load-bench", weights, tenant="bench")
        register_s = time.perf_counter() - started
        manifest = store.manifest("load-bench", tenant="bench")
        path = store.blob_path(info.sha256)
        # One output buffer for every method, touched before timing: first touches of fresh
        # memory cost 0.3-1.8 ms/MiB on these VMs and would otherwise be charged to whoever
        # reads first.
        out = np.ones(info.nbytes, dtype=np.uint8)
        hash_started = time.perf_counter()
        hashlib.sha256(memoryview(out)).digest()
        sha256_rate = info.nbytes / (time.perf_counter() - hash_started)
        print(
            f"blob: {info.nbytes / 1e6:.1f} MB ({len(manifest.chunks.digests)} chunks of "
            f"{manifest.chunks.chunk_bytes >> 20} MiB); registered in {register_s:.2f} s; "
            f"sha256 on one core: {sha256_rate / 1e9:.2f} GB/s; {os.cpu_count()} cores",
            flush=True,
        )
        samples = measure(
            repeats,
            {
                "raw": lambda: raw_local_read(path, out),
                "verified": lambda: store.read(manifest, out=out)[1].seconds,
                "unverified": lambda: read_blob(store.fs, path, out=out, options=store.read_options)[1].seconds,
            },
            before=lambda: drop_page_cache(path),
        )
        rows.append(LoadRow("local disk (page cache dropped)", info.nbytes, **samples))
        if with_s3:
            rows.append(_bench_s3(weights, out, repeats))
    return rows


def _bench_s3(weights: dict[str, torch.Tensor], out: np.ndarray, repeats: int) -> LoadRow:
    from workloads.s3server import create_bucket, moto_server, s3_storage_options

    with moto_server() as endpoint:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        create_bucket(endpoint, bucket)
        store = ModelStore(f"s3://{bucket}/store", storage_options=s3_storage_options(endpoint))
        info = store.register("load-bench", weights, tenant="bench")
        manifest = store.manifest("load-bench", tenant="bench")
        path = store.blob_path(info.sha256)

        def raw() -> float:
            # What a function does without trims_ray: one GET of the whole object.
            started = time.perf_counter()
            data = store.fs.cat_file(path)
            elapsed = time.perf_counter() - started
            assert len(data) == info.nbytes
            return elapsed

        samples = measure(
            repeats,
            {
                "raw": raw,
                "verified": lambda: store.read(manifest, out=out)[1].seconds,
                "unverified": lambda: read_blob(store.fs, path, out=out, options=store.read_options)[1].seconds,
            },
            before=lambda: None,
        )
        return LoadRow("S3 on loopback (moto server)", info.nbytes, **samples)


def print_load_table(rows: list[LoadRow], repeats: int) -> None:
    print(f"\nload: medians of {repeats} interleaved runs; GB/s = 1e9 bytes/s")
    header = f"{'source':34} {'raw sequential':>15} {'reader verified':>16} {'ratio':>6} {'reader unverified':>18} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for row in rows:
        raw, verified, unverified = row.rate(row.raw), row.rate(row.verified), row.rate(row.unverified)
        print(
            f"{row.source:34} {raw / 1e9:>10.3f} GB/s {verified / 1e9:>11.3f} GB/s {verified / raw:>6.2f} "
            f"{unverified / 1e9:>13.3f} GB/s {unverified / raw:>6.2f}"
        )


# -- shared by handoff and overhead ------------------------------------------------------------

RAY_CPUS = 2


@contextlib.contextmanager
def ray_with_trims(
    tmp: str,
    object_store_mb: int,
    host_bytes: int,
    nodes: int = 1,
    store: str | None = None,
    storage_options: dict | None = None,
    cpus: int = RAY_CPUS,
    **config,
) -> Iterator[list[str]]:
    """A Ray of our own with trims_ray on it, both shut down on exit; yields the node ids (the
    head first). One node: ``ray.init(address="local")``; more: a ``ray.cluster_utils.Cluster``
    of ``nodes`` nodes on this machine, each with ``object_store_mb`` and ``cpus`` CPUs.

    The store (unless ``store`` names one) and the disk tier live under ``tmp``; ``config``
    goes to CacheConfig.
    """
    if ray.is_initialized():
        raise RuntimeError("this benchmark starts its own Ray: run it where Ray is not initialized")
    cluster = None
    node_args = {"num_cpus": cpus, "object_store_memory": object_store_mb * MiB}
    if nodes == 1:
        local_ray.init_local(include_dashboard=False, log_to_driver=False, **node_args)
    else:
        cluster = local_ray.start_cluster(nodes, **node_args)
    try:
        node_ids = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        head = ray.get_runtime_context().get_node_id()
        node_ids.sort(key=lambda n: n != head)
        trims_config = trims_ray.CacheConfig(host_bytes=host_bytes, disk_dir=os.path.join(tmp, "disk"), **config)
        trims_ray.init(store=store or os.path.join(tmp, "store"), config=trims_config, storage_options=storage_options)
        try:
            yield node_ids
        finally:
            trims_ray.shutdown()
    finally:
        if cluster is not None:
            local_ray.stop_cluster(cluster)
        else:
            ray.shutdown()


def touch_every_page(model: nn.Module | dict[str, torch.Tensor]) -> float:
    """Reads one element in every 4 KiB of every weight, as a first forward pass reads them all
    (lazy mmaps and fresh mappings fault their pages in here); returns their sum, a checksum."""
    tensors = model.values() if isinstance(model, dict) else itertools.chain(model.parameters(), model.buffers())
    total = 0.0
    for t in tensors:
        flat = t.detach().reshape(-1)
        total += float(flat[:: max(1, 4096 // t.element_size())].sum(dtype=torch.float64))
    return total


def _ms(seconds: float) -> float:
    return seconds * 1e3


# -- handoff: synthetic models of a chosen size ------------------------------------------------


class SyntheticMLP(nn.Module):
    """``layers`` square ``nn.Linear(width, width)`` layers: an fp32 model of a chosen size."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


# Every synthetic model has the same number of layers, wider for bigger models: the handoff
# benchmark asks how a hit grows with BYTES, and a layer count that grew with size would measure
# torch's per-module construction cost instead (about 0.45 ms per nn.Linear on meta here). At
# commit f862967 the models grew by layers (6 to 62 of 2048 x 2048); see the issue note.
SYNTHETIC_LAYERS = 8


def synthetic_shape(mb: int) -> tuple[int, int]:
    """(width, layers) of the synthetic model closest to ``mb`` MiB: ``SYNTHETIC_LAYERS`` square
    layers whose width is chosen for the size."""
    width = max(1, int(math.sqrt(mb * MiB / (4 * SYNTHETIC_LAYERS))))
    return width, SYNTHETIC_LAYERS


_FACTORIES: dict[int, Callable[[], nn.Module]] = {}


def synthetic(mb: int) -> Callable[[], nn.Module]:
    """The zero-argument factory of the ~``mb`` MiB synthetic model; importable on workers as
    ``"workloads.bench:synthetic_<mb>"`` for any ``mb`` (see the module's ``__getattr__``)."""
    if mb not in _FACTORIES:
        width, layers = synthetic_shape(mb)

        def factory() -> nn.Module:
            return SyntheticMLP(width, layers)

        factory.__name__ = factory.__qualname__ = f"synthetic_{mb}"
        factory.__module__ = "workloads.bench"
        _FACTORIES[mb] = factory
    return _FACTORIES[mb]


synthetic_100, synthetic_500, synthetic_1000 = synthetic(100), synthetic(500), synthetic(1000)


def __getattr__(name: str):
    match = re.fullmatch(r"synthetic_([1-9][0-9]*)", name)
    if match:
        return synthetic(int(match.group(1)))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def warm_page_cache(path: str) -> None:
    """Reads a file once, so that its pages are in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        block = bytearray(RAW_BLOCK)
        while os.readv(fd, [block]):
            pass
    finally:
        os.close(fd)


HOST_HIT, HOST_FN = "host", "host-function"
TORCH_LOAD, ST_COLD, ST_WARM = "torch.load", "safetensors-cold", "safetensors-warm"
HANDOFF_METHODS = {
    HOST_HIT: "trims_ray host-tier hit, open()",
    HOST_FN: "trims_ray host-tier hit, @function",
    TORCH_LOAD: "(a) torch.load .pt + init, cold disk",
    ST_COLD: "(b) safetensors, cold disk, meta+assign",
    ST_WARM: "(c) safetensors, page cache, meta+assign",
}


def _handoff_function(model) -> dict:
    """The body of a ``@trims_ray.function``: the model arrives leased (its lease taken by the
    caller at submit time); the clock started when the task did, before the lease was used."""
    from trims_ray import _lease

    to_module = time.perf_counter() - _lease.task_started
    check = touch_every_page(model)
    touched = time.perf_counter() - _lease.task_started
    return {"to_module": to_module, "touched": touched, "check": check, "pid": os.getpid()}


def _handoff_task(method: str, source: str, mb: int) -> dict:
    """Runs in a fresh worker: the clock starts at this line (worker start-up and the imports of
    torch, ray and trims_ray, the same for every method, come before it)."""
    started = time.perf_counter()
    if method == HOST_HIT:
        with trims_ray.open(source) as model:
            to_module = time.perf_counter() - started
            check = touch_every_page(model)
            touched = time.perf_counter() - started
    else:
        if method == TORCH_LOAD:  # the naive way: default init, then copy the weights in
            model = synthetic(mb)()
            model.load_state_dict(torch.load(source))
        else:  # safetensors' lazy mmap, the architecture on meta, the mapped tensors assigned
            state = safetensors.torch.load_file(source)
            with torch.device("meta"):
                model = synthetic(mb)()
            model.load_state_dict(state, assign=True)
        model.eval()
        to_module = time.perf_counter() - started
        check = touch_every_page(model)
        touched = time.perf_counter() - started
    return {"to_module": to_module, "touched": touched, "check": check, "pid": os.getpid()}


HOST_STEPS = (
    "find node actor",
    "1st actor call",
    "acquire round trip",
    "ray.get object",
    "mprotect",
    "tensor views",
    "build on meta",
    "assign",
    "touch pages",
    "unprotect",
    "release msg",
)


def _host_steps_task(name: str) -> dict:
    """Runs in a fresh worker: the steps of ``trims_ray.open`` (see trims_ray/_lease.py), timed
    one by one, then a second, whole ``open`` in the same (now warm) worker. A no-op call to the
    node actor ("1st actor call", not part of ``open``) comes before the acquire, so that the cost
    of a new process's first call to the actor shows apart from the acquire's own."""
    marks = [time.perf_counter()]
    actor = node_cache_actor()
    marks.append(time.perf_counter())
    ray.get(actor.ping.remote())
    marks.append(time.perf_counter())
    grant = call(actor.acquire.remote(name, caller_tenant(), Holder.this_process()))
    marks.append(time.perf_counter())
    obj = ray.get(grant.ref)
    marks.append(time.perf_counter())
    manifest = grant.manifest
    blob = obj[grant.offset : grant.offset + manifest.nbytes]
    token = protect_array(blob)
    marks.append(time.perf_counter())
    tensors = tensors_from_buffer(blob, manifest.layout)
    for alias, target in manifest.aliases.items():
        tensors[alias] = tensors[target]
    marks.append(time.perf_counter())
    module = build_on_meta(resolve_factory(manifest.factory))
    marks.append(time.perf_counter())
    module.load_state_dict(tensors, strict=True, assign=True)
    module.eval()
    marks.append(time.perf_counter())
    check = touch_every_page(module)
    marks.append(time.perf_counter())
    del module, tensors
    release_protection(token)
    marks.append(time.perf_counter())
    actor.release.remote(grant.lease_id)
    marks.append(time.perf_counter())
    steps = {step: b - a for step, a, b in zip(HOST_STEPS, marks, marks[1:])}
    started = time.perf_counter()
    with trims_ray.open(name) as model:
        second = time.perf_counter() - started
        assert touch_every_page(model) == check
    return {"steps": steps, "second_open": second, "tier": grant.tier}


@dataclass
class HandoffModel:
    mb: int
    name: str
    nbytes: int
    width: int
    layers: int
    pt: str
    st: str


@dataclass
class HandoffResult:
    models: list[HandoffModel]
    repeats: int
    samples: dict[tuple[int, str], list[dict]] = field(default_factory=dict)
    steps: dict[int, list[dict]] = field(default_factory=dict)

    def median(self, mb: int, method: str, column: str) -> float:
        return statistics.median(s[column] for s in self.samples[(mb, method)])


def _host_need(mb: int) -> int:
    """Host-tier bytes the synthetic model of ``mb`` takes: its blob (plus room for the header)
    and two guard pages."""
    width, layers = synthetic_shape(mb)
    return 4 * width * (width + 1) * layers + 2 * layers * 256 + 64 * 1024 + 2 * GUARD_BYTES


def _prepare_model(mb: int, files: str) -> HandoffModel:
    """Builds the model once, registers it, writes its .pt and .safetensors, then frees it."""
    started = time.perf_counter()
    torch.manual_seed(mb)
    width, layers = synthetic_shape(mb)
    model = synthetic(mb)()
    name = f"synthetic-{mb}"
    info = trims_ray.register(name, model, factory=f"workloads.bench:synthetic_{mb}")
    state = model.state_dict()
    pt, st = os.path.join(files, f"{name}.pt"), os.path.join(files, f"{name}.safetensors")
    torch.save(state, pt)
    safetensors.torch.save_file(state, st)
    del model, state
    gc.collect()
    where = trims_ray.prefetch(name, tier="host")
    print(
        f"  synthetic_{mb}: {layers} x Linear({width}, {width}), {info.nbytes / 1e6:.1f} MB; built, "
        f"registered, .pt and .safetensors written, prefetched to the host tier (from "
        f"{'/'.join(sorted(set(where.values())))}) in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    return HandoffModel(mb, name, info.nbytes, width, layers, pt, st)


def _wait_for_disk_copies(count: int, timeout_s: float = 300.0) -> None:
    """Waits until the disk tier holds ``count`` models: a load's disk copy may be written after
    the load returns, and that write must not run under the timed tasks."""
    deadline = time.monotonic() + timeout_s
    while True:
        disk = [node.tiers["disk"].models for node in trims_ray.stats().nodes.values()]
        if all(n >= count for n in disk):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"disk tier holds {disk} models after {timeout_s:.0f} s, expected {count}")
        time.sleep(0.1)


def bench_handoff(sizes_mb: list[int], repeats: int, object_store_mb: int, directory: str | None) -> HandoffResult:
    host_bytes = sum(_host_need(mb) for mb in sizes_mb)
    print(
        f"handoff: {os.cpu_count()} cores; Ray with {RAY_CPUS} CPUs and a {object_store_mb} MiB object "
        f"store (not preallocated); host tier budget {host_bytes / MiB:.0f} MiB (every model, its "
        "blob and 2 guard pages)\n"
        "memory: each model's host-tier copy is written into the object store by the cache actor's "
        "prefetch before any timing, so a hit maps shared pages that exist already. Nothing else is "
        "pre-touched: every run is a fresh worker, whose first touches of fresh memory (0.3-1.8 "
        "ms/MiB on these VMs; torch.load's buffers, (a)'s default init) are part of what its "
        "method costs.",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="trims-bench-", dir=directory) as tmp:
        files = os.path.join(tmp, "files")
        os.makedirs(files)
        with ray_with_trims(tmp, object_store_mb, host_bytes):
            models = [_prepare_model(mb, files) for mb in sizes_mb]
            _wait_for_disk_copies(len(models))
            result = HandoffResult(models, repeats)
            task = ray.remote(max_calls=1)(_handoff_task)  # max_calls=1: every run a new process
            steps_task = ray.remote(max_calls=1)(_host_steps_task)
            function = trims_ray.function(_handoff_function, max_calls=1)
            sources = {HOST_HIT: lambda m: m.name, HOST_FN: lambda m: m.name, TORCH_LOAD: lambda m: m.pt, ST_COLD: lambda m: m.st, ST_WARM: lambda m: m.st}
            pids: list[int] = []
            for _ in range(repeats):
                for m in models:
                    for method in HANDOFF_METHODS:
                        if method in (HOST_HIT, HOST_FN):
                            where = trims_ray.prefetch(m.name, tier="host")
                            assert set(where.values()) == {"host"}, where
                        elif method in (TORCH_LOAD, ST_COLD):
                            drop_page_cache(sources[method](m))
                        else:
                            warm_page_cache(m.st)
                        if method == HOST_FN:
                            sample = ray.get(function.options(model=m.name).remote())
                        else:
                            sample = ray.get(task.remote(method, sources[method](m), m.mb))
                        pids.append(sample["pid"])
                        result.samples.setdefault((m.mb, method), []).append(sample)
                    steps = ray.get(steps_task.remote(m.name))
                    assert steps["tier"] == HOST_HIT, steps
                    result.steps.setdefault(m.mb, []).append(steps)
            assert len(set(pids)) == len(pids), "a run was not in a fresh worker process"
            for m in models:  # every method read the same weights
                checks = {s["check"] for method in HANDOFF_METHODS for s in result.samples[(m.mb, method)]}
                assert len(checks) == 1, f"{m.name}: methods disagree on the weights: {checks}"
    return result


def print_handoff(result: HandoffResult) -> None:
    r = result
    print(
        f"\nhandoff: medians of {r.repeats} runs, each in a fresh worker process (max_calls=1), "
        "methods interleaved; ms from the task's first line to a usable module, and to that module "
        "with every weight page touched (one element per 4 KiB); ratio = method / host-tier hit. "
        "(a), (b): the file's page cache dropped (POSIX_FADV_DONTNEED) just before the task is "
        "submitted; (c): the file read once just before"
    )
    header = f"{'MiB':>5} {'method':42} {'to module ms':>13} {'ratio':>8} {'+touched ms':>12} {'ratio':>8}"
    print(header)
    print("-" * len(header))
    for m in r.models:
        host = r.median(m.mb, HOST_HIT, "to_module"), r.median(m.mb, HOST_HIT, "touched")
        for method, label in HANDOFF_METHODS.items():
            t1, t2 = r.median(m.mb, method, "to_module"), r.median(m.mb, method, "touched")
            print(f"{m.mb:>5} {label:42} {_ms(t1):>13.2f} {t1 / host[0]:>8.2f} {_ms(t2):>12.2f} {t2 / host[1]:>8.2f}")
    print(
        "\nhost-tier hit, step by step (medians, ms; a fresh worker; the steps of trims_ray.open, "
        "with a no-op '1st actor call' added before the acquire, then a second whole open in the "
        "same worker)"
    )
    header = f"{'MiB':>5} " + " ".join(f"{s:>{max(len(s), 6)}}" for s in HOST_STEPS) + f" {'2nd open':>8}"
    print(header)
    print("-" * len(header))
    for m in r.models:
        runs = r.steps[m.mb]
        cells = [
            f"{_ms(statistics.median(x['steps'][s] for x in runs)):>{max(len(s), 6)}.2f}" for s in HOST_STEPS
        ]
        print(f"{m.mb:>5} " + " ".join(cells) + f" {_ms(statistics.median(x['second_open'] for x in runs)):>8.2f}")
    for method in (HOST_FN, HOST_HIT):
        print_handoff_goals(r, method)


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_handoff_goals(r: HandoffResult, method: str) -> None:
    """The issue's goals for one of the trims_ray methods (``@function`` or ``open()``)."""
    sizes = [m.mb for m in r.models]
    columns = ("to_module", "touched")

    def host(mb: int, column: str) -> float:
        return r.median(mb, method, column)

    rows: list[tuple[str, list[str]]] = []
    if 1000 in sizes:
        cells = [f"{_ms(host(1000, c)):.2f} ms: {_verdict(_ms(host(1000, c)) <= 15)}" for c in columns]
    else:
        cells = ["n/a (1000 MiB not measured)"] * 2
    rows.append(("host-tier hit <= 15 ms at ~1 GB (1000 MiB)", cells))
    if 500 in sizes:
        cells = []
        for c in columns:
            ratio = r.median(500, ST_COLD, c) / host(500, c)
            cells.append(f"{ratio:.2f}x: {_verdict(ratio >= 30)}")
    else:
        cells = ["n/a (500 MiB not measured)"] * 2
    rows.append(("host hit >= 30x faster than (b) at 500 MiB", cells))
    cells = []
    for c in columns:
        ratios = [r.median(mb, ST_WARM, c) / host(mb, c) for mb in sizes]
        shown = ", ".join(f"{x:.2f}x" for x in ratios)
        cells.append(f"(c)/host {shown}: {_verdict(min(ratios) >= 1)}")
    rows.append(("host hit no slower than (c), every size", cells))
    if len(sizes) > 1:
        lo, hi = min(sizes), max(sizes)
        cells = []
        for c in columns:
            growth = host(hi, c) / host(lo, c)
            cells.append(f"{growth:.2f}x: {_verdict(growth <= 1.5)}")
        label = f"host hit grows <= 1.5x, {lo} to {hi} MiB"
    else:
        cells, label = ["n/a (one size)"] * 2, "host hit grows <= 1.5x with size"
    rows.append((label, cells))
    print(
        f"\ngoals (the issue's) for the {HANDOFF_METHODS[method]}, measured in this run: to a "
        "usable module | with every page touched"
    )
    width = max(len(g) for g, _ in rows)
    cell_width = max(len(c) for _, cells in rows for c in cells)
    for goal, (a, b) in rows:
        print(f"{goal:{width}}  {a:{cell_width}} | {b}")


# -- overhead: a decorated call on a warm model against a plain task --------------------------


class TinyNet(nn.Module):
    """A model of a few KB: one ``nn.Linear(32, 32)`` (4,224 bytes in fp32)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)


def tiny_sum(model: TinyNet) -> float:
    """The work both calls do: the sum of one small tensor."""
    return float(model.fc.weight.sum())


def plain_sum(weight: torch.Tensor) -> float:
    return float(weight.sum())


# The steps of a warm decorated call, in order: the first two in the caller, the rest in the
# task (a worker that keeps the model: ``trims_ray._process_tier``).
OVERHEAD_STEPS = (
    "route (caller)",
    "submit task (caller)",
    "take kept model (task)",
    "work",
    "give it back (task)",
)
_CALLER_STEPS = 2


def _decorated_steps_task(tenant: str, hint) -> list[float] | None:
    """The task side of a warm decorated call, step by step (the calls ``@function`` makes);
    None when this worker does not keep the model (not a warm hit)."""
    from trims_ray._process_tier import process_tier

    tier = process_tier()
    marks = [time.perf_counter()]
    kept = tier.take(tenant, hint)
    marks.append(time.perf_counter())
    if kept is None:
        return None
    tiny_sum(kept.model)
    marks.append(time.perf_counter())
    tier.give(kept)
    marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:])]


def _decorated_steps(name: str, n: int) -> dict[str, float]:
    """A warm decorated call taken apart, ``n`` times: the caller's steps timed here, the
    task's in the task; medians in seconds (of the calls that landed on a worker keeping it)."""
    from trims_ray._routing import router
    from trims_ray._protocol import Resolved

    task = ray.remote(_decorated_steps_task)
    samples: dict[str, list[float]] = {s: [] for s in OVERHEAD_STEPS}
    routes = router()
    tenant = caller_tenant()
    for _ in range(n):
        marks = [time.perf_counter()]
        manifest, route = routes.route(name, tenant)
        marks.append(time.perf_counter())
        strategy = NodeAffinitySchedulingStrategy(route.node, soft=True)
        ref = task.options(scheduling_strategy=strategy).remote(tenant, Resolved.of(manifest))
        marks.append(time.perf_counter())
        inside = ray.get(ref)
        if inside is None:
            continue
        for step, seconds in zip(OVERHEAD_STEPS, [b - a for a, b in zip(marks, marks[1:])] + inside):
            samples[step].append(seconds)
    if not samples["work"]:
        raise RuntimeError("no call landed on a worker that keeps the model: the process tier is off")
    return {s: statistics.median(v) for s, v in samples.items()}


@dataclass
class OverheadResult:
    calls: int
    plain: list[float]
    decorated: list[float]
    steps: dict[str, float]


def bench_overhead(calls: int, object_store_mb: int, directory: str | None, nodes: int, warmup: int = 20) -> OverheadResult:
    with tempfile.TemporaryDirectory(prefix="trims-bench-", dir=directory) as tmp:
        with ray_with_trims(tmp, object_store_mb, host_bytes=16 * MiB, nodes=nodes):
            model = TinyNet()
            info = trims_ray.register("tiny", model, factory="workloads.bench:TinyNet")
            weight = model.fc.weight.detach().clone()
            trims_ray.prefetch("tiny", tier="host")
            decorated = trims_ray.function(model="tiny")(tiny_sum)
            plain = ray.remote(plain_sum)
            expected = plain_sum(weight)
            print(
                f"overhead: {os.cpu_count()} cores; Ray with {nodes} node(s) of {RAY_CPUS} CPUs and "
                f"{object_store_mb} MiB object store; model: TinyNet ({info.nbytes:,} bytes), resident in the host tier; "
                f"{warmup} warm-up calls of each first (workers started, model resident, caches "
                "filled)",
                flush=True,
            )
            for _ in range(warmup):
                assert ray.get(decorated.remote()) == expected
                assert ray.get(plain.remote(weight)) == expected
            times: dict[str, list[float]] = {"plain": [], "decorated": []}
            submit = {"plain": lambda: plain.remote(weight), "decorated": decorated.remote}
            for i in range(calls):
                for kind in ("plain", "decorated") if i % 2 == 0 else ("decorated", "plain"):
                    started = time.perf_counter()
                    value = ray.get(submit[kind]())
                    times[kind].append(time.perf_counter() - started)
                    assert value == expected
            steps = _decorated_steps("tiny", calls)
            return OverheadResult(calls, times["plain"], times["decorated"], steps)


def print_overhead(r: OverheadResult) -> None:
    print(
        f"\noverhead: {r.calls} sequential calls of each, interleaved, timed in the driver from "
        "submit to result (ray.get(f.remote())); both return the sum of a 32x32 fp32 tensor"
    )
    header = f"{'call':52} {'median ms':>10} {'p90 ms':>10}"
    print(header)
    print("-" * len(header))
    for label, samples in (
        ("plain Ray task (tensor as argument)", r.plain),
        ("@trims_ray.function (host-resident model)", r.decorated),
    ):
        print(f"{label:52} {_ms(statistics.median(samples)):>10.3f} {_ms(float(np.percentile(samples, 90))):>10.3f}")
    added = _ms(statistics.median(r.decorated) - statistics.median(r.plain))
    print(f"added latency (median decorated - median plain): {added:.3f} ms")
    print(
        f"\nwhere it goes: a decorated call's steps, the caller's timed in the driver and the "
        f"task's inside a warm worker (medians of {r.calls}, ms); Ray's own scheduling and the "
        "result's return are in both calls alike"
    )
    for step in OVERHEAD_STEPS:
        print(f"  {step:24} {_ms(r.steps[step]):>8.3f}")
    caller = sum(r.steps[s] for s in OVERHEAD_STEPS[:_CALLER_STEPS])
    task = sum(r.steps[s] for s in OVERHEAD_STEPS[_CALLER_STEPS:] if s != "work")
    print(f"  {'caller, all steps':24} {_ms(caller):>8.3f}")
    print(f"  {'task, all but the work':24} {_ms(task):>8.3f}")
    print(f"\ngoal: median added latency <= 0.5 ms: {added:.3f} ms: {_verdict(added <= 0.5)}")


def bench_routing(models: int, nodes: int, calls: int, seed: int = 0) -> dict[str, list[float]]:
    """Seconds per ``Placement.route`` call over a seeded cluster, split by the kind of model
    routed: "resident" (in one to three of ``nodes`` nodes, in a random tier) and "cold" (in no
    node: every node is a candidate to load on, the costliest case); a fifth of the models are
    cold, each node reports a few invocations in flight, and its host tier full but for up to
    2 GiB, with its host-resident models as what a load would evict (in a random order, with
    random recent uses), so that a cold model's route prices evictions. Pure Python, no Ray."""
    import random

    from trims_ray.cache.placement import TIERS, NodeReport, Placement

    rng = random.Random(seed)
    now = time.time()
    placement = Placement(wall_clock=lambda: now)
    names = [f"node{i:02d}" for i in range(nodes)]
    residency: dict[str, dict[str, str]] = {n: {} for n in names}
    sizes = {f"model{i:04d}": rng.randint(10, 2000) * MiB for i in range(models)}
    cold = set(rng.sample(list(sizes), models // 5))
    for key in sizes.keys() - cold:
        for node in rng.sample(names, rng.randint(1, min(3, len(names)))):
            residency[node][key] = rng.choice(TIERS)
    for node in names:
        busy = {key: rng.randint(0, 2) for key in rng.sample(list(sizes), 4)}
        evictable = [(key, sizes[key], rng.uniform(0, 20), now - rng.uniform(0, 60)) for key, tier in residency[node].items() if tier == "host"]
        rng.shuffle(evictable)
        capacity = 64 * 1024**3
        report = NodeReport(residency[node], capacity, capacity - rng.randint(0, 2) * 1024**3, busy, slots=8, evictable=evictable)
        placement.report(node, report)
    samples: dict[str, list[float]] = {"resident": [], "cold": []}
    for key in rng.choices(list(sizes), k=calls):
        started = time.perf_counter()
        placement.route(key, sizes[key])
        samples["cold" if key in cold else "resident"].append(time.perf_counter() - started)
    return samples


def print_routing(samples: dict[str, list[float]], models: int, nodes: int) -> None:
    every = sorted(samples["resident"] + samples["cold"])
    print(f"routing: {len(every)} route() calls, {models} models, {nodes} nodes, pure Python (no Ray)")
    print(f"{'models routed':28} {'calls':>7} {'median us':>10} {'p99 us':>8}")
    for label, values in (("resident on 1-3 nodes", samples["resident"]), ("cold (every node a candidate)", samples["cold"]), ("all", every)):
        ordered = sorted(values)
        median, p99 = statistics.median(ordered), ordered[int(0.99 * (len(ordered) - 1))]
        print(f"{label:28} {len(ordered):>7} {median * 1e6:>10.1f} {p99 * 1e6:>8.1f}")
    median = statistics.median(every)
    print(f"goal: median <= 50 us: {median * 1e6:.1f} us: {_verdict(median <= 50e-6)}")


def _sizes_mb(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[int]:
    """``--sizes-mb`` as sorted distinct positive integers (and ``--repeats`` checked too)."""
    try:
        sizes = sorted({int(x) for x in args.sizes_mb.split(",") if x.strip()})
    except ValueError:
        parser.error(f"--sizes-mb must be integers separated by commas, got {args.sizes_mb!r}")
    if not sizes or sizes[0] < 1 or args.repeats < 1:
        parser.error("--sizes-mb and --repeats must be positive")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workloads.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    load = sub.add_parser("load", help="store reader rate vs the raw read rate, disk and S3")
    load.add_argument("--mb", type=int, default=500, help="blob size in MiB (default 500)")
    load.add_argument("--repeats", type=int, default=3, help="runs per method (default 3)")
    load.add_argument("--dir", default=None, help="directory for the local store (default: system temp)")
    load.add_argument("--no-s3", action="store_true", help="skip the S3 measurement")
    handoff = sub.add_parser("handoff", help="task start to usable module in a fresh worker: host hit vs loading")
    handoff.add_argument("--sizes-mb", default="100,500,1000", help="model sizes in MiB, comma-separated (default 100,500,1000)")
    handoff.add_argument("--repeats", type=int, default=3, help="fresh-worker runs per size and method (default 3)")
    handoff.add_argument("--object-store-mb", type=int, default=3072, help="Ray object store in MiB (default 3072)")
    handoff.add_argument("--dir", default=None, help="directory for the store, disk tier and files (default: system temp)")
    routing = sub.add_parser("routing", help="cost of one routing decision, 1,000 models on 64 nodes")
    routing.add_argument("--models", type=int, default=1000)
    routing.add_argument("--nodes", type=int, default=64)
    routing.add_argument("--calls", type=int, default=100_000)
    peer = sub.add_parser("peer", help="first invocation on a node that misses: copy from a peer vs read the store")
    peer.add_argument("--sizes-mb", default="100,400", help="model sizes in MiB, comma-separated (default 100,400)")
    peer.add_argument("--repeats", type=int, default=3, help="runs per size and source (default 3)")
    peer.add_argument("--no-s3", action="store_true", help="only the local-disk store")
    peer.add_argument("--dir", default=None, help="directory for the store and disk tiers (default: system temp)")
    locality = sub.add_parser("locality", help="where invocations of a model resident on one node of three run")
    locality.add_argument("--invocations", type=int, default=50, help="invocations per task size (default 50)")
    locality.add_argument("--concurrency", type=int, default=5, help="invocations sent at a time (default 5)")
    locality.add_argument("--cpus", default="0.1,1", help="num_cpus of the tasks, comma-separated (default 0.1,1)")
    locality.add_argument("--mb", type=int, default=2, help="model size in MiB (default 2)")
    locality.add_argument("--dir", default=None, help="directory for the store and disk tiers (default: system temp)")
    build = sub.add_parser("build", help="a zoo model's build on meta: initialisers run vs skipped")
    build.add_argument("--models", default=None, help="comma-separated zoo models (default: all)")
    build.add_argument("--repeats", type=int, default=5, help="builds of each kind per model (default 5)")
    overhead = sub.add_parser("overhead", help="a decorated call on a warm model vs a plain Ray task")
    overhead.add_argument("--calls", type=int, default=200, help="timed calls of each kind (default 200)")
    overhead.add_argument("--object-store-mb", type=int, default=256, help="Ray object store in MiB per node (default 256)")
    overhead.add_argument("--nodes", type=int, default=3, help="nodes of the local cluster (default 3)")
    overhead.add_argument("--dir", default=None, help="directory for the store and disk tier (default: system temp)")
    miss = sub.add_parser("miss", help="a host-tier miss vs the same load in a plain task, one node")
    miss.add_argument("--mb", type=int, default=20, help="model size in MiB (default 20)")
    miss.add_argument("--rounds", type=int, default=15, help="timed rounds of each kind (default 15)")
    miss.add_argument("--dir", default=None, help="directory for the store (default: system temp)")
    buffers = sub.add_parser("buffers", help="a blob read into a new buffer vs one used again (the node cache's loads)")
    buffers.add_argument("--mb", type=int, default=256, help="blob size in MiB (default 256)")
    buffers.add_argument("--repeats", type=int, default=5, help="reads of each kind (default 5)")
    buffers.add_argument("--dir", default=None, help="directory for the store (default: system temp)")
    # Its own parser (workloads.peers) reads what follows "peers": prefix_chars="+" keeps this
    # one from taking "--mb" and the like as its own options.
    peers = sub.add_parser("peers", help="trims_ray vs Ray Serve multiplexing, an LRU actor and no cache (--help for more)", add_help=False, prefix_chars="+")
    peers.add_argument("peers_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.bench == "peers":
        from workloads.peers import main as peers_main

        return peers_main(args.peers_args, prog=f"{parser.prog} peers")
    if args.bench == "miss":
        from workloads.bench_miss import bench_miss, print_miss

        if args.mb < 1 or args.rounds < 1:
            parser.error("--mb and --rounds must be positive")
        print_miss(bench_miss(args.mb, args.rounds, args.dir))
        return 0
    if args.bench == "buffers":
        from workloads.bench_buffers import bench_buffers, print_buffers

        if args.mb < 1 or args.repeats < 1:
            parser.error("--mb and --repeats must be positive")
        print_buffers(bench_buffers(args.mb, args.repeats, args.dir))
        return 0
    if args.bench == "load":
        if args.mb < 1 or args.repeats < 1:
            parser.error("--mb and --repeats must be positive")
        rows = bench_load(args.mb, args.repeats, args.dir, not args.no_s3)
        print_load_table(rows, args.repeats)
    elif args.bench == "handoff":
        sizes = _sizes_mb(parser, args)
        need = sum(_host_need(mb) for mb in sizes)
        if need > args.object_store_mb * MiB * 0.9:
            parser.error(
                f"the models need {need / MiB:.0f} MiB of host tier: give --object-store-mb at least "
                f"{math.ceil(need / MiB / 0.9)}"
            )
        print_handoff(bench_handoff(sizes, args.repeats, args.object_store_mb, args.dir))
    elif args.bench == "peer":
        from workloads.bench_cluster import bench_peer, print_peer

        print_peer(bench_peer(_sizes_mb(parser, args), args.repeats, not args.no_s3, args.dir))
    elif args.bench == "locality":
        from workloads.bench_cluster import bench_locality, print_locality

        try:
            cpus = [float(c) for c in args.cpus.split(",") if c.strip()]
        except ValueError:
            parser.error(f"--cpus must be numbers separated by commas, got {args.cpus!r}")
        if not cpus or min(cpus) < 0 or min(args.invocations, args.concurrency, args.mb) < 1:
            parser.error("--cpus must be >= 0, --invocations, --concurrency and --mb positive")
        print_locality(bench_locality(args.invocations, args.concurrency, cpus, args.mb, args.dir))
    elif args.bench == "build":
        from workloads.bench_build import bench_build, default_names, print_build

        names = [n.strip() for n in (args.models or default_names()).split(",") if n.strip()]
        if args.repeats < 1 or not names:
            parser.error("--repeats must be positive and --models not empty")
        print_build(bench_build(names, args.repeats), args.repeats)
    elif args.bench == "routing":
        if min(args.models, args.nodes, args.calls) < 1:
            parser.error("--models, --nodes and --calls must be positive")
        print_routing(bench_routing(args.models, args.nodes, args.calls), args.models, args.nodes)
    else:
        if args.calls < 1:
            parser.error("--calls must be positive")
        if args.nodes < 1:
            parser.error("--nodes must be positive")
        print_overhead(bench_overhead(args.calls, args.object_store_mb, args.dir, args.nodes))
    return 0


if __name__ == "__main__":
    # Run the importable module, not __main__: Ray workers import the task functions and the
    # synthetic factories by their names in workloads.bench.
    from workloads import bench as _bench

    sys.exit(_bench.main())
