"""The demo and the load benchmark run end to end on small inputs: they are the README's
commands, so a change that breaks them must fail a test, not a user.
"""

from __future__ import annotations

import re

import pytest

from trims_ray import ModelStore
from workloads import bench, demo


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

