"""The demo and the load benchmark run end to end on small inputs: they are the README's
commands, so a change that breaks them must fail a test, not a user.
"""

from __future__ import annotations

import re

from trims_ray import ModelStore
from workloads import bench, demo


def test_demo_registers_models_and_checks_their_outputs(tmp_path, capsys):
    store_uri = (tmp_path / "demo-store").as_uri()
    assert demo.main(["--models", "resnet50", "--store", store_uri]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("resnet50"))
    assert "25,557,032" in row and " same " in row
    info = ModelStore(store_uri).manifest("resnet50", tenant="default").info
    assert info.factory == "workloads.zoo:resnet50" and f"{info.nbytes:,}" in row


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
