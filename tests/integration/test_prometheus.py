"""A real Prometheus against a local Ray running trims_ray: it scrapes the nodes it finds in the
service-discovery file Ray writes (with the scrape config in dashboards/prometheus.yml), and
every PromQL query of the Grafana dashboard (dashboards/grafana/trims_ray.json) must return data.

Prometheus is Debian's ``prometheus`` package (``.ci/run`` installs it); the test is skipped
without the binary. It runs on loopback on a free port with its storage in a temp directory, and
only the process this test started is stopped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import ray
import torch
import yaml

import trims_ray
from workloads.local_ray import init_local
from workloads.s3server import free_port

from .conftest import wait_for

REPO = Path(__file__).resolve().parents[2]
SCRAPE_CONFIG = REPO / "dashboards" / "prometheus.yml"
DASHBOARD = REPO / "dashboards" / "grafana" / "trims_ray.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
SD_FILE = "prom_metrics_service_discovery.json"  # ray._private.ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE

MiB = 1024 * 1024
SCRAPE_S = 1
# Wider than several scrapes, so that rate() has samples to work with; what Grafana's
# $__rate_interval would be for this scrape interval.
RATE_INTERVAL = "20s"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.access(PROMETHEUS, os.X_OK),
        reason="no prometheus binary (Debian package 'prometheus'; .ci/run installs it)",
    ),
]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target in the dashboard, its template variables replaced
    by what Grafana sends for "All" ($__rate_interval by a fixed window)."""
    dashboard = json.loads(DASHBOARD.read_text())
    values = {"__rate_interval": RATE_INTERVAL}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            values[var["name"]] = var.get("allValue") or ".*"
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in sorted(values, key=len, reverse=True):
                expr = expr.replace(f"${{{name}}}", values[name]).replace(f"${name}", values[name])
            assert "$" not in expr, f"unknown template variable in {target['expr']!r}"
            queries.append((panel["title"], expr))
    return queries


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray with its dashboard (which writes the service-discovery file) and a metrics
    export port; yields the session directory, where this session's file is."""
    init_local(
        num_cpus=2,
        object_store_memory=200 * MiB,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        log_to_driver=False,
        _metrics_export_port=free_port(),
        _system_config={"metrics_report_interval_ms": 500},
    )
    try:
        yield Path(ray._private.worker._global_node.get_session_dir_path())
    finally:
        ray.shutdown()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


@pytest.fixture
def prometheus(ray_session, tmp_path):
    """Prometheus scraping this Ray session, with dashboards/prometheus.yml's scrape config
    pointed at this session's service-discovery file (the /tmp/ray one follows whichever session
    on this machine started last); yields its base URL."""
    sd_file = ray_session / SD_FILE
    wait_for(sd_file.exists, 30, interval=0.5, what=f"Ray's service-discovery file {sd_file}")
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"] = {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"}
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "ray"]
    assert job["file_sd_configs"][0]["files"] == [f"/tmp/ray/{SD_FILE}"]
    job["file_sd_configs"][0]["files"] = [str(sd_file)]
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
            try:
                return urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200
            except OSError:
                return False

        wait_for(ready, 30, interval=0.5, what="prometheus ready")
        yield url
    finally:
        process.terminate()  # only the process this test started
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def query(url: str, promql: str) -> list[dict]:
    reply = get_json(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def test_every_dashboard_query_returns_data(prometheus, tmp_path):
    # A host tier that holds two of the three models: traffic over all three makes hits,
    # misses, loads from the store and the disk tier, and evictions.
    model_bytes = 4 * MiB
    config = trims_ray.CacheConfig(
        host_bytes=2 * model_bytes + 4 * MiB, disk_dir=str(tmp_path / "disk"), report_s=0.2
    )
    trims_ray.init(store=str(tmp_path / "store"), config=config)
    try:
        names = ["a", "b", "c"]
        for i, name in enumerate(names):
            trims_ray.register(name, {"w": torch.full((model_bytes // 4,), float(i))})

        @trims_ray.function(num_cpus=1)
        def first(model):
            return float(model["w"][0])

        # Prometheus must see the targets up before the counters move, so that rate() over the
        # dashboard's window sees them grow.
        wait_for(
            lambda: [r for r in query(prometheus, 'up{job="ray"}') if r["value"][1] == "1"],
            30,
            interval=0.5,
            what="Ray's nodes scraped (up == 1)",
        )
        queries = dashboard_queries()
        assert len(queries) >= 9
        deadline = time.monotonic() + 60
        rounds = 0
        missing = queries
        while missing:
            # Traffic keeps flowing while we wait, so that every rate is above zero.
            for name in ["a", "a", "b", "b", "c", "c", "a"]:
                assert ray.get(first.options(model=name).remote()) == float(names.index(name))
            rounds += 1
            missing = [(title, q) for title, q in queries if not any(_finite(r) for r in query(prometheus, q))]
            if missing and time.monotonic() > deadline:
                raise AssertionError(
                    f"after {rounds} rounds of traffic these dashboard queries return no data: "
                    + "; ".join(f"{title}: {q}" for title, q in missing)
                )
            time.sleep(SCRAPE_S)
        # The series come from trims_ray's actors and this driver, through Ray's export.
        assert query(prometheus, 'count(ray_trims_ray_tier_hits_total{tier="host"})')
    finally:
        trims_ray.shutdown()


def _finite(result: dict) -> bool:
    """A sample with a number (a ratio of two zero rates is NaN: no data to show)."""
    return math.isfinite(float(result["value"][1]))
