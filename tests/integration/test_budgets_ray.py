"""Tier budgets changed while the cluster runs (``trims_ray.set_budget``, ``trims-ray budget``)
on a real single-node Ray: a lower host budget evicts idle models and the object store really
gets the bytes back; a model in use stays until released; the change survives the node cache's
restart by Ray and is forgotten by shutdown; bad budgets change nothing; concurrent calls end
with the same budget on the node and in the record, whatever order they arrive in.
"""

from __future__ import annotations

import hashlib
import json
import threading

import pytest
import ray

import trims_ray
from trims_ray import cli
from trims_ray._cluster import node_cache_actor
from trims_ray.actors._budgets import claim_turn, record_budget, recorded_budgets

from .conftest import HOST_BUDGET, OBJECT_STORE_BYTES, wait_for
from .test_node_cache_ray import ModelHolder, node_stats, weights

MiB = 1024 * 1024


def test_a_lower_host_budget_evicts_idle_models_and_frees_the_object_store(lru_cache, ray_node):
    for i in range(3):
        trims_ray.register(f"m{i}", weights(12, seed=i))
        trims_ray.prefetch(f"m{i}")
    loaded = node_stats(ray_node).object_store_bytes_used

    result = trims_ray.set_budget("host", 20 * MiB)[ray_node]
    assert (result["budget"], result["evicted"], result["over_budget"]) == (20 * MiB, 2, 0)
    host = node_stats(ray_node).tiers["host"]
    assert (host.capacity, host.models, host.bytes_used) == (20 * MiB, 1, result["bytes_used"])
    assert trims_ray.evict("m2", tier="host")[ray_node]["host"] == "evicted"  # lru: m0, m1 went
    # Invariant 2 for a budget change: the raylet counts the bytes gone.
    wait_for(lambda: node_stats(ray_node).object_store_bytes_used <= loaded - 3 * 12 * MiB, what="bytes freed")
    # A model bigger than a budget is refused as at start; a higher budget takes it again.
    trims_ray.set_budget("host", 10 * MiB)
    with pytest.raises(trims_ray.CapacityError, match="budget is"):
        trims_ray.prefetch("m0")
    trims_ray.set_budget("host", HOST_BUDGET)
    assert trims_ray.prefetch("m0")[ray_node] == "disk"


def test_a_model_in_use_stays_over_a_lower_budget_until_released(lru_cache, ray_node):
    trims_ray.register("held", weights(8))
    result = ModelHolder.remote().hold.remote("held", 3.0)
    wait_for(lambda: node_stats(ray_node).leases == 1, what="the lease")
    changed = trims_ray.set_budget("host", 1 * MiB)[ray_node]
    assert changed["evicted"] == 0 and changed["bytes_used"] > 8 * MiB
    assert changed["over_budget"] == changed["bytes_used"] - MiB
    assert ray.get(result) == pytest.approx(float(weights(8)["w"].sum()), rel=1e-5)
    wait_for(lambda: node_stats(ray_node).tiers["host"].bytes_used == 0, what="the copy freed on release")
    assert node_stats(ray_node).tiers["host"].evictions == 1


