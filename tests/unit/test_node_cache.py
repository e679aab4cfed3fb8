"""NodeCache without Ray: host and disk tiers, single flight, leases, byte budgets, eviction,
the reaper, tenants and verification, over a local file store and a fake shared memory.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from trims_ray import CapacityError, IntegrityError, ModelNotFoundError, ModelStore
from trims_ray._protect import GUARD_BYTES
from trims_ray._reader import copy_verified
from trims_ray._protocol import BYPASS, Caller, Grant, Holder, cache_key, holder_alive, process_start
from trims_ray.cache.node_cache import NodeCache

# A wedged load must fail the test, not hang the suite.
pytestmark = pytest.mark.timeout(60)

TENANT = "default"
ME = Holder.this_process()
BIG = 64 << 20  # a budget nothing in these tests comes near


# -- helpers ---------------------------------------------------------------------------------


class FakeSharedMemory:
    """HostMemory for tests: publish copies into a fresh read-only array (as ray.put copies
    into plasma) and keeps only a weak reference, so a test can tell when the cache let go."""

    def __init__(self) -> None:
        self.published: list[weakref.ref] = []

    def publish(self, buffer: np.ndarray) -> np.ndarray:
        copy = np.array(buffer, copy=True)
        copy.flags.writeable = False
        self.published.append(weakref.ref(copy))
        return copy

    def live(self) -> int:
        gc.collect()
        return sum(ref() is not None for ref in self.published)


class CountingRead:
    """Wraps ModelStore.read on one instance: counts reads per blob, and holds reads of the
    blobs in ``hold`` until ``gate`` is set, so a load can be kept in flight."""

    def __init__(self, store: ModelStore) -> None:
        self.real = store.read
        self.calls: Counter[str] = Counter()
        self.hold: set[str] = set()
        self.started = threading.Event()
        self.gate = threading.Event()

    def __call__(self, manifest, **kwargs):
        self.calls[manifest.sha256] += 1
        if manifest.sha256 in self.hold:
            self.started.set()
            if not self.gate.wait(20):
                raise TimeoutError("the test never opened the gate")
        return self.real(manifest, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def weights(seed: int, rows: int = 32, cols: int = 64) -> dict[str, torch.Tensor]:
    """A small state dict; models with the same shape have the same blob size."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(rows, cols, generator=gen),
        "layer.bias": torch.randn(rows, generator=gen),
    }


def cost(info) -> int:
    """What a model costs in the host tier: the blob and its two guard regions."""
    return info.nbytes + 2 * GUARD_BYTES


def blob(store: ModelStore, sha: str) -> bytes:
    return store.fs.cat_file(store.blob_path(sha))


def served(grant: Grant) -> bytes:
    return bytes(grant.handle[grant.offset : grant.offset + grant.manifest.nbytes])


def flip_byte(data: bytes, at: int | None = None) -> bytes:
    at = len(data) - 1 if at is None else at  # the last byte is tensor data, not the header
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the cache")
        time.sleep(0.002)


