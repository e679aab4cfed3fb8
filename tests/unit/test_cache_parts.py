"""The parts of the cache core that NodeCache composes, each on its own and without Ray: the host
tier (budget, leases, quotas, failed loads), the disk tier (blobs, eviction, restart), the loader
and its write-behind, the scrub of host copies, and the per-tenant quota helpers.
"""

from __future__ import annotations

import errno
import math
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.test_node_cache import FakeSharedMemory, blob, cost, flip_byte, weights
from tests.unit.test_tenants import WritableSharedMemory
from trims_ray import CapacityError, IntegrityError, ModelStore, StoreUnavailableError
from trims_ray._fsio import write_atomically
from trims_ray._manifest import Manifest
from trims_ray._protect import GUARD_BYTES
from trims_ray._protocol import (
    ASSUMED_LOAD_RATES,
    DENIED,
    DISK,
    HOST,
    NOT_FOUND,
    PEER,
    STORE,
    RecentUses,
    TenantStats,
    cache_key,
)
from trims_ray._reader import copy_verified, read_blob
from trims_ray.cache import host_loader as host_loader_module
from trims_ray.cache import host_tier as host_tier_module
from trims_ray.cache.disk_tier import LOCAL_FS, DiskTier
from trims_ray.cache.host_loader import HostLoader, WriteBehind
from trims_ray.cache.host_entry import HostEntry, detached
from trims_ray.cache.host_tier import HostTier
from trims_ray.cache.quotas import tenant_of, tenant_quota, tenant_stats
from trims_ray.cache.scrub import scrub_host_tier
from trims_ray.policy import Quota, make_policy

# A wedged writer or waiter must fail the test, not hang the suite.
pytestmark = pytest.mark.timeout(60)

TENANT = "default"
BIG = 64 << 20  # a budget nothing in these tests comes near


# -- helpers ---------------------------------------------------------------------------------


