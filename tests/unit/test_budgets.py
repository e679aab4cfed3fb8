"""Tier budgets changed at run time, without Ray: the admission sequence over a tier that holds
more than its budget, the host and disk tiers of a NodeCache (idle models evicted in the
policy's order, leased ones kept until released, pinned ones asked back, tenants' shares that
follow the budget), and one GPU's tier over a FakeDevice.
"""

from __future__ import annotations

# ruff: noqa: F811 - the fixtures imported below are test arguments by the same names
import threading

import pytest

from tests.unit.test_gpu_tier import ME as GPU_ME
from tests.unit.test_gpu_tier import Models, make_tier
from tests.unit.test_node_cache import (  # noqa: F401 - fixtures are found by name
    TENANT,
    cost,
    disk_dir,
    make_cache,
    memory,
    reads,
    use,
    wait_for,
    weights,
)
from trims_ray import CapacityError
from trims_ray._config import CacheConfig, check_budget
from trims_ray._protocol import BYPASS, DISK, HOST, Holder, cache_key
from trims_ray.cache.gpu_testing import FakeDevice
from trims_ray.cache.gpu_tier import GpuTierConfig
from trims_ray.policy import Outcome, decide_admission, make_policy, shrink_victims

pytestmark = pytest.mark.timeout(60)

ME = Holder.this_process()
WORKER = Holder(ME.pid, ME.start + 1)  # another process (the holder_alive double decides)


# -- the policy's part -----------------------------------------------------------------------


def _lru(*keys: str, size: int = 10):
    policy = make_policy("lru")
    for key in keys:
        policy.on_insert(key, size, 1.0)
    return policy


def test_shrink_victims_takes_the_shortest_prefix_or_every_idle_key():
    policy = _lru("a", "b", "c")
    sizes = {"a": 10, "b": 10, "c": 10}
    assert shrink_victims(policy, 15, sizes, lambda k: True) == ["a", "b"]
    assert shrink_victims(policy, 0, sizes, lambda k: True) == []
    assert shrink_victims(policy, -5, sizes, lambda k: True) == []
    # Not enough idle bytes: every idle key still goes (a partial set is what a shrink wants).
    assert shrink_victims(policy, 100, sizes, lambda k: k != "b") == ["a", "c"]


def test_admission_over_a_lowered_budget_frees_the_excess_first():
    policy = _lru("a", "b", "c")
    sizes = {"a": 10, "b": 10, "c": 10}
    # 30 held, budget 20: keeping 10 more needs 20 freed, not 10.
    decision = decide_admission(policy, "d", 10, 1.0, budget=20, used=30, sizes=sizes, force=True)
    assert decision.outcome is Outcome.KEEP and decision.victims == ("a", "b")
    # The excess is leased: nothing can make room.
    decision = decide_admission(policy, "d", 10, 1.0, budget=20, used=30, sizes=sizes,
                                evictable=lambda k: k == "a")
    assert decision.outcome is Outcome.NO_ROOM and decision.victims == ()
    with pytest.raises(ValueError, match="nbytes"):
        decide_admission(policy, "d", -1, 1.0, budget=20, used=0, sizes=sizes)


def test_check_budget_takes_non_negative_ints_only():
    assert check_budget(0, "x") == 0 and check_budget(5 << 30, "x") == 5 << 30
    for bad in (-1, 1.5, True, "1", None):
        with pytest.raises(ValueError, match="the host budget must be a non-negative int"):
            check_budget(bad, "the host budget")
    with pytest.raises(ValueError, match="disk_bytes must be a non-negative int"):
        CacheConfig(disk_bytes=-1)


# -- the host tier ---------------------------------------------------------------------------


def _three(file_store, cache):
    """Three models of one size used in the order m0, m1, m2 (idle, all resident)."""
    infos = [file_store.register(f"m{i}", weights(i), tenant=TENANT) for i in range(3)]
    for info in infos:
        assert use(cache, info.name) == "store"
    return infos


