"""NodeCache invariants under interleavings the plain tests did not reach: a restart with tenant
shares, a burst of bypassed misses, the disk write-behind queue, a deferred evict under
overlapping leases, a peer's lend that times out, and a caller's release that arrives before its
grant. No Ray: the numpy HostMemory double and a file:// store, as in test_node_cache.py.
"""

from __future__ import annotations

# ruff: noqa: F811 - the fixtures imported below are test arguments by the same names
import threading
import tracemalloc

import pytest

from tests.unit.test_node_cache import (  # noqa: F401 - fixtures are found by name
    TENANT,
    FakeClock,
    blob,
    cost,
    disk_dir,
    join_all,
    make_cache,
    memory,
    reads,
    run_together,
    served,
    wait_for,
    weights,
)
from trims_ray._protocol import BYPASS, Caller, Grant, Holder, cache_key

pytestmark = pytest.mark.timeout(60)

ME = Holder.this_process()
OTHER = Holder(ME.pid, ME.start + 1)  # a second holder (the holder_alive double says alive)


# -- 1. a restart with tenant shares -----------------------------------------------------------


def test_a_restart_with_a_tenant_share_adopts_the_disk_tier(make_cache, file_store, disk_dir):
    # The disk tier adopts its files while NodeCache is being built, and asks each tenant's
    # quota as it does: the quota must not need the tier it is building.
    info = file_store.register("m", weights(1), tenant=TENANT)
    first = make_cache(tenant_share=0.5)
    grant = first.acquire("m", TENANT, ME)
    first.release(grant.lease_id)
    first.close()
    assert (disk_dir / TENANT / f"{info.sha256}.safetensors").exists()

    restarted = make_cache(tenant_share=0.5)
    assert restarted.stats()["disk"].models == 1
    assert restarted.tenant_stats(TENANT)[TENANT].disk_quota == int(0.5 * restarted.disk.budget)
    grant = restarted.acquire("m", TENANT, ME)
    assert grant.tier == "disk" and served(grant) == blob(file_store, info.sha256)
    restarted.release(grant.lease_id)


# -- 3. a burst of bypassed misses keeps single flight ------------------------------------------


def test_a_burst_of_bypassed_misses_reads_the_blob_once_into_one_counted_copy(
    make_cache, file_store, reads, memory
):
    a = file_store.register("a", weights(2), tenant=TENANT)
    b = file_store.register("b", weights(3), tenant=TENANT)
    n = 8
    # Room for one model, and for one shared copy of a miss the tier cannot keep.
    cache = make_cache(host_budget=cost(a), bypass_budget=cost(b))
    held = cache.acquire("a", TENANT, ME)  # the host tier is fully leased
    reads.hold.add(b.sha256)
    threads, results = run_together(n, lambda: cache.acquire("b", TENANT, ME))
    try:
        wait_for(lambda: cache.stats()["host"].bypasses == n)
    finally:
        reads.gate.set()
    join_all(threads)

    assert all(isinstance(g, Grant) for g in results), results
    assert reads.calls[b.sha256] == 1  # one read for the whole burst
    assert len({id(g.handle) for g in results}) == 1 and results[0].handle is not None
    assert sorted(g.tier for g in results) == ["host"] * (n - 1) + ["store"]
    assert all(served(g) == blob(file_store, b.sha256) for g in results)
    host = cache.stats()["host"]
    # Not kept: the tier's own bytes and models are what they were; the shared copy is counted.
    assert (host.bytes_used, host.models, host.bypass_bytes) == (cost(a), 1, cost(b))
    assert cache.report()["residency"].get(cache_key(b)) != "host"
    assert cache.leases() == n + 1

    for g in results:
        assert cache.release(g.lease_id)
    del results, g
    assert cache.stats()["host"].bypass_bytes == 0
    assert memory.live() == 1  # only a's object: the shared copy went with its last lease
    cache.release(held.lease_id)


def test_bypassed_misses_beyond_the_allowance_are_the_tasks_own_reads(make_cache, file_store, reads):
    a = file_store.register("a", weights(4), tenant=TENANT)
    b = file_store.register("b", weights(5), tenant=TENANT)
    c = file_store.register("c", weights(6), tenant=TENANT)
    cache = make_cache(host_budget=cost(a), bypass_budget=cost(b))
    held = cache.acquire("a", TENANT, ME)
    shared = cache.acquire("b", TENANT, ME)
    assert shared.tier == "store" and shared.handle is not None
    # c would take the node past its allowance: its task reads its own copy, as before.
    own = cache.acquire("c", TENANT, ME)
    assert own.tier == BYPASS and own.handle is None and reads.calls[c.sha256] == 0
    assert cache.stats()["host"].bypass_bytes == cost(b)
    assert cache.acquire("b", TENANT, OTHER).tier == "host"  # b's copy is still shared
    for grant in (held, shared):
        cache.release(grant.lease_id)


