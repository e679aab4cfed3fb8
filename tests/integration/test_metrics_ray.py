"""trims_ray's metrics as Ray exports them: a local Ray with its own metrics export port runs a
scripted sequence of invocations, and the values on http://127.0.0.1:<port>/metrics (Prometheus
text format, Ray's ``ray_`` prefix) must be exactly what that sequence implies; no series has a
model label unless a process was told to add one (``CacheConfig.metrics_per_model``).
"""

from __future__ import annotations

import time
import urllib.request

import pytest
import ray
import torch
from prometheus_client.parser import text_string_to_metric_families

import trims_ray
from trims_ray._metrics import INVOCATION_SECONDS_BUCKETS, LOAD_SECONDS_BUCKETS, TIER_COUNTERS
from workloads.local_ray import init_local
from workloads.s3server import free_port

MiB = 1024 * 1024
HOST_BUDGET = 64 * MiB
# Ray's core workers push their metrics to the node's agent this often (default 10 s).
REPORT_INTERVAL_MS = 500
EXPORT_TIMEOUT_S = 40.0


@pytest.fixture(scope="module")
def metrics_port():
    """A Ray of our own whose node serves its metrics on a free port; yields the port."""
    port = free_port()
    init_local(
        num_cpus=2,
        object_store_memory=200 * MiB,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": REPORT_INTERVAL_MS},
    )
    try:
        yield port
    finally:
        ray.shutdown()


def scrape(port: int) -> dict[str, list]:
    """The node's /metrics, parsed: sample name -> [(labels, value)]."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: dict[str, list], name: str, **labels: str) -> float | None:
    """The sum of ``name``'s samples whose labels include ``labels`` (None: no such sample).
    Summing adds up the series of different processes (Ray labels each with its WorkerId)."""
    matching = [v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items())]
    return sum(matching) if matching else None


def wait_for_export(port: int, expected: dict[tuple, float]) -> dict[str, list]:
    """Scrapes until every ``(name, labels...)`` in ``expected`` has its value (Ray's agent
    exports a few seconds late); fails with the values last seen."""
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while True:
        samples = scrape(port)
        seen = {key: total(samples, key[0], **dict(key[1:])) for key in expected}
        if seen == expected:
            return samples
        if time.monotonic() > deadline:
            wrong = {k: (v, expected[k]) for k, v in seen.items() if v != expected[k]}
            raise AssertionError(f"metrics not exported within {EXPORT_TIMEOUT_S} s; (seen, expected): {wrong}")
        time.sleep(0.5)


def key(name: str, **labels: str) -> tuple:
    return (name, *sorted(labels.items()))


def test_known_traffic_gives_exact_counts(metrics_port, tmp_path):
    """k distinct models, then repeats: exactly k misses and n - k hits on the host tier, k
    loads from the store with their bytes and latencies, n routed invocations with latencies,
    and gauges that match trims_ray.stats(); an evict then shows in the evictions counter."""
    config = trims_ray.CacheConfig(host_bytes=HOST_BUDGET, disk_dir=str(tmp_path / "disk"), report_s=0.2)
    trims_ray.init(store=str(tmp_path / "store"), config=config)
    try:
        names = ["m0", "m1", "m2"]
        nbytes = {}
        for i, name in enumerate(names):
            info = trims_ray.register(name, {"w": torch.full((MiB // 4,), float(i))})
            nbytes[name] = info.nbytes

        @trims_ray.function(num_cpus=1)
        def first(model):
            return float(model["w"][0])

        sequence = names + ["m0", "m1", "m2", "m0", "m1"]  # n = 8, k = 3
        for name in sequence:
            assert ray.get(first.options(model=name).remote()) == float(names.index(name))
        k, n = len(names), len(sequence)
        node = ray.get_runtime_context().get_node_id()
        # Hits served by the workers that keep a model reach the node with their next poll.
        deadline = time.monotonic() + 15
        while trims_ray.stats().nodes[node].tiers["host"].hits < n - k and time.monotonic() < deadline:
            time.sleep(0.1)
        host = trims_ray.stats().nodes[node].tiers["host"]
        assert (host.misses, host.hits, host.loads) == (k, n - k, k)  # the cache's own count

        at_node = {"node": node}
        samples = wait_for_export(
            metrics_port,
            {
                key("ray_trims_ray_tier_misses_total", tier="host", **at_node): k,
                key("ray_trims_ray_tier_hits_total", tier="host", **at_node): n - k,
                key("ray_trims_ray_tier_loads_total", tier="host", **at_node): k,
                # Each host miss looked in the disk tier first, which had nothing yet.
                key("ray_trims_ray_tier_misses_total", tier="disk", **at_node): k,
                key("ray_trims_ray_load_seconds_count", source="store", **at_node): k,
                key("ray_trims_ray_loaded_bytes_total", source="store", **at_node): sum(nbytes.values()),
                key("ray_trims_ray_tier_models", tier="host", **at_node): k,
                key("ray_trims_ray_tier_used_bytes", tier="host", **at_node): host.bytes_used,
                key("ray_trims_ray_tier_capacity_bytes", tier="host", **at_node): HOST_BUDGET,
                key("ray_trims_ray_leases", tier="host", **at_node): 0,
                # The caller routes each model's first invocation to a node that must load it,
                # and every later one to where it is (or is loading).
                key("ray_trims_ray_routing_decisions_total", decision="miss", **at_node): k,
                key("ray_trims_ray_routing_decisions_total", decision="hit", **at_node): n - k,
                key("ray_trims_ray_invocation_seconds_count", **at_node): n,
            },
        )
        # By tenant, never by model (CacheConfig.metrics_per_model is off by default).
        labels = {"node": node, "source": "store", "tenant": "default"}
        assert total(samples, "ray_trims_ray_load_seconds_count", **labels) == k
        assert total(samples, "ray_trims_ray_loaded_bytes_total", **labels) == sum(nbytes.values())
        assert total(samples, "ray_trims_ray_invocation_seconds_count", tenant="default") == n
        assert total(samples, "ray_trims_ray_routing_decisions_total", tenant="default") == n
        with_model = sorted(
            {name for name, series in samples.items() for lab, _ in series if "model" in lab and lab.get("tenant") == "default"}
        )
        assert with_model == [], f"series with a model label: {with_model}"
        # Explicit buckets, as defined: every boundary and +Inf.
        les = {lab["le"] for lab, _ in samples["ray_trims_ray_load_seconds_bucket"]}
        assert les == {str(float(b)) for b in LOAD_SECONDS_BUCKETS} | {"+Inf"}
        les = {lab["le"] for lab, _ in samples["ray_trims_ray_invocation_seconds_bucket"]}
        assert les == {str(float(b)) for b in INVOCATION_SECONDS_BUCKETS} | {"+Inf"}

        assert trims_ray.evict("m0", tier="host")[node]["host"] == "evicted"
        wait_for_export(
            metrics_port,
            {
                key("ray_trims_ray_tier_evictions_total", tier="host", **at_node): 1,
                key("ray_trims_ray_tier_models", tier="host", **at_node): k - 1,
            },
        )
        # Every tier counter carries help text with its unit.
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        for counter in TIER_COUNTERS:
            if f"ray_trims_ray_tier_{counter}_total" in samples:
                assert f"# HELP ray_trims_ray_tier_{counter}_total " in text
        assert "(seconds)" in text and "(bytes)" in text
    finally:
        trims_ray.shutdown()


@ray.remote(num_cpus=0)
class GpuTierOnFakeDevice:
    """A GPU holder's tier on the CPU stand-in device, in a Ray worker (whose metrics Ray
    exports for as long as it lives), exporting as the holder's reaper thread does."""

    def run(self, node: str, requests: int) -> dict:
        from dataclasses import asdict

        from trims_ray._gpu_ipc import DeviceIdentity
        from trims_ray._metrics import export_gpu_tier
        from trims_ray.cache.gpu_testing import ArraySource, FakeDevice
        from trims_ray.cache.gpu_tier import GpuTier, GpuTierConfig
        from trims_ray._protocol import Holder

        store = trims_ray.ModelStore(f"memory://metrics-gpu-{node}")
        store.register("g", {"w": torch.ones(64 * 1024)}, tenant="default")
        manifest = store.manifest("g", tenant="default")
        blob, _ = store.read(manifest)
        tier = GpuTier(
            device=FakeDevice(64 * MiB),
            identity=DeviceIdentity("GPU-00000000-0000-0000-0000-000000000000", 0, "0", node),
            host=ArraySource({manifest.sha256: blob}),
            config=GpuTierConfig(budget_bytes=8 * MiB),
        )
        for _ in range(requests):
            grant = tier.acquire(manifest, Holder.this_process())
            tier.release(grant.lease_id)
        export_gpu_tier(node, tier)
        self.tier = tier  # kept, as the holder keeps it
        return asdict(tier.stats())


