"""Helpers for the multi-node tests: a real Ray cluster of three nodes on this machine
(``ray.cluster_utils.Cluster``, small object stores), trims_ray on it, and the work the test
functions do.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import ray
import torch
from ray.cluster_utils import Cluster

import trims_ray
from trims_ray._cluster import placement_actor
from trims_ray.actors._naming import NAMESPACE, node_cache_actor_name
from trims_ray._protocol import cache_key
from workloads import local_ray

MiB = 1024 * 1024
NODE_STORE = 128 * MiB
HOST_BUDGET = 24 * MiB
NODES = 3

def start_cluster(nodes: int = NODES, cpus: int = 2) -> tuple[Cluster, list[str]]:
    """A head and ``nodes - 1`` workers, and a driver connected to them; returns node ids in
    the order they were added (the head first)."""
    cluster = local_ray.start_cluster(nodes, num_cpus=cpus, object_store_memory=NODE_STORE)
    return cluster, [n.node_id for n in cluster.list_all_nodes()]


def stop_cluster(cluster: Cluster) -> None:
    try:
        trims_ray.shutdown()
    finally:
        local_ray.stop_cluster(cluster)


def multinode_config(tmp_path) -> trims_ray.CacheConfig:
    """The cache configuration of ``init_trims``."""
    return trims_ray.CacheConfig(
        host_bytes=HOST_BUDGET, disk_dir=str(tmp_path / "disk"), lease_check_s=0.2, report_s=0.2
    )


def init_trims(tmp_path) -> None:
    trims_ray.init(store=str(tmp_path / "store"), config=multinode_config(tmp_path))


def weights(mb: float, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(int(mb * MiB / 4), generator=gen)}


def where_and_sum(model, delay_s: float = 0.0) -> tuple[str, float]:
    """The work of every test function: which node ran it, and a checksum of the weights."""
    if delay_s:
        time.sleep(delay_s)
    return ray.get_runtime_context().get_node_id(), float(model["w"].double().sum())


def expected_sum(w: dict[str, torch.Tensor]) -> float:
    return float(w["w"].double().sum())


def host_nodes(name: str) -> set[str]:
    """Nodes whose host tier holds ``name`` now (asked of every node's cache)."""
    key = cache_key(trims_ray._api.current_store().manifest(name, tenant="default"))
    return {n for n, tier in ray.get(placement_actor().holders.remote(key)).items() if tier == "host"}



def run_stream(fn, w, count: int, during=None, at: int = 0, concurrency: int = 4) -> list[tuple[str, float]]:
    """``count`` invocations, ``concurrency`` at a time, calling ``during()`` after ``at`` of
    them were submitted; returns every result (an invocation that fails fails the test)."""
    results = []
    with ThreadPoolExecutor(concurrency) as pool:
        futures = []
        for i in range(count):
            if during is not None and i == at:
                during()
            futures.append(pool.submit(lambda: ray.get(fn.remote(0.05))))
            if len(futures) >= concurrency:
                results.append(futures.pop(0).result())
        results += [f.result() for f in futures]
    assert all(total == expected_sum(w) for _, total in results)
    return results


@ray.remote(num_cpus=0)
def corrupt_resident_copy(node: str, key: str) -> None:
    """Flips one byte of a node's host-tier copy in place, as a stray write from a process that
    holds no lease (so no page protection) would."""
    import ctypes

    # Looked up afresh: this worker may hold the handle of an earlier test's (killed) cache.
    actor = ray.get_actor(node_cache_actor_name(node), namespace=NAMESPACE)
    grant = ray.get(actor.lend.remote(key))
    try:
        obj = ray.get(grant.ref)
        address = obj.ctypes.data + grant.offset + grant.manifest.nbytes - 1
        old = ctypes.c_uint8.from_address(address).value
        ctypes.c_uint8.from_address(address).value = old ^ 0xFF
    finally:
        actor.release.remote(grant.lease_id)
