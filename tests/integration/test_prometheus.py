"""A real Prometheus against a local Ray running trims_ray: it scrapes the nodes it finds in the
service-discovery file Ray writes (with the scrape config in dashboards/prometheus.yml), and
every PromQL query of the Grafana dashboard (trims_ray/dashboards/trims_ray.json) must return
data, filtered by the session and instance that Prometheus itself lists; the dashboard installs
where Ray's Grafana provisioning reads; and the cluster-health notebook runs against the same
Ray and Prometheus (against Ray alone, reading ``trims_ray.stats()``, where there is no
Prometheus).

Prometheus is Debian's ``prometheus`` package (``.ci/run`` installs it); the tests that need it
are skipped without the binary. It runs on loopback on a free port with its storage in a temp
directory, and only the process this module started is stopped.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import ray
import torch
import yaml

import trims_ray
from trims_ray import _dashboard
from trims_ray._protocol import cache_key
from workloads.local_ray import init_local
from workloads.s3server import free_port

from .conftest import wait_for
from .multinode import corrupt_resident_copy

REPO = Path(__file__).resolve().parents[2]
SCRAPE_CONFIG = REPO / "dashboards" / "prometheus.yml"
NOTEBOOK = REPO / "notebooks" / "cluster_health.ipynb"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
HAVE_PROMETHEUS = os.access(PROMETHEUS, os.X_OK)
SD_FILE = "prom_metrics_service_discovery.json"  # ray._private.ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE

MiB = 1024 * 1024
MODEL_BYTES = 4 * MiB
# Over the default tenant's disk quota: its disk copy is always refused (a quota denial).
BIG_BYTES = 6 * MiB
DISK_QUOTA = 5 * MiB
SCRAPE_S = 1
# Wider than several scrapes, so that rate() has samples to work with; what Grafana's
# $__rate_interval would be for this scrape interval.
RATE_INTERVAL = "20s"
# Traffic over the host tier, which holds two of a, b, c: hits, misses, loads from the store and
# the disk, and evictions; "big" now and then.
ROUND = ["a", "a", "b", "b", "c", "c", "a", "big"]

pytestmark = pytest.mark.slow
needs_prometheus = pytest.mark.skipif(
    not HAVE_PROMETHEUS, reason="no prometheus binary (Debian package 'prometheus'; .ci/run installs it)"
)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray with its dashboard (which writes the service-discovery file and Grafana's
    provisioning) and a metrics export port; yields the session directory."""
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


@pytest.fixture(scope="module")
def prometheus(ray_session, tmp_path_factory):
    """Prometheus scraping this Ray session, with dashboards/prometheus.yml's scrape config
    pointed at this session's service-discovery file (the /tmp/ray one follows whichever session
    on this machine started last); yields its base URL, or None without the binary."""
    if not HAVE_PROMETHEUS:
        yield None
        return
    tmp_path = tmp_path_factory.mktemp("prometheus")
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
        # Prometheus must see the targets up before the counters move, so that rate() over the
        # dashboard's window sees them grow.
        wait_for(
            lambda: [r for r in query(url, 'up{job="ray"}') if r["value"][1] == "1"],
            30,
            interval=0.5,
            what="Ray's nodes scraped (up == 1)",
        )
        yield url
    finally:
        process.terminate()  # only the process this fixture started
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