def test_gpu_tier_is_exported_as_tier_gpu(metrics_port):
    node = ray.get_runtime_context().get_node_id()
    holder = GpuTierOnFakeDevice.remote()
    stats = ray.get(holder.run.remote(node, 3))
    assert (stats["misses"], stats["hits"], stats["loads"]) == (1, 2, 1)
    at_gpu = {"node": node, "tier": "gpu"}
    wait_for_export(
        metrics_port,
        {
            key("ray_trims_ray_tier_misses_total", **at_gpu): 1,
            key("ray_trims_ray_tier_hits_total", **at_gpu): 2,
            key("ray_trims_ray_tier_loads_total", **at_gpu): 1,
            key("ray_trims_ray_tier_capacity_bytes", **at_gpu): 8 * MiB,
            key("ray_trims_ray_tier_used_bytes", **at_gpu): stats["bytes_used"],
            key("ray_trims_ray_tier_models", **at_gpu): 1,
            key("ray_trims_ray_leases", **at_gpu): 0,
        },
    )
    ray.kill(holder)


@ray.remote(num_cpus=0)
class PerModelRecorder:
    """A process told to label by model (as CacheConfig(metrics_per_model=True) tells the
    actors and callers), recording one load and one invocation through the real exporters."""

    def run(self, node: str) -> bool:
        from collections import deque

        from trims_ray import _metrics

        _metrics.set_per_model(True)
        events = deque([("store", "tenant-pm", "pm", 1234, 0.02)])
        _metrics.export_tiers(self, node, {}, {}, events)  # this actor owns the counters
        _metrics.record_route(node, None, "tenant-pm", "pm")
        _metrics.record_invocation(node, "tenant-pm", "pm", 0.03)
        _metrics.flush()
        return _metrics.per_model()


def test_model_label_when_asked_for(metrics_port):
    node = ray.get_runtime_context().get_node_id()
    recorder = PerModelRecorder.remote()
    assert ray.get(recorder.run.remote(node)) is True
    at = {"node": node, "tenant": "tenant-pm", "model": "pm"}
    wait_for_export(
        metrics_port,
        {
            key("ray_trims_ray_load_seconds_count", source="store", **at): 1,
            key("ray_trims_ray_loaded_bytes_total", source="store", **at): 1234,
            key("ray_trims_ray_routing_decisions_total", decision="miss", **at): 1,
            key("ray_trims_ray_invocation_seconds_count", **at): 1,
        },
    )
    ray.kill(recorder)