# -- 4. the disk write-behind queue -------------------------------------------------------------


def test_the_write_behind_queue_holds_only_copies_the_disk_tier_admitted(make_cache, file_store, monkeypatch):
    from trims_ray.cache import host_loader as host_loader_module

    size = 256 << 10  # KB-sized, yet far above what tracemalloc's own noise could reach
    infos = [file_store.register(f"m{i}", weights(10 + i, rows=size // 256, cols=64), tenant=TENANT) for i in range(6)]
    assert all(info.nbytes >= size for info in infos)
    # The host tier holds one model; the disk tier has room for one blob only.
    cache = make_cache(host_budget=cost(infos[0]) + 4096, disk_budget=infos[0].nbytes + 4096)
    gate, started = threading.Event(), threading.Event()
    real = host_loader_module.write_atomically

    def held_write(*args, **kwargs):
        started.set()
        assert gate.wait(20), "the test never opened the gate"
        return real(*args, **kwargs)

    monkeypatch.setattr(host_loader_module, "write_atomically", held_write)
    tracemalloc.start()
    try:
        grant = cache.acquire("m0", TENANT, ME)
        cache.release(grant.lease_id)
        assert started.wait(10)  # m0's copy is being written, and held there
        before, _ = tracemalloc.get_traced_memory()
        for i in range(1, len(infos)):
            grant = cache.acquire(f"m{i}", TENANT, ME)  # each evicts the one before it
            assert grant.tier == "store"
            cache.release(grant.lease_id)
        del grant
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gate.set()
    held = after - before
    # The disk tier can take none of m1..m5 while m0 is written: none may wait in the queue.
    assert held < size, f"the write-behind queue holds {held / size:.1f} blobs"
    cache.drain()
    assert cache.stats()["disk"].models == 1
    assert cache._disk_copies.queued() == (0, 0)


def test_the_write_behind_queue_is_bounded_in_bytes(make_cache, file_store, monkeypatch):
    from trims_ray.cache import host_loader as host_loader_module

    infos = [file_store.register(f"m{i}", weights(20 + i), tenant=TENANT) for i in range(5)]
    nbytes = infos[0].nbytes
    cache = make_cache(disk_queue_bytes=2 * nbytes)  # a disk tier with room for all five
    gate = threading.Event()
    real = host_loader_module.write_atomically
    monkeypatch.setattr(host_loader_module, "write_atomically", lambda *a, **k: (gate.wait(20), real(*a, **k))[1])
    try:
        for info in infos:
            cache.release(cache.acquire(info.name, TENANT, ME).lease_id)
            count, queued_bytes = cache._disk_copies.queued()
            assert queued_bytes <= 2 * nbytes and count <= 2
    finally:
        gate.set()
    cache.drain()
    disk = cache.stats()["disk"]
    assert disk.models == 2 and disk.bytes_used == 2 * nbytes  # the rest were not queued
    assert cache._disk_copies.queued() == (0, 0)


# -- 5. a deferred evict under overlapping leases -----------------------------------------------


def test_a_copy_marked_for_eviction_takes_no_new_lease_and_is_not_reported(make_cache, file_store, memory):
    info = file_store.register("m", weights(30), tenant=TENANT)
    key = cache_key(info)
    cache = make_cache()
    first = cache.acquire("m", TENANT, ME)
    cache.drain()
    assert cache.evict("m", TENANT, tier="host") == {"host": "deferred"}
    # Placement must not route to a copy on its way out.
    assert cache.report()["residency"][key] == "disk"

    # Leases keep overlapping: each new one must get a fresh copy, so the old one can go.
    second = cache.acquire("m", TENANT, OTHER)
    assert second.tier == "disk" and second.handle is not first.handle
    assert cache.report()["residency"][key] == "host"
    host = cache.stats()["host"]
    assert (host.bytes_used, host.models) == (2 * cost(info), 2)  # both counted until the first goes
    cache.release(first.lease_id)
    host = cache.stats()["host"]
    assert (host.bytes_used, host.models, host.evictions) == (cost(info), 1, 1)
    del first
    assert memory.live() == 1
    assert served(second) == blob(file_store, info.sha256)
    third = cache.acquire("m", TENANT, ME)
    assert third.tier == "host" and third.handle is second.handle  # the fresh copy is an ordinary one
    for grant in (second, third):
        cache.release(grant.lease_id)


def test_a_load_marked_for_eviction_is_not_joined_by_later_requests(make_cache, file_store, reads):
    info = file_store.register("m", weights(31), tenant=TENANT)
    cache = make_cache()
    reads.hold.add(info.sha256)
    threads, results = run_together(1, lambda: cache.acquire("m", TENANT, ME))
    try:
        assert reads.started.wait(10)
        assert cache.evict("m", TENANT, tier="host") == {"host": "deferred"}
        assert cache.report()["residency"].get(cache_key(info)) is None
        assert cache.evict("m", TENANT, tier="host") == {"host": "deferred"}  # still leaving
    finally:
        reads.gate.set()
    join_all(threads)
    (doomed,) = results
    fresh = cache.acquire("m", TENANT, OTHER)
    assert fresh.tier in ("disk", "store") and fresh.handle is not doomed.handle
    cache.release(doomed.lease_id)
    cache.release(fresh.lease_id)
    assert cache.stats()["host"].models == 1


# -- 8. prefetch after a deferred evict ---------------------------------------------------------


def test_prefetch_after_a_deferred_evict_loads_a_fresh_copy(make_cache, file_store):
    file_store.register("m", weights(32), tenant=TENANT)
    cache = make_cache()
    held = cache.acquire("m", TENANT, ME)
    cache.drain()
    assert cache.evict("m", TENANT, tier="host") == {"host": "deferred"}
    assert cache.prefetch("m", TENANT, tier="host") == "disk"  # not "host": that copy is leaving
    cache.release(held.lease_id)
    assert cache.stats()["host"].models == 1
    grant = cache.acquire("m", TENANT, ME)
    assert grant.tier == "host"
    cache.release(grant.lease_id)


# -- 6. a peer's lend that times out -------------------------------------------------------------


BORROWER = "0123456789abcdef0123456789abcdef"  # a borrower's own id prefix (a uuid's hex)


def test_a_lend_the_borrower_gave_up_on_leaves_no_lease(make_cache, file_store):
    info = file_store.register("m", weights(40), tenant=TENANT)
    cache = make_cache()
    cache.release(cache.acquire("m", TENANT, ME).lease_id)
    # The borrower's call timed out before the lend ran here; it released the id it chose.
    assert cache.release(f"{BORROWER}:1") is False
    assert cache.lend(cache_key(info), f"{BORROWER}:1") is None
    assert cache.leases() == 0 and cache._released_early == {}
    assert cache.evict("m", TENANT, "host")["host"] == "evicted"


def test_a_lend_nobody_releases_ends_long_before_the_unclaimed_ttl(make_cache, file_store):
    info = file_store.register("m", weights(41), tenant=TENANT)
    clock = FakeClock()
    cache = make_cache(clock=clock, unclaimed_ttl_s=600.0)
    cache.release(cache.acquire("m", TENANT, ME).lease_id)
    grant = cache.lend(cache_key(info))
    assert grant is not None
    clock.now += 5.0
    assert cache.reap() == 0  # the peer is still copying
    clock.now += 115.0  # far longer than a copy of a few KB may take, far less than 600 s
    assert cache.reap() == 1 and cache.leases() == 0
    assert cache.evict("m", TENANT, "host")["host"] == "evicted"


# -- 7. a caller's release before its grant -----------------------------------------------------


def test_a_release_before_the_grant_ends_it_however_long_the_load_takes(make_cache, file_store, reads):
    info = file_store.register("m", weights(50), tenant=TENANT)
    clock = FakeClock()
    cache = make_cache(clock=clock, unclaimed_ttl_s=600.0)
    reads.hold.add(info.sha256)
    threads, results = run_together(1, lambda: cache.acquire("m", TENANT, Caller("c"), "c:1"))
    try:
        assert reads.started.wait(10)
        assert cache.release("c:1") is False  # the task ran elsewhere and finished already
        clock.now += 3600.0  # a load longer than any ttl
        cache.reap()
    finally:
        reads.gate.set()
    join_all(threads)
    (grant,) = results
    assert isinstance(grant, Grant) and grant.lease_id == "c:1"
    assert cache.leases() == 0 and cache._released_early == {}
    assert cache.evict("m", TENANT, "host")["host"] == "evicted"  # not pinned


def test_releases_whose_grant_never_comes_are_remembered_within_a_bound(make_cache, file_store):
    file_store.register("m", weights(51), tenant=TENANT)
    cache = make_cache(clock=FakeClock(), unclaimed_ttl_s=600.0)
    for i in range(10_000):
        cache.release(f"stray:{i}")
    assert len(cache._released_early) <= 4096
    # The latest are the ones kept: a grant that follows its release at once still ends.
    grant = cache.acquire("m", TENANT, Caller("stray"), "stray:9999")
    assert cache.leases() == 0 and grant.lease_id == "stray:9999"

