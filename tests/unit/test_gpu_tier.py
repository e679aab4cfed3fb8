"""The GPU tier without a GPU: GpuTier over a FakeDevice (accounting with swap-ins in flight,
single flight, leases, deferred eviction, the reaper, CapacityError, policy order and
admission, pipelined grants, failures), the task side's views of one allocation, device-index
mapping, NVML parsing, and the tier being off (with its reason) on a machine without a GPU.
"""

from __future__ import annotations

import inspect
import pickle
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pynvml
import pytest
import torch
from torch import nn

from trims_ray import CapacityError, ModelNotFoundError, ModelStore, TrimsError
from trims_ray._cuda import MIN_SEGMENT, CudaIpcHandle, cuda_available, rebuild_args, segment_bytes
from trims_ray._gpu_ipc import (
    DeviceIdentity,
    holder_env,
    local_index,
    materialize_views,
    module_order,
    module_waits,
    node_gpus,
    plan_layers,
)
from trims_ray._gpu_lease import GpuLease, model_from_grant
from trims_ray._nvml import (
    GpuInfo,
    GpuInventory,
    gpu_info,
    inventory,
    normalize_uuid,
    parse_visible_devices,
    uuid_matches,
    visible_gpus,
)
from trims_ray.cache.gpu_testing import ArraySource, FakeDevice
from trims_ray.cache.gpu_tier import GpuTier, GpuTierConfig
from trims_ray._protocol import Caller, GpuGrant, Holder, Resolved, cache_key
from trims_ray.policy.lru import LRU

from .test_node_cache import wait_for

pytestmark = pytest.mark.timeout(60)

TENANT = "default"
ME = Holder.this_process()
UUID0 = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"
UUID1 = "GPU-1f0a3b4c-5d6e-7f80-9a1b-2c3d4e5f6a7b"
GPU0 = DeviceIdentity(UUID0, 0, "0", "node-a")


# -- helpers ---------------------------------------------------------------------------------