def run_together(n: int, fn: Callable[[], object]) -> tuple[list[threading.Thread], list[object]]:
    """Starts ``fn`` in n threads released at once; each result or exception lands in the list."""
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def join_all(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(20)
        assert not t.is_alive(), "a thread is stuck in the cache"


@pytest.fixture
def memory() -> FakeSharedMemory:
    return FakeSharedMemory()


@pytest.fixture
def disk_dir(tmp_path) -> Path:
    return tmp_path / "disk"


@pytest.fixture
def reads(file_store, monkeypatch) -> CountingRead:
    wrapper = CountingRead(file_store)
    monkeypatch.setattr(file_store, "read", wrapper)
    return wrapper


@pytest.fixture
def make_cache(file_store, memory, disk_dir):
    def make(**overrides) -> NodeCache:
        kwargs = dict(
            store=file_store,
            memory=memory,
            host_budget=BIG,
            disk_dir=disk_dir,
            disk_budget=BIG,
            policy="lru",
            manifest_ttl_s=60.0,
        )
        kwargs.update(overrides)
        return NodeCache(**kwargs)

    return make


def use(cache: NodeCache, name: str, tenant: str = TENANT) -> str:
    """Acquires and releases at once (a task that ran); returns the tier it was found in."""
    grant = cache.acquire(name, tenant, ME)
    assert cache.release(grant.lease_id)
    cache.drain()  # disk copies are written in the background
    return grant.tier


# -- 1. miss, then hit -----------------------------------------------------------------------


def test_miss_loads_from_store_writes_through_then_hits(make_cache, file_store, memory, disk_dir):
    info = file_store.register("m", weights(0), tenant=TENANT)
    cache = make_cache()

    first = cache.acquire("m", TENANT, ME)
    cache.drain()
    assert first.tier == "store"
    assert first.offset == GUARD_BYTES
    assert served(first) == blob(file_store, info.sha256)
    # The guard regions hold nothing but zeros.
    assert not first.handle[:GUARD_BYTES].any() and not first.handle[-GUARD_BYTES:].any()
    assert len(first.handle) == cost(info)
    assert (disk_dir / TENANT / f"{info.sha256}.safetensors").read_bytes() == blob(file_store, info.sha256)

    host, disk = cache.stats()["host"], cache.stats()["disk"]
    assert (host.hits, host.misses, host.loads, host.evictions) == (0, 1, 1, 0)
    assert (host.bytes_used, host.models, host.capacity) == (cost(info), 1, BIG)
    assert (disk.hits, disk.misses, disk.loads) == (0, 1, 1)
    assert (disk.bytes_used, disk.models) == (info.nbytes, 1)
    assert cache.leases() == 1

    assert cache.release(first.lease_id) is True
    assert cache.release(first.lease_id) is False  # twice is harmless
    assert cache.leases() == 0

    second = cache.acquire("m", TENANT, ME)
    assert second.tier == "host"
    assert second.handle is first.handle  # the same object, no copy
    host = cache.stats()["host"]
    assert (host.hits, host.misses, host.loads) == (1, 1, 1)
    assert (host.bytes_used, host.models) == (cost(info), 1)
    assert len(memory.published) == 1
    cache.release(second.lease_id)


# -- 2. disk tier across a restart ------------------------------------------------------------


def test_restarted_cache_loads_from_its_disk_tier_without_the_store(
    make_cache, file_store, reads, disk_dir
):
    info = file_store.register("m", weights(1), tenant=TENANT)
    expected = blob(file_store, info.sha256)
    assert use(make_cache(), "m") == "store"

    # Without the blob in the store, only the disk copy can serve the second cache.
    file_store.fs.rm(file_store.blob_path(info.sha256))
    reads.calls.clear()
    # A crash mid-write leaves a temporary file: the next start-up removes it.
    stale = disk_dir / f".{info.sha256}.safetensors.0123abcd.part"
    stale.write_bytes(b"half a blob")
    restarted = make_cache(memory=FakeSharedMemory())
    assert restarted.stats()["disk"].models == 1  # adopted at start-up
    assert restarted.stats()["host"].models == 0
    assert not stale.exists()

    grant = restarted.acquire("m", TENANT, ME)
    assert grant.tier == "disk"
    assert served(grant) == expected
    assert reads.total == 0
    host, disk = restarted.stats()["host"], restarted.stats()["disk"]
    assert (host.loads, host.misses, disk.hits, disk.misses) == (1, 1, 1, 0)
    restarted.release(grant.lease_id)


# -- 3. single flight -------------------------------------------------------------------------


def test_concurrent_cold_acquires_cause_exactly_one_load(make_cache, file_store, reads, memory):
    info = file_store.register("m", weights(2), tenant=TENANT)
    cache = make_cache()
    n = 32
    # Hold the one load until every thread has joined it, so all 32 really are concurrent.
    reads.hold.add(info.sha256)
    threads, results = run_together(n, lambda: cache.acquire("m", TENANT, ME))
    try:
        wait_for(lambda: cache.stats()["host"].misses == n)
        assert cache.stats()["host"].loads == 0
    finally:
        reads.gate.set()
    join_all(threads)

    assert all(isinstance(r, Grant) for r in results), results
    assert reads.calls[info.sha256] == 1
    assert len(memory.published) == 1
    assert cache.stats()["host"].loads == 1
    assert all(g.handle is results[0].handle for g in results)
    assert sorted(g.tier for g in results) == ["host"] * (n - 1) + ["store"]
    assert len({g.lease_id for g in results}) == n
    assert served(results[0]) == blob(file_store, info.sha256)
    assert cache.leases() == n
    for g in results:
        assert cache.release(g.lease_id)
    assert cache.leases() == 0


def test_a_load_in_flight_does_not_hold_up_the_load_of_another_model(make_cache, file_store, reads):
    # Issue 17: loads of different models run in parallel. A's read is held in the store; B's
    # whole miss (read, verify, publish, grant) completes meanwhile.
    a = file_store.register("a", weights(1), tenant=TENANT)
    b = file_store.register("b", weights(2), tenant=TENANT)
    cache = make_cache()
    reads.hold.add(a.sha256)
    threads, results = run_together(1, lambda: cache.acquire("a", TENANT, ME))
    try:
        assert reads.started.wait(10), "A's load never reached the store"
        grant_b = cache.acquire("b", TENANT, ME)
        assert grant_b.tier == "store" and served(grant_b) == blob(file_store, b.sha256)
        assert results == [None], "A was granted before its read was let go"
    finally:
        reads.gate.set()
    join_all(threads)
    (grant_a,) = results
    assert isinstance(grant_a, Grant) and served(grant_a) == blob(file_store, a.sha256), grant_a
    assert cache.release(grant_a.lease_id) and cache.release(grant_b.lease_id)


def test_a_failed_single_flight_load_fails_everyone_and_keeps_nothing(
    make_cache, file_store, reads, memory, disk_dir
):
    good = weights(3)
    info = file_store.register("m", good, tenant=TENANT)
    path = file_store.blob_path(info.sha256)
    file_store.fs.pipe_file(path, flip_byte(file_store.fs.cat_file(path)))
    cache = make_cache()
    n = 32
    reads.hold.add(info.sha256)
    threads, results = run_together(n, lambda: cache.acquire("m", TENANT, ME))
    try:
        wait_for(lambda: cache.stats()["host"].misses == n)
    finally:
        reads.gate.set()
    join_all(threads)

    assert all(isinstance(r, IntegrityError) for r in results), results
    assert reads.calls[info.sha256] == 1  # the failure was shared, not retried 32 times
    host, disk = cache.stats()["host"], cache.stats()["disk"]
    assert (host.bytes_used, host.models, host.loads) == (0, 0, 0)
    assert (disk.bytes_used, disk.models) == (0, 0)
    assert list(disk_dir.iterdir()) == []
    assert cache.leases() == 0
    assert memory.live() == 0 and memory.published == []

    # Registering the same weights again repairs the blob; the next acquire loads it.
    assert file_store.register("m", good, tenant=TENANT).sha256 == info.sha256
    grant = cache.acquire("m", TENANT, ME)
    assert grant.tier == "store"
    assert served(grant) == blob(file_store, info.sha256)
    cache.release(grant.lease_id)


# -- 5. bytes of loads in flight count --------------------------------------------------------


def test_loads_in_flight_count_against_the_budget(make_cache, file_store, reads):
    a = file_store.register("a", weights(4), tenant=TENANT)
    small = file_store.register("small", weights(5, rows=2, cols=2), tenant=TENANT)
    b = file_store.register("b", weights(6, rows=48), tenant=TENANT)
    # B fits the budget on its own, but not next to A, even with the idle small model evicted.
    budget = cost(a) + cost(b) - 1
    assert cost(b) <= budget and cost(small) + cost(b) <= budget
    cache = make_cache(host_budget=budget)
    assert use(cache, "small") == "store"

    reads.hold.add(a.sha256)
    threads, results = run_together(1, lambda: cache.acquire("a", TENANT, ME))
    try:
        assert reads.started.wait(10)
        host = cache.stats()["host"]
        assert host.bytes_used == cost(a) + cost(small)  # A's full size, before a byte arrived
        assert host.models == 1  # only the small one is ready

        # A request is served from its own copy (a bypass) rather than failed ...
        assert cache.acquire("b", TENANT, ME).tier == BYPASS
        # ... and a prefetch, which asks for the model to be kept, says why it cannot be.
        with pytest.raises(CapacityError, match="leased or loading"):
            cache.prefetch("b", TENANT)
        host = cache.stats()["host"]
        assert host.evictions == 0 and host.bypasses == 1
        assert host.bytes_used == cost(a) + cost(small)
        assert reads.calls[b.sha256] == 0
    finally:
        reads.gate.set()
    join_all(threads)

    (grant_a,) = results
    assert isinstance(grant_a, Grant) and grant_a.tier == "store"
    assert use(cache, "small") == "host"  # refusing B evicted nothing
    cache.release(grant_a.lease_id)
    assert use(cache, "b") == "store"  # once A is idle, B fits by evicting


# -- 6. leases and LRU ------------------------------------------------------------------------


def test_a_leased_model_is_never_evicted(make_cache, file_store, memory):
    a = file_store.register("a", weights(7), tenant=TENANT)
    b = file_store.register("b", weights(8), tenant=TENANT)
    assert a.nbytes == b.nbytes
    cache = make_cache(host_budget=cost(a))  # room for exactly one

    grant_a = cache.acquire("a", TENANT, ME)
    assert cache.acquire("b", TENANT, ME).tier == BYPASS  # served from its own copy instead
    with pytest.raises(CapacityError, match="leased"):
        cache.prefetch("b", TENANT)
    host = cache.stats()["host"]
    assert (host.models, host.evictions, host.bytes_used) == (1, 0, cost(a))
    assert served(grant_a) == blob(file_store, a.sha256)

    cache.release(grant_a.lease_id)
    grant_b = cache.acquire("b", TENANT, ME)
    assert grant_b.tier == "store"
    host = cache.stats()["host"]
    assert (host.models, host.evictions, host.bytes_used) == (1, 1, cost(b))
    # The cache held the only other reference to A's object: with our grant gone, it is freed.
    del grant_a
    assert memory.live() == 1
    cache.release(grant_b.lease_id)


def test_lru_evicts_the_least_recently_used_idle_model(make_cache, file_store):
    infos = [file_store.register(n, weights(10 + i), tenant=TENANT) for i, n in enumerate("abcd")]
    cache = make_cache(host_budget=3 * cost(infos[0]))
    for name in "abc":
        assert use(cache, name) == "store"
    assert use(cache, "a") == "host"  # recency now: b, c, a

    assert use(cache, "d") == "store"
    assert cache.stats()["host"].evictions == 1
    assert use(cache, "a") == "host"
    assert use(cache, "c") == "host"
    assert use(cache, "d") == "host"
    assert cache.stats()["host"].evictions == 1
    assert use(cache, "b") == "disk"  # b was the one that went (its disk copy remains)


def test_gdsf_keeps_a_miss_twice_as_popular_as_the_idle_model_it_evicts_however_long_that_load_took(
    make_cache, file_store, memory, monkeypatch
):
    # The policy weighs a newcomer's expected load against its victims' costs. A victim's cost
    # is estimated as a newcomer's is, not the time its load took: that time also holds the
    # put (slow here), and a newcomer as popular as the victim was refused behind it. No disk
    # tier: both reload from the store, at one cost (a's disk copy would make it the cheaper).
    infos = [file_store.register(n, weights(30 + i), tenant=TENANT) for i, n in enumerate("ab")]
    cache = make_cache(host_budget=cost(infos[0]), policy="gdsf", disk_budget=0)
    publish = memory.publish

    def slow_publish(buffer):
        time.sleep(0.3)
        return publish(buffer)

    monkeypatch.setattr(memory, "publish", slow_publish)
    assert use(cache, "a") == "store"
    monkeypatch.setattr(memory, "publish", publish)

    refused = cache.acquire("b", TENANT, ME)  # requested once, as a was: GDSF asks for twice
    assert refused.tier == "bypass" and refused.lease_id == 0
    assert use(cache, "b") == "store"  # twice: kept, unless a's slow put weighed as its cost
    host = cache.stats()["host"]
    assert (host.evictions, host.bypasses, host.models) == (1, 1, 1)
    assert use(cache, "b") == "host"


def test_gdsf_weighs_a_resident_whose_disk_copy_landed_after_its_load_as_a_reload_from_disk(make_cache, file_store):
    # a came from the store, and its disk copy landed after; b's disk copy was there before its
    # miss. Both would reload from disk now: b, asked for as often as a, is kept as one of two
    # newcomers would be. Weighed by a's load from the store, b was refused (a bypass).
    infos = [file_store.register(n, weights(40 + i), tenant=TENANT) for i, n in enumerate("ab")]
    assert infos[0].nbytes == infos[1].nbytes
    cache = make_cache(host_budget=cost(infos[0]), policy="gdsf")
    assert use(cache, "b") == "store"
    assert cache.evict("b", TENANT, "host") == {"host": "evicted"}  # its disk copy stays
    assert use(cache, "a") == "store"  # into free room; its disk copy lands after
    cache.rates["disk"] = 1e13  # disk reads far faster than the store's, as from a remote store

    granted = cache.acquire("b", TENANT, ME)
    assert granted.tier == "disk", granted.tier  # "bypass": refused
    cache.release(granted.lease_id)
    host = cache.stats()["host"]
    assert (host.evictions, host.bypasses, host.models) == (2, 0, 1)  # b's evict, then a
    assert use(cache, "b") == "host"


def test_gdsf_prices_a_disk_copy_before_any_disk_read_no_slower_than_the_store_it_stands_in_for(
    make_cache, file_store
):
    # a came from the store and its disk copy landed; the node has never read from its disk.
    # Priced at the assumed disk rate (0.5 GB/s) while the store measured faster, a weighed more
    # than a store load of itself, and b, asked for twice as often, was refused twice (the
    # routing test's failure: a disk copy priced slower than the store it saves a read from).
    infos = [file_store.register(n, weights(60 + i), tenant=TENANT) for i, n in enumerate("ab")]
    cache = make_cache(host_budget=cost(infos[0]), policy="gdsf")
    assert use(cache, "a") == "store"  # its disk copy lands after (use drains)
    assert "disk" not in cache.rates
    cache.rates["store"] = 1e13

    refused = cache.acquire("b", TENANT, ME)  # once, as a was: GDSF asks for twice
    assert refused.tier == "bypass" and refused.lease_id == 0
    assert use(cache, "b") == "store"  # "bypass": a outweighed it
    host = cache.stats()["host"]
    assert (host.evictions, host.bypasses, host.models) == (1, 1, 1)


def test_gdsf_prices_a_resident_again_once_the_disk_rate_it_was_priced_at_is_measured(make_cache, file_store):
    # a's disk copy landed before the node had read from its disk: a was priced as a disk
    # reload at the rate assumed then (the store's). Once disk reads measured far faster, b,
    # whose reload from disk is priced at that rate, was weighed against a's old price and
    # refused, however often it was asked (the routing test's failure in CI: 4 times running).
    infos = [file_store.register(n, weights(70 + i), tenant=TENANT) for i, n in enumerate("abc")]
    cache = make_cache(host_budget=cost(infos[0]), policy="gdsf")
    assert use(cache, "b") == "store"  # asked for once, as a is below
    assert cache.evict("b", TENANT, "host") == {"host": "evicted"}  # its disk copy stays
    assert use(cache, "a") == "store"  # into free room; its disk copy lands after
    assert "disk" not in cache.rates
    cache.rates["store"] = 1e9

    refused = cache.acquire("c", TENANT, ME)  # a is priced as a disk reload at 1 GB/s now
    assert refused.tier == "bypass" and refused.lease_id == 0
    cache.rates["disk"] = 1e13  # as a disk read would have measured

    granted = cache.acquire("b", TENANT, ME)  # twice, as a once: a tie at one rate
    assert granted.tier == "disk", granted.tier  # "bypass": a kept its price at 1 GB/s
    cache.release(granted.lease_id)
    host = cache.stats()["host"]
    assert (host.evictions, host.bypasses, host.models) == (2, 1, 1)  # b's evict, then a


def test_gdsf_keeps_a_residents_own_load_cost_while_it_would_reload_from_the_same_tier(make_cache, file_store):
    # Priced again at every load's rates, residents followed the latest rate instead of their
    # own load's, which cost hit ratio on the real-zoo peers run (docs/benchmarks.md). Here the
    # store turns slow after a's load: b, asked for once as a was, costs 10 s to load against
    # a's measured load, and is kept at once (priced at the new rate, a would have tied it).
    infos = [file_store.register(n, weights(50 + i), tenant=TENANT) for i, n in enumerate("ab")]
    cache = make_cache(host_budget=cost(infos[0]), policy="gdsf", disk_budget=0)
    assert use(cache, "a") == "store"
    cache.rates["store"] = infos[1].nbytes / 10.0

    granted = cache.acquire("b", TENANT, ME)
    assert granted.tier == "store", granted.tier  # "bypass": refused
    cache.release(granted.lease_id)
    host = cache.stats()["host"]
    assert (host.evictions, host.bypasses, host.models) == (1, 0, 1)


def test_lru_skips_leased_models(make_cache, file_store):
    for i, name in enumerate("abc"):
        file_store.register(name, weights(20 + i), tenant=TENANT)
    cache = make_cache(host_budget=2 * cost(file_store.manifest("a", tenant=TENANT)))
    held = cache.acquire("a", TENANT, ME)  # least recently used, but leased
    assert use(cache, "b") == "store"
    assert use(cache, "c") == "store"  # must evict b, not a
    assert served(held) == blob(file_store, held.manifest.sha256)
    assert use(cache, "a") == "host"
    cache.release(held.lease_id)


# -- 7. bigger than the budget ----------------------------------------------------------------


def test_a_model_bigger_than_the_host_budget_fails_without_evicting(
    make_cache, file_store, reads, memory, disk_dir
):
    small = file_store.register("small", weights(30, rows=4), tenant=TENANT)
    big = file_store.register("big", weights(31, rows=256), tenant=TENANT)
    budget = cost(big) - 1
    cache = make_cache(host_budget=budget)
    assert use(cache, "small") == "store"

    with pytest.raises(CapacityError, match=rf"budget is {budget}\b"):
        cache.acquire("big", TENANT, ME)
    host = cache.stats()["host"]
    assert (host.models, host.evictions, host.loads) == (1, 0, 1)
    assert host.bytes_used == cost(small)
    assert reads.calls[big.sha256] == 0
    assert not (disk_dir / TENANT / f"{big.sha256}.safetensors").exists()
    assert len(memory.published) == 1
    assert cache.leases() == 0


# -- 8. evict ---------------------------------------------------------------------------------


def test_evict_idle_model_frees_both_tiers(make_cache, file_store, memory, disk_dir):
    info = file_store.register("m", weights(40), tenant=TENANT)
    cache = make_cache()
    use(cache, "m")
    assert memory.live() == 1

    assert cache.evict("m", TENANT) == {"host": "evicted", "disk": "evicted"}
    host, disk = cache.stats()["host"], cache.stats()["disk"]
    assert (host.bytes_used, host.models, host.evictions) == (0, 0, 1)
    assert (disk.bytes_used, disk.models) == (0, 0)
    assert not (disk_dir / TENANT / f"{info.sha256}.safetensors").exists()
    assert memory.live() == 0  # no strong reference left anywhere
    assert cache.evict("m", TENANT) == {"host": "absent", "disk": "absent"}


def test_evict_leased_model_is_deferred_until_the_last_release(make_cache, file_store, memory):
    info = file_store.register("m", weights(41), tenant=TENANT)
    cache = make_cache()
    first = cache.acquire("m", TENANT, ME)
    second = cache.acquire("m", TENANT, Holder(ME.pid, ME.start))
    cache.drain()

    assert cache.evict("m", TENANT, tier="host") == {"host": "deferred"}
    assert served(first) == blob(file_store, info.sha256)  # the holders still read it
    assert cache.stats()["host"].bytes_used == cost(info)

    cache.release(first.lease_id)
    assert cache.stats()["host"].bytes_used == cost(info)  # one lease left
    cache.release(second.lease_id)
    host = cache.stats()["host"]
    assert (host.bytes_used, host.models, host.evictions) == (0, 0, 1)
    assert served(first) == blob(file_store, info.sha256)  # our grant still keeps it mapped
    del first, second
    assert memory.live() == 0
    assert use(cache, "m") == "disk"  # the disk copy was not touched


def test_evict_during_a_load_is_deferred_until_the_loader_releases(
    make_cache, file_store, reads, memory
):
    info = file_store.register("m", weights(45), tenant=TENANT)
    cache = make_cache()
    reads.hold.add(info.sha256)
    threads, results = run_together(1, lambda: cache.acquire("m", TENANT, ME))
    try:
        assert reads.started.wait(10)
        assert cache.evict("m", TENANT, tier="host") == {"host": "deferred"}
    finally:
        reads.gate.set()
    join_all(threads)

    (grant,) = results
    assert isinstance(grant, Grant)
    assert served(grant) == blob(file_store, info.sha256)  # the loader still gets its model
    assert cache.stats()["host"].models == 1
    cache.release(grant.lease_id)
    host = cache.stats()["host"]
    assert (host.bytes_used, host.models, host.evictions) == (0, 0, 1)
    del grant, results
    assert memory.live() == 0


def test_evict_absent_model(make_cache, file_store):
    file_store.register("m", weights(42), tenant=TENANT)
    assert make_cache().evict("m", TENANT) == {"host": "absent", "disk": "absent"}


def test_evict_disk_only_leaves_the_host_copy(make_cache, file_store, disk_dir):
    info = file_store.register("m", weights(43), tenant=TENANT)
    cache = make_cache()
    use(cache, "m")
    assert cache.evict("m", TENANT, tier="disk") == {"disk": "evicted"}
    assert not (disk_dir / TENANT / f"{info.sha256}.safetensors").exists()
    assert cache.stats()["disk"].models == 0
    assert cache.stats()["host"].models == 1
    assert use(cache, "m") == "host"


@pytest.mark.parametrize("tier", ["ram", "gpu", "HOST", ""])
def test_evict_rejects_tiers_it_does_not_have(make_cache, file_store, tier):
    file_store.register("m", weights(44), tenant=TENANT)
    cache = make_cache()
    use(cache, "m")
    with pytest.raises(ValueError, match="tier"):
        cache.evict("m", TENANT, tier=tier)
    assert cache.stats()["host"].models == 1  # nothing happened


# -- 9. prefetch ------------------------------------------------------------------------------


def test_prefetch_host_then_acquire_hits(make_cache, file_store):
    file_store.register("m", weights(50), tenant=TENANT)
    cache = make_cache()
    assert cache.prefetch("m", TENANT, tier="host") == "store"
    assert cache.leases() == 0  # prefetch holds no lease
    assert cache.acquire("m", TENANT, ME).tier == "host"


def test_prefetch_disk_fills_only_the_disk_tier(make_cache, file_store, disk_dir, memory):
    info = file_store.register("m", weights(51), tenant=TENANT)
    cache = make_cache()
    assert cache.prefetch("m", TENANT, tier="disk") == "store"
    host, disk = cache.stats()["host"], cache.stats()["disk"]
    assert (host.models, host.bytes_used) == (0, 0)
    assert (disk.models, disk.bytes_used) == (1, info.nbytes)
    assert (disk_dir / TENANT / f"{info.sha256}.safetensors").read_bytes() == blob(file_store, info.sha256)
    assert memory.published == []
    assert cache.prefetch("m", TENANT, tier="disk") == "disk"
    assert use(cache, "m") == "disk"


def test_prefetch_rejects_bad_tiers(make_cache, file_store):
    file_store.register("m", weights(52), tenant=TENANT)
    for tier in ("gpu", "ram", None):
        with pytest.raises(ValueError):
            make_cache().prefetch("m", TENANT, tier=tier)


# -- 10. the reaper ---------------------------------------------------------------------------


def test_reap_releases_exactly_the_dead_holders_leases(make_cache, file_store, memory):
    a = file_store.register("a", weights(60), tenant=TENANT)
    b = file_store.register("b", weights(61), tenant=TENANT)
    dead: set[Holder] = set()
    cache = make_cache(holder_alive=lambda h: h not in dead)
    h1, h2, h3 = Holder(10_001, 7), Holder(10_002, 7), Holder(10_003, 7)
    lease1 = cache.acquire("a", TENANT, h1).lease_id
    cache.acquire("a", TENANT, h2)
    cache.acquire("b", TENANT, h3)
    assert cache.reap() == 0
    assert cache.evict("a", TENANT, tier="host") == {"host": "deferred"}

    dead.add(h1)
    assert cache.reap() == 1
    assert cache.leases() == 2
    assert cache.stats()["host"].bytes_used == cost(a) + cost(b)  # h2 still holds a
    assert cache.release(lease1) is False  # already ended by the reaper

    dead.add(h2)
    assert cache.reap() == 1
    assert cache.leases() == 1
    host = cache.stats()["host"]
    assert (host.bytes_used, host.models, host.evictions) == (cost(b), 1, 1)  # deferred: done
    assert memory.live() == 1
    assert cache.reap() == 0


def test_holder_alive_follows_a_real_process(tmp_path):
    # A command name with spaces and parentheses: the parser must count fields after the last ")".
    odd = tmp_path / "s p) (x"
    odd.symlink_to(shutil.which("sleep"))
    child = subprocess.Popen([str(odd), "30"])
    try:
        start = process_start(child.pid)
        ticks_now = float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK")
        assert process_start(os.getpid()) <= start <= ticks_now + 1
        holder = Holder(child.pid, start)
        assert holder_alive(holder)
        assert not holder_alive(Holder(child.pid, start + 1))  # same pid, another process
        assert holder_alive(Holder.this_process())
    finally:
        child.kill()
        child.wait()  # reaped: a zombie would still have a /proc entry
    assert not holder_alive(holder)
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert process_start(pid_max + 1) == -1


def test_reap_with_the_real_holder_alive(make_cache, file_store):
    file_store.register("m", weights(62), tenant=TENANT)
    cache = make_cache()  # the default holder_alive
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        cache.acquire("m", TENANT, Holder(child.pid, process_start(child.pid)))
        cache.acquire("m", TENANT, ME)
        assert cache.reap() == 0
    finally:
        child.kill()
        child.wait()
    assert cache.reap() == 1
    assert cache.leases() == 1


# -- 11. tenants ------------------------------------------------------------------------------


def test_another_tenants_model_is_not_found(make_cache, file_store):
    file_store.register("secret", weights(70), tenant="alice")
    cache = make_cache()
    with pytest.raises(ModelNotFoundError):
        cache.acquire("secret", "bob", ME)
    assert cache.stats()["host"].misses == 0  # refused before touching the tiers
    assert use(cache, "secret", "alice") == "store"
    with pytest.raises(ModelNotFoundError):  # resident now, still invisible to bob
        cache.acquire("secret", "bob", ME)
    with pytest.raises(ModelNotFoundError):
        cache.evict("secret", "bob")
    assert cache.stats()["host"].models == 1


def test_public_models_resolve_for_everyone(make_cache, file_store):
    info = file_store.register("shared", weights(71), tenant="public")
    cache = make_cache()
    alice = cache.acquire("shared", "alice", ME)
    bob = cache.acquire("shared", "bob", ME)
    assert (alice.tier, bob.tier) == ("store", "host")
    assert bob.manifest.tenant == "public"
    assert served(bob) == blob(file_store, info.sha256)


def test_identical_weights_of_two_tenants_are_two_entries(make_cache, file_store, memory):
    # Keyed per tenant (cache_key): a hit must not tell bob that alice holds the same bytes.
    same = weights(72)
    alice_info = file_store.register("mine", same, tenant="alice")
    bob_info = file_store.register("ours", same, tenant="bob")
    assert alice_info.sha256 == bob_info.sha256
    cache = make_cache()
    alice = cache.acquire("mine", "alice", ME)
    bob = cache.acquire("ours", "bob", ME)
    assert (alice.tier, bob.tier) == ("store", "store")
    assert alice.handle is not bob.handle
    assert (bob.manifest.tenant, bob.manifest.name) == ("bob", "ours")
    host = cache.stats()["host"]
    assert (host.models, host.bytes_used, host.loads) == (2, 2 * cost(alice_info), 2)
    assert len(memory.published) == 2


# -- 12. disk budget --------------------------------------------------------------------------


def test_a_disk_tier_too_small_is_skipped_without_error(make_cache, file_store, disk_dir):
    info = file_store.register("m", weights(80), tenant=TENANT)
    cache = make_cache(disk_budget=info.nbytes - 1)
    grant = cache.acquire("m", TENANT, ME)
    assert grant.tier == "store"
    assert served(grant) == blob(file_store, info.sha256)
    assert list(disk_dir.iterdir()) == []
    disk = cache.stats()["disk"]
    assert (disk.models, disk.bytes_used, disk.loads, disk.evictions) == (0, 0, 0, 0)
    assert cache.prefetch("m", TENANT, tier="disk") == "store"  # also no error, no file
    assert list(disk_dir.iterdir()) == []


def test_a_full_disk_tier_evicts_its_least_recently_used_blob(make_cache, file_store, disk_dir):
    a, b, c = (file_store.register(n, weights(81 + i), tenant=TENANT) for i, n in enumerate("abc"))
    cache = make_cache(disk_budget=2 * a.nbytes)

    def on_disk() -> set[str]:
        return {p.name.removesuffix(".safetensors") for p in disk_dir.glob("*/*.safetensors")}

    use(cache, "a")
    use(cache, "b")
    assert on_disk() == {a.sha256, b.sha256}
    # A disk hit on a makes b the least recently used blob (FIFO would pick a).
    cache.evict("a", TENANT, tier="host")
    assert use(cache, "a") == "disk"

    use(cache, "c")
    assert on_disk() == {a.sha256, c.sha256}
    disk = cache.stats()["disk"]
    assert (disk.models, disk.bytes_used, disk.evictions) == (2, 2 * a.nbytes, 1)


def test_disk_budget_shrunk_across_a_restart(make_cache, file_store, disk_dir):
    for i, name in enumerate("ab"):
        file_store.register(name, weights(85 + i), tenant=TENANT)
    cache = make_cache()
    use(cache, "a")
    use(cache, "b")
    nbytes = file_store.manifest("a", tenant=TENANT).nbytes
    smaller = make_cache(disk_budget=nbytes)
    assert smaller.stats()["disk"].bytes_used <= nbytes
    assert len(list(disk_dir.glob("*/*.safetensors"))) == 1


# -- 13. manifest TTL -------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_reregistered_name_is_seen_after_the_manifest_ttl(make_cache, file_store):
    old = file_store.register("m", weights(90), tenant=TENANT)
    clock = FakeClock()
    cache = make_cache(clock=clock, manifest_ttl_s=5.0)
    assert use(cache, "m") == "store"
    new = file_store.register("m", weights(91), tenant=TENANT)
    assert new.sha256 != old.sha256

    clock.now += 4.9
    grant = cache.acquire("m", TENANT, ME)
    assert (grant.manifest.sha256, grant.tier) == (old.sha256, "host")
    cache.release(grant.lease_id)

    clock.now += 0.2
    grant = cache.acquire("m", TENANT, ME)
    assert (grant.manifest.sha256, grant.tier) == (new.sha256, "store")
    assert served(grant) == blob(file_store, new.sha256)
    cache.release(grant.lease_id)


# -- 14. a bad disk copy ----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_bad_disk_copy_is_dropped_and_reloaded_from_the_store(
    make_cache, file_store, reads, disk_dir, damage
):
    info = file_store.register("m", weights(100), tenant=TENANT)
    good = blob(file_store, info.sha256)
    cache = make_cache()
    assert use(cache, "m") == "store"
    cache.evict("m", TENANT, tier="host")

    copy = disk_dir / TENANT / f"{info.sha256}.safetensors"
    if damage == "flip":
        copy.write_bytes(flip_byte(good))
    elif damage == "truncate":
        copy.write_bytes(good[:-1])
    else:
        copy.unlink()

    reads.calls.clear()
    grant = cache.acquire("m", TENANT, ME)
    cache.drain()
    assert grant.tier == "store"
    assert served(grant) == good
    assert reads.calls[info.sha256] == 1
    assert copy.read_bytes() == good  # rewritten from verified bytes
    disk = cache.stats()["disk"]
    assert (disk.models, disk.bytes_used) == (1, info.nbytes)
    cache.release(grant.lease_id)

    cache.evict("m", TENANT, tier="host")
    assert use(cache, "m") == "disk"


