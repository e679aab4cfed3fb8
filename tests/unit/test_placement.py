"""Placement without Ray: the residency table, route ranking by expected start-up time, queues
spreading load, copies of hot models, membership, and the errors routing raises before any task.
"""

from __future__ import annotations

import pytest

from trims_ray import CapacityError
from trims_ray.actors.placement import Placement

MB = 1024 * 1024


def cluster(nodes: int = 3, capacity: int = 1024 * MB) -> Placement:
    p = Placement(clock=lambda: 0.0)
    for i in range(nodes):
        p.node_joined(f"n{i}", capacity)
    return p


def test_prefers_gpu_then_host_then_disk_then_loading():
    p = cluster(4)
    p.report("n1", residency={"m": "disk"}, host_used=0, in_flight=0)
    assert p.route("m", 100 * MB).node == "n1" and p.route("m", 100 * MB).tier == "disk"
    p.report("n2", residency={"m": "host"}, host_used=100 * MB, in_flight=0)
    assert p.route("m", 100 * MB).tier == "host" and p.route("m", 100 * MB).node == "n2"
    p.report("n3", residency={"m": "gpu"}, host_used=0, in_flight=0)
    assert p.route("m", 100 * MB).node == "n3"
    assert p.route("unknown-model", 100 * MB).tier is None  # loads somewhere


def test_a_long_queue_sends_traffic_elsewhere():
    p = cluster(2)
    p.report("n0", residency={"m": "host"}, host_used=10 * MB, in_flight=0)
    assert p.route("m", 10 * MB).node == "n0"
    for _ in range(20):  # 20 x 50 ms of queue outweighs loading 10 MB at 100 MB/s elsewhere
        p.started("m", "n0")
    route = p.route("m", 10 * MB)
    assert route.node == "n1" and route.tier is None
    for _ in range(20):
        p.finished("m", "n0")
    assert p.route("m", 10 * MB).node == "n0"


def test_traffic_spreads_over_two_copies():
    p = cluster(2)
    for node in ("n0", "n1"):
        p.report(node, residency={"m": "host"}, host_used=10 * MB, in_flight=0)
    chosen = []
    for _ in range(10):
        route = p.route("m", 10 * MB)
        p.started("m", route.node)
        chosen.append(route.node)
    assert chosen.count("n0") == chosen.count("n1") == 5


def test_a_hot_model_asks_for_a_copy_where_it_fits():
    p = cluster(3, capacity=100 * MB)
    p.report("n0", residency={"m": "host"}, host_used=50 * MB, in_flight=0)
    p.report("n1", residency={}, host_used=90 * MB, in_flight=0)  # no room for 50 MB
    assert p.copies_wanted("m", 50 * MB) == []
    for _ in range(p.copy_when_in_flight + 1):
        p.started("m", "n0")
    assert p.copies_wanted("m", 50 * MB) == ["n2"]
    p.report("n2", residency={"m": "host"}, host_used=50 * MB, in_flight=0)
    assert p.copies_wanted("m", 50 * MB) == []  # 5 in flight over 2 copies is under the bar


def test_a_model_no_node_can_hold_fails_before_any_task():
    p = cluster(3, capacity=64 * MB)
    with pytest.raises(CapacityError, match="more than any node"):
        p.route("huge", 65 * MB)
    with pytest.raises(LookupError):
        Placement().route("m", 1)


def test_a_node_that_leaves_takes_its_residency_with_it():
    p = cluster(2)
    p.report("n1", residency={"m": "host"}, host_used=MB, in_flight=0)
    version, table = p.table()
    assert table == {"m": {"n1": "host"}}
    p.node_left("n1")
    assert p.version > version and p.table()[1] == {}
    assert p.route("m", MB).node == "n0"
    p.node_left("n1")  # twice is harmless


def test_reports_replace_the_snapshot_and_version_only_moves_on_change():
    p = cluster(1)
    p.report("n0", residency={"a": "host", "b": "disk"}, host_used=0, in_flight=0)
    v = p.version
    p.report("n0", residency={"a": "host", "b": "disk"}, host_used=5, in_flight=1)
    assert p.version == v  # load figures alone do not invalidate callers' tables
    p.report("n0", residency={"a": "disk"}, host_used=0, in_flight=0)
    assert p.version == v + 1 and p.table()[1] == {"a": {"n0": "disk"}}
    with pytest.raises(ValueError, match="tier"):
        p.report("n0", residency={"a": "ram"}, host_used=0, in_flight=0)
    with pytest.raises(KeyError):
        p.report("ghost", residency={}, host_used=0, in_flight=0)
    with pytest.raises(ValueError):
        p.node_joined("bad", -1)