class TinyTied(nn.Module):
    """Two layers and an output tied to the embedding, as GPT-2's head is."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(self.embed(ids))))


def tiny_tied() -> TinyTied:
    torch.manual_seed(0)
    return TinyTied()


@pytest.fixture
def store() -> ModelStore:
    return ModelStore(f"memory://gpu-tier-{time.monotonic_ns()}")


class Models:
    """Registers models of a chosen blob size and keeps their blobs for an ArraySource."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.source = ArraySource()
        self.count = 0

    def add(self, nbytes: int):
        """A model whose blob is about ``nbytes`` (distinct contents, so a distinct sha256)."""
        self.count += 1
        values = torch.full((max(1, nbytes // 4),), float(self.count))
        return self._register(f"m{self.count}", {"w.weight": values}, None)

    def add_tied(self, model: TinyTied | None = None):
        """TinyTied (a module with a factory, layers and a tied weight)."""
        return self._register("tied", model or tiny_tied(), "tests.unit.test_gpu_tier:tiny_tied")

    def _register(self, name: str, weights, factory: str | None):
        self.store.register(name, weights, tenant=TENANT, factory=factory)
        manifest = self.store.manifest(name, tenant=TENANT)
        self.source.blobs[manifest.sha256], _ = self.store.read(manifest)
        return manifest


@pytest.fixture
def models(store) -> Models:
    return Models(store)


def make_tier(models: Models, device: FakeDevice | None = None, **kwargs) -> GpuTier:
    config = kwargs.pop("config", None) or GpuTierConfig(budget_bytes=kwargs.pop("budget", 1 << 20))
    return GpuTier(device=device or FakeDevice(64 << 20), identity=GPU0, host=models.source, config=config, **kwargs)


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list]:
    out: list = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def allocation_bytes(device: FakeDevice, grant) -> bytes:
    return device.open(grant.handle)[: grant.manifest.nbytes].tobytes()


# -- swap-in, hits, stats ----------------------------------------------------------------------


def test_identical_weights_of_two_tenants_are_two_gpu_entries(models):
    # A GPU hit must not tell tenant B that tenant A holds the same bytes.
    device = FakeDevice(64 << 20)
    tier = make_tier(models, device)
    weights = {"w.weight": torch.full((10_000,), 7.0)}
    models.store.register("same", weights, tenant="alice")
    models.store.register("same", weights, tenant="bob")
    a, b = (models.store.manifest("same", tenant=t) for t in ("alice", "bob"))
    assert a.sha256 == b.sha256
    models.source.blobs[a.sha256], _ = models.store.read(a)

    assert tier.acquire(a, ME).tier == "host"
    assert tier.acquire(b, ME).tier == "host"  # a miss of its own, not alice's copy
    assert tier.resident() == {cache_key(a): "gpu", cache_key(b): "gpu"}
    assert len(device.allocations) == 2


def test_miss_swaps_in_bit_exact_then_hits(models):
    device = FakeDevice(64 << 20)
    tier = make_tier(models, device)
    m = models.add(100_000)

    first = tier.acquire(m, ME)
    assert first.tier == "host" and first.device == GPU0 and first.events == ()
    assert allocation_bytes(device, first) == models.source.blobs[m.sha256].tobytes()
    second = tier.acquire(m, ME)
    assert second.tier == "gpu" and second.handle == first.handle
    assert models.source.opened[m.sha256] == 1 and models.source.open_now == 0  # host lease ended

    stats = tier.stats()
    assert (stats.hits, stats.misses, stats.loads, stats.models) == (1, 1, 1, 1)
    assert stats.bytes_used == device.footprint(m.nbytes) and stats.capacity == 1 << 20
    assert tier.leases() == 2
    assert tier.release(first.lease_id) and tier.release(second.lease_id)
    assert not tier.release(second.lease_id)  # twice is harmless
    assert tier.resident() == {cache_key(m): "gpu"}


def test_budget_defaults_to_a_fraction_of_the_device(models):
    tier = make_tier(models, FakeDevice(1000), config=GpuTierConfig(budget_fraction=0.25))
    assert tier.budget == 250 and tier.stats().capacity == 250
    with pytest.raises(ValueError, match="exceeds"):
        make_tier(models, FakeDevice(1000), config=GpuTierConfig(budget_bytes=2000))


@pytest.mark.parametrize(
    "bad",
    [dict(budget_bytes=-1), dict(budget_fraction=0), dict(budget_fraction=1.5), dict(min_layer_bytes=-1),
     dict(swap_workers=0), dict(lease_check_s=0)],
)
def test_config_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        GpuTierConfig(**bad)


def test_accounting_counts_swap_ins_in_flight(models):
    tier = make_tier(models, budget=300_000)
    a, b = models.add(200_000), models.add(200_000)
    models.source.gate = threading.Event()

    thread, out = in_thread(lambda: tier.acquire(a, ME))
    wait_for(lambda: models.source.opened[a.sha256] == 1)
    assert tier.stats().bytes_used == a.nbytes and tier.stats().models == 0
    assert tier.resident() == {cache_key(a): "loading"}
    # The bytes on their way in are not evictable: b cannot have them.
    with pytest.raises(CapacityError, match="leased or being swapped in"):
        tier.acquire(b, ME)
    models.source.gate.set()
    thread.join(10)
    assert out[0].tier == "host" and tier.stats().models == 1


def test_concurrent_misses_swap_in_once(models):
    device = FakeDevice(64 << 20)
    tier = make_tier(models, device)
    m = models.add(50_000)
    models.source.gate = threading.Event()

    barrier = threading.Barrier(8)
    runs = [in_thread(lambda: (barrier.wait(), tier.acquire(m, ME))[1]) for _ in range(8)]
    wait_for(lambda: models.source.opened[m.sha256] == 1)
    wait_for(lambda: tier.stats().misses == 8)
    models.source.gate.set()
    grants = []
    for thread, out in runs:
        thread.join(10)
        grants.append(out[0])
    assert models.source.opened[m.sha256] == 1 and len(device.allocations) == 1
    assert len({g.handle for g in grants}) == 1 and len({g.lease_id for g in grants}) == 8
    assert sorted(g.tier for g in grants) == ["gpu"] * 7 + ["host"]
    assert tier.stats().loads == 1 and tier.leases() == 8


def test_leased_model_is_never_freed(models):
    device = FakeDevice(64 << 20)
    tier = make_tier(models, device, budget=300_000)
    a, b = models.add(200_000), models.add(200_000)
    held = tier.acquire(a, ME)
    before = allocation_bytes(device, held)

    with pytest.raises(CapacityError):
        tier.acquire(b, ME)
    assert device.freed == [] and allocation_bytes(device, held) == before
    assert tier.evict(cache_key(a)) == "deferred"
    assert device.freed == [] and tier.resident() == {cache_key(a): "gpu"}
    # Still served while the eviction waits for the lease.
    assert tier.acquire(a, ME).tier == "gpu"


def test_deferred_evict_frees_on_last_release(models):
    device = FakeDevice(64 << 20)
    tier = make_tier(models, device)
    m = models.add(10_000)
    g1, g2 = tier.acquire(m, ME), tier.acquire(m, ME)
    assert tier.evict(cache_key(m)) == "deferred"
    tier.release(g1.lease_id)
    assert device.freed == []
    tier.release(g2.lease_id)
    assert device.freed == [g1.handle[1]] and device.allocations == {}
    stats = tier.stats()
    assert (stats.bytes_used, stats.models, stats.evictions) == (0, 0, 1)
    assert tier.evict(cache_key(m)) == "absent"


def test_evict_idle_frees_device_memory(models):
    device = FakeDevice(1 << 20)
    tier = make_tier(models, device)
    m = models.add(100_000)
    tier.release(tier.acquire(m, ME).lease_id)
    free_before = device.memory().free
    assert tier.evict(cache_key(m)) == "evicted"
    assert device.memory().free == free_before + device.footprint(m.nbytes)
    assert tier.stats().bytes_used == 0


def test_reaper_ends_leases_of_dead_holders(models):
    dead = Holder(pid=999_999, start=-1)
    device = FakeDevice(64 << 20)
    tier = make_tier(models, device, holder_alive=lambda h: h is not dead)
    m = models.add(10_000)
    gone = tier.acquire(m, dead)
    alive = tier.acquire(m, ME)
    assert tier.evict(cache_key(m)) == "deferred"
    assert tier.reap() == 1
    assert tier.leases() == 1 and device.freed == []
    tier.release(alive.lease_id)
    assert device.freed == [gone.handle[1]]


def test_reaper_ends_unclaimed_leases_after_ttl(models):
    now = [0.0]
    tier = make_tier(models, config=GpuTierConfig(budget_bytes=1 << 20, unclaimed_ttl_s=10), clock=lambda: now[0])
    m = models.add(10_000)
    unclaimed = tier.acquire(m, None)
    claimed = tier.acquire(m, None)
    assert tier.claim(claimed.lease_id, ME)
    now[0] = 5.0
    assert tier.reap() == 0
    now[0] = 11.0
    assert tier.reap() == 1
    assert not tier.release(unclaimed.lease_id) and tier.release(claimed.lease_id)
    assert not tier.claim(unclaimed.lease_id, ME)


def test_caller_lease_released_before_its_grant_ends_at_once(models):
    tier = make_tier(models)
    m = models.add(10_000)
    assert not tier.release("caller-1")  # the task finished before the acquire came back
    grant = tier.acquire(m, Caller("driver"), "caller-1")
    assert grant.lease_id == "caller-1" and tier.leases() == 0
    with pytest.raises(TypeError):
        tier.acquire(m, ME, 7)
    tier.acquire(m, ME, "x")
    with pytest.raises(ValueError, match="in use"):
        tier.acquire(m, ME, "x")


def test_capacity_error_evicts_nothing(models):
    device = FakeDevice(64 << 20)
    tier = make_tier(models, device, budget=500_000)
    a, b, c = models.add(150_000), models.add(200_000), models.add(400_000)
    tier.release(tier.acquire(a, ME).lease_id)  # idle
    tier.acquire(b, ME)  # leased
    with pytest.raises(CapacityError, match="leased"):
        tier.acquire(c, ME)  # evicting a is not enough: nothing is evicted
    assert set(tier.resident()) == {cache_key(a), cache_key(b)} and device.freed == []
    with pytest.raises(CapacityError, match="budget is"):
        tier.acquire(models.add(600_000), ME)
    assert tier.stats().evictions == 0


def test_capacity_error_when_other_processes_hold_the_memory(models):
    device = FakeDevice(1_000_000)
    tier = make_tier(models, device, budget=800_000)
    a, b = models.add(300_000), models.add(300_000)
    tier.release(tier.acquire(a, ME).lease_id)
    device.external = 650_000  # the tasks' own tensors
    with pytest.raises(CapacityError, match="other processes"):
        tier.acquire(b, ME)
    assert tier.resident() == {cache_key(a): "gpu"} and device.freed == []


@pytest.mark.parametrize("policy,evicted", [("lru", "b"), ("fifo", "a")])
def test_eviction_follows_the_policy(models, policy, evicted):
    device = FakeDevice(64 << 20)
    tier = make_tier(models, device, config=GpuTierConfig(budget_bytes=500_000, policy=policy))
    named = {"a": models.add(200_000), "b": models.add(200_000)}
    for key in ("a", "b", "a"):  # a is used last
        tier.release(tier.acquire(named[key], ME).lease_id)
    c = models.add(200_000)
    tier.release(tier.acquire(c, ME).lease_id)
    kept = {"a", "b"} - {evicted}
    assert set(tier.resident()) == {cache_key(c)} | {cache_key(named[k]) for k in kept}
    assert tier.stats().evictions == 1 and len(device.freed) == 1


def test_gdsf_swaps_in_a_model_twice_as_popular_as_an_idle_resident_one_whatever_its_swap_took(models):
    # The policy weighs a newcomer's swap-in cost against what its victims cost when they came
    # in. Both must be on one scale: a resident model whose slow first swap was recorded as its
    # cost outweighed every later newcomer of the same popularity, and they all bypassed.
    device = FakeDevice(64 << 20)
    tier = make_tier(models, device, config=GpuTierConfig(budget_bytes=300_000, policy="gdsf"))
    a, b = models.add(200_000), models.add(200_000)
    models.source.gate = gate = threading.Event()
    thread, out = in_thread(lambda: tier.acquire(a, ME))
    time.sleep(0.3)  # a slow host load: a's swap-in takes over 0.3 s
    gate.set()
    thread.join(10)
    tier.release(out[0].lease_id)

    first = tier.acquire(b, ME)  # requested once, as a was: GDSF's admission asks for twice
    assert first.tier == "bypass"
    tier.release(first.lease_id)
    grant = tier.acquire(b, ME)  # twice now: admitted, unless a's slow swap weighed as its cost
    assert grant.tier != "bypass" and grant.handle is not None
    assert tier.resident() == {cache_key(b): "gpu"} and tier.stats().evictions == 1
    tier.release(grant.lease_id)


class Refuses(LRU):
    name = "refuses"

    def _admit(self, key, nbytes, cost, victims):
        self.asked = (key, nbytes, list(victims))
        return False


def test_policy_admission_is_asked_after_choosing_victims(models):
    device = FakeDevice(64 << 20)
    policy = Refuses()
    tier = make_tier(models, device, budget=300_000, policy=policy)
    a, b = models.add(200_000), models.add(200_000)
    tier.release(tier.acquire(a, ME).lease_id)  # no victims: not asked
    assert not hasattr(policy, "asked")

    grant = tier.acquire(b, ME)
    assert grant.tier == "bypass" and grant.handle is None
    assert policy.asked == (cache_key(b), device.footprint(b.nbytes), [cache_key(a)])
    assert tier.resident() == {cache_key(a): "gpu"} and tier.stats().bypasses == 1 and tier.leases() == 0
    # Asked for by name (prefetch), it is kept whatever admission says.
    assert tier.prefetch(b) == "host"
    assert tier.resident() == {cache_key(b): "gpu"}


def test_a_miss_the_policy_refuses_is_a_bypass_even_when_the_device_is_short(models):
    # The policy is asked before the device's free memory is checked: a refused miss
    # allocates nothing on this GPU, so other processes' memory does not fail it.
    device = FakeDevice(1_000_000)
    tier = make_tier(models, device, budget=300_000, policy=Refuses())
    a, b = models.add(200_000), models.add(250_000)
    tier.release(tier.acquire(a, ME).lease_id)
    device.external = 900_000  # the tasks' own tensors: evicting a frees too little for b
    grant = tier.acquire(b, ME)
    assert grant.tier == "bypass" and tier.stats().bypasses == 1
    # Kept whatever admission says (prefetch), it does need the memory: CapacityError.
    with pytest.raises(CapacityError, match="other processes"):
        tier.prefetch(b)
    assert tier.resident() == {cache_key(a): "gpu"} and device.freed == []


# -- pipelined swap-in and failures ------------------------------------------------------------


def test_pipelined_grant_comes_before_the_last_layer(models):
    m = models.add_tied()
    gate = threading.Event()
    device = FakeDevice(64 << 20, gate=gate)
    tier = make_tier(models, device, config=GpuTierConfig(budget_bytes=1 << 20, min_layer_bytes=0))

    early = tier.acquire(m, ME, pipelined=True)
    assert len(early.groups) == len(early.events) > 1
    entry = tier._resident[cache_key(m)]
    assert entry.layers_done <= 1 and not entry.ready.is_set()
    thread, out = in_thread(lambda: tier.acquire(m, ME))  # not pipelined: waits for every byte
    time.sleep(0.05)
    assert out == []
    gate.set()
    thread.join(10)
    assert out[0].events == () and out[0].tier == "gpu"
    assert entry.layers_done == len(early.groups)
    assert allocation_bytes(device, out[0]) == models.source.blobs[m.sha256].tobytes()


def test_failed_swap_in_reaches_every_waiter_and_frees(models):
    device = FakeDevice(64 << 20)
    tier = make_tier(models, device)
    m = models.add(10_000)
    device.fail_copy = RuntimeError("copy engine fault")
    with pytest.raises(RuntimeError, match="copy engine"):
        tier.acquire(m, ME)
    assert device.allocations == {} and tier.stats().bytes_used == 0 and tier.resident() == {}
    device.fail_copy = None
    assert tier.acquire(m, ME).tier == "host"  # the next request tries again


def test_missing_host_copy_raises_model_not_found(models, store):
    tier = make_tier(models)
    info = store.register("nowhere", {"w.weight": torch.zeros(4)}, tenant=TENANT)
    with pytest.raises(ModelNotFoundError):
        tier.acquire(store.manifest(info.name, tenant=TENANT), ME)
    assert tier.stats().bytes_used == 0


# -- the task side: views of one allocation ------------------------------------------------------


def test_module_from_grant_is_views_of_the_allocation(models):
    reference = tiny_tied()
    m = models.add_tied(reference)
    device = FakeDevice(64 << 20)
    tier = make_tier(models, device)
    grant = tier.acquire(m, ME)
    received = pickle.loads(pickle.dumps(grant))  # as a task gets it from the holder actor
    assert received == grant and not received.bypass and received.node == "node-a"
    released = []
    lease = GpuLease(received, lambda: released.append(grant.lease_id),
                     open_buffer=lambda handle, _d: torch.from_numpy(device.open(handle)))
    with lease as model:
        alloc = device.open(grant.handle)
        lo, hi = alloc.ctypes.data, alloc.ctypes.data + len(alloc)
        for tensor in [*model.parameters(), *model.buffers()]:
            assert lo <= tensor.data_ptr() < hi  # zero-copy: inside the one allocation
        assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()  # tie kept
        ids = torch.arange(16).reshape(2, 8)
        with torch.inference_mode():
            assert torch.equal(model(ids), reference(ids))
    assert released == [grant.lease_id] and lease.model is None


def test_pipelined_module_waits_per_layer_in_order(models, store):
    m = Models(store).add_tied()
    groups = plan_layers(m, module_order(m), min_bytes=0)
    waited: list[int] = []
    grant = GpuGrant(lease_id=1, handle=None, manifest=m, offset=0, device=GPU0, tier="host", groups=groups,
                     events=tuple(range(len(groups))))
    buffer = torch.from_numpy(store.read(m)[0].copy())
    model, _, hooks = model_from_grant(grant, open_buffer=lambda h, d: buffer,
                                       layer_waiter=lambda events, d: waited.append)
    model(torch.arange(4).reshape(1, 4))
    # embed, proj, head (tied to embed: waits for embed's group) as the forward runs them.
    order = [groups.index(next(g for g in groups if mod in g.modules)) for mod in ("embed", "proj")]
    assert waited == [order[0], order[1], order[0]]
    for hook in hooks:
        hook.remove()
    waited.clear()
    model(torch.arange(4).reshape(1, 4))
    assert waited == []


def test_layer_plan_covers_the_blob_once_in_module_order(store):
    m = Models(store).add_tied()
    order = module_order(m)
    assert order == list(tiny_tied().state_dict())
    groups = plan_layers(m, order, min_bytes=0)
    assert [g.modules for g in groups] == [("embed",), ("proj",)]  # head is embed's alias
    covered = sorted(r for g in groups for r in g.ranges)
    assert covered[0][0] == 0 and covered[-1][1] == m.nbytes
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # no gap, no overlap
    waits = module_waits(m, groups)
    assert waits == {"embed": 0, "proj": 1, "head": 0}
    # Without an order: natural name order; one group when the minimum is the whole blob.
    assert [g.modules for g in plan_layers(m, None, min_bytes=0)] == [("embed",), ("proj",)]
    assert len(plan_layers(m, order, min_bytes=m.nbytes)) == 1


def test_natural_order_puts_layer_10_after_layer_2(store):
    tensors = {f"h.{i}.w": torch.full((4,), float(i)) for i in (10, 2, 1)}
    info = store.register("deep", tensors, tenant=TENANT)
    m = store.manifest(info.name, tenant=TENANT)
    assert [g.modules for g in plan_layers(m, None, min_bytes=0)] == [("h.1",), ("h.2",), ("h.10",)]


def test_views_reject_a_short_buffer(store):
    info = store.register("s", {"w": torch.ones(8)}, tenant=TENANT)
    m = store.manifest(info.name, tenant=TENANT)
    with pytest.raises(ValueError, match="needs"):
        materialize_views(m, torch.zeros(m.nbytes - 1, dtype=torch.uint8))
    with pytest.raises(TypeError):
        materialize_views(m, torch.zeros(m.nbytes, dtype=torch.float32))
    views = materialize_views(m, torch.from_numpy(store.read(m)[0].copy()))
    assert torch.equal(views["w"], torch.ones(8))


# -- device identity and CUDA_VISIBLE_DEVICES ------------------------------------------------------


@pytest.mark.parametrize(
    "value,expected",
    [
        (None, None),
        ("", []),
        ("NoDevFiles", []),
        ("0,1", [0, 1]),
        (" 2 , 0 ", [2, 0]),
        ("1,-1,0", [1]),  # CUDA stops at the first invalid entry
        ("0,foo,1", [0]),
        ("GPU-8932f937,1", ["GPU-8932f937", 1]),
        ("MIG-1f0a3b4c-5d6e-7f80-9a1b-2c3d4e5f6a7b", ["MIG-1f0a3b4c-5d6e-7f80-9a1b-2c3d4e5f6a7b"]),
    ],
)
def test_parse_visible_devices(value, expected):
    assert parse_visible_devices(value) == expected


@pytest.mark.parametrize(
    "visible,expected",
    [
        (None, 1),  # unset: every GPU, physical order
        ("1", 0),
        ("0,1", 1),
        ("1,0", 0),
        ("0", None),
        ("", None),
        ("NoDevFiles", None),
        (UUID1, 0),
        (f"{UUID0},{UUID1.upper().replace('GPU-', 'GPU-')}", 1),
        ("GPU-1f0a3b4c", 0),  # a unique prefix, as CUDA accepts
        ("3,GPU-1f0a", 1),
        ("GPU-8932", None),
    ],
)
def test_local_index_maps_the_holders_gpu(visible, expected):
    holder_gpu = DeviceIdentity(UUID1, 1, "1", "node-a")
    assert local_index(holder_gpu, visible) == expected


def test_device_identity_normalizes_and_validates():
    ident = DeviceIdentity(UUID0.upper().replace("GPU-", "gpu-"), 3)
    assert ident.uuid == UUID0 and ident.label == "3"
    with pytest.raises(ValueError):
        DeviceIdentity("not-a-uuid", 0)
    with pytest.raises(ValueError):
        DeviceIdentity(UUID0, -1)


def test_uuid_forms():
    assert normalize_uuid(UUID0.encode()) == UUID0
    assert normalize_uuid(UUID0.removeprefix("GPU-")) == UUID0  # torch's bare form
    assert normalize_uuid("MIG-" + UUID0[4:].upper()) == "MIG-" + UUID0[4:]
    for bad in ("", "GPU-xyz", "8932f937", "GPU-8932f937-d72c"):
        with pytest.raises(ValueError):
            normalize_uuid(bad)
    assert uuid_matches("GPU-8932F937", UUID0) and not uuid_matches("GPU-", UUID0)
    assert not uuid_matches("0", UUID0) and not uuid_matches("MIG-8932f937", UUID0)


def test_holder_env_pins_its_gpu_and_stops_ray_overriding_it():
    env = holder_env(UUID0.upper().replace("GPU-", "GPU-"))
    assert env == {"CUDA_VISIBLE_DEVICES": UUID0, "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
    assert local_index(GPU0, env["CUDA_VISIBLE_DEVICES"]) == 0


# -- NVML ------------------------------------------------------------------------------------------


class FakeNvml:
    """The part of pynvml that inventory() calls, answering from a list of devices."""

    NVML_ERROR_LIBRARY_NOT_FOUND = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION

    def __init__(self, devices, init_error=None, fail_at=None) -> None:
        self.devices, self.init_error, self.fail_at = devices, init_error, fail_at
        self.shutdowns = 0

    def nvmlInit(self):
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self):
        return b"580.159.04"

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i):
        if i == self.fail_at:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return i

    def nvmlDeviceGetName(self, h):
        return self.devices[h][0]

    def nvmlDeviceGetUUID(self, h):
        return self.devices[h][1]

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=self.devices[h][2], free=self.devices[h][3], used=0)


