"""The trace-driven simulator counts hits, bytes, load time, evictions and refusals right.

Each expected number below is derived in a comment from the trace, not copied from a run.
No Ray here.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pyarrow as pa
import pytest

from trims_ray.policy import POLICIES, available_policies
from trims_ray.policy.lru import LRU
from workloads import simulate as sim
from workloads import traces
from workloads.simulate import Requests, simulate

ONES = dict.fromkeys("abcdz", 1)


def test_lru_hits_on_a_hand_made_trace():
    # Budget 2, unit sizes: a, b miss; a hits; c evicts b (least recently used); a hits.
    result = simulate(Requests.from_keys("abaca", ONES), 2, "lru")
    assert (result.hits, result.evictions, result.requests) == (2, 1, 5)
    assert result.object_hit_ratio == pytest.approx(2 / 5)


def test_fifo_differs_from_lru_on_the_same_trace():
    # FIFO: c evicts a (the first in) although a was just hit; a then misses and evicts b.
    result = simulate(Requests.from_keys("abaca", ONES), 2, "fifo")
    assert (result.hits, result.evictions) == (1, 2)


def test_byte_and_object_hit_ratios_differ_when_sizes_differ():
    # Budget 10 holds both. Requests a b a a b: misses a, b; hits a, a, b.
    # Objects: 3 of 5. Bytes: hits 1 + 1 + 9 = 11 of 1 + 9 + 1 + 1 + 9 = 21.
    result = simulate(Requests.from_keys("abaab", {"a": 1, "b": 9}), 10, "lru")
    assert result.object_hit_ratio == pytest.approx(3 / 5)
    assert result.byte_hit_ratio == pytest.approx(11 / 21)
    assert (result.bytes_hit, result.bytes_requested) == (11, 21)


def test_load_time_is_the_sum_of_the_misses_costs():
    # Budget 1: a, b, a, b each evict the other, so every request misses: 2 * (0.5 + 2.0).
    trace = Requests.from_keys("abab", ONES, costs={"a": 0.5, "b": 2.0})
    result = simulate(trace, 1, "lru")
    assert result.hits == 0
    assert result.load_seconds == pytest.approx(5.0)
    assert result.evictions == 3


def test_a_key_larger_than_the_budget_is_served_but_never_kept():
    # z (11 bytes) never fits in 10: both its requests miss and load; a and b are untouched.
    sizes = {"a": 5, "b": 5, "z": 11}
    costs = {"a": 1.0, "b": 1.0, "z": 3.0}
    result = simulate(Requests.from_keys("abzabz", sizes, costs), 10, "lru")
    assert (result.hits, result.oversize, result.evictions) == (2, 2, 0)
    assert result.load_seconds == pytest.approx(1 + 1 + 3 + 3)
    assert result.peak_bytes == 10


def test_belady_on_a_hand_made_trace():
    # Budget 2, unit sizes, requests a b c a b d a b c. Belady keeps a and b (next needed at
    # 3 and 4) and serves c (needed again at 8), d (never) and the last c (never) without
    # keeping them: hits a, b, a, b = 4, the optimum (keeping c costs two of those hits).
    # LRU evicts each key just before it is needed again: no hit at all.
    trace = Requests.from_keys("abcabdabc", ONES)
    best = simulate(trace, 2, "belady")
    assert (best.hits, best.refused, best.evictions) == (4, 3, 0)
    assert simulate(trace, 2, "lru").hits == 0


def test_belady_beats_or_equals_lru_with_equal_sizes():
    rng = random.Random(5)
    keys = rng.choices(range(40), weights=[1 / (r + 1) for r in range(40)], k=4000)
    trace = Requests.from_keys(keys, dict.fromkeys(range(40), 3))
    for slots in (2, 8, 20):
        optimum = simulate(trace, 3 * slots, "belady")
        lru = simulate(trace, 3 * slots, "lru")
        assert optimum.object_hit_ratio >= lru.object_hit_ratio > 0


def test_gdsf_keeps_one_of_two_equally_asked_models_instead_of_swapping_them():
    # Room for one of a, b, asked for in turn. Admitting ties, each miss evicts the other: b's
    # first request (1, with this one) ties a's 1, a's next (2) beats b's 1, and so on: 40
    # misses, 39 evictions. With the margin of 2, b needs twice a's count and never has it (its
    # refused requests count, a's hits too): a misses once and hits 19 times, b is refused 20.
    trace = Requests.from_keys("ab" * 20, ONES)
    swapping = simulate(trace, 1, "gdsf", admit_margin=1.0)
    assert (swapping.hits, swapping.evictions) == (0, 39)
    steady = simulate(trace, 1, "gdsf")
    assert (steady.hits, steady.evictions, steady.refused) == (19, 0, 20)


@pytest.mark.parametrize("policy", available_policies())
def test_the_budget_is_never_exceeded(policy):
    rng = random.Random(11)
    sizes = {k: rng.randint(1, 30) for k in range(50)}
    costs = {k: rng.uniform(0.0, 2.0) for k in range(50)}
    keys = rng.choices(range(50), weights=[1 / (r + 1) ** 0.7 for r in range(50)], k=3000)
    trace = Requests.from_keys(keys, sizes, costs)
    for budget in (29, 100, 400):
        result = simulate(trace, budget, policy)
        assert 0 < result.peak_bytes <= budget
        assert result.hits + result.refused + result.oversize <= result.requests
        assert result.evictions > 0


def test_the_budget_can_be_filled_exactly():
    # Three 20-byte keys fill 60 bytes to the byte: no eviction, peak = budget.
    result = simulate(Requests.from_keys("abcabc", dict.fromkeys("abc", 20)), 60, "lru")
    assert (result.peak_bytes, result.evictions, result.hits) == (60, 0, 3)


class Recorder(LRU):
    """LRU that logs every call the simulator makes and the time its clock shows."""

    name = "recorder"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.log: list[tuple] = []
        Recorder.last = self

    def _insert(self, key, nbytes, cost):
        self.log.append(("insert", key, nbytes, cost, self._clock()))
        super()._insert(key, nbytes, cost)

    def _access(self, key):
        self.log.append(("access", key, self._clock()))
        super()._access(key)

    def _remove(self, key):
        self.log.append(("remove", key, self._clock()))
        super()._remove(key)

    def _admit(self, key, nbytes, cost, victims):
        self.log.append(("admit", key, list(victims), self._clock()))
        return key != "x"  # x is never kept


def test_the_simulator_calls_the_policy_as_the_node_cache_does(monkeypatch):
    # admit is asked only for a miss that would evict (x: a is its victim), never for one that
    # fits in free room (a, b), and before the victims go; a refused key is neither inserted
    # nor evicts anything. The policy's clock shows each request's time.
    monkeypatch.setitem(POLICIES, "recorder", f"{__name__}:Recorder")
    sizes = {"a": 1, "b": 1, "x": 1}
    trace = Requests.from_keys(
        "abxab", sizes, costs=dict.fromkeys("abx", 0.5), times=[0, 1, 2, 3, 4]
    )
    result = simulate(trace, 2, "recorder")
    assert Recorder.last.log == [
        ("insert", "a", 1, 0.5, 0.0),
        ("insert", "b", 1, 0.5, 1.0),
        ("admit", "x", ["a"], 2.0),
        ("access", "a", 3.0),
        ("access", "b", 4.0),
    ]
    assert (result.hits, result.refused, result.evictions) == (2, 1, 0)


def test_a_trace_table_gives_the_same_result_as_its_lists():
    catalog = traces.Catalog(("m0", "m1", "m2"), np.array([10, 20, 30]))
    table = traces.build_trace([0.0, 1.0, 2.0, 3.0, 4.0], [0, 1, 0, 2, 1], catalog)
    costs = dict(zip(catalog.names, traces.miss_cost(catalog.sizes).tolist()))
    keys = ["m0", "m1", "m0", "m2", "m1"]
    by_lists = Requests.from_keys(
        keys, dict(zip(catalog.names, [10, 20, 30])), costs, times=range(5)
    )
    # Budget 35: m0 and m1 fit (30 bytes); m0 hits; m2 (30) evicts m1, then m0 (least
    # recently used first); m1 misses and evicts m2: one hit, three evictions.
    result = simulate(table, 35, "lru")
    assert result == simulate(by_lists, 35, "lru")
    assert (result.hits, result.evictions) == (1, 3)


def test_a_model_with_two_sizes_is_rejected():
    table = pa.table(
        {
            "time": [0.0, 1.0],
            "tenant": ["t", "t"],
            "model": ["m", "m"],
            "size": pa.array([10, 11], pa.int64()),
            "cost": [1.0, 1.0],
            "tokens": pa.array([0, 0], pa.int64()),
        }
    )
    with pytest.raises(ValueError, match="two different sizes"):
        simulate(table, 100, "lru")


@pytest.mark.parametrize(
    ("budget", "policy", "error"),
    [
        (-1, "lru", ValueError),
        (1.5, "lru", TypeError),
        (True, "lru", TypeError),
        (10, "nope", ValueError),
    ],
)
def test_bad_arguments_are_rejected(budget, policy, error):
    with pytest.raises(error):
        simulate(Requests.from_keys("ab", ONES), budget, policy)


def test_speed_command_times_every_policy(capsys):
    assert sim.main(["speed", "--requests", "3000"]) == 0
    out = capsys.readouterr().out
    for policy in available_policies():
        line = next(line for line in out.splitlines() if line.startswith(policy + " "))
        seconds, rate, hit = (float(x.replace(",", "")) for x in line.split()[1:4])
        # The rate is 3000 requests over the seconds before they were rounded to 3 decimals.
        assert 3000 / (seconds + 0.0005) <= rate <= 3000 / max(seconds - 0.0005, 1e-9)
        assert 0 < hit < 1


def test_curves_command_prints_a_table_per_metric_and_workload(capsys, tmp_path):
    # An empty trace directory: the Azure workload is skipped, and says so.
    assert sim.main(["curves", "--requests", "2000", "--trace-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "azure workload skipped" in out
    sections = re.split(r"\n== ", out)[1:]
    assert [s.split(":")[0] for s in sections] == ["zipf", "pareto"]
    for section in sections:
        assert section.count("object hit ratio:") == section.count("byte hit ratio:") == 1
        header = next(line for line in section.splitlines() if line.lstrip().startswith("cache"))
        columns = header.split()[2:]
        assert set(available_policies()) <= set(columns)
        rows = [
            line.split()
            for line in section.splitlines()
            if line.strip().endswith(tuple("0123456789")) and "%" in line
        ]
        assert len(rows) == 4 * len(sim.CACHE_FRACTIONS)
        for row in rows[: 2 * len(sim.CACHE_FRACTIONS)]:  # the two hit-ratio tables
            assert all(0 <= float(x) <= 1 for x in row[2:]) and len(row) == 2 + len(columns)


# -- several nodes routed by placement (simulate_nodes) -------------------------------------


def test_a_miss_on_full_nodes_evicts_where_the_victims_are_cold():
    # Two nodes of 2 MiB, 1 MiB models, a request a second. a, b fill node-0 (the first of
    # equals), c and d go to node-1 (node-0 has no room). a and b are then asked for three
    # times each; e must evict: node-1's c (one use, 8 s ago) costs less than node-0's a or b,
    # so e goes to node-1 and the last a and b still hit. 8 hits of 13; misses 2 and 3.
    mib = 1 << 20
    trace = Requests.from_keys("abcd" "ababab" "e" "ab", dict.fromkeys("abcde", mib))
    ratio, misses = sim.simulate_nodes(trace, 2, 2 * mib, "lru")
    assert (ratio, misses) == (pytest.approx(8 / 13), [2, 3])
    # Partitioned by model instead, the same trace loses hits that one cache would keep.
    one_cache = simulate(trace, 4 * mib, "lru").object_hit_ratio
    assert ratio == pytest.approx(one_cache)


def test_placement_routing_keeps_more_than_a_partition_by_model_on_a_zipf_trace():
    catalog = traces.zoo_catalog(40, seed=3)
    trace = Requests.from_table(traces.synthetic_trace(3000, catalog, seed=3, exponent=0.9))
    node_budget = int(0.1 * catalog.total_bytes)
    routed, misses = sim.simulate_nodes(trace, 3, node_budget, "gdsf")
    hashed, _ = sim.simulate_nodes(trace, 3, node_budget, "gdsf", routing="hash")
    one = simulate(trace, 3 * node_budget, "gdsf").object_hit_ratio
    assert hashed < routed <= one + 0.02
    assert sum(misses) == round((1 - routed) * len(trace)) and min(misses) > 0
    with pytest.raises(ValueError, match="routing"):
        sim.simulate_nodes(trace, 3, node_budget, "gdsf", routing="random")
    with pytest.raises(ValueError, match="offline"):
        sim.simulate_nodes(trace, 3, node_budget, "belady")


def test_nodes_command_prints_every_policy_and_says_when_the_trace_is_missing(capsys, tmp_path):
    import pyarrow.parquet as pq

    catalog = traces.zoo_catalog(20, seed=1)
    path = tmp_path / "trace.parquet"
    pq.write_table(traces.synthetic_trace(400, catalog, seed=1, exponent=0.9), path)
    node_mb = int(0.1 * catalog.total_bytes) >> 20
    assert sim.main(["nodes", "--trace", str(path), "--node-mb", str(node_mb), "--policies", "lru,gdsf"]) == 0
    out = capsys.readouterr().out
    assert f"3 nodes of {node_mb} MiB" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["lru"], ["gdsf"])]
    assert [row[0] for row in rows] == ["lru", "gdsf"]
    for row in rows:
        assert all(0 <= float(x) <= 1 for x in row[1:4])
    assert sim.main(["nodes", "--trace", str(tmp_path / "missing.parquet")]) == 2
    assert "run `python -m workloads.replay` first" in capsys.readouterr().err


def test_zoo_requests_are_the_peers_benchmarks_and_nodes_replays_them(capsys):
    from trims_ray._protect import GUARD_BYTES
    from workloads.peers import zipf_sequence
    from workloads.zoo import zoo_model

    names = ["resnet50", "t5_small", "alexnet"]
    trace = sim.zoo_requests(names, 40, seed=3)
    # The warm-up asks for each model once, in order; then the benchmark's own Zipf draw.
    assert trace.keys == [0, 1, 2] + zipf_sequence(3, 40, exponent=1.0, seed=3)
    assert trace.sizes[:3] == [4 * zoo_model(n).params + 2 * GUARD_BYTES for n in names]
    assert trace.times[:2] == [0.0, 1 / 8.0] and trace.costs[0] < trace.costs[2]  # alexnet is the bigger
    mean = sum(4 * zoo_model(n).params for n in names) / 3
    assert sim.zoo_node_budget(names, 2) == int(2 * mean) + 4 * GUARD_BYTES

    assert sim.main(["nodes", "--zoo", ",".join(names), "--requests", "40", "--seeds", "2", "--policies", "gdsf,lru"]) == 0
    out = capsys.readouterr().out
    assert "3 nodes of" in out and "seeds 0-1" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["gdsf"], ["lru"])]
    assert [row[0] for row in rows] == ["gdsf", "lru"]
    for row in rows:
        assert len(row) == 6 and all(0 < float(x) <= 1 for x in row[1:])  # 3 means and 2 seeds
    assert sim.main(["nodes", "--zoo", "resnet50"]) == 2
    assert "two model names" in capsys.readouterr().err


# -- a measured run's own routes (simulate_routes) --------------------------------------------


def test_routes_replay_each_request_on_the_node_it_was_sent_to():
    # Nodes of one model each, a and b asked for in turn: on one node they evict each other
    # (lru: no hit), on a node each the second round hits. Misses are counted per node.
    mib = 1 << 20
    trace = Requests.from_keys("abab", dict.fromkeys("ab", mib))
    assert sim.simulate_routes(trace, ["x"] * 4, mib, "lru") == (0.0, {"x": 4})
    assert sim.simulate_routes(trace, ["x", "y", "x", "y"], mib, "lru") == (0.5, {"x": 1, "y": 1})
    with pytest.raises(ValueError, match="one node per request"):
        sim.simulate_routes(trace, ["x"], mib, "lru")
    with pytest.raises(ValueError, match="offline"):
        sim.simulate_routes(trace, ["x"] * 4, mib, "belady")


def test_routes_command_sets_a_runs_measured_hits_beside_its_routes_and_placement(capsys, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trims_ray._protect import GUARD_BYTES

    # Four 1 MiB models asked for in turn, nodes of 2 MiB (guard pages included: just under two
    # models fit): the run sent a and b to node x, c and d to y, and hit on its second round.
    mib = 1 << 20
    size = mib - 2 * GUARD_BYTES
    models = ["a", "b", "c", "d"] * 2
    trace = pa.table(
        {
            "time": [float(i) for i in range(8)],
            "tenant": ["t"] * 8,
            "model": models,
            "size": [size] * 8,
            "cost": [0.1] * 8,
            "tokens": [0] * 8,
        },
        schema=traces.TRACE_SCHEMA,
    )
    results = pa.table(
        {
            "request_id": list(range(8)),
            "time": [float(i) for i in range(8)],
            "tenant": ["t"] * 8,
            "model": models,
            "size": [size] * 8,
            "system": ["trims_ray"] * 8,
            "policy": ["lru"] * 8,
            "node": ["x", "x", "y", "y"] * 2,
            "tier": ["store"] * 4 + ["process", "host", "process", "store"],
            "latency_s": [0.01] * 8,
            "ok": [True] * 8,
        },
        schema=traces.RESULT_SCHEMA,
    )
    pq.write_table(trace, tmp_path / "run.trace.parquet")
    pq.write_table(results, tmp_path / "run.parquet")
    assert sim.main(["routes", "--results", str(tmp_path / "run.parquet"), "--node-mb", "2"]) == 0
    out = capsys.readouterr().out
    (row,) = [line.split() for line in out.splitlines() if line.startswith("lru ")]
    # Measured 3 of 8 from memory; on its routes every second round hits (4 of 8), 2 misses a node.
    assert row[1:3] == ["0.375", "0.500"] and " ".join(row[5:]) == "[2, 2]"
    assert 0 <= float(row[3]) <= 1 and float(row[4]) == 0.5  # one cache of 4 MiB holds them all
    assert sim.main(["routes", "--results", str(tmp_path / "missing.parquet")]) == 2
    assert "no trace" in capsys.readouterr().err
