"""GPU tier benchmark: four tables measured side by side in one run (issue 5; docs/benchmarks.md).

    python -m workloads.gpu_bench [--sizes-mb 100,1000,10000] [--zoo alexnet,resnet50,...]
                                  [--repeats 2] [--tables handoff,swap,pipeline,trims] [--dir DIR]

``handoff``: time from a task's start to a usable module on its GPU, for synthetic models of
100 MB to 10 GB: a GPU-tier hit (map the holder's allocation through CUDA IPC, build the module
on meta, assign views) against loading the same safetensors file from local disk onto the GPU
in the task (page cache warm, and dropped). ``swap``: the host-to-GPU swap-in rate (page-locking
the host tier's shared mapping in place, copying layer by layer) against a plain ``copy_`` from
pinned memory of the same bytes on the same GPU, the link's practical limit. ``pipeline``: time to
the first layer's output and to the full output when compute starts as the first layers arrive,
against swapping everything in first. ``trims``: TrIMS's table for the zoo models: first-invocation
latency in a fresh process, disk to GPU in the task vs GPU hit vs host hit + swap-in, against the
ideal (compute alone), with each speedup and its fraction of the ideal speedup.

It runs without Ray: this process plays the GPU holder (a GpuTier over CudaDevice, its host tier a
shared-memory mapping as Ray's object store gives), and each task is a fresh process (forked from a
server that imported torch and trims_ray, as a Ray worker has, with no CUDA context yet) that gets
its grant directly; under Ray a task adds one call to the holder actor (well under a millisecond
on one node) to a hit. Without a CUDA GPU it says so and exits with status 1.
"""

from __future__ import annotations

import argparse
import math
import mmap
import multiprocessing
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from trims_ray._cuda import CudaDevice, HostRegistration, cuda_available
from trims_ray._factory import assemble_module, resolve_factory
from trims_ray._gpu_ipc import (
    DeviceIdentity,
    attach_layer_waits,
    materialize_views,
    module_order,
    module_waits,
    plan_layers,
    quiet_from_numpy,
)
from trims_ray._gpu_lease import GpuLease
from trims_ray._manifest import Manifest
from trims_ray._nvml import inventory
from trims_ray._protocol import cache_key
from trims_ray._store import ModelStore
from trims_ray.cache.gpu_testing import ArraySource
from trims_ray.cache.gpu_tier import GpuTier, GpuTierConfig
from workloads import zoo
from workloads.zoo import ZOO, build, zoo_model

MB = 1000 * 1000
MiB = 1024 * 1024
TENANT = "bench"
WIDE_DEPTH = 8
HIT, DISK_WARM, DISK_COLD, SWAP = "gpu hit", "disk warm", "disk cold", "host hit + swap-in"


# -- synthetic models of a chosen size ---------------------------------------------------------


class Wide(nn.Module):
    """``depth`` square fp32 ``Linear`` layers with ReLU: a model of a chosen size whose layer
    count does not grow with it (so a hit's cost is measured against bytes, not modules)."""

    def __init__(self, width: int, depth: int = WIDE_DEPTH) -> None:
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        return x


def wide_width(mb: int) -> int:
    """The width whose ``WIDE_DEPTH`` layers take about ``mb`` MB."""
    return max(8, int(math.sqrt(mb * MB / (4 * WIDE_DEPTH))))


def __getattr__(name: str):
    # "workloads.gpu_bench:wide_<mb>" is the importable factory of each size.
    match = re.fullmatch(r"wide_([1-9][0-9]*)", name)
    if match is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    width = wide_width(int(match.group(1)))

    def factory() -> Wide:
        return Wide(width)

    factory.__name__ = factory.__qualname__ = name
    return factory