def test_the_first_invocation_does_not_wait_for_the_disk_copy(make_cache, file_store, disk_dir, monkeypatch):
    """Write-through runs after the model is served: a slow disk delays no one."""
    from trims_ray.cache import host_loader as host_loader_module

    info = file_store.register("m", weights(60), tenant=TENANT)
    cache = make_cache()
    gate = threading.Event()
    real_write = host_loader_module.write_atomically

    def slow_write(*args, **kwargs):
        assert gate.wait(20), "the test never opened the gate"
        return real_write(*args, **kwargs)

    monkeypatch.setattr(host_loader_module, "write_atomically", slow_write)
    grant = cache.acquire("m", TENANT, ME)  # returns while the disk write is held
    assert grant.tier == "store" and served(grant) == blob(file_store, info.sha256)
    assert not (disk_dir / TENANT / f"{info.sha256}.safetensors").exists()
    assert cache.stats()["disk"].bytes_used == info.nbytes  # the write in flight is counted
    gate.set()
    cache.drain()
    assert (disk_dir / TENANT / f"{info.sha256}.safetensors").read_bytes() == blob(file_store, info.sha256)
    cache.release(grant.lease_id)


def test_a_lease_taken_for_a_task_is_claimed_and_reaped_like_any_other(make_cache, file_store):
    file_store.register("m", weights(70), tenant=TENANT)
    now = [0.0]
    dead: set[Holder] = set()
    cache = make_cache(clock=lambda: now[0], unclaimed_ttl_s=30.0, holder_alive=lambda h: h not in dead)
    claimed = cache.acquire("m", TENANT, None)
    never_claimed = cache.acquire("m", TENANT, None)
    worker = Holder(4242, 7)
    assert cache.claim(claimed.lease_id, worker) is True
    assert cache.claim(10_000, worker) is False  # no such lease
    now[0] = 29.0
    assert cache.reap() == 0  # the unclaimed one is still within its time to be claimed
    now[0] = 31.0
    assert cache.reap() == 1 and cache.leases() == 1  # the unclaimed one expired
    dead.add(worker)
    assert cache.reap() == 1 and cache.leases() == 0  # its claimant died
    assert cache.release(never_claimed.lease_id) is False