def test_a_lower_host_budget_evicts_idle_models_in_the_policys_order(make_cache, file_store, memory):
    cache = make_cache(policy="lru")
    infos = _three(file_store, cache)
    live = memory.live()
    assert use(cache, "m0") == HOST  # m0 is now the most recently used: m1 goes first

    result = cache.set_budget(HOST, cost(infos[0]))
    assert result == {"budget": cost(infos[0]), "bytes_used": cost(infos[0]), "evicted": 2, "over_budget": 0}
    host = cache.stats()[HOST]
    assert (host.capacity, host.bytes_used, host.models, host.evictions) == (cost(infos[0]), cost(infos[0]), 1, 2)
    assert memory.live() == live - 2  # the two copies were really let go
    assert use(cache, "m0") == HOST
    assert use(cache, "m1") == DISK  # evicted from the host tier; its miss evicts m0 to fit
    assert cache.stats()[HOST].bytes_used == cost(infos[0])


def test_a_higher_host_budget_admits_what_did_not_fit(make_cache, file_store):
    info = file_store.register("m", weights(1), tenant=TENANT)
    cache = make_cache(host_budget=cost(info) - 1)
    with pytest.raises(CapacityError, match="budget is"):
        cache.acquire("m", TENANT, ME)
    assert cache.set_budget(HOST, cost(info))["evicted"] == 0
    assert use(cache, "m") == "store" and use(cache, "m") == HOST


def test_a_leased_model_stays_over_the_budget_until_released(make_cache, file_store):
    cache = make_cache(policy="lru")
    small = [file_store.register(f"s{i}", weights(i), tenant=TENANT) for i in range(2)]
    big = file_store.register("big", weights(9, rows=64), tenant=TENANT)
    for info in (*small, big):
        use(cache, info.name)
    held = cache.acquire("big", TENANT, ME)
    budget = cost(big) - 100  # below the leased model, above a small one
    result = cache.set_budget(HOST, budget)
    assert result == {"budget": budget, "bytes_used": cost(big), "evicted": 2, "over_budget": 100}
    # The leased copy is served as before. A small miss cannot be kept while the leased one
    # holds the excess: it is a bypass, not an error.
    again = cache.acquire("big", TENANT, ME)
    assert again.tier == HOST
    assert cache.acquire("s0", TENANT, ME).tier == BYPASS
    assert cache.release(held.lease_id)
    assert cache.stats()[HOST].models == 1  # the other lease holds it still
    assert cache.release(again.lease_id)
    assert (cache.stats()[HOST].models, cache.stats()[HOST].bytes_used) == (0, 0)
    assert use(cache, "s0") == DISK and cache.stats()[HOST].bytes_used == cost(small[0])


def test_the_last_release_over_a_lowered_budget_frees_the_model(make_cache, file_store, memory):
    cache = make_cache(policy="lru")
    info = file_store.register("m", weights(1), tenant=TENANT)
    lease_id = cache.acquire("m", TENANT, ME).lease_id  # (a grant holds the copy: not kept)
    assert cache.set_budget(HOST, cost(info) - 1)["over_budget"] == 1
    live = memory.live()
    assert cache.release(lease_id)
    host = cache.stats()[HOST]
    assert (host.bytes_used, host.models, host.evictions) == (0, 0, 1)
    assert memory.live() == live - 1


def test_a_pinned_model_is_asked_back_when_the_budget_falls(make_cache, file_store):
    cache = make_cache(holder_alive=lambda holder: True, policy="lru")
    file_store.register("m", weights(1), tenant=TENANT)
    assert cache.acquire("m", TENANT, WORKER, pin=True).pinned

    def worker() -> None:  # a worker process's reclaim thread
        for pin_id in cache.wait_asked(WORKER, 10.0):
            cache.release(pin_id)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    result = cache.set_budget(HOST, 0)
    thread.join(10)
    assert result == {"budget": 0, "bytes_used": 0, "evicted": 1, "over_budget": 0}
    assert cache.pinned() == 0 and cache.stats()[HOST].models == 0


def test_a_pin_not_given_back_in_time_is_over_the_budget(make_cache, file_store):
    cache = make_cache(holder_alive=lambda holder: True, policy="lru", reclaim_wait_s=0.2)
    info = file_store.register("m", weights(1), tenant=TENANT)
    pin = cache.acquire("m", TENANT, WORKER, pin=True)
    result = cache.set_budget(HOST, 0)
    assert result == {"budget": 0, "bytes_used": cost(info), "evicted": 0, "over_budget": cost(info)}
    assert cache.release(pin.lease_id)  # given back late: freed then
    assert cache.stats()[HOST].bytes_used == 0