@torch.no_grad()
def wide_model(mb: int) -> Wide:
    """The ~``mb`` MB Wide model with small, deterministic, non-constant weights (a repeating
    ramp: filling 10 GB with random numbers would take longer than the benchmark)."""
    with torch.device("meta"):
        model = Wide(wide_width(mb))
    model = model.to_empty(device="cpu")
    ramp = (torch.arange(1 << 24) % 997).float().mul_(2e-6)
    for p in model.parameters():
        flat = p.view(-1)
        for start in range(0, flat.numel(), ramp.numel()):
            part = flat[start : start + ramp.numel()]
            part.copy_(ramp[: part.numel()])
    return model.eval()


# -- set-up: the store, the host tier, the holder ------------------------------------------------


@dataclass
class Bench:
    """The models, their host copies (shared mappings) and the holder's tier."""

    store: ModelStore
    device: CudaDevice
    tier: GpuTier
    source: ArraySource
    manifests: dict[str, Manifest] = field(default_factory=dict)
    inputs: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    _maps: list[mmap.mmap] = field(default_factory=list)

    def add(self, name: str, model: nn.Module, factory: str, example: Callable[[], torch.Tensor]) -> Manifest:
        """Registers a model, and puts its verified blob in a shared mapping (the host tier)."""
        self.store.register(name, model, tenant=TENANT, factory=factory)
        manifest = self.store.manifest(name, tenant=TENANT)
        mapping = mmap.mmap(-1, manifest.nbytes, flags=mmap.MAP_SHARED)
        host = np.frombuffer(mapping, dtype=np.uint8)
        self.store.read(manifest, out=host)  # also touches every page: no first-touch cost later
        self._maps.append(mapping)
        self.source.blobs[manifest.sha256] = host
        self.manifests[name] = manifest
        self.inputs[name] = example
        return manifest

    def path(self, name: str) -> str:
        return self.store.blob_path(self.manifests[name].sha256)

    def evict(self, name: str) -> None:
        state = self.tier.evict(cache_key(self.manifests[name]))
        if state == "deferred":
            raise RuntimeError(f"{name} is still leased")


def drop_from_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- one fresh process per measurement -------------------------------------------------------------


def _fresh_task(job: dict, conn) -> None:
    """A task in a fresh process: CUDA context first (timed apart, every method pays it), then
    the clock starts; the model is made usable by the job's method, and one forward pass runs."""
    try:
        started = time.perf_counter()
        torch.cuda.init()
        torch.empty(1, device="cuda")
        torch.cuda.synchronize()
        out = {"cuda_init": time.perf_counter() - started}
        manifest: Manifest = job["manifest"]
        t0 = time.perf_counter()
        lease = None
        if job["method"] in (DISK_WARM, DISK_COLD):
            import safetensors.torch

            tensors = safetensors.torch.load_file(job["path"], device="cuda:0")
            model = assemble_module(resolve_factory(manifest.factory), tensors, manifest.aliases)
        else:
            grant = job.get("grant")
            if grant is None:  # a miss: ask the holder, which swaps it in from the host tier
                conn.send({"acquire": True})
                grant = conn.recv()
            lease = GpuLease(grant, lambda: None)
            model = lease.__enter__()
        torch.cuda.synchronize()
        out["module"] = time.perf_counter() - t0
        x = zoo.to_device(job["input"], "cuda")
        t1 = time.perf_counter()
        y = zoo.forward(model, x)
        torch.cuda.synchronize()
        out["forward"] = time.perf_counter() - t1
        out["total"] = time.perf_counter() - t0
        out["check"] = float(y.double().sum().cpu())
        if lease is not None:
            lease.__exit__(None, None, None)
        conn.send(out)
    except BaseException:  # noqa: BLE001 - the parent prints it
        conn.send({"error": traceback.format_exc()})