def test_a_callers_lease_can_be_released_before_it_is_granted(make_cache, file_store, memory):
    # A caller ends its task's lease when the result exists; if the task ran elsewhere, that can
    # be before this node even granted it. The grant then ends at once: nothing stays leased.
    file_store.register("m", weights(71), tenant=TENANT)
    now = [0.0]
    cache = make_cache(clock=lambda: now[0], unclaimed_ttl_s=30.0)
    caller = Caller("c1")
    assert cache.release("c1:1") is False  # not granted yet
    grant = cache.acquire("m", TENANT, caller, "c1:1")
    assert grant.lease_id == "c1:1" and cache.leases() == 0
    assert cache.evict("m", TENANT, "host")["host"] == "evicted"  # not pinned by a lost lease
    kept = cache.acquire("m", TENANT, caller, "c1:2")
    with pytest.raises(ValueError, match="in use"):
        cache.acquire("m", TENANT, caller, "c1:2")
    with pytest.raises(TypeError):
        cache.acquire("m", TENANT, caller, 3)
    assert cache.leases() == 1 and cache.release(kept.lease_id) is True and cache.leases() == 0
    cache.release("c1:9")  # a tombstone whose acquire never comes is forgotten in time
    now[0] = 31.0
    cache.reap()
    assert cache._released_early == {}