def test_tenant_shares_follow_the_budget(make_cache):
    cache = make_cache(tenant_share=0.5, host_budget=1000, disk_budget=4000)
    assert (cache.quota(TENANT, HOST), cache.quota(TENANT, DISK)) == (500, 2000)
    cache.set_budget(HOST, 3000)
    cache.set_budget(DISK, 100)
    assert (cache.quota(TENANT, HOST), cache.quota(TENANT, DISK)) == (1500, 50)


def test_bad_budget_calls_are_refused_and_change_nothing(make_cache):
    cache = make_cache(host_budget=1000)
    for tier, nbytes, match in [
        ("gpu", 10, "GPU budgets are its GPU holders'"),
        ("nvme", 10, "tier must be"),
        (None, 10, "tier must be"),
        (HOST, -1, "non-negative int"),
        (HOST, 2.5, "non-negative int"),
        (HOST, True, "non-negative int"),
    ]:
        with pytest.raises(ValueError, match=match):
            cache.set_budget(tier, nbytes)
    assert cache.stats()[HOST].capacity == 1000 and cache.host_budget == 1000


# -- the disk tier ---------------------------------------------------------------------------


def test_a_lower_disk_budget_deletes_blobs_in_the_policys_order(make_cache, file_store):
    cache = make_cache(policy="lru")
    infos = _three(file_store, cache)
    paths = [cache.disk.path(cache_key(file_store.manifest(i.name, tenant=TENANT))) for i in infos]
    assert all(p.exists() for p in paths)
    size = paths[0].stat().st_size
    result = cache.set_budget(DISK, size)
    assert result == {"budget": size, "bytes_used": size, "evicted": 2, "over_budget": 0}
    assert [p.exists() for p in paths] == [False, False, True]  # m2 was written last
    disk = cache.stats()[DISK]
    assert (disk.capacity, disk.bytes_used, disk.models) == (size, size, 1)
    # A later copy fits the new budget by deleting the one left.
    cache.evict("m0", TENANT, HOST)
    assert use(cache, "m0") == "store"
    assert [p.exists() for p in paths] == [True, False, False]


# -- tenant quotas -----------------------------------------------------------------------------

OTHER = "other"


def test_a_lower_quota_evicts_the_tenants_own_idle_models_in_the_policys_order(make_cache, file_store, memory):
    cache = make_cache(policy="lru")
    theirs = file_store.register("theirs", weights(7), tenant=OTHER)
    assert use(cache, "theirs", tenant=OTHER) == "store"  # used first: lru's first victim overall
    infos = _three(file_store, cache)
    assert use(cache, "m0") == HOST  # m1 is now the tenant's least recently used
    live = memory.live()
    result = cache.set_quota(TENANT, HOST, 2 * cost(infos[0]))
    assert result == {"quota": 2 * cost(infos[0]), "bytes_used": 2 * cost(infos[0]), "evicted": 1, "over_quota": 0}
    assert memory.live() == live - 1
    assert use(cache, "theirs", tenant=OTHER) == HOST  # another tenant's model never goes for it
    assert use(cache, "m1") == DISK  # m1 went; its miss makes room from the tenant's own models
    tenants = cache.tenant_stats(TENANT)[TENANT]
    assert tenants.host_quota == 2 * cost(infos[0]) and tenants.host_bytes <= 2 * cost(infos[0])
    # None drops the explicit quota: the tenant's share of the budget (all of it here) holds.
    assert cache.set_quota(TENANT, HOST, None)["quota"] is None
    assert cache.quota(TENANT, HOST) is None
    assert use(cache, "m2") in (HOST, DISK) and cache.stats()[HOST].models == 4
    assert theirs.tenant == OTHER


def test_a_lower_disk_quota_deletes_the_tenants_blobs_and_a_leased_host_copy_stays(make_cache, file_store):
    cache = make_cache(policy="lru", tenant_quotas={TENANT: {HOST: 1 << 30}})
    infos = _three(file_store, cache)
    paths = [cache.disk.path(cache_key(file_store.manifest(i.name, tenant=TENANT))) for i in infos]
    size = paths[0].stat().st_size
    result = cache.set_quota(TENANT, DISK, size)
    assert (result["quota"], result["evicted"], result["over_quota"]) == (size, 2, 0)
    assert [p.exists() for p in paths] == [False, False, True]
    held = cache.acquire("m0", TENANT, ME)
    result = cache.set_quota(TENANT, HOST, 0)
    assert (result["evicted"], result["over_quota"]) == (2, cost(infos[0]))  # m0 is leased: it stays
    assert cache.release(held.lease_id)
    with pytest.raises(CapacityError, match="quota"):
        cache.acquire("m0", TENANT, ME)


