"""A real single-node Ray for the integration tests, started once per module with a small object
store, and a fresh trims_ray (store, disk tier, node cache actor) for every test.
"""

from __future__ import annotations

import time

import pytest
import ray

import trims_ray
from workloads.local_ray import init_local

OBJECT_STORE_BYTES = 256 * 1024 * 1024
HOST_BUDGET = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def ray_node():
    # address="local": our own cluster, never one another test or user left running.
    init_local(
        num_cpus=2,
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        yield ray.get_runtime_context().get_node_id()
    finally:
        ray.shutdown()


def _trims_ray_on(tmp_path, **overrides):
    """Starts trims_ray with its own store and disk tier under ``tmp_path``; yields the store."""
    settings = dict(host_bytes=HOST_BUDGET, disk_dir=str(tmp_path / "disk"), lease_check_s=0.2, caller_timeout_s=3.0)
    trims_ray.init(store=str(tmp_path / "store"), config=trims_ray.CacheConfig(**{**settings, **overrides}))
    try:
        yield trims_ray.ModelStore(str(tmp_path / "store"))
    finally:
        trims_ray.shutdown()


@pytest.fixture
def cache(ray_node, tmp_path):
    """trims_ray on the module's Ray, with its own store and disk tier and the default policy;
    yields the store."""
    yield from _trims_ray_on(tmp_path)


@pytest.fixture
def lru_cache(ray_node, tmp_path):
    """As ``cache``, with the lru policy: for tests that check which model goes (lru's order is
    the one a test can name; gdsf's among equally popular models follows how long loads took)."""
    yield from _trims_ray_on(tmp_path, policy="lru")


def wait_for(condition, timeout: float = 15.0, interval: float = 0.1, what: str = "condition"):
    """Polls ``condition`` until it returns a truthy value; fails the test after ``timeout`` s,
    saying ``what`` it waited for."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(interval)