def test_a_budget_set_for_the_cluster_survives_a_restart_and_shutdown_forgets_it(ray_node, tmp_path):
    config = trims_ray.CacheConfig(host_bytes=HOST_BUDGET, disk_dir=str(tmp_path / "disk"), lease_check_s=0.2)
    trims_ray.init(store=str(tmp_path / "store"), config=config)
    try:
        trims_ray.register("m", weights(1))
        trims_ray.prefetch("m")  # a load the restarted cache will not have counted
        trims_ray.set_budget("host", 40 * MiB)
        trims_ray.set_budget("disk", 30 * MiB, nodes=[ray_node])
        ray.kill(node_cache_actor(ray_node), no_restart=False)  # Ray restarts it from its arguments

        def restarted_with_the_budgets() -> bool:
            try:
                tiers = node_stats(ray_node).tiers
            except Exception:  # the call that found it dying
                return False
            if tiers["host"].loads:
                return False  # not restarted yet
            assert (tiers["host"].capacity, tiers["disk"].capacity) == (40 * MiB, 30 * MiB)
            return True

        wait_for(restarted_with_the_budgets, timeout=60, interval=0.5, what="the restarted cache's budgets")
        # It knows the records' turns too: a call older than them, arriving now, changes nothing.
        stale = ray.get(node_cache_actor(ray_node).set_budget.remote("host", 10 * MiB, 0))
        assert stale["budget"] == 40 * MiB and node_stats(ray_node).tiers["host"].capacity == 40 * MiB
    finally:
        trims_ray.shutdown()
    trims_ray.init(store=str(tmp_path / "store"), config=config)
    try:
        tiers = node_stats(ray_node).tiers
        assert (tiers["host"].capacity, tiers["disk"].capacity) == (HOST_BUDGET, config.disk_bytes)
    finally:
        trims_ray.shutdown()


def test_bad_budgets_change_nothing(cache, ray_node):
    with pytest.raises(ValueError, match="exceeds the .*-byte object store"):
        trims_ray.set_budget("host", OBJECT_STORE_BYTES + 1)
    with pytest.raises(ValueError, match="tier must be one of"):
        trims_ray.set_budget("nvme", MiB)
    with pytest.raises(ValueError, match="non-negative int"):
        trims_ray.set_budget("disk", -1)
    assert node_stats(ray_node).tiers["host"].capacity == HOST_BUDGET
    # No GPU here: nothing to set, and the record waits for a holder that starts later.
    assert trims_ray.set_budget("gpu", MiB)[ray_node] == {"budget": MiB, "bytes_used": 0, "evicted": 0,
                                                           "over_budget": 0, "gpus": 0}


