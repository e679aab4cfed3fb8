"""Placement without Ray: the residency table, route ranking by expected start-up time, queues
spreading load, copies of hot models (asked for and dropped), membership, callers' copies of the
table, and the errors routing raises before any task.
"""

from __future__ import annotations

import pytest

from trims_ray import CapacityError
from trims_ray.cache.placement import LOADING, NodeReport, Placement

MB = 1024 * 1024


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def cluster(nodes: int = 3, capacity: int = 1024 * MB, slots: int = 1, clock=None) -> Placement:
    p = Placement(clock=clock or (lambda: 0.0))
    for i in range(nodes):
        p.node_joined(f"n{i}", capacity, slots)
    return p


def report(p: Placement, node: str, residency: dict, *, used: int = 0, in_flight=None, capacity=1024 * MB, slots=1, models=None):
    p.report(
        node,
        NodeReport(residency, capacity, used, in_flight or {}, slots, models or {}),
    )


def test_prefers_gpu_then_host_then_disk_then_loading():
    p = cluster(4)
    report(p, "n1", {"m": "disk"})
    assert p.route("m", 100 * MB).node == "n1" and p.route("m", 100 * MB).tier == "disk"
    report(p, "n2", {"m": "host"}, used=100 * MB)
    assert p.route("m", 100 * MB).tier == "host" and p.route("m", 100 * MB).node == "n2"
    report(p, "n3", {"m": "gpu"})
    assert p.route("m", 100 * MB).node == "n3"
    assert p.route("unknown-model", 100 * MB).tier is None  # loads somewhere


def test_a_host_hit_beats_loading_even_a_tiny_model_from_a_peer():
    p = cluster(3)
    report(p, "n1", {"m": "host"}, used=MB)
    assert p.route("m", MB).node == "n1"


def test_a_long_queue_sends_traffic_elsewhere():
    p = cluster(2)
    report(p, "n0", {"m": "host"}, used=10 * MB)
    assert p.route("m", 10 * MB).node == "n0"
    for _ in range(20):  # 20 x 50 ms of queue outweighs loading 10 MB from n0's memory
        p.started("m", "n0")
    route = p.route("m", 10 * MB)
    assert route.node == "n1" and route.tier is None
    for _ in range(20):
        p.finished("m", "n0")
    assert p.route("m", 10 * MB).node == "n0"


def test_a_node_with_more_slots_queues_later():
    p = Placement(clock=lambda: 0.0)
    p.node_joined("small", 1024 * MB, slots=1)
    p.node_joined("big", 1024 * MB, slots=8)
    for node in ("small", "big"):
        report(p, node, {"m": "host"}, slots=1 if node == "small" else 8)
    chosen = []
    for _ in range(9):
        route = p.route("m", MB)
        p.started("m", route.node)
        chosen.append(route.node)
    assert chosen.count("big") == 8 and chosen.count("small") == 1


def test_measured_service_time_sets_the_cost_of_a_queue():
    p = cluster(2)
    report(p, "n0", {"m": "host"}, used=10 * MB)
    p.started("m", "n0")
    assert p.route("m", 10 * MB).node == "n0"  # 50 ms of queue by default: worth waiting
    for _ in range(3):
        p.finished("m", "n0", seconds=2.0)
        p.started("m", "n0")
    assert p.route("m", 10 * MB).node == "n1"  # ~1 s of queue: loading elsewhere is sooner


def test_traffic_spreads_over_two_copies():
    p = cluster(2)
    for node in ("n0", "n1"):
        report(p, node, {"m": "host"}, used=10 * MB)
    chosen = []
    for _ in range(10):
        route = p.route("m", 10 * MB)
        p.started("m", route.node)
        chosen.append(route.node)
    assert chosen.count("n0") == chosen.count("n1") == 5


def test_a_load_in_flight_attracts_the_next_invocations():
    p = cluster(3)
    first = p.route("m", 100 * MB)
    assert first.tier is None
    p.loading("m", first.node)
    second = p.route("m", 100 * MB)
    assert (second.node, second.tier) == (first.node, LOADING)
    report(p, first.node, {})  # the node's report is the truth: the load did not start there
    assert p.route("m", 100 * MB).tier is None