DEVICES = [
    (b"NVIDIA H100 80GB HBM3", UUID0.encode(), 85_520_809_984, 84_000_000_000),
    ("NVIDIA H100 80GB HBM3", UUID1.upper().replace("GPU-", "GPU-"), 85_520_809_984, 1_000),
]


def test_inventory_parses_nvml_answers():
    nvml = FakeNvml(DEVICES)
    inv = inventory(nvml)
    assert inv.available and inv.reason == "" and inv.driver == "580.159.04"
    assert inv.gpus == (
        GpuInfo(0, UUID0, "NVIDIA H100 80GB HBM3", 85_520_809_984, 84_000_000_000),
        GpuInfo(1, UUID1, "NVIDIA H100 80GB HBM3", 85_520_809_984, 1_000),
    )
    assert inv.by_uuid("GPU-1f0a") == inv.gpus[1] and inv.by_uuid("GPU-") is None
    assert nvml.shutdowns == 1


@pytest.mark.parametrize(
    "nvml,reason",
    [
        (FakeNvml(DEVICES, init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND), "library"),
        (FakeNvml(DEVICES, init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED), "driver is not loaded"),
        (FakeNvml(DEVICES, init_error=pynvml.NVML_ERROR_NO_PERMISSION), "no permission"),
        (FakeNvml([]), "no GPU"),
        (FakeNvml(DEVICES, fail_at=1), "NVML error"),
    ],
)
def test_inventory_says_why_there_is_no_gpu(nvml, reason):
    inv = inventory(nvml)
    assert not inv.available and inv.gpus == ()
    assert reason in inv.reason and "GPU tier is off" in inv.reason