class Tasks:
    """Starts fresh task processes from a fork server that imported torch and trims_ray."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["workloads.gpu_bench"])

    def run(self, name: str, method: str) -> dict:
        bench = self.bench
        manifest = bench.manifests[name]
        job = {"method": method, "manifest": manifest, "path": bench.path(name), "input": bench.inputs[name]()}
        leases = []
        if method == HIT:
            grant = bench.tier.acquire(manifest, None, force=True)
            leases.append(grant.lease_id)
            job["grant"] = grant
        elif method == SWAP:
            bench.evict(name)
        elif method == DISK_COLD:
            drop_from_page_cache(job["path"])
        here, there = self.ctx.Pipe()
        # By the module's name, not __main__'s (``python -m``), so that the task process, which
        # has no such __main__, finds the function.
        from workloads import gpu_bench

        proc = self.ctx.Process(target=gpu_bench._fresh_task, args=(job, there))
        proc.start()
        try:
            while True:
                if not here.poll(600):
                    raise TimeoutError(f"task for {name} ({method}) did not answer")
                msg = here.recv()
                if "acquire" not in msg:
                    break
                grant = bench.tier.acquire(manifest, None, force=True)
                leases.append(grant.lease_id)
                here.send(grant)
        finally:
            proc.join(60)
            for lease in leases:
                bench.tier.release(lease)
        if "error" in msg:
            raise RuntimeError(f"task for {name} ({method}) failed:\n{msg['error']}")
        return msg


def _median(samples: list[dict], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f}"


def measure_tasks(tasks: Tasks, names: list[str], methods: list[str], repeats: int) -> dict[tuple[str, str], list[dict]]:
    """Runs every (model, method) ``repeats`` times, interleaved so that drift hits all alike."""
    samples: dict[tuple[str, str], list[dict]] = {(n, m): [] for n in names for m in methods}
    for _ in range(repeats):
        for name in names:
            for method in methods:
                samples[(name, method)].append(tasks.run(name, method))
    return samples


def _agree(samples: dict, name: str, methods: list[str]) -> str:
    checks = [s["check"] for m in methods for s in samples[(name, m)]]
    ok = all(math.isclose(c, checks[0], rel_tol=1e-3, abs_tol=1e-3) for c in checks)
    return "yes" if ok else "NO"


# -- table 1: GPU-hit handoff ---------------------------------------------------------------------


def table_handoff(bench: Bench, tasks: Tasks, sizes: list[int], repeats: int) -> None:
    names = [f"wide{mb}" for mb in sizes]
    methods = [HIT, DISK_WARM, DISK_COLD]
    samples = measure_tasks(tasks, names, methods, repeats)
    init = statistics.median(s["cuda_init"] for v in samples.values() for s in v)
    print(f"\nGPU-hit handoff: task start to a usable module on its GPU (ms, median of {repeats} fresh "
          f"processes; CUDA context creation, paid by every method, excluded: {init * 1e3:.0f} ms)")
    print(f"{'model':>10} {'GB':>6} | {'gpu hit':>9} {'disk warm':>9} {'disk cold':>9} | "
          f"{'hit 1st out':>11} | {'warm/hit':>8} {'cold/hit':>8} | outputs agree")
    hits = []
    for name in names:
        hit, warm, cold = (_median(samples[(name, m)], "module") for m in methods)
        first = _median(samples[(name, HIT)], "total")
        hits.append(hit)
        gb = bench.manifests[name].nbytes / 1e9
        print(f"{name:>10} {gb:6.2f} | {_ms(hit)} {_ms(warm)} {_ms(cold)} | {_ms(first):>11} | "
              f"{warm / hit:8.1f} {cold / hit:8.1f} | {_agree(samples, name, methods)}")
    flat = max(hits) / min(hits)
    print(f"goal: gpu hit <= 2 ms and flat in size: max {max(hits) * 1e3:.2f} ms, "
          f"largest/smallest {flat:.2f}x -> {'met' if max(hits) <= 2e-3 and flat < 2 else 'NOT met'}")


# -- table 2: swap-in rate against pinned copy_ ---------------------------------------------------


def _timed(fn: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def _swap_samples(bench: Bench, name: str, repeats: int) -> dict[str, list[float]]:
    """Seconds per run: a pinned copy_, registering the host mapping, a copy_ from it once
    registered, unregistering, and the tier's whole swap-in, interleaved."""
    manifest = bench.manifests[name]
    host = bench.source.blobs[manifest.sha256]
    dst = torch.empty(manifest.nbytes, dtype=torch.uint8, device=bench.device.device)
    pinned = torch.empty(manifest.nbytes, dtype=torch.uint8, pin_memory=True)
    pinned.numpy()[:] = host
    src = quiet_from_numpy(host)
    samples: dict[str, list[float]] = {k: [] for k in ("plain", "register", "registered", "unregister", "swap")}
    dst.copy_(pinned, non_blocking=True)  # warm-up
    for _ in range(repeats):
        samples["plain"].append(_timed(lambda: dst.copy_(pinned, non_blocking=True)))
        started = time.perf_counter()
        registration = HostRegistration(host)
        samples["register"].append(time.perf_counter() - started)
        if not registration.ok:
            raise RuntimeError(f"cudaHostRegister refused the host tier's mapping: {registration.error}")
        samples["registered"].append(_timed(lambda: dst.copy_(src, non_blocking=True)))
        started = time.perf_counter()
        registration.close()
        samples["unregister"].append(time.perf_counter() - started)
        bench.evict(name)
        samples["swap"].append(_timed(lambda: bench.tier.release(bench.tier.acquire(manifest, None, force=True).lease_id)))
    return samples