def test_a_hot_model_asks_for_one_copy_at_a_time_where_it_fits():
    clock = Clock()
    p = cluster(4, capacity=100 * MB, clock=clock)
    report(p, "n0", {"m": "host"}, used=50 * MB, capacity=100 * MB, in_flight={"m": 5})
    report(p, "n1", {}, used=90 * MB, capacity=100 * MB)  # no room for 50 MB
    report(p, "n3", {}, capacity=100 * MB, in_flight={"other": 3})
    assert p.demand("m") == 5
    assert p.copies_wanted("m", 50 * MB) == ["n2"]  # free and idle; n3 is busy
    p.copy_made("m", "n2")
    report(p, "n0", {"m": "host"}, used=50 * MB, capacity=100 * MB, in_flight={"m": 30})
    assert p.copies_wanted("m", 50 * MB) == []  # the first copy has not landed yet
    report(p, "n2", {"m": "host"}, used=50 * MB, capacity=100 * MB)
    assert p.copies_wanted("m", 50 * MB) == ["n3"]  # 30 in flight over 2 copies is still hot


def test_a_copy_that_never_lands_is_asked_for_again_after_a_timeout():
    clock = Clock()
    p = cluster(3, clock=clock)
    report(p, "n0", {"m": "host"}, in_flight={"m": 10})
    (node,) = p.copies_wanted("m", MB)
    p.copy_made("m", node)
    assert p.copies_wanted("m", MB) == []
    clock.now += p.copy_timeout_s + 1
    assert p.copies_wanted("m", MB) != []


def test_scaled_copies_are_dropped_when_demand_stays_low():
    clock = Clock()
    p = cluster(3, clock=clock)
    report(p, "n0", {"m": "host"}, in_flight={"m": 10})
    (node,) = p.copies_wanted("m", MB)
    p.copy_made("m", node)
    report(p, node, {"m": "host"}, in_flight={"m": 2})
    report(p, "n0", {"m": "host"}, in_flight={"m": 0})
    assert p.copies_unwanted("m") == []  # low, but not for long yet
    clock.now += p.drop_after_s + 1
    assert p.copies_unwanted("m") == [node]
    report(p, node, {})
    clock.now += p.drop_after_s + 1
    assert p.copies_unwanted("m") == []  # the last copy, and n0's was not placement's doing


def test_a_copy_that_a_user_made_is_never_dropped():
    clock = Clock()
    p = cluster(2, clock=clock)
    report(p, "n0", {"m": "host"})
    report(p, "n1", {"m": "host"})
    clock.now += 3600
    assert p.copies_unwanted("m") == []


def test_a_model_no_node_can_hold_fails_before_any_task():
    p = cluster(3, capacity=64 * MB)
    with pytest.raises(CapacityError, match="more than any node"):
        p.route("huge", 65 * MB)
    with pytest.raises(LookupError):
        Placement().route("m", 1)


def test_a_node_that_leaves_takes_its_residency_and_demand_with_it():
    p = cluster(2)
    report(p, "n1", {"m": "host"}, used=MB, in_flight={"m": 3})
    version, table = p.table()
    assert table == {"m": {"n1": "host"}} and p.demand("m") == 3
    p.node_left("n1")
    assert p.version > version and p.table()[1] == {} and p.demand("m") == 0
    assert p.route("m", MB).node == "n0"
    p.node_left("n1")  # twice is harmless


def test_reports_replace_the_snapshot_and_version_only_moves_on_change():
    p = cluster(1)
    report(p, "n0", {"a": "host", "b": "disk"})
    v = p.version
    report(p, "n0", {"a": "host", "b": "disk"}, used=5, in_flight={"a": 1})
    assert p.version == v  # load figures alone do not invalidate callers' tables
    report(p, "n0", {"a": "disk"})
    assert p.version == v + 1 and p.table()[1] == {"a": {"n0": "disk"}}
    with pytest.raises(ValueError, match="tier"):
        report(p, "n0", {"a": "ram"})
    with pytest.raises(ValueError):
        p.node_joined("bad", -1)