class Changes:
    """An ``on_change`` that counts its calls."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def host_tier(
    budget: int = BIG, quota: Callable[[str], int | None] = lambda tenant: None, on_change=lambda: None
) -> HostTier:
    return HostTier(budget, make_policy("lru"), on_change, quota=quota)


def disk_tier(directory: Path, budget: int = BIG, **kwargs) -> DiskTier:
    return DiskTier(directory, budget, make_policy("lru"), **kwargs)


def model(store: ModelStore, name: str, seed: int, tenant: str = TENANT, **shape) -> Manifest:
    store.register(name, weights(seed, **shape), tenant=tenant)
    return store.manifest(name, tenant=tenant)


def publish(host: HostTier, entry: HostEntry, store: ModelStore, memory) -> object:
    """Ends an admitted entry's load as NodeCache does: the blob between zeroed guard regions,
    read verified from the store and published; returns the handle."""
    buffer = np.zeros(entry.nbytes, dtype=np.uint8)
    store.read(entry.manifest, out=buffer[GUARD_BYTES : GUARD_BYTES + entry.manifest.nbytes])
    handle = memory.publish(buffer)
    host.loaded(entry, handle, 0.01)
    return handle


def load(host: HostTier, manifest: Manifest, store: ModelStore, memory) -> HostEntry:
    """Admits a miss (it must be admitted) and loads it."""
    entry = host.admit(manifest, False, 1.0)
    assert entry is not None
    publish(host, entry, store, memory)
    return entry


def on_disk(disk: DiskTier, key: str, data: bytes) -> None:
    """Puts a blob in the disk tier as a write-behind does: reserve, write, adopt."""
    assert disk.reserve(key, len(data), None)
    write_atomically(LOCAL_FS, str(disk.path(key)), [data])
    disk.unreserve(key)
    disk.adopt(key, len(data))


def array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


class GatedWrites:
    """Holds the disk tier's file writes (``write_atomically`` as host_loader calls it) until
    ``gate`` is set, so that a write can be kept queued or in flight."""

    def __init__(self) -> None:
        self.real = host_loader_module.write_atomically
        self.started = threading.Event()
        self.gate = threading.Event()

    def __call__(self, *args, **kwargs):
        self.started.set()
        if not self.gate.wait(20):
            raise TimeoutError("the test never opened the gate")
        return self.real(*args, **kwargs)

    def open_later(self, seconds: float = 0.2) -> threading.Timer:
        timer = threading.Timer(seconds, self.gate.set)
        timer.start()
        return timer


@pytest.fixture
def gated_writes(monkeypatch) -> GatedWrites:
    gated = GatedWrites()
    monkeypatch.setattr(host_loader_module, "write_atomically", gated)
    return gated


@pytest.fixture
def disk_dir(tmp_path) -> Path:
    return tmp_path / "disk"


# -- host tier -------------------------------------------------------------------------------


def test_host_tier_counts_a_load_in_flight_against_its_budget(file_store):
    a = model(file_store, "a", 1)
    b = model(file_store, "b", 2)
    memory = FakeSharedMemory()
    host = host_tier(budget=cost(a) + cost(b) - 1)  # room for one of them, not both

    loading = host.admit(a, False, 1.0)
    assert loading is not None and not loading.ready.is_set()
    assert host.used == cost(a)  # its full size, before a byte arrived
    assert (host.stats.bytes_used, host.stats.models, host.stats.misses) == (cost(a), 0, 1)

    # Nothing idle to evict: a miss is served without being kept; one asked for by name fails.
    assert host.admit(b, False, 1.0) is None
    with pytest.raises(CapacityError, match="leased or loading"):
        host.admit(b, True, 1.0)
    assert (host.stats.bypasses, host.stats.evictions) == (1, 0)
    assert set(host.entries) == {cache_key(a)}

    publish(host, loading, file_store, memory)
    entry_b = host.admit(b, False, 1.0)  # a is idle now: it goes to make room
    assert entry_b is not None
    assert set(host.entries) == {cache_key(b)}
    assert loading.handle is None and host.stats.evictions == 1
    assert host.used == cost(b)


def test_host_tier_evicts_an_idle_entry_but_never_a_leased_one(file_store):
    a, b, c = (model(file_store, n, 10 + i) for i, n in enumerate("abc"))
    memory = FakeSharedMemory()
    host = host_tier(budget=2 * cost(a))
    held = load(host, a, file_store, memory)  # the least recently used, but leased
    held.leases = 1
    idle = load(host, b, file_store, memory)

    entry_c = host.admit(c, False, 1.0)
    assert entry_c is not None
    assert set(host.entries) == {cache_key(a), cache_key(c)}
    assert idle.handle is None and held.handle is not None
    assert host.stats.evictions == 1
    assert cache_key(b) not in host.policy and cache_key(a) in host.policy

    # With c loading and a leased, nothing more can go.
    assert host.admit(b, False, 1.0) is None
    with pytest.raises(CapacityError, match="leased or loading"):
        host.admit(b, True, 1.0)
    assert set(host.entries) == {cache_key(a), cache_key(c)}


def test_host_tier_refuses_a_model_bigger_than_its_budget_without_evicting(file_store):
    small = model(file_store, "small", 20, rows=4)
    big = model(file_store, "big", 21, rows=256)
    host = host_tier(budget=cost(big) - 1)
    kept = load(host, small, file_store, FakeSharedMemory())

    with pytest.raises(CapacityError, match=rf"needs {cost(big)} bytes .* budget is {cost(big) - 1}\b"):
        host.admit(big, True, 1.0)
    assert set(host.entries) == {cache_key(small)} and kept.handle is not None
    assert (host.stats.evictions, host.used) == (0, cost(small))
    assert host.quota_denied == {}


def test_host_tier_quota_refuses_a_tenant_and_never_evicts_another_tenants_model(file_store):
    a = model(file_store, "a", 30, tenant="alice")
    b = model(file_store, "b", 31, tenant="alice")
    huge = model(file_store, "huge", 32, tenant="alice", rows=128)
    bobs = model(file_store, "x", 33, tenant="bob")
    limit = cost(a)
    memory = FakeSharedMemory()
    host = host_tier(quota=lambda tenant: limit if tenant == "alice" else None)
    other = load(host, bobs, file_store, memory)  # idle, and the least recently used
    mine = load(host, a, file_store, memory)
    mine.leases = 1

    # Its own model is leased: alice cannot make room, and bob's is not hers to evict.
    with pytest.raises(CapacityError, match=rf"tenant 'alice' over its host quota of {limit} bytes \({limit} in use"):
        host.admit(b, False, 1.0)
    with pytest.raises(CapacityError, match=rf"over the host quota of tenant 'alice' \({limit} bytes\)"):
        host.admit(huge, True, 1.0)
    assert host.quota_denied == {"alice": 2}
    assert host.stats.quota_denials == 2
    assert set(host.entries) == {cache_key(bobs), cache_key(a)}
    assert host.stats.evictions == 0

    # Once her model is idle, alice makes room from it, and from it only.
    host.unlease(mine)
    assert host.admit(b, False, 1.0) is not None
    assert set(host.entries) == {cache_key(bobs), cache_key(b)}
    assert mine.handle is None and other.handle is not None
    assert host.quota_denied == {"alice": 2}


def test_host_tier_used_tenant_used_and_tenants_count_loads_and_condemned_copies(file_store):
    a = model(file_store, "a", 40, tenant="alice")
    b = model(file_store, "b", 41, tenant="bob", rows=8)
    memory = FakeSharedMemory()
    host = host_tier()
    assert (host.used, host.tenants(), host.tenant_used("alice")) == (0, set(), 0)

    ready = load(host, a, file_store, memory)
    loading = host.admit(b, False, 1.0)
    assert loading is not None
    assert host.used == cost(a) + cost(b)
    assert (host.tenant_used("alice"), host.tenant_used("bob"), host.tenant_used("carol")) == (cost(a), cost(b), 0)
    assert host.tenants() == {"alice", "bob"}

    # A corrupt copy out of the table still holds its bytes while a lease holds it ...
    ready.leases = 1
    host.condemn(cache_key(a), ready)
    assert cache_key(a) not in host.entries
    assert host.tenant_used("alice") == cost(a) and "alice" in host.tenants()
    assert host.stats.corrupt == 1 and host.stats.bytes_used == cost(a) + cost(b)
    # ... and lets them go with its last lease.
    host.unlease(ready)
    assert ready.handle is None and host.condemned == {}
    assert (host.used, host.tenants(), host.stats.bytes_used) == (cost(b), {"bob"}, cost(b))


def test_host_tier_stats_are_refreshed_on_every_change(file_store):
    a = model(file_store, "a", 45)
    changes = Changes()
    host = host_tier(budget=BIG, on_change=changes)
    assert (host.stats.capacity, host.stats.bytes_used, host.stats.models) == (BIG, 0, 0)

    entry = host.admit(a, False, 1.0)
    assert (host.stats.misses, host.stats.bytes_used, host.stats.models, host.stats.loads) == (1, cost(a), 0, 0)
    assert changes.count == 1
    publish(host, entry, file_store, FakeSharedMemory())
    assert (host.stats.bytes_used, host.stats.models, host.stats.loads) == (cost(a), 1, 1)
    assert changes.count == 2

    host.drop(cache_key(a), evicted=False)  # an explicit drop is not an eviction
    assert (host.stats.bytes_used, host.stats.models, host.stats.evictions) == (0, 0, 0)
    assert changes.count == 3
    assert cache_key(a) not in host.policy


def test_a_failed_load_wakes_its_waiters_with_the_error_and_frees_its_bytes(file_store):
    a = model(file_store, "a", 50)
    host = host_tier()
    entry = host.admit(a, False, 1.0)
    entry.leases = 1  # the waiter's
    seen: list[BaseException | None] = []

    def waiter() -> None:
        assert entry.ready.wait(20)
        seen.append(entry.error)

    thread = threading.Thread(target=waiter)
    thread.start()
    error = IntegrityError("the blob of default/a does not match")
    host.failed(entry, error)
    thread.join(10)
    assert not thread.is_alive(), "failed() did not wake the waiter"

    assert seen == [error]
    assert host.entries == {} and host.used == 0
    assert (host.stats.bytes_used, host.stats.models, host.stats.loads) == (0, 0, 0)
    # The next miss of that model is admitted afresh.
    again = host.admit(a, False, 1.0)
    assert again is not None and again is not entry and again.error is None


def test_host_tier_reports_what_a_load_could_evict_in_order_with_recent_uses(file_store, monkeypatch):
    a, b, c = (model(file_store, n, 30 + i) for i, n in enumerate("abc"))
    memory = FakeSharedMemory()
    wall = [1000.0]
    host = HostTier(BIG, make_policy("lru"), lambda: None, quota=lambda t: None, wall_clock=lambda: wall[0])
    for manifest in (a, b, c):
        entry, leader = host.request(manifest, False, 1.0)  # one use each, at its miss
        assert leader
        publish(host, entry, file_store, memory)
        host.unlease(entry)
    wall[0] += 30.0
    host.request(a, False, 1.0)[0].leases -= 1  # a hit: a is now the most recently used
    host.note_use(cache_key(b), 4)  # hits that processes served from b while they kept it
    running, _ = host.request(c, False, 1.0)  # c is leased by an invocation: not evictable
    order = host.evictable()
    assert [key for key, *_ in order] == [cache_key(b), cache_key(a)]  # LRU's order
    assert all(nbytes == host.entries[key].nbytes for key, nbytes, *_ in order)
    uses = {key: RecentUses(count, at) for key, _, count, at in order}
    # b: one use 30 s ago (decayed by e) and 4 now; a: likewise, and 1 now.
    assert uses[cache_key(b)].count_at(wall[0]) == pytest.approx(4 + math.exp(-1))
    assert uses[cache_key(a)].count_at(wall[0]) == pytest.approx(1 + math.exp(-1))
    assert uses[cache_key(b)].per_s(wall[0]) > uses[cache_key(a)].per_s(wall[0])
    # Pinned by a process only (leases == pins): evictable, since the node can ask it back.
    running.pins = running.leases
    assert cache_key(c) in [key for key, *_ in host.evictable()]
    # A report lists the first few only: every caller gets it.
    monkeypatch.setattr(host_tier_module, "EVICTABLE_REPORTED", 2)
    assert [key for key, *_ in host.evictable()] == [cache_key(b), cache_key(a)]


def test_detached_keeps_type_message_and_details_but_no_traceback_cause_or_context():
    def fail() -> None:
        try:
            raise OSError(errno.ECONNREFUSED, "refused")
        except OSError as exc:
            raise StoreUnavailableError("the store cannot be reached", reason="endpoint") from exc

    try:
        fail()
    except StoreUnavailableError as exc:
        original = exc
    copy = detached(original)
    assert copy is not original
    assert type(copy) is StoreUnavailableError
    assert str(copy) == "the store cannot be reached" and copy.reason == "endpoint"
    assert copy.__traceback__ is None and copy.__cause__ is None and copy.__context__ is None
    # The original is left as raised.
    assert original.__traceback__ is not None and isinstance(original.__cause__, OSError)

    class Uncopyable(Exception):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(f"{a}+{b}")  # args no longer fit __init__: copying fails

    odd = Uncopyable(1, 2)
    assert detached(odd) is odd


# -- disk tier -------------------------------------------------------------------------------


def test_disk_tier_keeps_a_written_blob_and_reads_it_back_verified(file_store, disk_dir):
    m = model(file_store, "m", 60)
    data = blob(file_store, m.sha256)
    key = cache_key(m)
    disk = disk_tier(disk_dir)

    assert disk.reserve(key, len(data), None)
    assert (disk.used, disk.reserved) == (len(data), {key: len(data)})
    assert (disk.stats.bytes_used, disk.stats.models) == (len(data), 0)
    assert not disk.reserve(key, len(data), None)  # already on its way
    write_atomically(LOCAL_FS, str(disk.path(key)), [data])
    disk.unreserve(key)
    disk.adopt(key, len(data))

    assert disk.path(key) == disk_dir / TENANT / f"{m.sha256}.safetensors"
    assert disk.sizes == {key: len(data)} and disk.reserved == {}
    assert (disk.stats.bytes_used, disk.stats.models, disk.stats.loads) == (len(data), 1, 1)
    assert not disk.reserve(key, len(data), None)  # already here
    out, _ = read_blob(LOCAL_FS, str(disk.path(key)), nbytes=m.nbytes, chunk_digests=m.chunks)
    assert bytes(out) == data
    # Verified, not merely read: a flipped byte is caught.
    disk.path(key).write_bytes(flip_byte(data))
    with pytest.raises(IntegrityError):
        read_blob(LOCAL_FS, str(disk.path(key)), nbytes=m.nbytes, chunk_digests=m.chunks)


def test_disk_tier_evicts_by_its_policy_to_stay_within_its_budget(file_store, disk_dir):
    a, b, c = (model(file_store, n, 61 + i) for i, n in enumerate("abc"))
    n = a.nbytes
    assert b.nbytes == c.nbytes == n
    disk = disk_tier(disk_dir, budget=2 * n)
    on_disk(disk, cache_key(a), blob(file_store, a.sha256))
    on_disk(disk, cache_key(b), blob(file_store, b.sha256))
    disk.policy.on_access(cache_key(a))  # a disk hit: b is now the least recently used

    assert not disk.reserve("default/" + "f" * 64, 2 * n + 1, 1.0)  # bigger than the budget
    assert disk.stats.evictions == 0 and set(disk.sizes) == {cache_key(a), cache_key(b)}

    assert disk.reserve(cache_key(c), n, 1.0)
    assert set(disk.sizes) == {cache_key(a)} and disk.reserved == {cache_key(c): n}
    assert not disk.path(cache_key(b)).exists() and disk.path(cache_key(a)).exists()
    assert (disk.stats.evictions, disk.stats.bytes_used, disk.stats.models) == (1, 2 * n, 1)
    assert disk.used <= disk.budget


def test_disk_tier_quota_takes_room_from_the_tenants_own_blobs_or_refuses(file_store, disk_dir):
    a, b, c = (model(file_store, name, 65 + i, tenant="alice") for i, name in enumerate("abc"))
    huge = model(file_store, "huge", 68, tenant="alice", rows=128)
    bobs = model(file_store, "x", 69, tenant="bob")
    n = a.nbytes
    disk = disk_tier(disk_dir, quota=lambda tenant: n if tenant == "alice" else None)
    on_disk(disk, cache_key(bobs), blob(file_store, bobs.sha256))  # the least recently used
    on_disk(disk, cache_key(a), blob(file_store, a.sha256))

    # Over her quota, alice's copy takes the room of her own blob, never bob's.
    assert disk.reserve(cache_key(b), n, 1.0)
    assert set(disk.sizes) == {cache_key(bobs)} and not disk.path(cache_key(a)).exists()
    assert disk.quota_denied == {} and disk.stats.evictions == 1

    # Her only bytes are a write in flight, which cannot be evicted: refused, and counted.
    assert not disk.reserve(cache_key(c), n, 1.0)
    assert not disk.reserve(cache_key(huge), huge.nbytes, None)  # over the quota on its own
    assert disk.quota_denied == {"alice": 2} and disk.stats.quota_denials == 2
    assert set(disk.sizes) == {cache_key(bobs)} and disk.reserved == {cache_key(b): n}
    assert disk.path(cache_key(bobs)).exists()


def test_disk_tier_tenant_use_counts_writes_in_flight(file_store, disk_dir):
    a = model(file_store, "a", 70, tenant="alice")
    b = model(file_store, "b", 71, tenant="bob", rows=8)
    disk = disk_tier(disk_dir)
    assert (disk.tenants(), disk.tenant_used("alice")) == (set(), 0)

    assert disk.reserve(cache_key(a), a.nbytes, None)  # not written yet
    assert (disk.tenants(), disk.tenant_used("alice"), disk.tenant_used("bob")) == ({"alice"}, a.nbytes, 0)
    on_disk(disk, cache_key(b), blob(file_store, b.sha256))
    assert disk.tenants() == {"alice", "bob"}
    assert (disk.tenant_used("alice"), disk.tenant_used("bob")) == (a.nbytes, b.nbytes)
    assert disk.used == a.nbytes + b.nbytes

    disk.unreserve(cache_key(a))  # the write was given up
    assert (disk.tenants(), disk.tenant_used("alice"), disk.used) == ({"bob"}, 0, b.nbytes)


def test_a_restarted_disk_tier_adopts_its_blobs_and_deletes_what_is_not_one(file_store, disk_dir):
    a = model(file_store, "a", 72, tenant="alice")
    b = model(file_store, "b", 73, tenant="bob", rows=8)
    before = disk_tier(disk_dir)
    on_disk(before, cache_key(a), blob(file_store, a.sha256))
    on_disk(before, cache_key(b), blob(file_store, b.sha256))

    junk = [
        disk_dir / f"{a.sha256}.safetensors",  # named as before tenants: whose is unknown
        disk_dir / f".{a.sha256}.safetensors.0123abcd.part",  # a write a crash interrupted
        disk_dir / "alice" / f".{b.sha256}.safetensors.4567ef01.part",
        disk_dir / "Bad Tenant" / f"{a.sha256}.safetensors",  # not a tenant id
        disk_dir / "alice" / "not-a-digest.safetensors",
    ]
    for path in junk:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not a blob of this cache")
    unrelated = disk_dir / "alice" / "notes.txt"  # not named like a blob or a temp file
    unrelated.write_text("left alone")

    after = disk_tier(disk_dir)
    assert after.sizes == {cache_key(a): a.nbytes, cache_key(b): b.nbytes}
    assert set(after.policy.keys()) == {cache_key(a), cache_key(b)}
    assert (after.stats.models, after.stats.bytes_used, after.stats.loads) == (2, a.nbytes + b.nbytes, 0)
    assert [p for p in junk if p.exists()] == []
    assert unrelated.read_text() == "left alone"
    out, _ = read_blob(LOCAL_FS, str(after.path(cache_key(b))), nbytes=b.nbytes, chunk_digests=b.chunks)
    assert bytes(out) == blob(file_store, b.sha256)


def test_a_restarted_disk_tier_deletes_blobs_over_a_smaller_budget_or_a_quota(file_store, disk_dir):
    infos = [model(file_store, "m", 74 + i, tenant=t) for i, t in enumerate(("alice", "bob", "carol"))]
    n = infos[0].nbytes
    before = disk_tier(disk_dir)
    for m in infos:
        on_disk(before, cache_key(m), blob(file_store, m.sha256))

    # Files are adopted in path order: alice's is over her (new) quota, carol's over the budget.
    after = disk_tier(disk_dir, budget=n, quota=lambda tenant: 0 if tenant == "alice" else None)
    assert after.sizes == {cache_key(infos[1]): n}
    assert [p.parent.name for p in sorted(disk_dir.glob("*/*.safetensors"))] == ["bob"]
    assert after.used == n <= after.budget


def test_disk_tier_recovers_from_its_directory_being_deleted(file_store, disk_dir):
    a = model(file_store, "a", 77)
    b = model(file_store, "b", 78)
    disk = disk_tier(disk_dir)
    on_disk(disk, cache_key(a), blob(file_store, a.sha256))
    shutil.rmtree(disk_dir)

    assert disk.reserve(cache_key(b), b.nbytes, 1.0)  # noticed before the write
    assert disk_dir.is_dir()
    assert disk.sizes == {} and disk.stats.errors == 1
    assert (disk.stats.models, disk.stats.bytes_used) == (0, b.nbytes)


# -- host loader -----------------------------------------------------------------------------


def test_loader_reads_a_miss_from_the_store_with_the_exact_bytes(file_store, disk_dir):
    m = model(file_store, "m", 80)
    disk = disk_tier(disk_dir)
    loader = HostLoader(store=file_store, disk=disk, lock=threading.Lock())
    out = np.zeros(m.nbytes, dtype=np.uint8)

    assert loader.read(m, out, None) == STORE
    assert bytes(out) == blob(file_store, m.sha256)
    assert (disk.stats.hits, disk.stats.misses) == (0, 1)
    assert disk.sizes == {} and not disk.path(cache_key(m)).exists()  # copies are WriteBehind's
    [(source, tenant, name, nbytes, seconds)] = loader.load_events
    assert (source, tenant, name, nbytes) == (STORE, TENANT, "m", m.nbytes) and seconds >= 0
    assert loader.rates == {}  # a few KB measure latency, not bandwidth
    assert loader.expected_load_s(m.nbytes, STORE) == m.nbytes / ASSUMED_LOAD_RATES[STORE]


def test_loader_measures_the_rate_of_each_source_as_a_moving_average(file_store, disk_dir):
    file_store.register("m", {"w": torch.ones(256 * 1024)}, tenant=TENANT)  # 1 MiB and a header
    m = file_store.manifest("m", tenant=TENANT)
    loader = HostLoader(store=file_store, disk=disk_tier(disk_dir), lock=threading.Lock())
    out = np.zeros(m.nbytes, dtype=np.uint8)

    loader.read(m, out, None)
    first = m.nbytes / loader.load_events[-1][4]
    assert loader.rates == {STORE: pytest.approx(first)}
    loader.read(m, out, None)
    second = m.nbytes / loader.load_events[-1][4]
    assert loader.rates[STORE] == pytest.approx(0.7 * first + 0.3 * second)
    assert loader.expected_load_s(m.nbytes, STORE) == pytest.approx(m.nbytes / loader.rates[STORE])
    assert loader.expected_load_s(m.nbytes, PEER) == m.nbytes / ASSUMED_LOAD_RATES[PEER]
    assert [e[0] for e in loader.load_events] == [STORE, STORE]
    assert bytes(out) == blob(file_store, m.sha256)


def test_loader_reads_the_disk_tier_first_and_asks_no_peer(file_store, disk_dir):
    a = model(file_store, "a", 81)
    b = model(file_store, "b", 82)
    expected = blob(file_store, a.sha256)
    disk = disk_tier(disk_dir)
    on_disk(disk, cache_key(a), expected)
    on_disk(disk, cache_key(b), blob(file_store, b.sha256))
    file_store.fs.rm(file_store.blob_path(a.sha256))  # only the disk copy can serve it
    asked: list[str] = []
    loader = HostLoader(store=file_store, disk=disk, lock=threading.Lock())
    out = np.zeros(a.nbytes, dtype=np.uint8)

    assert loader.read(a, out, lambda manifest, buf: asked.append(manifest.name) or False) == DISK
    assert bytes(out) == expected
    assert asked == []
    assert (disk.stats.hits, disk.stats.misses) == (1, 0)
    # The hit counts for the disk policy: b is now the one to evict first.
    assert list(disk.policy.victims(lambda key: True)) == [cache_key(b), cache_key(a)]
    assert loader.load_events[-1][:3] == (DISK, TENANT, "a")


def test_loader_drops_a_bad_disk_copy_and_reads_the_store(file_store, disk_dir):
    m = model(file_store, "m", 83)
    good = blob(file_store, m.sha256)
    disk = disk_tier(disk_dir)
    on_disk(disk, cache_key(m), good)
    disk.path(cache_key(m)).write_bytes(flip_byte(good))
    loader = HostLoader(store=file_store, disk=disk, lock=threading.Lock())
    out = np.zeros(m.nbytes, dtype=np.uint8)

    assert loader.read(m, out, None) == STORE
    assert bytes(out) == good
    assert disk.sizes == {} and not disk.path(cache_key(m)).exists()
    assert (disk.stats.errors, disk.stats.hits, disk.stats.models, disk.stats.bytes_used) == (1, 1, 0, 0)
    assert cache_key(m) not in disk.policy


def test_loader_asks_a_peer_before_the_store_and_falls_back_on_a_bad_copy(file_store, disk_dir):
    m = model(file_store, "m", 84)
    good = blob(file_store, m.sha256)
    loader = HostLoader(store=file_store, disk=disk_tier(disk_dir), lock=threading.Lock())

    def peer(corrupt: bool):
        def read(manifest: Manifest, out: np.ndarray) -> bool:
            data = np.frombuffer(good, dtype=np.uint8).copy()
            if corrupt:
                data[-1] ^= 0xFF
            copy_verified(data, out, manifest.chunks, source="peer")
            return True

        return read

    for peer_read, source in ((peer(False), PEER), (lambda manifest, out: False, STORE), (peer(True), STORE)):
        out = np.zeros(m.nbytes, dtype=np.uint8)
        assert loader.read(m, out, peer_read) == source
        assert bytes(out) == good
    assert [e[0] for e in loader.load_events] == [PEER, STORE, STORE]


# -- write-behind ----------------------------------------------------------------------------


def write_behind(disk: DiskTier, lock: threading.Lock | None = None) -> WriteBehind:
    return WriteBehind(lock or threading.Lock(), disk, lambda nbytes, source: nbytes / ASSUMED_LOAD_RATES[source])


def test_write_behind_writes_a_queued_copy_by_drain(file_store, disk_dir, gated_writes):
    m = model(file_store, "m", 90)
    data = blob(file_store, m.sha256)
    key = cache_key(m)
    disk = disk_tier(disk_dir)
    writes = write_behind(disk)
    try:
        writes.submit(key, array(data))
        assert gated_writes.started.wait(10)
        assert disk.reserved == {key: len(data)} and disk.sizes == {}  # in flight: counted
        assert not disk.path(key).exists()
        timer = gated_writes.open_later()
        writes.drain()
        timer.join()
        assert disk.path(key).read_bytes() == data
        assert disk.sizes == {key: len(data)} and disk.reserved == {}
        assert (disk.stats.loads, disk.stats.models, disk.stats.bytes_used) == (1, 1, len(data))
    finally:
        gated_writes.gate.set()
        writes.close()


def test_write_behind_close_finishes_every_pending_copy(file_store, disk_dir, gated_writes):
    infos = [model(file_store, n, 91 + i) for i, n in enumerate("abc")]
    disk = disk_tier(disk_dir)
    writes = write_behind(disk)
    for m in infos:
        writes.submit(cache_key(m), array(blob(file_store, m.sha256)))
    assert gated_writes.started.wait(10)
    assert disk.sizes == {}
    timer = gated_writes.open_later()
    writes.close()
    timer.join()
    assert disk.sizes == {cache_key(m): m.nbytes for m in infos}
    for m in infos:
        assert disk.path(cache_key(m)).read_bytes() == blob(file_store, m.sha256)
    assert disk.reserved == {}


def test_write_behind_drops_a_copy_cancelled_while_it_was_written(file_store, disk_dir, gated_writes):
    m = model(file_store, "m", 95)
    key = cache_key(m)
    lock = threading.Lock()
    disk = disk_tier(disk_dir)
    writes = write_behind(disk, lock)
    try:
        writes.submit(key, array(blob(file_store, m.sha256)))
        assert gated_writes.started.wait(10)
        with lock:  # as NodeCache.evict does
            writes.cancel(key)
            assert writes.cancelled(key)
        gated_writes.gate.set()
        writes.drain()
        assert disk.sizes == {} and disk.reserved == {} and not disk.path(key).exists()
        assert not writes.cancelled(key)  # forgotten once its last copy was done
        writes.submit(key, array(blob(file_store, m.sha256)))  # a later copy is written as usual
        writes.drain()
        assert disk.sizes == {key: m.nbytes}
    finally:
        gated_writes.gate.set()
        writes.close()


def test_write_behind_counts_a_failed_write_and_releases_its_room(file_store, disk_dir, monkeypatch):
    m = model(file_store, "m", 96)
    key = cache_key(m)
    disk = disk_tier(disk_dir)
    writes = write_behind(disk)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        monkeypatch.setattr(host_loader_module, "write_atomically", disk_full)
        writes.submit(key, array(blob(file_store, m.sha256)))
        writes.drain()
        assert (disk.stats.errors, disk.used, disk.stats.models) == (1, 0, 0)
        assert disk.reserved == {} and not disk.path(key).exists()

        monkeypatch.undo()
        writes.submit(key, array(blob(file_store, m.sha256)))
        writes.drain()
        assert disk.path(key).read_bytes() == blob(file_store, m.sha256)
    finally:
        writes.close()


# -- scrub -----------------------------------------------------------------------------------


class Reloads:
    """A scrub's ``reload``: records the manifests, or raises ``error``."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.manifests: list[Manifest] = []
        self.error = error

    def __call__(self, manifest: Manifest) -> None:
        self.manifests.append(manifest)
        if self.error is not None:
            raise self.error


