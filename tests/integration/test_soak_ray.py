"""The soak (workloads/soak.py) in short: half a minute of a seeded three-tenant trace on a
three-node local Ray, with a node removed and another added and a node cache killed in that
time. Nothing may be lost or wrong, and after the final evict every node's object store should be
back where it started (not always yet: see the test's end). (The ten-minute run is ``python -m workloads.soak``.)
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
    if not ok:
        # Known and open (issue 8): about 2 MiB can stay in a node's object store after the final
        # evict while trims_ray reports nothing held there. Reported as an expected failure so the
        # loss checks above keep guarding every run; the message carries the figures.
        pytest.xfail(f"object store not back to its start (known, open): {line}")