def test_a_release_from_before_a_restart_ends_no_lease_of_the_restarted_cache(make_cache, file_store, memory):
    # The node cache actor restarts while a task holds a lease; the task's release comes to the
    # new incarnation, which has since granted a lease of its own to another task. The old id
    # must end nothing: were ids counted from 1 in each incarnation, it would end that lease.
    file_store.register("m", weights(101), tenant=TENANT)
    before = make_cache()
    stale = before.acquire("m", TENANT, ME).lease_id
    before.close()
    restarted = make_cache(memory=FakeSharedMemory())
    held = restarted.acquire("m", TENANT, ME)
    assert restarted.release(stale) is False
    assert restarted.leases() == 1
    assert restarted.evict("m", TENANT, "host")["host"] == "deferred"  # still leased
    assert restarted.release(held.lease_id) is True and restarted.leases() == 0


def test_callers_leases_are_reaped_when_the_actor_finds_the_caller_dead(make_cache, file_store):
    file_store.register("m", weights(72), tenant=TENANT)
    now = [0.0]
    dead: set[str] = set()
    cache = make_cache(clock=lambda: now[0], holder_alive=lambda h: not (isinstance(h, Caller) and h.id in dead))
    cache.acquire("m", TENANT, Caller("alive"), "alive:1")
    cache.acquire("m", TENANT, Caller("gone"), "gone:1")
    cache.acquire("m", TENANT, ME)
    assert cache.callers(older_than_s=5.0) == set()  # too young to ask about
    now[0] = 10.0
    assert cache.callers(older_than_s=5.0) == {"alive", "gone"}
    dead.add("gone")
    assert cache.reap() == 1 and cache.leases() == 2
    assert cache.report()["in_flight"] == {cache_key(file_store.manifest("m", tenant=TENANT)): 2}