def flip_blob_byte(published: np.ndarray, manifest: Manifest) -> None:
    """Flips the last byte of the blob in a published copy (tensor data, not the header)."""
    published[GUARD_BYTES + manifest.nbytes - 1] ^= 0xFF


def test_scrub_passes_intact_copies_and_skips_loads_in_flight(file_store):
    a, b, c = (model(file_store, n, 100 + i) for i, n in enumerate("abc"))
    memory = WritableSharedMemory()
    host = host_tier()
    entries = [load(host, m, file_store, memory) for m in (a, b)]
    host.admit(c, False, 1.0)  # loading: nothing to hash yet
    reload = Reloads()

    assert scrub_host_tier(host, threading.Lock(), memory, reload) == {"scrubbed": 2, "corrupt": 0, "reloaded": 0}
    assert reload.manifests == []
    assert (host.stats.scrubbed, host.stats.corrupt) == (2, 0)
    assert set(host.entries) == {cache_key(a), cache_key(b), cache_key(c)}
    assert all(e.leases == 0 and e.handle is not None for e in entries)


def test_scrub_drops_a_copy_with_a_flipped_byte_and_asks_for_its_reload(file_store):
    a = model(file_store, "a", 105)
    b = model(file_store, "b", 106)
    memory = WritableSharedMemory()
    host = host_tier()
    good = load(host, a, file_store, memory)
    bad = load(host, b, file_store, memory)
    flip_blob_byte(bad.handle, b)
    reload = Reloads()

    assert scrub_host_tier(host, threading.Lock(), memory, reload) == {"scrubbed": 2, "corrupt": 1, "reloaded": 1}
    assert reload.manifests == [b]
    assert set(host.entries) == {cache_key(a)} and good.handle is not None
    assert bad.handle is None and bad.evict_when_idle and host.condemned == {}  # unleased: freed now
    assert cache_key(b) not in host.policy
    assert (host.stats.scrubbed, host.stats.corrupt, host.used) == (2, 1, cost(a))


