"""The GPU tier's invariants under interleavings that FakeDevice's copy gate and ArraySource's
open gate force: device memory is freed only after the copies into it are done, and never
leaked; the policy tracks exactly the resident models; a busy GPU sends a task to the host tier
instead of failing it; a holder trusts a manifest for the configured ttl and a re-register
during a swap-in does not fail the task; each waiter of a failed swap-in gets its own error.
"""

from __future__ import annotations

import threading

import pytest

from trims_ray import CapacityError
from trims_ray._config import CacheConfig
from trims_ray._protocol import cache_key
from trims_ray.actors.gpu_tier_actor import GpuTierActor, _NodeHostSource
from trims_ray.cache.gpu_testing import FakeDevice
from trims_ray.cache.gpu_tier import GpuTier, GpuTierConfig
from trims_ray.cache.node_cache import NodeCache

from .test_gpu_tier import GPU0, ME, TENANT, allocation_bytes, in_thread, make_tier, models, store  # noqa: F401
from .test_node_cache import wait_for, weights
from .test_resolve_once import node  # noqa: F401

pytestmark = pytest.mark.timeout(60)


# -- a holder without Ray ------------------------------------------------------------------------


class InProcessHostSource(_NodeHostSource):
    """The holder's own host source with its calls to the node's cache made on a NodeCache in
    this process instead of over Ray; ``before_acquire`` runs just before a swap-in asks the
    node (where a concurrent register or another process's allocation can land)."""

    def __init__(self, cache: NodeCache, store, before_acquire=lambda: None) -> None:
        super().__init__("node-a", store)
        self.cache = cache
        self.before_acquire = before_acquire

    def _acquire(self, manifest, hint):
        self.before_acquire()
        return self.cache.acquire(manifest.name, manifest.tenant, ME, None, hint=hint)

    def _object(self, grant):
        return grant.handle

    def _release(self, lease_id) -> None:
        self.cache.release(lease_id)

    def _held(self, key):
        return self.cache.held_manifest(key)


def make_holder(file_store, cache: NodeCache, *, budget: int = 1 << 20, device: FakeDevice | None = None,
                before_acquire=lambda: None, ttl_s: float = 0.0) -> GpuTierActor:
    """A GPU holder (the actor's body) of a fake GPU, started as the node cache actor starts it:
    with ``CacheConfig.gpu_tier_config()``; its host tier is ``cache``."""
    config = CacheConfig(manifest_ttl_s=ttl_s, gpu_bytes=budget).gpu_tier_config()
    server = GpuTierActor(GPU0.node_id, GPU0.label, GPU0.uuid, file_store.uri, None, config)
    server.host = InProcessHostSource(cache, server.store, before_acquire)
    server.tier = GpuTier(device=device or FakeDevice(64 << 20), identity=GPU0, host=server.host, config=config)
    return server


@pytest.fixture
def holders():
    made: list[GpuTierActor] = []
    yield made
    for server in made:
        server.tier.close()


# -- 9: evict then release during a pipelined swap-in ----------------------------------------------


def test_evict_and_release_during_a_pipelined_swap_in_free_only_after_the_copy(models):
    m = models.add_tied()
    key = cache_key(m)
    gate = threading.Event()
    device = FakeDevice(64 << 20, gate=gate)
    tier = make_tier(models, device, config=GpuTierConfig(budget_bytes=1 << 20, min_layer_bytes=0))

    early = tier.acquire(m, ME, pipelined=True)
    assert early.events  # the copy is still writing into the allocation
    assert tier.evict(key) == "deferred"
    tier.release(early.lease_id)
    # The copy engine still writes into the allocation: it must not be freed under it.
    assert device.freed == [] and tier.stats().bytes_used == device.footprint(m.nbytes)
    gate.set()
    wait_for(lambda: device.freed == [early.handle[1]])
    wait_for(lambda: tier.stats().bytes_used == 0)
    assert tier.resident() == {} and key not in tier.policy  # the policy tracks what is resident
    assert tier.stats().evictions == 1

    # The model is swapped in again, neither hanging nor tripping over the policy.
    thread, out = in_thread(lambda: tier.acquire(m, ME))
    thread.join(10)
    assert not thread.is_alive(), "the acquire after the evicted swap-in hangs"
    grant = out[0]
    assert not isinstance(grant, BaseException), grant
    assert grant.tier == "host" and allocation_bytes(device, grant) == models.source.blobs[m.sha256].tobytes()
    assert tier.resident() == {key: "gpu"} and key in tier.policy


