"""The peers benchmark's smallest regime on a real one-node Ray: every system answers every
request right, and the table has a row for each of them and the goal lines under it."""

from __future__ import annotations

import re

import pytest

import trims_ray
from workloads import peers
from workloads.peers_systems import SYSTEMS

# Three 1 MiB models, two of which fit a node's memory; 20 timed requests per system.
SMALLEST = ["--models", "3", "--mb", "1", "--cache-models", "2", "--requests", "20", "--regimes", "warm", "--nodes", "1"]


@pytest.mark.slow  # starts Ray and Serve: about 40 s on two cores
def test_smallest_regime_answers_every_request_of_every_system(tmp_path, capsys):
    assert peers.main([*SMALLEST, "--dir", str(tmp_path)]) == 0  # 1 if any answer was wrong
    out = capsys.readouterr().out
    for label in SYSTEMS.values():
        line = next((line for line in out.splitlines() if line.startswith(f"{label} ")), None)
        assert line is not None, f"no row for {label}:\n{out}"
        ok, wrong, failed, p50, p90, p99, rate = line[len(label) :].split()[:7]
        assert (int(ok), int(wrong), int(failed)) == (20, 0, 0), line
        assert 0 < float(p50) <= float(p90) <= float(p99) and float(rate) > 0, line
    assert re.search(r"^trims_ray tiers served: .*\d", out, re.M), out
    default = trims_ray.CacheConfig.policy
    assert re.search(rf"trims_ray's\s+policy\s+{default}\b", out), out  # the default, named in the title
    for goal in ("p50", "p99", "throughput"):
        assert re.search(rf"^GOAL {goal}: trims_ray .* vs best peer \(.+\) .*: [\d.]+x, (MET|NOT MET)$", out, re.M), out
    assert not list(tmp_path.iterdir()), "the benchmark must remove its temporary store"


@pytest.mark.slow  # starts Ray: about 20 s on two cores
def test_sweep_prints_the_added_latency_of_a_hit_for_each_size(tmp_path, capsys):
    assert peers.main(["--sweep", "--sweep-mb", "2,1", "--calls", "5", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for mb in (1, 2):
        plain, decorated, added = map(float, re.search(rf"^\s+{mb} +(\S+) +(\S+) +(\S+)$", out, re.M).groups())
        assert plain > 0 and decorated > 0 and abs(added - (decorated - plain)) <= 0.0016, out
        verdict = "MET" if added <= 0.5 else "NOT MET"
        assert re.search(rf"^GOAL added <= 0.5 ms at {mb} MiB: {added:.3f} ms, {verdict}$", out, re.M), out
    assert out.index("GOAL added <= 0.5 ms at 1 MiB") < out.index("GOAL added <= 0.5 ms at 2 MiB")  # sorted