def test_gpu_info_rejects_bad_answers():
    with pytest.raises(ValueError):
        gpu_info(0, "x", "bogus", SimpleNamespace(total=1, free=0))
    with pytest.raises(ValueError):
        gpu_info(0, "x", UUID0, SimpleNamespace(total=1, free=2))


def test_node_gpus_follow_the_raylets_visible_devices():
    inv = inventory(FakeNvml(DEVICES))
    assert [label for label, _ in node_gpus(None, inv)[0]] == ["0", "1"]
    assert [(label, g.uuid) for label, g in node_gpus("1", inv)[0]] == [("1", UUID1)]
    assert [(label, g.index) for label, g in visible_gpus(f"{UUID1},0", inv)] == [(UUID1, 1), ("0", 0)]
    assert [label for label, _ in node_gpus(None, inv, ray_gpus=1)[0]] == ["0"]
    gpus, reason = node_gpus("", inv)
    assert gpus == [] and "hides every GPU" in reason
    gpus, reason = node_gpus(None, inv, ray_gpus=0)
    assert gpus == [] and "no GPU resource" in reason
    gpus, reason = node_gpus(None, GpuInventory(reason="no driver"))
    assert gpus == [] and reason == "no driver"


# -- without a GPU: the tier is off, and says why ------------------------------------------------