def test_evicting_an_idle_model_still_copying_frees_it_when_the_copy_ends(models):
    # A caller's lease released before its grant (see test_caller_lease_released_before_...)
    # leaves a pipelined swap-in with no lease: evicting it then must still free it.
    m = models.add_tied()
    gate = threading.Event()
    device = FakeDevice(64 << 20, gate=gate)
    tier = make_tier(models, device, config=GpuTierConfig(budget_bytes=1 << 20, min_layer_bytes=0))
    assert not tier.release("caller-1")
    early = tier.acquire(m, ME, "caller-1", pipelined=True)
    assert early.events and tier.leases() == 0
    assert tier.evict(cache_key(m)) == "deferred"
    assert device.freed == []
    gate.set()
    wait_for(lambda: device.allocations == {})
    assert tier.resident() == {} and cache_key(m) not in tier.policy and tier.stats().bytes_used == 0


# -- 10: the grantee releases before the swap-in fails ----------------------------------------------


def test_a_swap_in_that_fails_after_its_grantee_released_is_freed(models):
    m = models.add_tied()
    gate = threading.Event()
    device = FakeDevice(64 << 20, gate=gate)
    tier = make_tier(models, device, config=GpuTierConfig(budget_bytes=1 << 20, min_layer_bytes=0))

    early = tier.acquire(m, ME, pipelined=True)
    assert tier.release(early.lease_id) and tier.leases() == 0
    device.fail_copy = RuntimeError("copy engine fault")
    gate.set()
    wait_for(lambda: tier.resident() == {})
    wait_for(lambda: device.allocations == {})  # not leaked: nobody is left to release it
    assert device.freed == [early.handle[1]] and tier.stats().bytes_used == 0
    device.fail_copy = None
    grant = tier.acquire(m, ME)
    assert grant.tier == "host" and tier.stats().bytes_used == device.footprint(m.nbytes)


# -- 11: a busy GPU tier sends the task to the host tier -------------------------------------------


def test_a_busy_gpu_answers_bypass_and_a_model_too_big_raises(file_store, node, holders):
    holders.append(holder := make_holder(file_store, node, budget=300_000))
    for name, seed in (("a", 1), ("b", 2)):
        file_store.register(name, weights(seed, rows=200, cols=250), tenant=TENANT)  # 200 KB each
    file_store.register("huge", weights(3, rows=400, cols=250), tenant=TENANT)
    held = holder.acquire("a", TENANT, ME)
    assert held.tier == "store" and not held.bypass  # swapped in through the node's host tier

    # Every byte of the budget is leased: "not now", and the task uses the host tier.
    busy = holder.acquire("b", TENANT, ME)
    assert busy.bypass and busy.handle is None and busy.manifest.name == "b"
    assert holder.tier.leases() == 1 and holder.tier.resident() == {cache_key(held.manifest): "gpu"}
    # A model that can never fit the GPU's budget is an error (DESIGN, invariant 3).
    with pytest.raises(CapacityError, match="budget is"):
        holder.acquire("huge", TENANT, ME)
    # Once the lease ends, b can be swapped in (a evicted) when GDSF's admission lets it: on
    # the request that makes it twice as asked for as a.
    holder.release(held.lease_id)
    refused = holder.acquire("b", TENANT, ME)
    assert refused.bypass and holder.tier.leases() == 0
    holder.release(refused.lease_id)
    grant = holder.acquire("b", TENANT, ME)
    assert grant.tier == "store" and not grant.bypass


