"""The demo and the load benchmark run end to end on small inputs: they are the README's
commands, so a change that breaks them must fail a test, not a user.
"""

from __future__ import annotations

import re
import time

import pytest

from trims_ray import ModelStore
from workloads import bench, bench_miss, demo


def test_demo_serves_every_tier_and_checks_its_outputs(tmp_path, capsys):
    store_uri = (tmp_path / "demo-store").as_uri()
    argv = ["--models", "resnet50", "--invocations", "4", "--object-store-mb", "512", "--store", store_uri]
    assert demo.main(argv) == 0
    out = capsys.readouterr().out
    assert "every output equals the original model's" in out
    # Columns: MB, load in task, cold, disk hit, host hit, compute, speedup, share of ideal.
    row = next(line for line in out.splitlines() if line.startswith("resnet50 "))
    mb, base, cold, disk, host, compute = map(float, row.split()[1:7])
    assert mb == pytest.approx(102.5, abs=0.1) and min(base, cold, disk, host, compute) > 0
    assert host >= compute  # end to end includes the compute measured inside the task
    assert re.search(r"4 invocations \(seed 0\): \d+ host hits", out)
    info = ModelStore(store_uri).manifest("resnet50", tenant="default").info
    assert info.factory == "workloads.zoo:resnet50"