@pytest.mark.skipif(cuda_available(), reason="this machine has a GPU")
def test_without_gpu_the_tier_is_off_with_a_reason(tmp_path):
    inv = inventory()  # the real pynvml against this machine
    assert not inv.available and "GPU tier is off" in inv.reason
    from trims_ray._cuda import CudaDevice

    with pytest.raises(TrimsError, match="sees no GPU"):
        CudaDevice(0)
    from trims_ray.actors.gpu_tier_actor import GpuTierActor

    holder = GpuTierActor("node-a", "0", UUID0, (tmp_path / "store").as_uri(), None, GpuTierConfig())
    stats = holder.stats()
    assert stats["enabled"] is False and "sees no GPU" in stats["reason"]
    assert stats["tiers"]["gpu"]["capacity"] == 0
    assert holder.acquire("m", TENANT, ME) is None and holder.report() == {}
    with pytest.raises(TrimsError, match="cannot prefetch"):
        holder.prefetch("m", TENANT)
    with pytest.raises(TypeError):
        holder.acquire("m", TENANT, Caller("driver"))
    # A budget set while the tier is off is only its config (for a start with a GPU).
    assert holder.set_budget(5 << 20) == {"budget": 5 << 20, "bytes_used": 0, "evicted": 0, "over_budget": 0}
    assert holder.config.budget_bytes == 5 << 20
    with pytest.raises(ValueError, match="non-negative int"):
        holder.set_budget(-1)
    assert holder.config.budget_bytes == 5 << 20


