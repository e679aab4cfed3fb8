"""The soak (workloads/soak.py) in short: half a minute of a seeded three-tenant trace on a
three-node local Ray, with a node removed and another added and a node cache killed in that
time. Nothing may be lost or wrong, and after the final evict every node's object store must be
back where it started. (The ten-minute run is ``python -m workloads.soak``.)
"""

from __future__ import annotations

import io

import pytest

from workloads.soak import SoakConfig, print_report, run_soak, store_back_to_start

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def test_short_soak_loses_nothing_and_gives_the_object_store_back(tmp_path):
    config = SoakConfig(minutes=0.5, seed=1, bucket_s=10.0)
    result = run_soak(config, store_uri=str(tmp_path / "store"), log=lambda line: None)
    report = io.StringIO()
    print_report(result, out=report)
    print(report.getvalue())  # shown by pytest when the test fails

    assert [e for _, e in result.events if e.startswith("FAILED")] == [], report.getvalue()
    assert len(result.events) == 3 and result.removed_node and result.added_node
    lost = [o for o in result.outcomes if not o.ok]
    assert result.outcomes and lost == [], report.getvalue()
    assert {o.tenant for o in result.outcomes} == {"alpha", "beta", "gamma"}
    ok, line = store_back_to_start(result)
    assert ok, line