@ray.remote(num_cpus=0)
class FakeGpuHolder:
    """A GPU holder's tier on the package's CPU stand-in device, in a Ray worker, exporting as
    the holder's reaper thread does: two models of which the budget holds one, so every tick
    has hits, swap-ins and evictions, and one bypass (a miss while the other model is leased)."""

    def __init__(self, node: str) -> None:
        from trims_ray._gpu_ipc import DeviceIdentity
        from trims_ray.cache.gpu_testing import ArraySource, FakeDevice
        from trims_ray.cache.gpu_tier import GpuTier, GpuTierConfig

        store = trims_ray.ModelStore(f"memory://prometheus-gpu-{node}")
        self.node, self.manifests, blobs = node, {}, {}
        for i, name in enumerate(("g1", "g2")):  # different bytes: blobs are content-addressed
            store.register(name, {"w": torch.full((MiB // 4,), float(i))}, tenant="default")
            manifest = self.manifests[name] = store.manifest(name, tenant="default")
            blobs[manifest.sha256] = store.read(manifest)[0]
        self.tier = GpuTier(
            device=FakeDevice(64 * MiB),
            identity=DeviceIdentity("GPU-00000000-0000-0000-0000-000000000000", 0, "0", node),
            host=ArraySource(blobs),
            # lru: every swap-in is admitted, so each tick evicts (gdsf asks a newcomer for twice
            # what the resident model saves, and g2 would never get in).
            config=GpuTierConfig(budget_bytes=MiB + MiB // 2, policy="lru"),
        )

    def tick(self) -> dict:
        from dataclasses import asdict

        from trims_ray._metrics import export_gpu_tier
        from trims_ray._protocol import Holder

        me = Holder.this_process()
        for name in ("g1", "g1", "g2", "g2"):
            self.tier.release(self.tier.acquire(self.manifests[name], me).lease_id)
        held = self.tier.acquire(self.manifests["g2"], me)
        try:
            bypass = self.tier.acquire(self.manifests["g1"], me, bypass_when_busy=True)
            assert bypass.handle is None, "g1 fitted beside a leased g2: the budget is too large"
        finally:
            self.tier.release(held.lease_id)
        export_gpu_tier(self.node, self.tier)
        return asdict(self.tier.stats())


class Traffic:
    """trims_ray on the module's Ray with models a, b, c and big, and the function that uses them."""

    def __init__(self, tmp_path: Path) -> None:
        self.disk_dir = tmp_path / "disk"
        config = trims_ray.CacheConfig(
            host_bytes=2 * MODEL_BYTES + 4 * MiB,
            disk_dir=str(self.disk_dir),
            report_s=0.2,
            tenant_quotas={"default": {"disk": DISK_QUOTA}},
            # lru: every miss is admitted, so each ROUND evicts and the evictions charts have
            # data; gdsf (the default) may refuse a one-off newcomer and bypass instead.
            policy="lru",
        )
        trims_ray.init(store=str(tmp_path / "store"), config=config)
        self.infos = {name: trims_ray.register(name, {"w": torch.full((MODEL_BYTES // 4,), float(i))}) for i, name in enumerate("abc")}
        self.infos["big"] = trims_ray.register("big", {"w": torch.full((BIG_BYTES // 4,), 3.0)})
        self.node = ray.get_runtime_context().get_node_id()

        @trims_ray.function(num_cpus=1)
        def first(model):
            return float(model["w"][0])

        self.first = first
        self.gpu = FakeGpuHolder.remote(self.node)

    def round(self) -> None:
        """One round of invocations, each checked, and a tick of the GPU holder."""
        gpu = self.gpu.tick.remote()
        for name in ROUND:
            assert ray.get(self.first.options(model=name).remote()) == float(self.value(name))
        ray.get(gpu)

    def value(self, name: str) -> int:
        return 3 if name == "big" else "abc".index(name)

    def faults(self) -> None:
        """What the refusals-and-faults row charts, made to happen for real: the disk tier's
        directory deleted (the next disk write counts an error), and a resident host copy
        changed in place, which a scrub finds corrupt and drops."""
        shutil.rmtree(self.disk_dir / self.node, ignore_errors=True)
        trims_ray.prefetch("a", tier="host", nodes=[self.node])
        strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(self.node, soft=False)
        # In a worker of its own (another runtime_env): a worker that ran the traffic keeps "a"
        # built with its pages write-protected (invariant 6), and the write would kill it.
        fresh = {"env_vars": {"TRIMS_RAY_TEST_FRESH_WORKER": "1"}}
        corrupt = corrupt_resident_copy.options(scheduling_strategy=strategy, runtime_env=fresh, max_retries=0)
        ray.get(corrupt.remote(self.node, cache_key(self.infos["a"])))
        assert trims_ray.scrub(nodes=[self.node])[self.node]["corrupt"] == 1


@pytest.fixture(scope="module")
def traffic(ray_session, tmp_path_factory):
    traffic = Traffic(tmp_path_factory.mktemp("trims"))
    try:
        yield traffic
    finally:
        ray.kill(traffic.gpu)
        trims_ray.shutdown()


def dashboard_queries(values: dict[str, str]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target in the dashboard, its template variables replaced
    by ``values`` ($__rate_interval by a fixed window)."""
    dashboard = json.loads(_dashboard.dashboard_json())
    values = {"__rate_interval": RATE_INTERVAL, **values}
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in sorted(values, key=len, reverse=True):
                expr = expr.replace(f"${{{name}}}", values[name]).replace(f"${name}", values[name])
            assert "$" not in expr, f"unknown template variable in {target['expr']!r}"
            queries.append((panel["title"], expr))
    return queries


def variable_values(url: str) -> dict[str, list[str]]:
    """What Grafana would list for each query variable: its label_values() run by Prometheus
    (the series API, as Grafana's Prometheus data source does), each selector's variables at
    "All"."""
    dashboard = json.loads(_dashboard.dashboard_json())
    variables = [v for v in dashboard["templating"]["list"] if v["type"] == "query"]
    all_values = {v["name"]: v["allValue"] for v in variables}
    found = {}
    for var in variables:
        selector, label = var["definition"].removeprefix("label_values(").removesuffix(")").rsplit(",", 1)
        for name, value in all_values.items():
            selector = selector.replace(f"${name}", value)
        params = urllib.parse.urlencode({"match[]": selector.strip()})
        reply = get_json(f"{url}/api/v1/label/{label.strip()}/values?{params}")
        assert reply["status"] == "success", reply
        found[var["name"]] = reply["data"]
    return found


def _finite(result: dict) -> bool:
    """A sample with a number (a ratio of two zero rates is NaN: no data to show)."""
    return math.isfinite(float(result["value"][1]))


@needs_prometheus
def test_every_dashboard_query_returns_data(prometheus, traffic):
    traffic.round()
    traffic.faults()
    # The filters list this session and this node's address (no ray_io_cluster: no KubeRay).
    listed = wait_for(
        lambda: (lambda v: v if v["SessionName"] and v["Instance"] else None)(variable_values(prometheus)),
        30,
        interval=0.5,
        what="the dashboard's variables listing the session and node",
    )
    session = ray._private.worker._global_node.session_name
    assert listed["SessionName"] == [session] and listed["Cluster"] == []
    (instance,) = listed["Instance"]
    assert instance.rsplit(":", 1)[0] == ray.util.get_node_ip_address()
    # Each query with the session and node chosen, as a user would (the cluster at "All").
    queries = dashboard_queries({"SessionName": session, "Instance": instance, "Cluster": ".*"})
    assert len(queries) >= 20
    deadline = time.monotonic() + 60
    rounds = 0
    missing = queries
    while missing:
        traffic.round()  # traffic keeps flowing while we wait, so that every rate is above zero
        rounds += 1
        missing = [(title, q) for title, q in queries if not any(_finite(r) for r in query(prometheus, q))]
        if missing and time.monotonic() > deadline:
            raise AssertionError(
                f"after {rounds} rounds of traffic these dashboard queries return no data: "
                + "; ".join(f"{title}: {q}" for title, q in missing)
            )
        time.sleep(SCRAPE_S)
    # The series come from trims_ray's actors, the GPU holder and this driver, through Ray's
    # export, and carry no model label (CacheConfig.metrics_per_model is off).
    assert query(prometheus, 'count(ray_trims_ray_tier_hits_total{tier="host"})')
    assert query(prometheus, 'ray_trims_ray_tier_quota_denials_total{tier="disk"}')
    assert query(prometheus, "count({__name__=~\"ray_trims_ray_.*\", model!=\"\"})") == []


def test_dashboard_installs_where_rays_grafana_provisioning_reads(ray_session):
    """Ray's dashboard wrote Grafana's dashboard provider for this session; the default install
    lands in the folder that provider names, next to Ray's own dashboards."""
    provider = ray_session / "metrics" / "grafana" / "provisioning" / "dashboards" / "default.yml"
    wait_for(provider.exists, 30, interval=0.5, what=f"Ray's Grafana dashboard provider {provider}")
    (folder,) = [p["options"]["path"] for p in yaml.safe_load(provider.read_text())["providers"]]
    wait_for(lambda: list(Path(folder).glob("default_grafana_dashboard.json")), 30, interval=0.5, what="Ray's dashboards")
    path = _dashboard.install_dashboard()
    assert path.parent.resolve() == Path(folder).resolve()
    assert json.loads(path.read_text())["uid"] == "trims-ray"
    # A Grafana dashboard uid must not collide with Ray's own in the same provider's folder.
    uids = [json.loads(p.read_text())["uid"] for p in Path(folder).glob("*.json")]
    assert len(uids) == len(set(uids)) >= 2


def test_cluster_health_notebook_runs_on_this_cluster(prometheus, traffic, tmp_path, monkeypatch):
    """The notebook, executed by nbclient in a real kernel (a second driver on this Ray), polls
    ``trims_ray.stats()`` while traffic flows and, with Prometheus, charts the tiers over the
    last two minutes; the data it saves must agree with what this test knows."""
    nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat")
    nbclient = pytest.importorskip("nbclient", reason="the test extra installs nbclient")
    for _ in range(3):  # some history for Prometheus' rates when this test runs alone
        traffic.round()
    figures = tmp_path / "figures"
    env = {
        "RAY_ADDRESS": ray._private.worker._global_node.address,
        # Without Prometheus: a port nothing listens on, so the notebook's fallback runs.
        "RAY_PROMETHEUS_HOST": prometheus or f"http://127.0.0.1:{free_port()}",
        "TRIMS_RAY_WINDOW_S": "120",
        "TRIMS_RAY_STEP_S": "2",
        "TRIMS_RAY_RATE_WINDOW": RATE_INTERVAL,
        "TRIMS_RAY_POLLS": "3",
        "TRIMS_RAY_POLL_S": "0.5",
        "TRIMS_RAY_FIGURES": str(figures),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    stop = threading.Event()

    def keep_traffic() -> None:
        while not stop.wait(0.2):  # paced: the kernel shares this machine's CPUs
            traffic.round()

    flowing = threading.Thread(target=keep_traffic, daemon=True)
    flowing.start()
    try:
        notebook = nbformat.read(NOTEBOOK, as_version=4)
        nbclient.NotebookClient(
            notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        stop.set()
        flowing.join(timeout=60)

    summary = json.loads((figures / "summary.json").read_text())
    assert summary["nodes"] == 1 and summary["polls"] == 3
    assert summary["prometheus"] is (prometheus is not None)
    now = trims_ray.stats().nodes[traffic.node].tiers["host"]
    seen = summary["stats_now"]["host"]
    assert 0 < seen["hits"] <= now.hits and seen["capacity"] == now.capacity
    # Traffic flowed while the notebook polled: some interval had requests, hit ratio in [0, 1].
    host_ratios = [r for r in summary["interval_hit_ratio"]["host"] if r is not None]
    assert host_ratios and all(0 <= r <= 1 for r in host_ratios)
    with open(figures / "stats_polls.csv") as polled:
        host_hits = [int(row["hits"]) for row in csv.DictReader(polled) if row["tier"] == "host"]
    assert len(host_hits) == 3 and host_hits == sorted(host_hits) and host_hits[-1] > host_hits[0]
    assert (figures / "stats_over_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if prometheus is None:
        return
    points, last = summary["prometheus_points"], summary["prometheus_last"]
    for chart, line in (("hit ratio", "host"), ("bytes held (MiB)", "host"), ("load latency (s)", "p99 store"), ("evictions per s", "host")):
        assert points.get(chart, {}).get(line, 0) >= 2, f"{chart}/{line}: {points.get(chart)}"
    assert 0 <= last["hit ratio"]["host"] <= 1
    assert 0 < last["bytes held (MiB)"]["host"] <= now.capacity / MiB
    assert 0 < last["load latency (s)"]["p50 store"] <= last["load latency (s)"]["p99 store"]
    assert (figures / "tiers_over_time.png").stat().st_size > 2000