def test_report_gives_placement_residency_usage_and_demand(make_cache, file_store, reads):
    a = file_store.register("a", weights(73), tenant=TENANT)
    b = file_store.register("b", weights(74), tenant=TENANT)
    changes = []
    cache = make_cache(on_change=lambda: changes.append(1))
    grant = cache.acquire("a", TENANT, ME)
    cache.drain()
    assert changes  # every change is signalled, so the actor reports it
    reads.hold.add(b.sha256)
    loader = threading.Thread(target=lambda: use(cache, "b"))
    loader.start()
    assert reads.started.wait(10)
    report = cache.report()
    assert report["residency"] == {cache_key(a): "host", cache_key(b): "loading"}
    assert report["in_flight"] == {cache_key(a): 1, cache_key(b): 1}  # b's loader holds its lease
    assert report["host_used"] == cost(a) + cost(b) and report["host_capacity"] == BIG
    assert report["models"][cache_key(a)] == (TENANT, "a", a.nbytes)
    reads.gate.set()
    loader.join()
    cache.release(grant.lease_id)
    cache.evict("a", TENANT, "host")
    assert cache.report()["residency"] == {cache_key(a): "disk", cache_key(b): "host"}


def test_lend_serves_only_a_ready_host_copy_and_holds_it(make_cache, file_store, memory):
    info = file_store.register("m", weights(75), tenant=TENANT)
    cache = make_cache()
    assert cache.lend(cache_key(info)) is None  # not here: lending never loads
    use(cache, "m")
    grant = cache.lend(cache_key(info))
    assert served(grant) == blob(file_store, info.sha256)
    assert cache.evict("m", TENANT, "host")["host"] == "deferred"  # the peer is still copying
    lease_id = grant.lease_id
    del grant
    assert cache.release(lease_id) and memory.live() == 0
    assert cache.lend(cache_key(info)) is None


