"""A model name is resolved once per invocation: the hop that resolves it (the caller, else the
first cache a task asks) passes a ``Resolved`` hint down, and the node cache and a GPU holder
serve the copy the hint names without resolving the name again, unless the hint is not theirs to
trust (another tenant's private model, a manifest they hold no copy of). Every cache here trusts
a manifest for ``manifest_ttl_s=0``, so that each resolution reads the store and the reads
counted are the resolutions made.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from trims_ray import ModelNotFoundError, ModelStore
from trims_ray._gpu_ipc import DeviceIdentity
from trims_ray._manifest import Manifest
from trims_ray._protocol import STORE, Caller, Holder, Resolved, cache_key
from trims_ray.cache.gpu_testing import FakeDevice
from trims_ray.cache.gpu_tier import GpuTier, GpuTierConfig
from trims_ray.cache.node_cache import NodeCache

from .test_node_cache import BIG, FakeSharedMemory, weights

pytestmark = pytest.mark.timeout(60)

TENANT = "default"
ME = Holder.this_process()
GPU0 = DeviceIdentity("GPU-8932f937-d72c-4106-c12f-20bd9faed9f6", 0, "0", "node-a")


class Resolutions(Counter):
    """Counts one process's resolutions: the store reads of its ``ModelStore.manifest``."""

    def __init__(self, store: ModelStore) -> None:
        super().__init__()
        real = store.manifest

        def manifest(name: str, *, tenant: str) -> Manifest:
            self[(tenant, name)] += 1
            return real(name, tenant=tenant)

        store.manifest = manifest  # this instance only

    @property
    def total(self) -> int:
        return sum(self.values())


class CallerProcess:
    """The caller's side of a decorated call: its own process, its own store client."""

    def __init__(self, uri: str) -> None:
        self.store = ModelStore(uri)
        self.resolutions = Resolutions(self.store)
        self.id = Caller("driver")
        self.leases = 0

    def resolve(self, name: str, tenant: str = TENANT) -> Resolved:
        return Resolved.of(self.store.manifest(name, tenant=tenant))

    def lease_id(self) -> str:
        self.leases += 1
        return f"driver:{self.leases}"


class CacheHostSource:
    """What the GPU holder's ``_NodeHostSource`` does over Ray, on a NodeCache in this process:
    a swap-in leases the host copy with the manifest's hint; a hint is checked against the
    node's host copies."""

    def __init__(self, cache: NodeCache) -> None:
        self.cache = cache

    def held_manifest(self, key: str) -> Manifest | None:
        return self.cache.held_manifest(key)

    @contextlib.contextmanager
    def open(self, manifest: Manifest) -> Iterator[tuple[np.ndarray, str]]:
        grant = self.cache.acquire(manifest.name, manifest.tenant, ME, hint=Resolved.of(manifest))
        try:
            if grant.bypass:
                buffer, _ = self.cache.store.read(manifest)
                yield buffer, STORE
            else:
                yield grant.handle[grant.offset : grant.offset + manifest.nbytes], grant.tier
        finally:
            self.cache.release(grant.lease_id)


@pytest.fixture
def node(file_store, tmp_path) -> NodeCache:
    cache = NodeCache(
        store=file_store,
        memory=FakeSharedMemory(),
        host_budget=BIG,
        disk_dir=tmp_path / "disk",
        disk_budget=BIG,
        manifest_ttl_s=0.0,
    )
    cache.resolutions = Resolutions(file_store)
    yield cache
    cache.close()


@pytest.fixture
def caller(file_store) -> CallerProcess:
    return CallerProcess(file_store.uri)


@pytest.fixture
def holder(node, file_store):
    """A GPU holder (the actor's body, without Ray) of a fake GPU, its host tier ``node``."""
    from trims_ray.actors.gpu_tier_actor import GpuTierActor

    server = GpuTierActor(GPU0.node_id, GPU0.label, GPU0.uuid, file_store.uri, None, GpuTierConfig(),
                             manifest_ttl_s=0.0)
    server.host = CacheHostSource(node)
    server.tier = GpuTier(device=FakeDevice(64 << 20), identity=GPU0, host=server.host,
                          config=GpuTierConfig(budget_bytes=16 << 20))
    server.resolutions = Resolutions(server.store)
    yield server
    server.tier.close()


def counts(caller: CallerProcess, node: NodeCache, holder=None) -> tuple[int, ...]:
    """Resolutions so far: (caller, node[, holder]); the counters start again from zero."""
    out = [caller.resolutions.total, node.resolutions.total]
    if holder is not None:
        out.append(holder.resolutions.total)
    for process in (caller, node, holder):
        if process is not None:
            process.resolutions.clear()
    return tuple(out)


# -- the host tier -------------------------------------------------------------------------------


def test_a_decorated_call_resolves_its_name_once(file_store, node, caller):
    file_store.register("m", weights(1), tenant=TENANT)

    def invoke() -> str:  # ModelFunction.remote's lease: route, then acquire with the hint
        lease_id = caller.lease_id()
        grant = node.acquire("m", TENANT, caller.id, lease_id, hint=caller.resolve("m"))
        node.release(lease_id)
        return grant.tier

    # The first call loads: the node resolves the name itself before it loads under it.
    assert invoke() == "store"
    assert counts(caller, node) == (1, 1)
    # Every hit after: the caller's resolution only (before, the node's was a second).
    for _ in range(3):
        assert invoke() == "host"
        assert counts(caller, node) == (1, 0)
    # open() in a task: nobody resolved it yet, so the node does, once.
    grant = node.acquire("m", TENANT, ME)
    node.release(grant.lease_id)
    assert grant.tier == "host"
    assert counts(caller, node) == (0, 1)