def test_a_lower_budget_trims_a_tenant_over_its_share_of_it(make_cache, file_store):
    probe = file_store.register("probe", weights(0), tenant=TENANT)
    cache = make_cache(policy="lru", tenant_share=0.5, host_budget=10 * cost(probe))
    infos = _three(file_store, cache)  # the probe's size: weights() are all alike
    result = cache.set_budget(HOST, 4 * cost(infos[0]))  # the tier still fits all three; the share (2) does not
    assert (result["evicted"], result["bytes_used"]) == (1, 2 * cost(infos[0]))
    assert use(cache, "m0") == DISK  # lru: m0 went


def test_bad_quota_calls_are_refused_and_change_nothing(make_cache):
    cache = make_cache(tenant_share=0.5, host_budget=1000)
    for tenant, tier, nbytes, error, match in [
        (TENANT, "gpu", 10, ValueError, "no per-tenant quota"),
        (TENANT, HOST, -1, ValueError, "non-negative int"),
        (TENANT, HOST, 1.5, ValueError, "non-negative int"),
        ("Bad Tenant", HOST, 10, ValueError, "tenant"),
        (7, HOST, 10, TypeError, "tenant"),
    ]:
        with pytest.raises(error, match=match):
            cache.set_quota(tenant, tier, nbytes)
    assert cache.quota(TENANT, HOST) == 500 and cache.tenant_quotas == {}


# -- one GPU ---------------------------------------------------------------------------------


@pytest.fixture
def gpu_models(tmp_path) -> Models:
    from trims_ray import ModelStore

    return Models(ModelStore(f"file://{tmp_path}/gpu-store"))


