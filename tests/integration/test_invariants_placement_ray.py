"""Placement invariants that need real Ray: a node cache's report that Ray delivers late does not
undo a newer one, a table refresh older than a load the caller started does not make it start
another, and a task the user placed is not counted on the node routing would have
chosen (one small single-node cluster for the module, see conftest).
"""

from __future__ import annotations

import pytest
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import trims_ray
from trims_ray import _routing
from trims_ray._cluster import node_cache_actor, placement_actor
from trims_ray._protocol import cache_key

pytestmark = pytest.mark.timeout(120)


def weights(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(256, generator=torch.Generator().manual_seed(seed))}


def total(model) -> float:
    return float(model["w"].double().sum())


def test_a_node_report_delivered_late_does_not_undo_a_newer_one(cache, ray_node):
    node = ray_node
    older = ray.get(node_cache_actor(node).report.remote())  # taken now, delivered below
    trims_ray.register("m", weights(1))
    trims_ray.prefetch("m", nodes=[node])  # the node reports its new copy before this returns
    key = cache_key(cache.manifest("m", tenant="default"))
    holders = placement_actor().holders
    assert ray.get(holders.remote(key)) == {node: "host"}
    ray.get(placement_actor().report.remote(node, older))  # the call that timed out, applied now
    assert ray.get(holders.remote(key)) == {node: "host"}, "a stale report undid a newer one"
    newer = ray.get(node_cache_actor(node).report.remote())
    assert newer["seq"] > older["seq"]


def test_a_refresh_older_than_a_load_this_caller_started_keeps_the_load(cache, ray_node):
    trims_ray.register("m", weights(3))
    key = cache_key(cache.manifest("m", tenant="default"))
    router = _routing.router()
    before = ray.get(placement_actor().snapshot.remote())  # taken before the load below
    _, route = router.route("m", "default")
    assert route.tier is None, "nothing holds the model yet: the route starts a load"
    with router._lock:  # the poll thread adopts a table that predates the load
        router._placement = router._adopt(before)
    _, again = router.route("m", "default")
    assert (again.node, again.tier) == (route.node, "loading"), "the next invocation started another load"
    with router._lock:
        assert router._placement.holders(key) == {route.node: "loading"}


def test_a_task_the_user_placed_is_not_counted_where_routing_would_have_sent_it(cache, ray_node):
    w = weights(2)
    trims_ray.register("m", w)
    key = cache_key(cache.manifest("m", tenant="default"))
    fn = trims_ray.function(model="m", num_cpus=1)(total)
    router = _routing.router()
    # A resource no node has: this task never starts anywhere, so no node ever loads for it.
    nowhere = fn.options(scheduling_strategy="SPREAD", resources={"nowhere": 1})
    ref = nowhere.remote()
    try:
        with router._lock:
            holders = router._placement.holders(key)
        assert holders == {}, f"a task that went nowhere is counted as loading on {holders}"
        assert router.in_flight() == 0
    finally:
        ray.cancel(ref, force=True)
    # A task placed on a node by its user runs there, with the model.
    pinned = fn.options(scheduling_strategy=NodeAffinitySchedulingStrategy(ray_node, soft=False))
    assert ray.get(pinned.remote()) == pytest.approx(float(w["w"].double().sum()))