def test_a_hint_for_another_tenants_private_model_is_refused_like_a_missing_name(file_store, node, caller):
    file_store.register("secret", weights(2), tenant="alice")
    alices = caller.resolve("secret", "alice")
    grant = node.acquire("secret", "alice", ME)  # alice's copy is here
    node.release(grant.lease_id)
    hits = node.stats()["host"].hits
    with pytest.raises(ModelNotFoundError) as refused:
        node.acquire("secret", "bob", caller.id, caller.lease_id(), hint=alices)
    with pytest.raises(ModelNotFoundError) as unhinted:
        node.acquire("secret", "bob", ME)
    with pytest.raises(ModelNotFoundError) as missing:
        node.acquire("no-such-model", "bob", ME)
    assert str(refused.value) == str(unhinted.value) == str(missing.value).replace("no-such-model", "secret")
    assert node.tenant_stats("bob")["bob"].not_found == 3
    assert node.leases() == 0 and node.stats()["host"].hits == hits


def test_a_reregistered_name_is_seen_through_a_hint(file_store, node, caller):
    old = file_store.register("m", weights(3), tenant=TENANT)
    stale = caller.resolve("m")
    grant = node.acquire("m", TENANT, ME, hint=stale)
    node.release(grant.lease_id)
    counts(caller, node)

    # New weights under the name: the caller's new hint names a copy the node does not hold,
    # so the node resolves the name, and loads what the store has now.
    new = file_store.register("m", weights(4), tenant=TENANT)
    grant = node.acquire("m", TENANT, ME, hint=caller.resolve("m"))
    node.release(grant.lease_id)
    loaded = grant.manifest
    assert (loaded.sha256, grant.tier) == (new.sha256, "store")
    assert counts(caller, node) == (1, 1)
    # A caller whose resolution is older (within its own ttl) still gets the copy it resolved:
    # a hint is served as the caller resolved it, never as something else.
    grant = node.acquire("m", TENANT, ME, hint=stale)
    node.release(grant.lease_id)
    assert (grant.manifest.sha256, grant.tier) == (old.sha256, "host")
    assert counts(caller, node) == (0, 0)

    # The same blob again, with a factory: same key, another manifest. The old manifest's
    # copy does not vouch for the new hint: the node serves what the store has now.
    file_store.register("m", weights(4), tenant=TENANT, factory=OneLinear)
    current = caller.resolve("m")
    assert current.key == cache_key(loaded) and current.fingerprint != loaded.fingerprint
    grant = node.acquire("m", TENANT, ME, hint=current)
    node.release(grant.lease_id)
    assert grant.tier == "host" and grant.manifest.factory is not None
    assert Resolved.of(grant.manifest) == current
    assert counts(caller, node) == (1, 1)


class OneLinear(torch.nn.Module):
    """An architecture for ``weights``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 32)


# -- the GPU tier --------------------------------------------------------------------------------


def test_a_gpu_invocation_resolves_its_name_once(file_store, node, caller, holder):
    file_store.register("m", weights(5), tenant=TENANT)
    node.release(node.acquire("m", TENANT, ME).lease_id)  # in the host tier, as GPU misses are
    key = caller.resolve("m").key
    counts(caller, node, holder)

    def invoke(name: str, hint: Resolved | None) -> str:  # a task asks the holder of its GPU
        grant = holder.acquire(name, TENANT, ME, None, False, hint)
        holder.release(grant.lease_id)
        return grant.tier

    # A GPU task of a decorated call: the caller resolved the name; the holder and the node's
    # host tier, which the swap-in reads, hold that very manifest, and resolve nothing.
    assert invoke("m", caller.resolve("m")) == "host"  # swapped in from the host tier
    assert counts(caller, node, holder) == (1, 0, 0)
    assert invoke("m", caller.resolve("m")) == "gpu"
    assert counts(caller, node, holder) == (1, 0, 0)

    # open() in a GPU task: the holder, asked first, resolves it, and its swap-in passes it on.
    assert invoke("m", None) == "gpu"
    assert counts(caller, node, holder) == (0, 0, 1)
    assert holder.tier.evict(key) == "evicted"
    assert invoke("m", None) == "host"
    assert counts(caller, node, holder) == (0, 0, 1)

    # A model in neither tier is loaded, and a hop that loads resolves the name before it
    # loads under it: the holder (nothing here vouches for the hint), then the node.
    file_store.register("cold", weights(6), tenant=TENANT)
    assert invoke("cold", caller.resolve("cold")) == "store"
    assert counts(caller, node, holder) == (1, 1, 1)


def test_a_gpu_holder_refuses_a_hint_for_another_tenants_private_model(file_store, node, caller, holder):
    file_store.register("secret", weights(7), tenant="alice")
    alices = caller.resolve("secret", "alice")
    grant = holder.acquire("secret", "alice", ME, None, False, alices)  # alice's copy is on the GPU
    holder.release(grant.lease_id)
    with pytest.raises(ModelNotFoundError) as refused:
        holder.acquire("secret", "bob", ME, None, False, alices)
    with pytest.raises(ModelNotFoundError) as unhinted:
        holder.acquire("secret", "bob", ME)
    assert str(refused.value) == str(unhinted.value)
    assert holder.tier.leases() == 0 and holder.tier.stats().hits == 0