def test_a_miss_copies_from_a_peer_and_falls_back_to_the_store_on_a_bad_copy(make_cache, file_store, reads, tmp_path):
    info = file_store.register("m", weights(76), tenant=TENANT)
    peer = make_cache(disk_dir=tmp_path / "peer-disk")
    use(peer, "m")
    reads.calls.clear()
    corrupt = [False]

    def from_peer(manifest, out):
        grant = peer.lend(cache_key(manifest))
        try:
            data = np.array(grant.handle[grant.offset : grant.offset + manifest.nbytes])
            if corrupt[0]:
                data[-1] ^= 0xFF
            copy_verified(data, out, manifest.chunks, source="peer")
            return True
        finally:
            peer.release(grant.lease_id)

    cache = make_cache(peer_read=from_peer)
    assert use(cache, "m") == "peer" and reads.total == 0  # the store was not read
    assert served(cache.acquire("m", TENANT, ME)) == blob(file_store, info.sha256)
    assert cache.rates.keys() <= {"peer"}
    other = make_cache(peer_read=from_peer, disk_dir=tmp_path / "other-disk")
    corrupt[0] = True
    assert use(other, "m") == "store" and reads.total == 1


def test_an_evict_cancels_the_disk_copy_still_queued(make_cache, file_store, disk_dir, monkeypatch):
    # The disk copy is written after the load returns; an evict of both tiers in between must
    # not see the copy appear afterwards.
    info = file_store.register("m", weights(77), tenant=TENANT)
    cache = make_cache()
    gate = threading.Event()
    real = cache._disk_copies.write
    monkeypatch.setattr(cache._disk_copies, "write", lambda key, data: (gate.wait(10), real(key, data)))
    grant = cache.acquire("m", TENANT, ME)
    cache.release(grant.lease_id)
    assert cache.evict("m", TENANT) == {"host": "evicted", "disk": "absent"}
    gate.set()
    cache.drain()
    assert cache.stats()["disk"].models == 0 and not (disk_dir / TENANT / f"{info.sha256}.safetensors").exists()
    assert use(cache, "m") == "store"  # and a later load writes its copy as usual
    assert cache.stats()["disk"].models == 1