def table_swap(bench: Bench, sizes: list[int], repeats: int) -> None:
    print(f"\nSwap-in rate host tier -> GPU against a plain pinned copy_ of the same bytes (GB/s, median of {repeats})")
    print(f"{'model':>10} {'GB':>6} | {'pinned copy_':>12} {'registered':>10} {'swap-in':>8} | "
          f"{'swap/pinned':>11} | {'register ms':>11} {'unregister ms':>13}")
    for mb in sizes:
        name = f"wide{mb}"
        manifest = bench.manifests[name]
        n = manifest.nbytes
        samples = _swap_samples(bench, name, repeats)
        rate = {k: n / statistics.median(v) / 1e9 for k, v in samples.items() if k in ("plain", "registered", "swap")}
        print(f"{name:>10} {n / 1e9:6.2f} | {rate['plain']:12.1f} {rate['registered']:10.1f} {rate['swap']:8.1f} | "
              f"{rate['swap'] / rate['plain']:11.2f} | {statistics.median(samples['register']) * 1e3:11.1f} "
              f"{statistics.median(samples['unregister']) * 1e3:13.1f}")
    print("'registered': copy_ straight from the host tier's mapping once page-locked; 'swap-in': the tier's "
          "whole miss (allocate, register, copy layer by layer, unregister). goal: swap/pinned >= 0.8")


# -- table 3: pipelined swap-in -------------------------------------------------------------------


def _first_layer_recorder(model: nn.Module) -> tuple[list, list]:
    """Hooks that record a timing event after the first parameterized leaf module runs."""
    first: list = []

    def after(_module, _args, _out) -> None:
        if not first:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            first.append(event)

    hooks = [
        m.register_forward_hook(after)
        for m in model.modules()
        if not list(m.children()) and any(True for _ in m.parameters(recurse=False))
    ]
    return first, hooks


def _pipeline_once(bench: Bench, name: str, pipelined: bool, order, min_bytes: int) -> tuple[float, float]:
    device, manifest = bench.device, bench.manifests[name]
    host = bench.source.blobs[manifest.sha256]
    groups = plan_layers(manifest, order, min_bytes=min_bytes)
    buffer = device.allocate(manifest.nbytes)
    model = materialize_views(manifest, buffer.tensor[: manifest.nbytes])
    x = zoo.to_device(bench.inputs[name](), "cuda")
    first, hooks = _first_layer_recorder(model)
    compute = torch.cuda.current_stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record(compute)
    job = device.copy_in(buffer, host, groups)
    if pipelined:
        hooks += attach_layer_waits(model, module_waits(manifest, groups), lambda g: compute.wait_event(job.local_events[g]))
    else:
        job.wait()
    zoo.forward(model, x)
    end.record(compute)
    end.synchronize()
    job.wait()
    result = start.elapsed_time(first[0]) / 1e3, start.elapsed_time(end) / 1e3
    for hook in hooks:
        hook.remove()
    del model
    device.free(buffer)
    return result


