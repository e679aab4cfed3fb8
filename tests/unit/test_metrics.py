"""The metric definitions, the Grafana dashboard and the Prometheus scrape config agree with each
other, with Ray's export and with the conventions of Ray's own dashboards (no Ray started; the
PromQL is checked by Prometheus' promtool where installed, and the Prometheus test runs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE
from ray.dashboard.modules.metrics import dashboards as ray_dashboards
from ray.util.metrics import Counter, Gauge, Histogram, Metric

from trims_ray import CacheConfig, _dashboard, _metrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads(_dashboard.dashboard_json())
# Ray's default dashboard: where its cluster, session and node filters are defined.
RAY_DEFAULT_DASHBOARD = json.loads(
    (Path(ray_dashboards.__file__).parent / "default_grafana_dashboard_base.json").read_text()
)
FILTERS = ('SessionName=~"$SessionName"', 'ray_io_cluster=~"$Cluster"', 'instance=~"$Instance"')
# The metrics that carry a model label only where CacheConfig.metrics_per_model is on.
PER_MODEL = {
    "trims_ray_load_seconds",
    "trims_ray_loaded_bytes",
    "trims_ray_routing_decisions",
    "trims_ray_invocation_seconds",
}


def defined(per_model: bool = False) -> dict[str, Metric]:
    """Every metric trims_ray defines, by name (creating them without Ray records nothing)."""
    found: dict[str, Metric] = {}
    for value in vars(_metrics._Metrics(per_model=per_model)).values():
        if isinstance(value, bool):  # the per_model flag
            continue
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


def panels() -> list[dict]:
    return [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def variables() -> dict[str, dict]:
    return {v["name"]: v for v in DASHBOARD["templating"]["list"]}


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
    assert {"source", "tenant"} <= set(metrics["trims_ray_loaded_bytes"].info["tag_keys"])
    assert "decision" in metrics["trims_ray_routing_decisions"].info["tag_keys"]
    for counter in _metrics.TIER_COUNTERS:
        assert kinds[f"trims_ray_tier_{counter}"] is Counter


def test_no_metric_has_a_model_label_unless_asked_for():
    off, on = defined(per_model=False), defined(per_model=True)
    assert set(off) == set(on)
    assert [name for name, m in off.items() if "model" in m.info["tag_keys"]] == []
    assert {name for name, m in on.items() if "model" in m.info["tag_keys"]} == PER_MODEL
    for name in PER_MODEL:  # the tenant label stays either way: tenants are few
        assert "tenant" in off[name].info["tag_keys"], name
        assert tuple(k for k in on[name].info["tag_keys"] if k != "model") == off[name].info["tag_keys"]


def test_the_per_model_setting_is_a_config_field_and_a_process_setting():
    assert CacheConfig().metrics_per_model is False
    assert CacheConfig(metrics_per_model=True).metrics_per_model is True
    with pytest.raises(TypeError, match="metrics_per_model must be a bool"):
        CacheConfig(metrics_per_model="yes")
    with pytest.raises(TypeError, match="metrics_per_model must be a bool"):
        _metrics.set_per_model(1)
    if _metrics._metrics is not None:  # another test of this process recorded already
        pytest.skip("this process's metrics exist already; the setting is fixed for it")
    before = _metrics.per_model()
    try:
        _metrics.set_per_model(True)
        assert _metrics.per_model() is True
        _metrics.set_per_model(False)
        assert _metrics.per_model() is False
    finally:
        _metrics.set_per_model(before)


def test_every_dashboard_series_is_one_we_export():
    exported = {exported_name(m) for m in defined().values()}
    queries = dashboard_exprs() + [v["definition"] for v in variables().values() if v["type"] == "query"]
    used = {name for expr in queries for name in re.findall(r"\bray_trims_ray_\w+", expr)}
    assert used and used <= exported, used - exported


def test_every_selector_filters_by_cluster_session_and_instance():
    selectors = [s for expr in dashboard_exprs() for s in re.findall(r"\bray_trims_ray_\w+\{([^}]*)\}", expr)]
    bare = [e for e in dashboard_exprs() if re.search(r"\bray_trims_ray_\w+(?!\w|\{)", e)]
    assert selectors and bare == []
    for selector in selectors:
        for wanted in FILTERS:
            assert wanted in selector, f"{wanted} missing in {{{selector}}}"
    text = json.dumps(DASHBOARD)
    # Nodes are chosen by the address Prometheus scrapes, as in Ray's dashboards, never by the
    # 56-hex-digit node id (still a label of every series, for trims_ray.stats()).
    assert "$Node" not in text and "node=~" not in text and "{{node}}" not in text


def test_filters_are_rays_variables():
    """The cluster, session and instance variables are named as in Ray's default dashboard, list
    the same label and match "All" the same way (".*" for the cluster: without KubeRay the
    label is absent, and ".*" matches an absent label)."""
    ours = variables()
    theirs = {v["name"]: v for v in RAY_DEFAULT_DASHBOARD["templating"]["list"]}
    for name in ("Cluster", "SessionName", "Instance"):
        label = re.search(r",\s*(\w+)\)$", theirs[name]["definition"]).group(1)
        assert re.search(rf",\s*{label}\)$", ours[name]["definition"]), (name, ours[name]["definition"])
        assert ours[name]["allValue"] == theirs[name]["allValue"], name
        assert ours[name]["includeAll"] and ours[name]["multi"] == theirs[name]["multi"], name
        assert ours[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert ours["Cluster"]["definition"].endswith(", ray_io_cluster)")
    assert ours["Instance"]["definition"].endswith(", instance)")
    assert ours["datasource"]["type"] == "datasource" and ours["datasource"]["query"] == "prometheus"


def test_dashboard_has_the_panels_operators_need():
    exprs = "\n".join(dashboard_exprs())
    assert "ray_trims_ray_tier_hits_total" in exprs and "ray_trims_ray_tier_misses_total" in exprs
    assert "sum by (instance, tier) (ray_trims_ray_tier_used_bytes" in exprs
    assert "histogram_quantile(0.99, sum by (le, source) (rate(ray_trims_ray_load_seconds_bucket" in exprs
    assert "histogram_quantile(0.99, sum by (le, tenant) (rate(ray_trims_ray_invocation_seconds_bucket" in exprs
    assert "sum by (decision) (rate(ray_trims_ray_routing_decisions_total" in exprs
    # Every tier counter is charted: bypasses, quota denials, errors and corruption included.
    for counter in _metrics.TIER_COUNTERS:
        assert f"ray_trims_ray_tier_{counter}_total" in exprs, counter
    # No aggregation keeps a model label: there is none unless a user asks for it.
    groupings = re.findall(r"\bby \(([^)]*)\)", exprs)
    assert groupings and not [g for g in groupings if "model" in g]
    assert "{{model}}" not in json.dumps(DASHBOARD)
    # Every query runs against the dashboard's Prometheus data source variable.
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["title"] and panel["description"], panel


def test_gpu_row_charts_the_gpu_tier():
    rows: dict[str, list[dict]] = {}
    current = None
    for panel in DASHBOARD["panels"]:
        if panel["type"] == "row":
            current = rows.setdefault(panel["title"], [])
        else:
            assert current is not None, f"panel {panel['title']!r} is in no row"
            current.append(panel)
    (gpu,) = [title for title in rows if "GPU" in title]
    exprs = [t["expr"] for p in rows[gpu] for t in p["targets"]]
    selectors = [s for e in exprs for s in re.findall(r"\bray_trims_ray_\w+\{([^}]*)\}", e)]
    assert selectors and all('tier="gpu"' in s for s in selectors)
    joined = "\n".join(exprs)
    for series in ("tier_used_bytes", "tier_capacity_bytes", "tier_models", "tier_hits_total", "tier_loads_total"):
        assert f"ray_trims_ray_{series}{{" in joined, series
    # Panels do not overlap: Grafana would stack them unpredictably.
    cells = set()
    for panel in DASHBOARD["panels"]:
        box = panel["gridPos"]
        covered = {(box["x"] + dx, box["y"] + dy) for dx in range(box["w"]) for dy in range(box["h"])}
        assert not cells & covered, panel["title"]
        assert box["x"] + box["w"] <= 24
        cells |= covered


@pytest.mark.skipif(not shutil.which("promtool"), reason="no promtool (Debian package 'prometheus')")
def test_every_query_is_valid_promql(tmp_path):
    """promtool parses each panel query and variable selector as a recording rule (templating
    replaced by what Grafana sends for "All")."""
    values = {"__rate_interval": "1m", **{n: v["allValue"] for n, v in variables().items() if v["type"] == "query"}}

    def substituted(expr: str) -> str:
        for name in sorted(values, key=len, reverse=True):
            expr = expr.replace(f"${{{name}}}", values[name]).replace(f"${name}", values[name])
        assert "$" not in expr, expr
        return expr

    selectors = [re.search(r"label_values\((.*),\s*\w+\)$", v["definition"]).group(1) for v in variables().values() if v["type"] == "query"]
    rules = [{"record": f"trims_ray:check_{i}", "expr": substituted(e)} for i, e in enumerate(dashboard_exprs() + selectors)]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([shutil.which("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout + done.stderr


def test_repository_copy_is_the_packaged_dashboard():
    assert json.loads((REPO / "dashboards" / "grafana" / "trims_ray.json").read_text()) == DASHBOARD


def test_scrape_config_reads_the_service_discovery_file_ray_writes():
    config = yaml.safe_load((REPO / "dashboards" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"] == [{"files": [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]}]


@pytest.mark.skipif(not shutil.which("promtool"), reason="no promtool (Debian package 'prometheus')")
def test_scrape_config_is_valid_for_prometheus():
    config = REPO / "dashboards" / "prometheus.yml"
    done = subprocess.run([shutil.which("promtool"), "check", "config", "--syntax-only", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "SUCCESS" in done.stdout + done.stderr, done.stdout + done.stderr
