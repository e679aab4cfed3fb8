"""The analysis notebook, executed end to end by nbclient with a real kernel on a tiny results
file (and the simulator's curves for a tiny trace), must save its three figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workloads import traces
from workloads.replay import companion_path, simulator_curves

nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat")
nbclient = pytest.importorskip("nbclient", reason="the test extra installs nbclient")

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "analysis.ipynb"
FIGURES = ("latency_cdf.png", "hit_ratio_vs_cache.png", "speedup_table.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_replay(path: Path) -> None:
    """A results file as the replay writes it (three systems, two models) and its curves."""
    rng = np.random.default_rng(0)
    catalog = traces.Catalog(("small", "large"), np.array([2 << 20, 6 << 20]))
    trace = traces.build_trace(np.arange(24) * 0.1, rng.integers(0, 2, 24), catalog)
    tables = []
    for system, policy, base_ms, tier in (
        ("nocache", "", 80.0, "store"),
        ("serve", "lru", 30.0, "host"),
        ("trims_ray", "lru", 6.0, "host"),
    ):
        n = trace.num_rows
        tables.append(
            pa.table(
                {
                    "request_id": np.arange(n),
                    "time": trace["time"],
                    "tenant": trace["tenant"],
                    "model": trace["model"],
                    "size": trace["size"],
                    "system": [system] * n,
                    "policy": [policy] * n,
                    "node": ["node-a", "node-b"] * (n // 2),
                    "tier": [tier] * n,
                    "latency_s": (base_ms + rng.exponential(base_ms, n)) / 1e3,
                    "ok": [True] * (n - 1) + [system != "serve"],
                }
            )
        )
    traces.write_results(pa.concat_tables(tables), path)
    curves = simulator_curves(trace, catalog.total_bytes, cluster_bytes=4 << 20)
    pq.write_table(curves, companion_path(path, "curves"))


def test_notebook_runs_and_saves_its_figures(tmp_path, monkeypatch):
    results = tmp_path / "replay.parquet"
    tiny_replay(results)
    figures = tmp_path / "figures"
    monkeypatch.setenv("TRIMS_RAY_RESULTS", str(results))
    monkeypatch.setenv("TRIMS_RAY_FIGURES", str(figures))
    monkeypatch.delenv("TRIMS_RAY_CURVES", raising=False)  # found beside the results

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # "python3" is the kernel ipykernel installs in this environment: it runs this interpreter.
    client = nbclient.NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()

    for name in FIGURES:
        png = figures / name
        assert png.is_file(), f"the notebook did not save {name}"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 2000, name
    printed = "".join(
        out.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )
    assert "trims_ray/lru" in printed and "speedup" in printed