# -- CUDA pieces that do not need a GPU ----------------------------------------------------------


def test_rebuild_args_follow_torchs_signature():
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    handle = CudaIpcHandle(b"h" * 64, 20 << 20, 4096, b"/torch_1_2", 7, b"e" * 64, True, 20 << 20)
    args = dict(zip(inspect.signature(rebuild_cuda_tensor).parameters, rebuild_args(handle, 3)))
    assert args == {
        "tensor_cls": torch.Tensor,
        "tensor_size": (20 << 20,),
        "tensor_stride": (1,),
        "tensor_offset": 0,
        "storage_cls": torch.UntypedStorage,
        "dtype": torch.uint8,
        "storage_device": 3,
        "storage_handle": b"h" * 64,
        "storage_size_bytes": 20 << 20,
        "storage_offset_bytes": 4096,
        "requires_grad": False,
        "ref_counter_handle": b"/torch_1_2",
        "ref_counter_offset": 7,
        "event_handle": b"e" * 64,
        "event_sync_required": True,
    }


def test_allocations_take_a_segment_of_their_own():
    assert segment_bytes(1) == MIN_SEGMENT
    assert segment_bytes(MIN_SEGMENT + 1) == MIN_SEGMENT + (2 << 20)
    assert segment_bytes(100 << 20) == 100 << 20
    assert all(segment_bytes(n) % (2 << 20) == 0 and segment_bytes(n) >= n for n in (0, 5, 10**9 + 7))
    with pytest.raises(ValueError):
        segment_bytes(-1)
    assert np.dtype(np.uint8).itemsize == 1