def test_a_gpu_short_of_memory_answers_bypass_at_admission_and_at_allocation(file_store, node, holders):
    device = FakeDevice(1 << 20)
    taken = []

    def others_take_the_memory() -> None:  # once, after the first swap-in was admitted
        if not taken:
            taken.append(device.total)
            device.external = device.total

    holders.append(holder := make_holder(file_store, node, budget=500_000, device=device,
                                         before_acquire=others_take_the_memory))
    file_store.register("a", weights(1, rows=200, cols=250), tenant=TENANT)

    # Other processes took the memory after the swap-in was admitted, before it allocated.
    grant = holder.acquire("a", TENANT, ME)
    assert taken and grant.bypass and grant.manifest.name == "a"
    assert holder.tier.resident() == {} and holder.tier.stats().bytes_used == 0 and holder.tier.leases() == 0
    # ... and before it was admitted.
    assert holder.acquire("a", TENANT, ME).bypass
    # Asked for by name, it does need the memory: prefetch says so.
    with pytest.raises(CapacityError):
        holder.prefetch("a", TENANT)
    device.external = 0
    assert holder.acquire("a", TENANT, ME).tier == "host"


# -- 12: the manifest ttl, and a re-register during a swap-in ---------------------------------------


def test_gpu_holders_trust_a_manifest_for_the_configured_ttl(file_store, node, holders):
    holders.append(holder := make_holder(file_store, node, ttl_s=0.0))
    assert holder.manifests.ttl_s == 0.0
    old = file_store.register("m", weights(4), tenant=TENANT)
    first = holder.acquire("m", TENANT, ME)
    holder.release(first.lease_id)
    assert holder.tier.evict(cache_key(first.manifest)) == "evicted"
    node.evict("m", TENANT)  # in no tier of the node either

    new = file_store.register("m", weights(5), tenant=TENANT)
    grant = holder.acquire("m", TENANT, ME)
    assert (first.manifest.sha256, grant.manifest.sha256) == (old.sha256, new.sha256)
    assert allocation_bytes(holder.tier.device, grant) == file_store.read(grant.manifest)[0].tobytes()


def test_a_reregister_during_a_gpu_swap_in_serves_the_manifest_resolved(file_store, node, holders):
    registered = []

    def reregister() -> None:  # lands between the holder's resolution and the node's
        if not registered:
            registered.append(file_store.register("m", weights(7), tenant=TENANT))

    holders.append(holder := make_holder(file_store, node, before_acquire=reregister))
    old = file_store.register("m", weights(6), tenant=TENANT)
    grant = holder.acquire("m", TENANT, ME)
    assert grant.manifest.sha256 == old.sha256  # what the name meant when it was resolved
    assert allocation_bytes(holder.tier.device, grant) == file_store.read(grant.manifest)[0].tobytes()
    assert node.leases() == 0  # the node's lease on the other blob ended
    holder.release(grant.lease_id)
    # The next invocation resolves the name again and gets the new weights.
    later = holder.acquire("m", TENANT, ME)
    assert later.manifest.sha256 == registered[0].sha256
    assert allocation_bytes(holder.tier.device, later) == file_store.read(later.manifest)[0].tobytes()


# -- 13: each waiter of a failed swap-in gets its own error -----------------------------------------


def test_each_waiter_of_a_failed_swap_in_gets_its_own_error(models):
    device = FakeDevice(64 << 20)
    tier = make_tier(models, device)
    m = models.add(10_000)
    models.source.gate = threading.Event()
    runs = [in_thread(lambda: tier.acquire(m, ME)) for _ in range(3)]
    wait_for(lambda: tier.stats().misses == 3)  # the leader is in the host's open, two wait
    device.fail_copy = RuntimeError("copy engine fault")
    models.source.gate.set()
    errors = []
    for thread, out in runs:
        thread.join(10)
        errors.append(out[0])
    assert all(isinstance(e, RuntimeError) and str(e) == "copy engine fault" for e in errors)
    assert len({id(e) for e in errors}) == 3, "waiters raise one shared error object"
    assert all(e is not device.fail_copy for e in errors)
    assert device.allocations == {} and tier.stats().bytes_used == 0