def test_a_report_from_a_new_node_makes_it_join():
    p = cluster(1)
    report(p, "fresh", {"m": "host"}, capacity=10 * MB, slots=4)
    assert p.nodes() == ["fresh", "n0"]
    assert p.route("m", MB).node == "fresh"


def test_a_callers_copy_routes_like_the_original_and_keeps_measurements():
    p = cluster(3)
    report(p, "n2", {"m": "host"}, used=MB, in_flight={"m": 1}, models={"m": ("t", "model", MB)})
    copy = Placement.from_snapshot(p.snapshot())
    assert copy.version == p.version and copy.table() == p.table()
    assert copy.route("m", MB) == p.route("m", MB)
    assert copy.model_of("m") is None  # names stay in the placement actor
    copy.finished("m", "n2", seconds=1.5)
    again = Placement.from_snapshot(p.snapshot(), previous=copy)
    for _ in range(2):
        again.started("m", "n2")
    # 1.5 s per queued invocation, measured by the copy before: loading elsewhere wins now.
    assert again.route("m", MB).node != "n2"


# -- slots from what a task asks for (issue 17, item 3) ---------------------------------------


def test_a_nodes_slots_for_a_task_follow_the_resources_it_asks_for():
    from trims_ray.cache.placement import NodeInfo, task_slots

    one_cpu = NodeInfo(MB, slots=1)
    assert task_slots(one_cpu, 1.0) == 1
    assert task_slots(one_cpu, 0.1) == 10
    assert task_slots(one_cpu, 0.3) == 3
    assert task_slots(one_cpu, 2.0) == 1  # never fewer than one: Ray would queue it there anyway
    assert task_slots(one_cpu, 0.0) == float("inf")  # asks for no CPU: never waits for one
    gpu_node = NodeInfo(MB, slots=8, gpus=2)
    assert task_slots(gpu_node, 1.0, 1.0) == 2 and task_slots(gpu_node, 1.0, 0.25) == 8
    assert task_slots(gpu_node, 0.0, 0.5) == 4


def test_fractional_cpu_tasks_stay_on_the_node_that_holds_their_model():
    # Five 0.1-CPU invocations in flight on a 1-CPU node: all of them run at once there, so
    # the next one has no queue to avoid and stays with the model (a whole-CPU one does not).
    p = cluster(3)
    report(p, "n0", {"m": "host"}, used=2 * MB)
    for _ in range(5):
        p.started("m", "n0")
    assert p.route("m", 2 * MB, cpus=0.1).node == "n0"
    assert not p.queued("n0", cpus=0.1) and p.queued("n0", cpus=1.0)
    assert p.route("m", 2 * MB, cpus=1.0).node != "n0"


def test_the_service_time_a_task_measured_sets_the_queue_cost():
    p = cluster(2)
    report(p, "n0", {"m": "host"}, used=10 * MB)
    for _ in range(2):
        p.started("m", "n0")
    p.finished("m", None, 0.001)  # a task measured a millisecond: n0's queue costs little
    for _ in range(5):
        p.finished("m", None, 0.001)
    assert p.route("m", 10 * MB).node == "n0"
    for _ in range(20):
        p.finished("m", None, 5.0)  # now five seconds each: loading elsewhere is cheaper
    assert p.route("m", 10 * MB).node == "n1"


# -- where a load evicts: the node whose victims are least likely asked for soon -------------


def full_node(p: Placement, node: str, victims: list[tuple[str, float]], *, at: float = 1000.0) -> None:
    """Reports ``node`` full (10 MB), holding 5 MB models ``victims``: (key, recent uses at ``at``)."""
    report_evictable = [(key, 5 * MB, uses, at) for key, uses in victims]
    p.report(
        node,
        NodeReport({key: "host" for key, _ in victims}, 10 * MB, 10 * MB, evictable=report_evictable),
    )