def test_a_process_without_a_gpu_gets_no_gpu_lease():
    from trims_ray._gpu_lease import acquire_gpu, task_gpu_label

    assert task_gpu_label() is None  # no Ray here, hence no GPU from Ray
    assert acquire_gpu("m", TENANT) == (None, None)
    # The caller's hint comes back for the host tier to use.
    hint = Resolved(f"{TENANT}/{'0' * 64}", "f" * 64)
    assert acquire_gpu("m", TENANT, hint=hint) == (None, hint)


def test_node_stats_sum_the_gpus_and_say_why_off():
    from dataclasses import asdict

    from trims_ray.actors.gpu_tier_actor import combine_gpu_stats
    from trims_ray._protocol import TierStats

    on = {"enabled": True, "reason": "", "tiers": {"gpu": asdict(TierStats(10, 100, 1, 2, 3, 1, 0, 0))}}
    off = {"enabled": False, "reason": "GPU 1: driver gone", "tiers": {"gpu": asdict(TierStats())}}
    both = combine_gpu_stats({"0": on, "1": off})
    assert both["enabled"] and both["reason"] == "" and both["tier"]["bytes_used"] == 10
    assert both["tier"]["capacity"] == 100 and both["gpus"]["1"]["reason"] == "GPU 1: driver gone"
    assert combine_gpu_stats({"1": off}) == {
        "enabled": False, "reason": "GPU 1: driver gone", "tier": asdict(TierStats()), "gpus": {"1": off}
    }
    none = combine_gpu_stats({}, "NVML found no GPU on this node: the GPU tier is off")
    assert not none["enabled"] and "no GPU" in none["reason"] and none["tier"]["capacity"] == 0