def _alone(bench: Bench, name: str, groups, repeats: int) -> tuple[float, float]:
    """Seconds of the swap-in's copies alone, and of a forward pass alone with the weights
    resident (after a warm-up that loads the kernels)."""
    manifest = bench.manifests[name]
    host = bench.source.blobs[manifest.sha256]
    resident = materialize_views(manifest, quiet_from_numpy(host).cuda())
    x = zoo.to_device(bench.inputs[name](), "cuda")
    zoo.forward(resident, x)
    compute = statistics.median(_timed(lambda: zoo.forward(resident, x)) for _ in range(max(3, repeats)))
    resident = None
    buffer = bench.device.allocate(manifest.nbytes)
    try:
        copy = statistics.median(_timed(lambda: bench.device.copy_in(buffer, host, groups).wait()) for _ in range(repeats))
    finally:
        bench.device.free(buffer)
    return copy, compute


def table_pipeline(bench: Bench, names: list[str], repeats: int, min_bytes: int) -> None:
    print(f"\nPipelined swap-in (in the holder's process, kernels warm, weights cold): ms from the start of the "
          f"swap-in, median of {repeats}")
    print(f"{'model':>12} {'MB':>7} {'groups':>6} | {'copy':>7} {'compute':>8} | {'sequential':>21} | "
          f"{'pipelined':>21} | {'speedup':>7}")
    print(f"{'':>12} {'':>7} {'':>6} | {'':>7} {'':>8} | {'1st layer':>10} {'output':>10} | "
          f"{'1st layer':>10} {'output':>10} | {'output':>7}")
    for name in names:
        manifest = bench.manifests[name]
        order = module_order(manifest)
        groups = plan_layers(manifest, order, min_bytes=min_bytes)
        copy, compute = _alone(bench, name, groups, repeats)
        runs = {p: [_pipeline_once(bench, name, p, order, min_bytes) for _ in range(repeats)] for p in (False, True)}
        seq = [statistics.median(r[i] for r in runs[False]) for i in (0, 1)]
        pipe = [statistics.median(r[i] for r in runs[True]) for i in (0, 1)]
        print(f"{name:>12} {manifest.nbytes / 1e6:7.0f} {len(groups):6d} | {_ms(copy):>7} {_ms(compute):>8} | "
              f"{_ms(seq[0]):>10} {_ms(seq[1]):>10} | {_ms(pipe[0]):>10} {_ms(pipe[1]):>10} | {seq[1] / pipe[1]:7.2f}")
    print("sequential: swap every layer in, then compute; pipelined: compute starts on the first layers while "
          "later ones transfer (each module waits on its layer's event on the GPU, not the CPU)")


# -- table 4: TrIMS's table for the zoo -------------------------------------------------------------


def table_trims(bench: Bench, tasks: Tasks, names: list[str], repeats: int) -> None:
    methods = [DISK_WARM, HIT, SWAP]
    samples = measure_tasks(tasks, names, methods, repeats)
    print(f"\nTrIMS table: first-invocation latency in a fresh process, batch 1 (ms, median of {repeats}; "
          "CUDA context creation excluded)")
    print(f"{'model':>12} {'MB':>6} | {'baseline':>9} {'gpu hit':>9} {'swap-in':>9} {'ideal':>9} | "
          f"{'hit x':>6} {'swap x':>6} {'ideal x':>7} | {'hit %ideal':>10} {'swap %ideal':>11} | agree")
    for name in names:
        base, hit, swap = (_median(samples[(name, m)], "total") for m in methods)
        # Compute alone: the first forward with the weights already there (the hit's own).
        ideal = min(_median(samples[(name, m)], "forward") for m in methods)
        best = base / ideal
        print(f"{name:>12} {bench.manifests[name].nbytes / 1e6:6.0f} | {_ms(base)} {_ms(hit)} {_ms(swap)} "
              f"{_ms(ideal)} | {base / hit:6.1f} {base / swap:6.1f} {best:7.1f} | "
              f"{ideal / hit:10.0%} {ideal / swap:11.0%} | {_agree(samples, name, methods)}")
    print("baseline: safetensors file from local disk (page cache warm) onto the GPU in the task; gpu hit: "
          "the holder's copy mapped through CUDA IPC; swap-in: a GPU miss served from the host tier; "
          "ideal: the first forward pass alone. x: speedup over baseline; %ideal: speedup / ideal speedup")