def test_scrub_keeps_a_leased_corrupt_copy_counted_until_its_last_lease(file_store):
    m = model(file_store, "m", 107)
    memory = WritableSharedMemory()
    host = host_tier()
    entry = load(host, m, file_store, memory)
    entry.leases = 1
    flip_blob_byte(entry.handle, m)

    # A reload that fails (no room, store down) is left to the next miss, not raised.
    reload = Reloads(CapacityError("no room"))
    assert scrub_host_tier(host, threading.Lock(), memory, reload) == {"scrubbed": 1, "corrupt": 1, "reloaded": 0}
    assert reload.manifests == [m]
    assert host.entries == {} and host.condemned == {id(entry): entry}
    assert entry.handle is not None and entry.leases == 1  # its holder still has it mapped
    assert host.used == cost(m) and host.tenants() == {TENANT}
    host.unlease(entry)
    assert entry.handle is None and host.condemned == {} and host.used == 0


def test_scrub_hashes_through_the_memorys_view_when_handles_are_not_arrays(file_store):
    m = model(file_store, "m", 108)

    class TokenMemory:
        """Handles are tokens, as Ray's ObjectRefs are; ``view`` gives the bytes."""

        def __init__(self) -> None:
            self.objects: dict[int, np.ndarray] = {}

        def publish(self, buffer: np.ndarray) -> int:
            token = len(self.objects)
            self.objects[token] = np.array(buffer, copy=True)
            return token

        def view(self, handle: int) -> np.ndarray:
            return self.objects[handle]

    memory = TokenMemory()
    host = host_tier()
    entry = load(host, m, file_store, memory)
    lock = threading.Lock()
    assert scrub_host_tier(host, lock, memory, Reloads()) == {"scrubbed": 1, "corrupt": 0, "reloaded": 0}
    flip_blob_byte(memory.view(entry.handle), m)
    assert scrub_host_tier(host, lock, memory, Reloads()) == {"scrubbed": 1, "corrupt": 1, "reloaded": 1}
    assert host.entries == {}