def test_load_benchmark_prints_rates_and_ratios_for_disk_and_s3(tmp_path, capsys):
    assert bench.main(["load", "--mb", "8", "--repeats", "1", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for source in ("local disk", "S3 on loopback"):
        line = next(line for line in out.splitlines() if line.startswith(source))
        # Columns: raw, verified, ratio, unverified, ratio.
        raw, verified, verified_ratio, unverified, unverified_ratio = map(float, re.findall(r"\d+\.\d+", line))
        assert min(raw, verified, unverified) > 0, line
        # Each ratio is the reader's rate over the raw rate printed on the same line (the
        # printed rates are rounded, hence the tolerance).
        assert abs(verified_ratio - verified / raw) < 0.05 * max(1, verified / raw), line
        assert abs(unverified_ratio - unverified / raw) < 0.05 * max(1, unverified / raw), line
    assert not list(tmp_path.iterdir()), "the benchmark must remove its temporary store"


def test_buffers_benchmark_reads_into_every_kind_of_buffer_and_prints_the_ratios(tmp_path, capsys):
    from workloads.bench_buffers import BUFFER_KINDS

    assert bench.main(["buffers", "--mb", "4", "--repeats", "1", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {kind: _floats(line[len(kind):]) for line in out.splitlines() for kind in BUFFER_KINDS if line.startswith(kind)}
    assert set(rows) == set(BUFFER_KINDS) and all(len(v) == 2 and min(v) > 0 for v in rows.values()), out
    raw_ratio, verified_ratio = _floats(out.splitlines()[-1])
    new_raw, new_verified = rows[BUFFER_KINDS[0]]
    used_raw, used_verified = rows[BUFFER_KINDS[-1]]
    assert _ratio_matches(raw_ratio, used_raw, new_raw, half_ulp=0.05), out
    assert _ratio_matches(verified_ratio, used_verified, new_verified, half_ulp=0.05), out
    assert not list(tmp_path.iterdir()), "the benchmark must remove its temporary store"


def _floats(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+", text)]


def _ratio_matches(ratio: float, value: float, base: float, half_ulp: float = 0.005) -> bool:
    """Whether a printed ratio fits value/base, all three rounded to 2 decimals when printed."""
    low = (value - half_ulp) / (base + half_ulp) - half_ulp
    high = (value + half_ulp) / max(base - half_ulp, 1e-9) + half_ulp
    return low <= ratio <= high


def test_handoff_benchmark_times_every_method_in_fresh_workers(tmp_path, capsys):
    # One tiny model, one run: starts its own Ray (address="local") and shuts it down.
    argv = ["handoff", "--sizes-mb", "4", "--repeats", "1", "--object-store-mb", "128", "--dir", str(tmp_path)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = {
        label: _floats(line)[-4:]
        for line in out.splitlines()
        for label in bench.HANDOFF_METHODS.values()
        if re.match(rf"\s*4 {re.escape(label)} ", line)
    }
    assert set(rows) == set(bench.HANDOFF_METHODS.values()), out
    host_module, host_ratio, host_touched, host_touched_ratio = rows[bench.HANDOFF_METHODS[bench.HOST_HIT]]
    assert host_ratio == host_touched_ratio == 1.0
    for label, (to_module, ratio, touched, touched_ratio) in rows.items():
        assert 0 < to_module <= touched, label
        # Each ratio is the method's time over the host hit's time printed in the same column.
        assert _ratio_matches(ratio, to_module, host_module), label
        assert _ratio_matches(touched_ratio, touched, host_touched), label
    steps = next(line for line in out.splitlines() if re.match(r"\s*4 +\d", line))
    assert len(_floats(steps)) == len(bench.HOST_STEPS) + 1 and min(_floats(steps)) >= 0, steps
    # The first goals block is for the decorated path, the second for open().
    goals = out[out.index("goals"):]
    assert goals.count("goals (the issue's)") == 2 and "n/a (1000 MiB not measured)" in goals
    c_module = rows["(c) safetensors, page cache, meta+assign"][0]
    blocks = goals.split("goals (the issue's)")[1:]
    for block, method in zip(blocks, (bench.HOST_FN, bench.HOST_HIT)):
        assert bench.HANDOFF_METHODS[method] in block
        (c_ratio,) = _floats(block.split("(c)/host")[1].split(":")[0])
        assert _ratio_matches(c_ratio, c_module, rows[bench.HANDOFF_METHODS[method]][0])
    assert not list(tmp_path.iterdir()), "the benchmark must remove its temporary files"


def test_overhead_benchmark_compares_a_decorated_call_with_a_plain_task(tmp_path, capsys):
    assert bench.main(["overhead", "--calls", "5", "--object-store-mb", "128", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    plain = _floats(next(line for line in lines if line.startswith("plain Ray task")))
    decorated = _floats(next(line for line in lines if line.startswith("@trims_ray.function")))
    for median, p90 in (plain, decorated):
        assert 0 < median <= p90
    (added,) = _floats(next(line for line in lines if line.startswith("added latency")))
    # The added latency is the difference of the printed medians (each rounded to 3 decimals).
    assert abs(added - (decorated[0] - plain[0])) <= 0.0016, out
    for step in bench.OVERHEAD_STEPS:
        (ms,) = _floats(next(line for line in lines if line.strip().startswith(step)))
        assert ms >= 0, step
    goal = next(line for line in lines if line.startswith("goal: median added latency <= 0.5 ms"))
    assert goal.endswith(": met" if added <= 0.5 else ": NOT met"), goal
    assert not list(tmp_path.iterdir()), "the benchmark must remove its temporary files"


def test_miss_benchmark_times_a_real_miss_against_plain_loads(tmp_path, capsys):
    assert bench.main(["miss", "--mb", "2", "--rounds", "2", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    medians = {}
    for key, label in bench_miss.LABELS.items():
        median, p90 = _floats(next(line for line in lines if line.startswith(label)))
        assert 0 < median <= p90, (label, out)
        medians[key] = median
    # Every timed miss really missed: the node cache loaded it from the store.
    assert "trims_ray misses were served from: {'store': 2}" in out, out
    goal = next(line for line in lines if line.startswith("goal: a miss no slower"))
    assert (": met;" in goal) != (": NOT met;" in goal), goal
    if medians[bench_miss.TRIMS_MISS] != medians[bench_miss.PLAIN_VERIFIED]:  # not a tie once rounded
        met = medians[bench_miss.TRIMS_MISS] < medians[bench_miss.PLAIN_VERIFIED]
        assert (": met;" in goal) == met, goal
    # The miss taken apart: every step once, a positive time each, the sum printed is their sum.
    steps = {}
    for step in (*bench_miss.MISS_STEPS, *bench_miss.LOAD_STEPS):
        line = next(line for line in lines if line.strip().startswith(step))
        steps[step] = float(line.split()[-1])
        assert steps[step] >= 0, line
    whole = float(next(line for line in lines if line.strip().startswith("sum of the medians")).split()[-1])
    assert whole == pytest.approx(sum(steps[s] for s in bench_miss.MISS_STEPS), abs=0.1 * len(bench_miss.MISS_STEPS))
    # The grant waits for the node cache's load, which reads and verifies every byte.
    assert steps["wait for the grant (task)"] > 0 and steps["read + verify (node cache)"] > 0
    assert not list(tmp_path.iterdir()), "the benchmark must remove its temporary files"


def test_routing_benchmark_prints_median_and_goal(capsys):
    assert bench.main(["routing", "--models", "50", "--nodes", "8", "--calls", "500"]) == 0
    out = capsys.readouterr().out
    rows = {}
    for label in ("resident on 1-3 nodes", "cold (every node a candidate)", "all"):
        calls, median, p99 = re.search(rf"{re.escape(label)}\s+(\d+)\s+([\d.]+)\s+([\d.]+)", out).groups()
        rows[label] = (int(calls), float(median), float(p99))
        assert 0 < rows[label][1] <= rows[label][2]
    assert rows["all"][0] == 500 == rows["resident on 1-3 nodes"][0] + rows["cold (every node a candidate)"][0]
    assert rows["cold (every node a candidate)"][0] > 0
    median = rows["all"][1]
    assert re.search(rf"goal: median <= 50 us: {median} us: ({'met' if median <= 50 else 'NOT met'})$", out, re.M)


# -- the peers benchmark's pure parts (workloads.peers, workloads.peers_systems) ---------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nodes", "0"], "--nodes must be positive integers"),
        (["--nodes", "one"], "--nodes must be integers separated by commas"),
        (["--nodes", "9"], "--nodes must be node counts from 1 to 8"),
        (["--regimes", "warm,hot"], "--regimes: unknown ['hot']"),
        (["--systems", "trims,vllm"], "--systems: unknown ['vllm']"),
        (["--mb", "0"], "--mb must be an integer >= 1"),
        (["--clients", "0"], "--clients must be an integer >= 1"),
        (["--models", "4", "--cache-models", "4"], "holds the whole catalog of 4"),
        (["--zoo", "resnet50,alexnet2", "--cache-models", "1"], "--zoo: unknown models ['alexnet2']"),
        (["--zoo", "resnet50,bert_base"], "--cache-models 4 holds the whole catalog of 2"),
        (["--sweep", "--sweep-mb", "10,x"], "--sweep-mb must be integers separated by commas"),
        (["--policy", "belady"], "--policy: unknown 'belady'; choose from cost, fifo, gdsf, lfu, lru"),
        (["--trims-cpus", "0"], "--trims-cpus must be > 0 and <= 1, got 0.0"),
        (["--trims-cpus", "1.5"], "--trims-cpus must be > 0 and <= 1, got 1.5"),
    ],
)
def test_peers_rejects_bad_arguments_with_a_clear_message(argv, message, capsys):
    # Through workloads.bench, as users call it: the sub-parser hands everything to peers.
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["peers", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m workloads.bench peers" in err and message in err, err


def test_peers_help_through_bench_and_the_cli(capsys):
    from trims_ray import cli

    assert cli.main(["bench", "peers", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--regimes" in out and "--sweep-mb" in out and "--zoo" in out and "--trims-cpus" in out


@pytest.mark.parametrize(("cpus", "task_cpus", "workers"), [(2, 1.0, 2), (1, 1.0, 1), (2, 0.5, 4), (1, 0.3, 3), (1, 0.1, 10), (2, 2.0, 1)])
def test_peers_starts_a_worker_for_each_task_a_node_runs_at_once(cpus, task_cpus, workers):
    from workloads.peers_systems import workers_per_node

    assert workers_per_node(cpus, task_cpus) == workers


def test_peers_worker_count_rejects_a_task_that_asks_for_no_cpu():
    from workloads.peers_systems import workers_per_node

    with pytest.raises(ValueError, match="task_cpus must be > 0"):
        workers_per_node(2, 0)


def test_peers_zipf_sequence_is_seeded_and_skewed():
    from workloads.peers import zipf_sequence

    first = zipf_sequence(12, 400, exponent=1.0, seed=0)
    assert first == zipf_sequence(12, 400, exponent=1.0, seed=0)
    assert first != zipf_sequence(12, 400, exponent=1.0, seed=1)
    assert len(first) == 400 and set(first) <= set(range(12))
    counts = [first.count(i) for i in range(12)]
    # Zipf(1.0) over 12 models: model 0 takes about 1/H(12) = 32% of requests.
    assert counts[0] == max(counts) and 0.25 < counts[0] / 400 < 0.40
    assert counts[0] > counts[3] > counts[11]
    uniform = zipf_sequence(12, 1200, exponent=0.0, seed=0)
    assert max(uniform.count(i) for i in range(12)) < 2 * 100


def _row(system, p50, p99, rate, *, wrong=0):
    from workloads.peers import SystemRow

    return SystemRow(system, 100, wrong, 0, p50 / 1e3, p99 / 1e3, p99 / 1e3, rate, 0.5, 0.0, 0.0, 0.0)


def test_peers_goal_lines_compare_trims_ray_with_the_best_peer():
    from workloads.peers import goal_lines

    rows = [_row("serve", 60.0, 300.0, 20.0), _row("lru", 27.0, 120.0, 40.0), _row("nocache", 30.0, 90.0, 30.0), _row("trims", 35.1, 100.0, 45.0)]
    assert goal_lines(rows, regime="warm", nodes=1) == [
        "GOAL p50: trims_ray 35.1 ms vs best peer (LRU actor) 27.0 ms: 1.30x, NOT MET",
        "GOAL p99: trims_ray 100.0 ms vs best peer (no cache) 90.0 ms: 1.11x, NOT MET",
        "GOAL throughput: trims_ray 45.00 req/s vs best peer (LRU actor) 40.00 req/s: 1.12x, MET",
    ]
    # Cold or several nodes: the Serve line too; p99 300 / 100 = 3x lower.
    lines = goal_lines(rows, regime="cold", nodes=1)
    assert lines[-1] == "GOAL p99 vs Serve (cold, 1 node): trims_ray 100.0 ms vs Ray Serve mux 300.0 ms: 3.00x lower (goal >= 2x), MET"
    assert goal_lines(rows, regime="warm", nodes=3)[-1].startswith("GOAL p99 vs Serve (warm, 3 nodes)")
    # Faster but with a wrong answer is not met.
    rows[-1] = _row("trims", 20.0, 50.0, 50.0, wrong=1)
    assert goal_lines(rows, regime="warm", nodes=1)[0] == (
        "GOAL p50: trims_ray 20.0 ms vs best peer (LRU actor) 27.0 ms: 0.74x, NOT MET (1 trims_ray requests wrong or failed)"
    )
    assert goal_lines(rows[:1], regime="warm", nodes=1) == ["GOAL: n/a (trims_ray and at least one peer must run)"]


def test_byte_lru_counts_bytes_and_evicts_least_recently_used():
    from workloads.peers_systems import ByteLRU

    cache = ByteLRU(100)
    loads = []

    def loader(key):
        return lambda: loads.append(key) or f"model {key}"

    assert cache.get("a", 40, loader("a")) == ("model a", False)
    assert cache.get("b", 40, loader("b")) == ("model b", False)
    assert cache.bytes_used == 80
    assert cache.get("a", 40, loader("a")) == ("model a", True)  # a is now the most recent
    assert cache.get("c", 40, loader("c")) == ("model c", False)  # evicts b, not a
    assert cache.keys() == ["a", "c"] and cache.bytes_used == 80
    assert cache.get("d", 100, loader("d")) == ("model d", False)  # takes the whole budget
    assert cache.keys() == ["d"] and cache.bytes_used == 100
    assert cache.get("e", 101, loader("e")) == ("model e", False)  # too big: served, not kept
    assert cache.keys() == ["d"] and cache.bytes_used == 100
    assert loads == ["a", "b", "c", "d", "e"]
    s = cache.stats
    assert (s.hits, s.misses, s.loads, s.evictions, s.uncached) == (1, 5, 5, 3, 1)
    with pytest.raises(ValueError, match="capacity"):
        ByteLRU(-1)


def test_byte_lru_runs_one_load_for_concurrent_misses_and_shares_its_error():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from workloads.peers_systems import ByteLRU

    cache = ByteLRU(100)
    calls = []
    release = threading.Event()

    def slow_load():
        calls.append(1)
        release.wait(5)
        return "model"

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(cache.get, "m", 10, slow_load) for _ in range(8)]
        wait_for_misses = time.monotonic() + 5
        while cache.stats.misses < 8 and time.monotonic() < wait_for_misses:
            time.sleep(0.01)
        assert cache.bytes_used == 10  # reserved while the load is in flight
        release.set()
        results = [f.result(5) for f in futures]
    assert len(calls) == 1 and all(value == "model" for value, _ in results)
    assert [hit for _, hit in results] == [False] * 8 and cache.stats.loads == 1
    assert cache.get("m", 10, slow_load) == ("model", True)

    failing = threading.Event()

    def broken_load():
        failing.wait(5)
        raise OSError("disk gone")

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(cache.get, "x", 10, broken_load) for _ in range(4)]
        deadline = time.monotonic() + 5
        while cache.stats.misses < 8 + 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        failing.set()
        for f in futures:
            with pytest.raises(OSError, match="disk gone"):
                f.result(5)
    assert cache.keys() == ["m"] and cache.bytes_used == 10  # nothing kept, reservation returned


def test_peers_table_shows_a_system_without_answers_and_no_goal(capsys):
    from workloads.peers import Outcome, print_table, summarize

    failed = summarize("trims", [Outcome(1.0, None, False, "TrimsError: down")] * 3, 1.0)
    assert (failed.requests, failed.wrong, failed.failed, failed.throughput) == (3, 0, 3, 0.0)
    print_table([_row("lru", 10.0, 20.0, 5.0), failed], title="t", regime="cold", nodes=1)
    out = capsys.readouterr().out
    assert re.search(r"^trims_ray +0 +0 +3 +- +- +- +0\.00 +- +- +- +-$", out, re.M), out
    assert "trims_ray tiers served: none (no answer)" in out
    assert "GOAL: n/a (no right trims_ray answer: 0 wrong, 3 failed)" in out and "nan" not in out


def test_peers_summary_counts_wrong_answers_and_times_only_right_ones():
    from workloads.peers import Outcome, summarize
    from workloads.peers_systems import Answer

    right = [Outcome(0.010 * (i + 1), Answer(1.0, i % 2 == 0, "host", 0.002, 0.004), True) for i in range(10)]
    wrong = Outcome(5.0, Answer(2.0, True, "host", 0.002, 0.004), False, "m: checksum 2.0, expected 1.0")
    row = summarize("lru", [*right, wrong], wall_s=2.0)
    assert (row.requests, row.wrong, row.failed) == (11, 1, 0)
    assert row.p50_s == pytest.approx(0.055) and row.p99_s < 0.1  # the wrong answer's 5 s is left out
    assert row.throughput == pytest.approx(5.0)  # right answers per second of the run
    assert row.hit_ratio == pytest.approx(6 / 11) and row.load_s == pytest.approx(0.002)
    assert row.errors == ["m: checksum 2.0, expected 1.0"]
    assert summarize("nocache", right, wall_s=1.0).hit_ratio is None
    assert row.held_bytes is None  # no serving process said what it held


def test_peers_table_says_the_most_bytes_a_serving_process_held(capsys):
    from workloads.bench import MiB
    from workloads.peers import Outcome, print_table, summarize
    from workloads.peers_systems import Answer

    def answers(held: list[int]) -> list[Outcome]:
        return [Outcome(0.01, Answer(1.0, True, "memory", 0.001, 0.002, h), True) for h in held]

    serve = summarize("serve", answers([100 * MiB, 464 * MiB, 230 * MiB]), 1.0)
    lru = summarize("lru", answers([326 * MiB, 98 * MiB]), 1.0)
    trims = summarize("trims", [Outcome(0.01, Answer(1.0, True, "host", 0.001, 0.002), True)], 1.0)
    assert (serve.held_bytes, lru.held_bytes, trims.held_bytes) == (464 * MiB, 326 * MiB, None)
    print_table([serve, lru, trims], title="t", regime="warm", nodes=3)
    out = capsys.readouterr().out
    assert "most model bytes one serving process held (memory per node above): Ray Serve mux 464.0 MiB, LRU actor 326.0 MiB\n" in out


def test_peers_memory_per_node_is_cache_models_of_the_mean_and_at_least_the_largest():
    from trims_ray._protect import GUARD_BYTES
    from workloads.peers import memory_per_node

    # Mean 20: two models of it are 40; one is 20, less than the largest (30), which must fit.
    assert memory_per_node([10, 30, 20], 2) == (40, 40 + 4 * GUARD_BYTES)
    assert memory_per_node([10, 30, 20], 1) == (30, 30 + 2 * GUARD_BYTES)
