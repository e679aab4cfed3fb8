"""The GPU tier on a real GPU, without Ray: a GpuTier over CudaDevice in this process (the
holder's side) and tasks in spawned processes mapping its grants through CUDA IPC.

Checks: zero-copy IPC (a task's weights lie inside the holder's one allocation, and a write
through them shows in it), device-index mapping under CUDA_VISIBLE_DEVICES=<uuid>, bit-exact
swap-in from registered host memory, pipelined grants, eviction returning the bytes to the GPU
(as torch and NVML report them), and a leased model surviving an evict.
"""

from __future__ import annotations

import mmap
import multiprocessing

import numpy as np
import pytest
import torch

from tests.gpu._workers import example_ids, stack, use_grant
from trims_ray._cuda import CudaDevice, HostRegistration, segment_bytes
from trims_ray._errors import CapacityError
from trims_ray._gpu_ipc import DeviceIdentity
from trims_ray._nvml import inventory
from trims_ray._store import ModelStore
from trims_ray.cache.gpu_testing import ArraySource
from trims_ray.cache.gpu_tier import GpuTier, GpuTierConfig
from trims_ray._protocol import Holder, cache_key

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

TENANT = "default"
MiB = 1024 * 1024


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore((tmp_path / "store").as_uri())


@pytest.fixture
def device() -> CudaDevice:
    torch.cuda.empty_cache()
    return CudaDevice(0)


def identity(device: CudaDevice) -> DeviceIdentity:
    uuid = device.uuid()
    assert uuid is not None, "torch does not report the GPU's UUID"
    gpu = inventory().by_uuid(uuid)
    return DeviceIdentity(uuid, gpu.index if gpu else 0, "0")


def register(store: ModelStore, source: ArraySource, name: str, model=None, **tensors):
    weights = model if model is not None else tensors
    factory = "tests.gpu._workers:stack" if model is not None else None
    store.register(name, weights, tenant=TENANT, factory=factory)
    manifest = store.manifest(name, tenant=TENANT)
    source.blobs[manifest.sha256], _ = store.read(manifest)
    return manifest