# -- quotas ----------------------------------------------------------------------------------


def test_tenant_of_and_tenant_quota():
    assert tenant_of("alice/" + "0" * 64) == "alice"
    assert tenant_quota("alice", None, 123) is None
    quota = tenant_quota("alice", 100, 40)
    assert isinstance(quota, Quota) and (quota.limit, quota.used) == (100, 40)
    assert quota.owns("alice/" + "0" * 64)
    assert not quota.owns("bob/" + "0" * 64) and not quota.owns("alice2/" + "0" * 64)


def test_tenant_stats_over_a_host_and_a_disk_tier(file_store, disk_dir):
    a = model(file_store, "a", 110, tenant="alice")
    huge = model(file_store, "huge", 111, tenant="alice", rows=128)
    b = model(file_store, "b", 112, tenant="bob", rows=8)
    c = model(file_store, "c", 113, tenant="carol")
    d = model(file_store, "d", 114, tenant="dave")
    quotas = {("alice", HOST): cost(a), ("dave", DISK): d.nbytes - 1}

    def quota(tenant: str, tier: str) -> int | None:
        return quotas.get((tenant, tier))

    host = host_tier(quota=lambda tenant: quota(tenant, HOST))
    disk = disk_tier(disk_dir, quota=lambda tenant: quota(tenant, DISK))
    load(host, a, file_store, FakeSharedMemory())
    with pytest.raises(CapacityError):
        host.admit(huge, False, 1.0)  # over alice's host quota
    assert host.admit(b, False, 1.0) is not None  # in flight
    on_disk(disk, cache_key(b), blob(file_store, b.sha256))
    assert disk.reserve(cache_key(c), c.nbytes, None)  # in flight
    assert not disk.reserve(cache_key(d), d.nbytes, None)  # over dave's disk quota
    refusals = {"erin": {NOT_FOUND: 2, DENIED: 1}}

    stats = tenant_stats(host, disk, refusals, quota)
    assert list(stats) == ["alice", "bob", "carol", "dave", "erin"]
    assert stats == {
        "alice": TenantStats(host_bytes=cost(a), host_quota=cost(a), quota_denials=1),
        "bob": TenantStats(host_bytes=cost(b), disk_bytes=b.nbytes),
        "carol": TenantStats(disk_bytes=c.nbytes),
        "dave": TenantStats(disk_quota=d.nbytes - 1, quota_denials=1),
        "erin": TenantStats(not_found=2, denied=1),
    }
    # Only the asked tenant, even one the tiers do not know.
    assert tenant_stats(host, disk, refusals, quota, tenant="bob") == {"bob": stats["bob"]}
    assert tenant_stats(host, disk, refusals, quota, tenant="zed") == {"zed": TenantStats()}