# -- main ---------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workloads.gpu_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", default="100,1000,10000", help="synthetic model sizes, MB (default 100,1000,10000)")
    parser.add_argument("--zoo", default=",".join(ZOO), help=f"zoo models for pipeline and trims (default {','.join(ZOO)})")
    parser.add_argument("--repeats", type=int, default=2, help="runs per cell (default 2)")
    parser.add_argument("--tables", default="handoff,swap,pipeline,trims", help="which tables (default all four)")
    parser.add_argument("--min-layer-mb", type=float, default=4.0, help="pipelining group size in MiB (default 4)")
    parser.add_argument("--dir", default=None, help="directory for the store (default: system temp)")
    args = parser.parse_args(argv)
    tables = {t.strip() for t in args.tables.split(",") if t.strip()}
    unknown = tables - {"handoff", "swap", "pipeline", "trims"}
    if unknown or args.repeats < 1:
        parser.error(f"unknown tables {sorted(unknown)}" if unknown else "--repeats must be >= 1")
    if not cuda_available():
        inv = inventory()
        why = inv.reason or f"NVML sees {len(inv.gpus)} GPU(s) but torch {torch.__version__} cannot use them"
        print(f"gpu_bench: no CUDA GPU here ({why}); nothing measured. Run it on a machine with a GPU.")
        return 1
    sizes = _ints(args.sizes_mb)
    zoo = [zoo_model(n).name for n in args.zoo.split(",") if n.strip()]
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="trims-gpu-bench-") as tmp:
        device = CudaDevice(0)
        uuid = device.uuid() or "GPU-00000000-0000-0000-0000-000000000000"
        gpu = inventory().by_uuid(uuid)
        source = ArraySource()
        tier = GpuTier(device=device, identity=DeviceIdentity(uuid, gpu.index if gpu else 0, "0"), host=source,
                       config=GpuTierConfig(budget_fraction=0.6, min_layer_bytes=int(args.min_layer_mb * MiB)))
        bench = Bench(ModelStore(os.path.join(tmp, "store")), device, tier, source)
        print(f"GPU: {gpu.name if gpu else torch.cuda.get_device_name(0)} ({uuid}), torch {torch.__version__}, "
              f"tier budget {tier.budget / 1e9:.1f} GB", flush=True)
        started = time.perf_counter()
        if tables & {"handoff", "swap"}:
            for mb in sizes:
                width = wide_width(mb)
                bench.add(f"wide{mb}", wide_model(mb), f"workloads.gpu_bench:wide_{mb}",
                          lambda w=width: torch.full((1, w), 0.5))
        if tables & {"pipeline", "trims"}:
            for name in zoo:
                entry = zoo_model(name)
                bench.add(name, build(name), entry.factory,
                          lambda e=entry: e.example_input(1, generator=torch.Generator().manual_seed(0)))
        print(f"models registered and in the host tier in {time.perf_counter() - started:.0f} s", flush=True)
        tasks = Tasks(bench)
        if "handoff" in tables:
            table_handoff(bench, tasks, sizes, args.repeats)
        if "swap" in tables:
            table_swap(bench, sizes, args.repeats)
        for name in list(bench.manifests):
            bench.evict(name)
        if "pipeline" in tables:
            table_pipeline(bench, zoo, args.repeats, int(args.min_layer_mb * MiB))
        if "trims" in tables:
            table_trims(bench, tasks, zoo, args.repeats)
        tier.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