def test_a_one_off_huge_model_does_not_flush_a_hot_set(make_cache, file_store, memory):
    # GDSF admits a miss only if it saves more per byte than its victims: a model asked for once
    # that would take the room of two hot ones is served without being kept, and they stay.
    hot = [file_store.register(f"hot{i}", weights(80 + i), tenant=TENANT) for i in range(2)]
    huge = file_store.register("huge", weights(90, rows=64), tenant=TENANT)
    cache = make_cache(host_budget=cost(hot[0]) + cost(hot[1]) + cost(huge) // 2, policy="gdsf")
    for _ in range(5):
        for i in range(2):
            use(cache, f"hot{i}")
    grant = cache.acquire("huge", TENANT, ME)
    assert grant.tier == "bypass" and grant.handle is None and cache.leases() == 0
    stats = cache.stats()["host"]
    assert (stats.models, stats.bypasses, stats.evictions) == (2, 1, 0)
    assert all(use(cache, f"hot{i}") == "host" for i in range(2))
    assert cache.prefetch("huge", TENANT) == "store"  # asked for by name: kept, whatever it costs
    assert cache.stats()["host"].models == 2 and cache.stats()["host"].evictions == 1
    lru = make_cache(host_budget=cost(hot[0]) + cost(hot[1]) + cost(huge) // 2, disk_dir=file_store.root + "-lru")
    for i in range(2):
        use(lru, f"hot{i}")
    assert use(lru, "huge") == "store" and lru.stats()["host"].evictions == 1  # LRU admits all


def test_misses_that_evict_read_into_one_buffer_used_again_and_serve_each_models_own_bytes(make_cache, file_store):
    infos = [file_store.register(f"m{seed}", weights(seed, rows=256, cols=1024), tenant=TENANT) for seed in range(4)]
    cache = make_cache(host_budget=cost(infos[0]), disk_budget=0)  # room for one: every miss evicts
    for info in infos * 2:
        grant = cache.acquire(info.name, TENANT, ME)
        assert served(grant) == blob(file_store, info.sha256)
        cache.release(grant.lease_id)
    assert cache.stats()["host"].loads == 8
    assert cache.loader.buffers.made == 1
    cache.give_back_memory()
    assert cache.loader.buffers.idle_bytes() == 0


def test_a_failed_load_keeps_no_buffer_alive_after_its_error_is_handled(make_cache, file_store):
    # The leader's error goes to every waiter (entry.error) and its traceback holds the frames
    # of the load, whose locals are the blob's buffer. A reference cycle through the entry kept
    # that buffer (the model's size, in the actor's private memory) until the cyclic collector
    # ran; it is disabled here, as it may as well be in a quiet actor. The loader's buffers go
    # back to it (``load_buffers``) only once no reference to them is left.
    nbytes = 4 << 20
    info = file_store.register("m", {"w": torch.ones(nbytes // 4)}, tenant=TENANT)
    path = file_store.blob_path(info.sha256)
    file_store.fs.pipe_file(path, flip_byte(file_store.fs.cat_file(path)))
    cache = make_cache()
    gc.collect()
    gc.disable()
    try:
        try:  # not pytest.raises: its ExceptionInfo would keep the error for us
            cache.acquire("m", TENANT, ME)
        except IntegrityError:
            pass
        else:
            pytest.fail("a corrupt blob was served")
        buffers = cache.loader.buffers
        assert buffers.made == 1  # the load did take a buffer
        assert buffers.idle_bytes() >= nbytes, "the failed load's buffer is still held"
    finally:
        gc.enable()