def test_a_load_evicts_on_the_node_whose_victims_are_used_least_lately():
    wall = Clock()
    wall.now = 1000.0
    p = Placement(clock=lambda: 0.0, wall_clock=wall)
    full_node(p, "n0", [("hot-a", 30.0), ("hot-b", 30.0)])  # about one use a second each
    full_node(p, "n1", [("cold-a", 0.5), ("hot-c", 30.0)])  # its evict-first model is cold
    full_node(p, "n2", [("warm-a", 2.0), ("warm-b", 2.0)])
    route = p.route("new", 5 * MB)
    assert route.tier is None and route.node == "n1"
    assert p.eviction_cost(p._nodes["n1"], 5 * MB) < p.eviction_cost(p._nodes["n2"], 5 * MB)
    # Room for one more needs both of n1's models: now n2's two warm ones cost less.
    assert p.route("bigger", 10 * MB).node == "n2"
    # Time passes without uses: the counts decay alike, the order stays.
    wall.now += 60.0
    assert p.route("new", 5 * MB).node == "n1"


def test_a_node_with_free_room_is_charged_nothing_and_one_that_cannot_make_room_a_load():
    p = Placement(clock=lambda: 0.0, wall_clock=lambda: 1000.0)
    full_node(p, "n0", [("hot", 30.0)])  # 5 MB evictable of a full 10 MB: not enough for 6 MB
    p.report("n1", NodeReport({}, 10 * MB, 0))
    assert p.eviction_cost(p._nodes["n1"], 6 * MB) == 0.0
    assert p.eviction_cost(p._nodes["n0"], 6 * MB) is None
    assert p.route("new", 6 * MB).node == "n1"


def test_a_callers_load_takes_its_room_and_victims_until_the_node_reports():
    # Two loads routed before the nodes report: the second must not count on the room, or the
    # cold victim, that the first one takes.
    p = Placement(clock=lambda: 0.0, wall_clock=lambda: 1000.0)
    full_node(p, "n0", [("cold-a", 0.1), ("hot-a", 30.0)])
    full_node(p, "n1", [("warm-b", 3.0), ("hot-b", 30.0)])
    copy = Placement.from_snapshot(p.snapshot(), wall_clock=lambda: 1000.0)
    first = copy.route("new-1", 5 * MB)
    assert first.node == "n0"
    copy.loading("new-1", first.node, 5 * MB)
    assert copy._nodes["n0"].evictable[0][0] == "hot-a"  # cold-a is counted as gone
    assert copy.route("new-2", 5 * MB).node == "n1"  # hot-a next on n0 costs more than warm-b
    # A snapshot carries each node's evictable models to callers unchanged.
    assert Placement.from_snapshot(p.snapshot())._nodes["n1"].evictable == p._nodes["n1"].evictable


def test_a_second_copy_that_must_evict_needs_a_longer_queue_than_one_that_fits():
    # n0 holds m (1 slot, 50 ms a call). Loading m from n0's memory costs about 61 ms; on n1,
    # full, it would evict a model nobody used lately (about free), and a second copy there is
    # charged one more load: 122 ms. Two calls queued at n0 (110 ms) keep the next one there;
    # three (160 ms) send it to n1. With room on n2 instead, two queued are enough to go there.
    p = Placement(clock=lambda: 0.0, wall_clock=lambda: 1000.0)
    p.report("n0", NodeReport({"m": "host"}, 10 * MB, MB))
    full_node(p, "n1", [("cold", 0.0), ("other", 0.0)])
    for _ in range(2):
        p.started("m", "n0")
    assert p.route("m", MB).node == "n0"
    p.started("m", "n0")
    route = p.route("m", MB)
    assert (route.node, route.tier) == ("n1", None)
    p.report("n2", NodeReport({}, 10 * MB, 0))
    p.finished("m", "n0")
    assert p.route("m", MB).node == "n2"


@pytest.mark.parametrize("tier", ["gpu", "host", "disk", LOADING])
def test_a_report_names_only_tiers_placement_knows(tier):
    p = Placement()
    assert p.report("n1", NodeReport({"t/a": tier}, 10 * MB, MB)) is True
    assert p.holders("t/a") == {"n1": tier}
    with pytest.raises(ValueError, match="unknown tier 'ssd' for t/b"):
        p.report("n1", NodeReport({"t/a": tier, "t/b": "ssd"}, 10 * MB, MB))
    assert p.holders("t/a") == {"n1": tier}, "a refused report changed the table"
