"""A small replay on a real two-node Ray cluster with a real S3 server (moto on loopback): every
request of every system must come back with the right answer, and the results file must have
the replay's schema."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from workloads import traces
from workloads.replay import ReplayConfig, companion_path, run_replay

# Five models of 1-2 MiB and a host tier of 4 MiB per node (three of 1 MiB fit): a node's
# cache cannot hold the catalog, so misses evict. Arrivals are slow enough that the models
# leased at once on a node always fit its budget (trims_ray fails a miss it has no room for).
SMALL = {
    "trace": "zipf",
    "requests": 30,
    "rate": 5.0,
    "speedup": 1.0,
    "models": 5,
    "min_mb": 1,
    "max_mb": 2,
    "nodes": 2,
    "host_mb": 4,
    "object_store_mb": 96,
    "timeout_s": 60.0,
}


@pytest.mark.slow  # one cluster for the three systems: about a minute on two cores
def test_small_replay_answers_every_request_of_every_system(tmp_path):
    config = ReplayConfig(**SMALL, systems=("lru", "nocache", "serve"))
    out = tmp_path / "replay.parquet"
    result = run_replay(config, out)
    assert result.failures == []

    table = traces.read_results(out)  # raises unless it has the replay's schema
    assert table.schema == traces.RESULT_SCHEMA
    rows = table.to_pylist()
    assert len(rows) == config.requests * 3
    assert all(r["ok"] for r in rows), "a request failed or gave a wrong answer"
    labels = [s.label for s in result.summaries]
    assert labels == ["trims_ray/lru", "nocache", f"serve (K={result.serve_models})"]
    for system in ("trims_ray", "nocache", "serve"):
        mine = [r for r in rows if r["system"] == system]
        assert [r["request_id"] for r in mine] == list(range(config.requests))
        assert all(r["node"] for r in mine)
    # Each trims_ray request says which tier served it ("process": the model its worker kept);
    # a cold cache loads first.
    trims_tiers = [r["tier"] for r in rows if r["system"] == "trims_ray"]
    assert set(trims_tiers) <= {"process", "host", "peer", "store", "bypass"}
    assert "store" in trims_tiers and {"host", "process"} & set(trims_tiers)
    assert {r["tier"] for r in rows if r["system"] == "nocache"} == {"store"}
    assert {r["tier"] for r in rows if r["system"] == "serve"} <= {"host", "store"}
    assert len({r["node"] for r in rows}) == config.nodes, "not every node served"

    # Serve's cap is a count (host budget over the mean model size): at the end each replica
    # held at most that many models.
    largest = max(m.nbytes for m in result.catalog)
    serve = result.summaries[2]
    assert 0 < serve.resident_bytes <= config.nodes * result.serve_models * largest

    traces.read_trace(companion_path(out, "trace"))
    curves = pq.read_table(companion_path(out, "curves"))
    assert {"belady", "lru", "cost"} <= set(curves.column("policy").to_pylist())