@pytest.mark.skipif(cuda_available(), reason="this machine has a GPU")
def test_a_node_without_gpus_starts_no_holder(tmp_path):
    from trims_ray.actors.gpu_tier_actor import start_gpu_tier_actors

    holders, reason = start_gpu_tier_actors("node-a", (tmp_path / "s").as_uri(), None, GpuTierConfig(),
                                        visible=None, ray_gpus=0)
    assert holders == {} and "GPU tier is off" in reason


def test_failed_pipelined_swap_in_keeps_memory_until_its_grantees_release(models):
    m = models.add_tied()
    gate = threading.Event()
    device = FakeDevice(64 << 20, gate=gate)
    tier = make_tier(models, device, config=GpuTierConfig(budget_bytes=1 << 20, min_layer_bytes=0))
    early = tier.acquire(m, ME, pipelined=True)
    device.fail_copy = RuntimeError("link down")
    gate.set()
    wait_for(lambda: tier.resident() == {})  # failed: no new grant can find it
    assert tier.stats().bytes_used == device.footprint(m.nbytes) and len(device.allocations) == 1
    with pytest.raises(RuntimeError, match="link down"):
        tier.acquire(m, ME)  # a new request tries again, and fails the same way
    assert tier.release(early.lease_id)
    assert device.allocations == {} and tier.stats().bytes_used == 0