def in_task(grant, env=None, write=False) -> dict:
    """Runs ``use_grant`` in a fresh process (a task) and returns what it reported."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=use_grant, args=(grant, env or {}, results, write))
    proc.start()
    try:
        out = results.get(timeout=240)
    finally:
        proc.join(60)
    assert "error" not in out, out.get("error")
    return out


def test_ipc_is_zero_copy_and_maps_the_device_by_uuid(store, device):
    source = ArraySource()
    reference = stack()
    manifest = register(store, source, "stack", reference)
    tier = GpuTier(device=device, identity=identity(device), host=source, config=GpuTierConfig(budget_fraction=0.2))
    grant = tier.acquire(manifest, Holder.this_process())
    with torch.no_grad():
        expected = reference.cuda()(example_ids().cuda()).cpu()

    seen = in_task(grant, env={"CUDA_VISIBLE_DEVICES": grant.device.uuid}, write=True)
    assert seen["inside"] and seen["all_cuda"] and seen["device"] == 0
    # The task allocated nothing for its weights: they are the holder's memory.
    assert seen["allocated_before_forward"] == 0
    torch.testing.assert_close(torch.from_numpy(seen["logits"]), expected, rtol=1e-4, atol=1e-4)
    # Its write landed in the holder's allocation: one copy, shared.
    entry = tier._resident[cache_key(manifest)]
    bias = next(t for t in manifest.tensors if t.name == "layers.0.bias")
    value = entry.buffer.tensor[bias.start : bias.start + 4].view(torch.float32)[0].item()
    assert value == 12345.0
    tier.release(grant.lease_id)


def test_swap_in_is_bit_exact_from_registered_shared_memory(store, device):
    blob = np.random.default_rng(0).integers(0, 2**31, 24 * MiB // 4, dtype=np.int32).view(np.float32)
    source = ArraySource()
    manifest = register(store, source, "raw", w=torch.from_numpy(blob.copy()))
    # Host bytes in a shared mapping, as Ray's object store holds them.
    shared = mmap.mmap(-1, manifest.nbytes, flags=mmap.MAP_SHARED)
    host = np.frombuffer(shared, dtype=np.uint8)
    host[:] = source.blobs[manifest.sha256]
    registration = HostRegistration(host)
    assert registration.ok, registration.error
    registration.close()
    source.blobs[manifest.sha256] = host

    tier = GpuTier(device=device, identity=identity(device), host=source, config=GpuTierConfig(budget_fraction=0.2))
    grant = tier.acquire(manifest, Holder.this_process())
    on_gpu = tier._resident[cache_key(manifest)].buffer.tensor[: manifest.nbytes].cpu().numpy()
    assert np.array_equal(on_gpu, host)
    assert tier.swap_rate is not None and tier.swap_rate > 0
    tier.release(grant.lease_id)
    tier.close()


def test_pipelined_grant_serves_a_task_while_layers_arrive(store, device):
    source = ArraySource()
    reference = stack()
    manifest = register(store, source, "stack", reference)
    config = GpuTierConfig(budget_fraction=0.2, min_layer_bytes=MiB)
    tier = GpuTier(device=device, identity=identity(device), host=source, config=config)
    grant = tier.acquire(manifest, Holder.this_process(), pipelined=True)
    with torch.no_grad():
        expected = reference.cuda()(example_ids().cuda()).cpu()
    if grant.events:  # the swap-in may already be done by the time the grant is built
        assert len(grant.events) == len(grant.groups) > 1
    seen = in_task(grant)
    torch.testing.assert_close(torch.from_numpy(seen["logits"]), expected, rtol=1e-4, atol=1e-4)
    tier.release(grant.lease_id)


def test_evict_frees_device_memory_and_a_leased_model_stays(store, device):
    source = ArraySource()
    manifest = register(store, source, "big", w=torch.ones(64 * MiB // 4))
    ident = identity(device)
    tier = GpuTier(device=device, identity=ident, host=source, config=GpuTierConfig(budget_fraction=0.5))
    footprint = segment_bytes(manifest.nbytes)
    reserved_before = torch.cuda.memory_reserved(0)

    held = tier.acquire(manifest, Holder.this_process())
    assert torch.cuda.memory_reserved(0) - reserved_before == footprint
    in_task(held)  # a task mapped it and let go
    assert tier.evict(cache_key(manifest)) == "deferred"
    assert torch.cuda.memory_reserved(0) - reserved_before == footprint  # leased: kept
    kept = tier._resident[cache_key(manifest)].buffer.tensor[: manifest.nbytes].cpu().numpy()
    assert np.array_equal(kept, source.blobs[manifest.sha256])

    free_torch = torch.cuda.mem_get_info(0)[0]
    free_nvml = inventory().by_uuid(ident.uuid).free
    tier.release(held.lease_id)  # the deferred evict happens now
    assert torch.cuda.memory_reserved(0) == reserved_before
    # The device got the whole segment back (not parked by torch's IPC bookkeeping).
    assert torch.cuda.mem_get_info(0)[0] - free_torch >= footprint
    assert inventory().by_uuid(ident.uuid).free - free_nvml >= footprint
    assert tier.stats().bytes_used == 0 and tier.stats().evictions == 1


def test_over_budget_is_a_capacity_error_not_an_oom(store, device):
    source = ArraySource()
    small = register(store, source, "small", w=torch.ones(12 * MiB // 4))
    large = register(store, source, "large", w=torch.ones(30 * MiB // 4))
    tier = GpuTier(device=device, identity=identity(device), host=source, config=GpuTierConfig(budget_bytes=40 * MiB))
    held = tier.acquire(small, Holder.this_process())
    with pytest.raises(CapacityError):
        tier.acquire(large, Holder.this_process())
    tier.release(held.lease_id)
    grant = tier.acquire(large, Holder.this_process())  # now the idle one is evicted for it
    assert tier.resident() == {cache_key(large): "gpu"}
    tier.release(grant.lease_id)
