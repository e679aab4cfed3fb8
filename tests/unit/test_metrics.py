"""The metric definitions, the Grafana dashboard and the Prometheus scrape config agree with each
other and with Ray's export (no Ray needed; the Prometheus test runs the queries for real).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE
from ray.util.metrics import Counter, Gauge, Histogram, Metric

from trims_ray import _metrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((REPO / "dashboards" / "grafana" / "trims_ray.json").read_text())


def defined() -> dict[str, Metric]:
    """Every metric trims_ray defines, by name (creating them without Ray records nothing)."""
    found: dict[str, Metric] = {}
    for value in vars(_metrics._Metrics()).values():
        for metric in value.values() if isinstance(value, dict) else [value]:
            assert isinstance(metric, Metric)
            found[metric.info["name"]] = metric
    return found


def exported_name(metric: Metric) -> str:
    """The series name Ray's Prometheus export gives it."""
    name = f"ray_{metric.info['name']}"
    if isinstance(metric, Counter):
        return f"{name}_total"
    if isinstance(metric, Histogram):
        return f"{name}_bucket"
    return name


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in DASHBOARD["panels"] for t in p["targets"]]


def test_metrics_have_prefix_units_tags_and_explicit_buckets():
    metrics = defined()
    assert len(metrics) >= 12
    for name, metric in metrics.items():
        info = metric.info
        assert name.startswith("trims_ray_"), name
        assert re.search(r"\((count|bytes|seconds)\)", info["description"]), f"{name}: no unit in help"
        assert "node" in info["tag_keys"], name
        if isinstance(metric, Histogram):
            assert info["boundaries"] == sorted(info["boundaries"]) and len(info["boundaries"]) >= 8
    kinds = {name: type(m) for name, m in metrics.items()}
    assert kinds["trims_ray_load_seconds"] is Histogram
    assert kinds["trims_ray_invocation_seconds"] is Histogram
    assert kinds["trims_ray_tier_used_bytes"] is Gauge
    assert kinds["trims_ray_tier_capacity_bytes"] is Gauge
    assert {"source", "model", "tenant"} <= set(metrics["trims_ray_loaded_bytes"].info["tag_keys"])
    assert "decision" in metrics["trims_ray_routing_decisions"].info["tag_keys"]
    for counter in ("hits", "misses", "loads", "evictions"):
        assert kinds[f"trims_ray_tier_{counter}"] is Counter


def test_every_dashboard_series_is_one_we_export():
    exported = {exported_name(m) for m in defined().values()}
    used = {name for expr in dashboard_exprs() for name in re.findall(r"\bray_trims_ray_\w+", expr)}
    assert used and used <= exported, used - exported


def test_dashboard_has_the_panels_operators_need():
    exprs = "\n".join(dashboard_exprs())
    assert "ray_trims_ray_tier_hits_total" in exprs and "ray_trims_ray_tier_misses_total" in exprs
    assert "sum by (node, tier) (ray_trims_ray_tier_used_bytes" in exprs
    assert "histogram_quantile(0.99, sum by (le, source) (rate(ray_trims_ray_load_seconds_bucket" in exprs
    assert "histogram_quantile(0.99, sum by (le, model) (rate(ray_trims_ray_invocation_seconds_bucket" in exprs
    assert "ray_trims_ray_tier_evictions_total" in exprs
    assert "sum by (decision) (rate(ray_trims_ray_routing_decisions_total" in exprs
    # Every query runs against the dashboard's Prometheus data source variable.
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_scrape_config_reads_the_service_discovery_file_ray_writes():
    config = yaml.safe_load((REPO / "dashboards" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"] == [{"files": [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]}]