def test_the_budget_command(lru_cache, ray_node, capsys):
    trims_ray.register("m", weights(4))
    trims_ray.prefetch("m")
    assert cli.main(["budget", "host", "2MiB", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tier"] == "host" and out["nodes"][ray_node]["evicted"] == 1
    assert cli.main(["budget", "host", "64MiB", "--node", ray_node[:8]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "the host budget is 64.0 MiB on 1 node(s)"
    assert lines[1].split() == ["NODE", "BUDGET", "USED", "EVICTED", "OVER", "(LEASED)"]
    assert lines[2].split()[1:] == ["64.0", "MiB", "0", "B", "0", "0", "B"]
    assert cli.main(["budget", "host", "1TiB"]) == 2
    assert "exceeds the" in capsys.readouterr().err


def _digest(tensor) -> str:
    """The tensor's bytes, hashed: equal only for a bit-exact copy (a float sum may differ in
    its last digit with the buffer's alignment)."""
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


@trims_ray.function(model="m0", num_cpus=0.5)
def _checksum(model, name: str) -> tuple[str, str]:
    return name, _digest(model["w"])


def test_invocations_go_on_right_while_the_budget_falls_and_rises(lru_cache, ray_node):
    # Six 4 MiB models, invoked twelve at a time (four run at once: half a CPU each of two)
    # through workers that keep them (the process tier), while the host budget goes from
    # 64 MiB to 6 MiB (one model) and back, four times.
    expected = {}
    for i in range(6):
        w = weights(4, seed=40 + i)
        trims_ray.register(f"m{i}", w)
        expected[f"m{i}"] = _digest(w["w"])
    before = node_stats(ray_node).object_store_bytes_used
    stop = threading.Event()
    changes: list[dict] = []

    def change_budgets() -> None:
        for budget in [6 * MiB, HOST_BUDGET] * 4:
            if stop.wait(0.5):
                return
            changes.append(trims_ray.set_budget("host", budget)[ray_node])

    changer = threading.Thread(target=change_budgets)
    changer.start()
    answers = []
    try:
        while changer.is_alive() or len(answers) < 120:  # every change made under traffic
            names = [f"m{(len(answers) // 12 + i) % 6}" for i in range(12)]
            answers += ray.get([_checksum.options(model=n).remote(n) for n in names])
    finally:
        stop.set()
        changer.join(30)
    wrong = [(name, digest) for name, digest in answers if digest != expected[name]]
    assert len(answers) >= 120 and not wrong, wrong[:5]
    assert len(changes) == 8 and changes[-1]["budget"] == HOST_BUDGET
    # Lowered, then with no invocation left: the tier fits, and the object store has back what
    # the evicted copies held.
    trims_ray.set_budget("host", 6 * MiB)
    wait_for(lambda: node_stats(ray_node).tiers["host"].bytes_used <= 6 * MiB, timeout=20, what="the tier fits")
    host = node_stats(ray_node).tiers["host"]
    assert host.models <= 1 and host.capacity == 6 * MiB
    wait_for(
        lambda: node_stats(ray_node).object_store_bytes_used <= before + 6 * MiB,
        timeout=20,
        what="the object store back to one model",
    )


def test_a_call_that_reaches_the_node_after_a_later_call_changes_nothing(lru_cache, ray_node):
    trims_ray.register("m", weights(12))
    trims_ray.prefetch("m")
    first = claim_turn()  # a call begins and claims its turn, then stalls (a slow network) ...
    assert trims_ray.set_budget("host", 20 * MiB)[ray_node]["budget"] == 20 * MiB  # ... one after it ends
    # The first call's record and its call to the node arrive late: neither undoes the second.
    record_budget("host", 8 * MiB, None, first)
    late = ray.get(node_cache_actor(ray_node).set_budget.remote("host", 8 * MiB, first))
    assert (late["budget"], late["evicted"]) == (20 * MiB, 0)
    host = node_stats(ray_node).tiers["host"]
    assert (host.capacity, host.models) == (20 * MiB, 1)  # 12 MiB: 8 MiB would have evicted it
    assert recorded_budgets(ray_node)["host"].nbytes == 20 * MiB
    # A call that begins after both holds, and its record replaces theirs.
    trims_ray.set_budget("host", 30 * MiB)
    assert node_stats(ray_node).tiers["host"].capacity == 30 * MiB
    assert recorded_budgets(ray_node)["host"].nbytes == 30 * MiB
    # A later call this node refuses (a budget above its object store) still goes after the first.
    first = claim_turn()
    with pytest.raises(ValueError, match="object store"):
        ray.get(node_cache_actor(ray_node).set_budget.remote("host", OBJECT_STORE_BYTES + 1, claim_turn()))
    assert ray.get(node_cache_actor(ray_node).set_budget.remote("host", 8 * MiB, first))["budget"] == 30 * MiB
    # The GPU tier is off here, yet ordered the same: a late call answers with the budget that holds.
    first = claim_turn()
    trims_ray.set_budget("gpu", 2 * MiB)
    late = ray.get(node_cache_actor(ray_node).set_budget.remote("gpu", MiB, first))
    assert late == {"budget": 2 * MiB, "bytes_used": 0, "evicted": 0, "over_budget": 0, "gpus": 0}


def test_a_turn_claimed_from_a_stale_listing_is_claimed_again_above_the_highest(ray_node, monkeypatch):
    from trims_ray.actors import _budgets

    held = [claim_turn() for _ in range(3)]  # the last is the highest; the ones below are deleted
    real = _budgets._claimed_turns
    listings = iter([[held[0] - 1]])  # a caller that listed before those three were claimed

    def stale_first() -> list[int]:
        return next(listings, None) or real()

    monkeypatch.setattr(_budgets, "_claimed_turns", stale_first)
    # Its put of held[0] finds the key deleted and succeeds: the turn must not be taken.
    assert claim_turn() == held[-1] + 1


def test_concurrent_calls_end_with_one_budget_on_the_node_and_in_the_record(lru_cache, ray_node):
    budgets = [16 * MiB, 24 * MiB, 32 * MiB, 40 * MiB]
    claimed: list[int] = []

    def claim() -> None:
        claimed.extend(claim_turn() for _ in range(10))

    claimers = [threading.Thread(target=claim) for _ in range(4)]
    for t in claimers:
        t.start()
    for t in claimers:
        t.join(30)
    assert len(claimed) == len(set(claimed)) == 40  # no turn given twice
    assert claim_turn() > max(claimed)  # and a call that begins later goes after them all
    for _ in range(3):
        callers = [threading.Thread(target=trims_ray.set_budget, args=("host", b)) for b in budgets]
        for t in callers:
            t.start()
        for t in callers:
            t.join(60)
        capacity = node_stats(ray_node).tiers["host"].capacity
        assert capacity in budgets and recorded_budgets(ray_node)["host"].nbytes == capacity


def test_a_tenant_quota_set_while_running_evicts_its_idle_models_and_outlives_a_restart(ray_node, tmp_path):
    config = trims_ray.CacheConfig(
        host_bytes=HOST_BUDGET, disk_dir=str(tmp_path / "disk"), lease_check_s=0.2, policy="lru",
        tenant_quotas={"default": {"disk": 512 * MiB}},
    )
    tenant = trims_ray.init(store=str(tmp_path / "store"), config=config).tenant
    assert tenant == "default"
    try:
        trims_ray.register("shared", weights(4, seed=1), tenant="public")
        trims_ray.prefetch("shared")  # another tenant's: it never goes for this one's quota
        for i in range(3):
            trims_ray.register(f"m{i}", weights(4, seed=10 + i))
            trims_ray.prefetch(f"m{i}")
        first = claim_turn()  # a call that begins now and reaches the node after the next one
        result = trims_ray.set_quota(tenant, "host", 9 * MiB)[ray_node]
        assert (result["quota"], result["evicted"], result["over_quota"]) == (9 * MiB, 1, 0)
        stats = node_stats(ray_node)
        assert stats.tenants[tenant].host_quota == 9 * MiB and stats.tenants[tenant].host_bytes <= 9 * MiB
        assert stats.tiers["host"].models == 3  # two of its own, and the public one
        assert trims_ray.evict("m0", tier="host")[ray_node]["host"] == "absent"  # lru: m0 went
        assert trims_ray.prefetch("m0")[ray_node] == "disk"  # and comes back in place of m1
        assert trims_ray.evict("m1", tier="host")[ray_node]["host"] == "absent"
        late = ray.get(node_cache_actor(ray_node).set_quota.remote(tenant, "host", MiB, first))
        assert (late["quota"], late["evicted"]) == (9 * MiB, 0)
        assert trims_ray.set_quota(tenant, "disk", None)[ray_node]["quota"] is None  # the config's dropped

        ray.kill(node_cache_actor(ray_node), no_restart=False)  # Ray restarts it from its arguments

        def restarted_with_the_quota() -> bool:
            try:
                stats = node_stats(ray_node)
            except Exception:  # the call that found it dying
                return False
            if stats.tiers["host"].loads:
                return False  # not restarted yet
            assert (stats.tenants[tenant].host_quota, stats.tenants[tenant].disk_quota) == (9 * MiB, None)
            return True

        wait_for(restarted_with_the_quota, timeout=60, interval=0.5, what="the restarted cache's quota")
        assert trims_ray.set_quota(tenant, "host", None)[ray_node]["quota"] is None  # its share: all of it
        with pytest.raises(ValueError, match="no per-tenant quota"):
            trims_ray.set_quota(tenant, "gpu", MiB)
        with pytest.raises(ValueError, match="tenant"):
            trims_ray.set_quota("Not A Tenant", "host", MiB)
    finally:
        trims_ray.shutdown()
    trims_ray.init(store=str(tmp_path / "store"), config=config)
    try:
        trims_ray.set_quota(tenant, "disk", MiB)  # recorded, then forgotten by shutdown below
    finally:
        trims_ray.shutdown()
    trims_ray.init(store=str(tmp_path / "store"), config=config)
    try:
        assert node_stats(ray_node).tenants[tenant].disk_quota == 512 * MiB  # the config's again
    finally:
        trims_ray.shutdown()