def test_a_lower_gpu_budget_frees_idle_models_and_the_rest_on_release(gpu_models):
    device = FakeDevice(64 << 20)
    tier = make_tier(gpu_models, device, budget=1 << 20)
    a, b, c = gpu_models.add(200_000), gpu_models.add(200_000), gpu_models.add(200_000)
    for m in (a, b):
        tier.release(tier.acquire(m, GPU_ME).lease_id)
    held = tier.acquire(c, GPU_ME)
    one = device.footprint(a.nbytes)

    result = tier.set_budget(one // 2)
    assert result == {"budget": one // 2, "bytes_used": one, "evicted": 2, "over_budget": one - one // 2}
    assert set(tier.resident()) == {cache_key(c)} and len(device.freed) == 2
    tier.release(held.lease_id)  # the last lease over the lowered budget: c goes now
    assert tier.resident() == {} and device.allocations == {}
    assert (tier.stats().capacity, tier.stats().bytes_used) == (one // 2, 0)

    with pytest.raises(ValueError, match="exceeds"):
        tier.set_budget(65 << 20)
    with pytest.raises(ValueError, match="non-negative int"):
        tier.set_budget(-1)
    assert tier.set_budget(1 << 20)["over_budget"] == 0
    assert tier.acquire(a, GPU_ME).tier != BYPASS


# -- found in review: the edges of a lowered budget ------------------------------------------


def test_what_a_tier_holds_over_its_budget_comes_out_of_the_bypass_allowance(make_cache, file_store):
    infos = [file_store.register(f"m{i}", weights(i), tenant=TENANT) for i in range(12)]
    unit = cost(infos[0])
    store = 10 * unit  # the node's object store; the allowance is half of what the budget leaves

    def allowance(budget: int) -> int:
        return (store - budget) // 2

    cache = make_cache(policy="lru", host_budget=8 * unit, bypass_budget=allowance(8 * unit))
    held = [cache.acquire(f"m{i}", TENANT, ME) for i in range(8)]  # eight running tasks
    assert cache.set_budget(HOST, 2 * unit, bypass_budget=allowance(2 * unit))["over_budget"] == 6 * unit
    # 8 held against a budget of 2: the 6 over it leave no allowance (4 - 6 < 0), so the next
    # misses read their own copies instead of four shared ones that would overfill the store.
    more = [cache.acquire(f"m{i}", TENANT, ME) for i in range(8, 12)]
    assert [g.tier for g in more] == [BYPASS] * 4 and cache.host.bypass_used == 0
    assert cache.host.used + cache.host.bypass_used <= store
    for grant in held:
        cache.release(grant.lease_id)
    assert cache.host.used <= 2 * unit


def test_a_raised_budget_counts_shared_copies_beyond_their_smaller_allowance(make_cache, file_store):
    infos = [file_store.register(f"m{i}", weights(i), tenant=TENANT) for i in range(4)]
    unit = cost(infos[0])
    cache = make_cache(policy="lru", host_budget=2 * unit, bypass_budget=2 * unit)
    held = [cache.acquire(f"m{i}", TENANT, ME) for i in range(2)]  # the tier is full and leased
    shared = [cache.acquire(f"m{i}", TENANT, ME) for i in (2, 3)]  # two shared bypass copies
    assert [g.tier for g in shared] == ["store", "store"] and cache.host.bypass_used == 2 * unit
    cache.set_budget(HOST, 3 * unit, bypass_budget=unit // 2)  # the store is 4: (4 - 3) / 2
    for grant in held:
        cache.release(grant.lease_id)
    # 2 held + 2 shared = the whole store: the copies over the allowance (1.5 units) count
    # against the budget, so a miss must evict rather than push the total past it.
    use(cache, "m2")
    assert cache.host.used + cache.host.bypass_used <= 4 * unit
    for grant in shared:
        cache.release(grant.lease_id)


def test_a_copy_asked_back_is_not_counted_twice(make_cache, file_store):
    cache = make_cache(holder_alive=lambda holder: True, policy="lru", reclaim_wait_s=0.2)
    infos = {n: file_store.register(n, weights(i), tenant=TENANT) for i, n in enumerate("pabx")}
    size = cost(infos["p"])
    pin = cache.acquire("p", TENANT, WORKER, pin=True)  # a worker keeps p built (LRU-oldest)
    use(cache, "a")
    use(cache, "b")
    task = cache.acquire("x", TENANT, ME)
    result = cache.set_budget(HOST, 2 * size)  # p asked back (not given in time), a evicted
    assert (result["evicted"], result["over_budget"]) == (1, size)

    def resident() -> list[str]:
        keys = {cache_key(file_store.manifest(n, tenant=TENANT)): n for n in infos}
        return sorted(keys[k] for k in cache.host.entries)

    assert resident() == ["b", "x"]
    cache.release(task.lease_id)  # p's bytes are on their way out: b must not go for them
    assert resident() == ["b", "x"]
    cache.release(pin.lease_id)  # the worker gives p back
    assert (cache.stats()[HOST].bytes_used, cache.stats()[HOST].models) == (2 * size, 2)


def test_a_pin_granted_by_a_load_in_flight_over_the_new_budget_is_asked_back(make_cache, file_store, reads):
    cache = make_cache(holder_alive=lambda holder: True, reclaim_wait_s=0.2)
    info = file_store.register("m", weights(1), tenant=TENANT)
    reads.hold.add(info.sha256)
    granted = []
    loading = threading.Thread(target=lambda: granted.append(cache.acquire("m", TENANT, WORKER, pin=True)))
    loading.start()
    assert reads.started.wait(10)
    assert cache.set_budget(HOST, 0)["over_budget"] == cost(info)  # the load in flight stays
    reads.gate.set()
    loading.join(10)
    assert granted[0].pinned
    assert cache.wait_asked(WORKER, 5.0) == [granted[0].lease_id]  # asked back at once
    cache.release(granted[0].lease_id)
    assert cache.stats()[HOST].bytes_used == 0


def test_a_disk_write_queued_before_the_budget_fell_is_decided_when_it_lands(tmp_path):
    from trims_ray.cache.disk_tier import DiskTier

    disk = DiskTier(tmp_path / "disk", 1000, make_policy("lru"))
    old, big, small = (f"{TENANT}/{c * 64}" for c in "abc")

    def land(key: str, size: int) -> None:  # what WriteBehind does once a reserved write is done
        disk.path(key).parent.mkdir(parents=True, exist_ok=True)
        disk.path(key).write_bytes(b"x" * size)
        disk.unreserve(key)
        disk.adopt(key, size)

    disk.reserve(old, 50, None)
    land(old, 50)
    assert disk.reserve(big, 150, None) and disk.reserve(small, 80, None)  # queued writes
    assert disk.set_budget(100) == 0  # the queued writes do not make it delete the blob written
    land(big, 150)  # bigger than the whole new budget: not kept, nothing evicted for it
    assert set(disk.sizes) == {old} and not disk.path(big).exists()
    land(small, 80)  # fits the budget, not beside the old one: that goes (lru)
    assert set(disk.sizes) == {small} and not disk.path(old).exists() and disk.used == 80


def test_a_disk_write_queued_before_a_quota_fell_is_decided_when_it_lands(tmp_path):
    from trims_ray.cache.disk_tier import DiskTier

    quotas = {TENANT: 1000}
    disk = DiskTier(tmp_path / "disk", 1000, make_policy("lru"), quota=quotas.get)
    old, big, small = (f"{TENANT}/{c * 64}" for c in "abc")
    theirs = f"{OTHER}/{'d' * 64}"

    def land(key: str, size: int) -> None:  # what WriteBehind does once a reserved write is done
        disk.path(key).parent.mkdir(parents=True, exist_ok=True)
        disk.path(key).write_bytes(b"x" * size)
        disk.unreserve(key)
        disk.adopt(key, size)

    for key, size in ((theirs, 60), (old, 50)):
        disk.reserve(key, size, None)
        land(key, size)
    assert disk.reserve(big, 150, None) and disk.reserve(small, 80, None)  # queued writes
    quotas[TENANT] = 100
    assert disk.fit_tenant(TENANT, 100) == 0  # the queued writes do not make it delete the blob written
    land(big, 150)  # bigger than the tenant's whole new quota: not kept
    assert set(disk.sizes) == {theirs, old} and not disk.path(big).exists()
    land(small, 80)  # fits the quota, not beside the tenant's other blob: that goes, not the other tenant's
    assert set(disk.sizes) == {theirs, small} and not disk.path(old).exists() and disk.path(theirs).exists()


def test_a_gpu_model_whose_pipelined_grants_ended_goes_when_its_copy_ends(gpu_models):
    gate = threading.Event()
    device = FakeDevice(64 << 20, gate=gate)
    tier = make_tier(gpu_models, device, config=GpuTierConfig(budget_bytes=1 << 20, min_layer_bytes=0))
    m = gpu_models.add_tied()  # layers: the gate holds the copy before its second one
    early = tier.acquire(m, GPU_ME, pipelined=True)  # granted while the copy is in flight
    assert tier.set_budget(0)["over_budget"] > 0
    tier.release(early.lease_id)  # the task is done before its copy
    gate.set()
    wait_for(lambda: tier.resident() == {} and device.allocations == {})
    assert tier.stats().bytes_used == 0


def test_a_gpu_model_evicted_while_leased_is_not_counted_as_excess(gpu_models):
    device = FakeDevice(64 << 20)
    tier = make_tier(gpu_models, device, config=GpuTierConfig(budget_bytes=8 << 20, min_layer_bytes=0))
    named = {n: gpu_models.add(100_000) for n in "abcx"}
    grants = {n: tier.acquire(m, GPU_ME) for n, m in named.items()}
    unit = tier.stats().bytes_used // 4
    for n in "ab":
        tier.release(grants[n].lease_id)  # a, b idle (lru: a first); c, x leased
    assert tier.evict(cache_key(named["c"])) == "deferred"  # goes with its lease

    def resident() -> list[str]:
        keys = {cache_key(m): n for n, m in named.items()}
        return sorted(keys[k] for k in tier.resident())

    assert tier.set_budget(2 * unit)["evicted"] == 1  # a only: c is going anyway
    assert resident() == ["b", "c", "x"]
    tier.release(grants["c"].lease_id)
    assert resident() == ["b", "x"] and tier.stats().bytes_used == 2 * unit


def test_a_recorded_gpu_budget_a_gpu_cannot_hold_is_left_out():
    from trims_ray.actors._budgets import gpu_config_with

    given = GpuTierConfig(budget_bytes=None, budget_fraction=0.5)
    assert gpu_config_with(given, None, 64 << 20, "n") is given
    assert gpu_config_with(given, 32 << 20, 64 << 20, "n").budget_bytes == 32 << 20
    assert gpu_config_with(given, 1 << 40, 64 << 20, "n") is given  # a smaller GPU joined
