"""Ray of our own on this machine, for tests and benchmarks: one node (``ray.init(address="local")``)
or several (``ray.cluster_utils.Cluster``), with a driver connected, started once more if the
first start times out.

Ray waits a fixed 30 s for a new raylet to register with its GCS (``ray/_private/node.py``) and
then raises "The current node timed out during startup". On a loaded two-core CI machine that
happened once right after the soak's cluster had gone (CI of 52c96f2), and never here in many
runs. A second try is cheap; the processes the failed start left behind are stopped first, by
the PIDs this process started, never by name.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import psutil
import ray
from ray.cluster_utils import Cluster

from trims_ray._gc import quick_frees, ray_env

__all__ = ["init_local", "start_cluster", "stop_cluster", "local_cluster", "retry_slow_start"]

log = logging.getLogger("trims_ray")

T = TypeVar("T")

# What Ray's Node.__init__ raises when the raylet does not register in time, and when the GCS
# server does not write its port file in time (a CI run met the second on a loaded machine).
START_TIMED_OUT = ("timed out during startup", "Timed out waiting for file")


def retry_slow_start(start: Callable[[], T], *, attempts: int = 2) -> T:
    """Runs ``start`` (something that starts Ray processes); if Ray says the node timed out during
    startup, stops the processes that start left (children of this process that were not there
    before) and runs it again, up to ``attempts`` times in all. Other errors pass through."""
    for attempt in range(1, attempts + 1):
        before = _descendants()
        try:
            return start()
        except Exception as error:
            if not any(message in str(error) for message in START_TIMED_OUT) or attempt == attempts:
                raise
            log.warning("Ray's start timed out (%s); stopping what it started and trying again", error)
            with contextlib.suppress(Exception):
                ray.shutdown()
            _stop([p for pid, p in _descendants().items() if pid not in before])
    raise AssertionError("unreachable")


def init_local(**kwargs) -> None:
    """``ray.init(address="local", **kwargs)``: a new one-node Ray of our own, never one that
    another test or user left running on this machine; it frees released objects every 100 ms,
    as a Ray that ``trims_ray.init`` starts does (``trims_ray._gc.quick_frees``)."""
    with quick_frees():
        retry_slow_start(lambda: ray.init(address="local", **kwargs))


@contextlib.contextmanager
def preallocated_object_store() -> Iterator[None]:
    """Ray started within the block touches its whole object store when it starts (Ray's
    ``preallocate_plasma_memory``), so no timed run pays for first touching plasma pages: these
    VMs take 2.5-3 ms per MiB the first time (DESIGN.md, "Benchmarks"); measured here, publishing
    a 20 MiB model took 10-34 ms on fresh plasma memory and 3 ms on memory touched before."""
    with ray_env({"RAY_preallocate_plasma_memory": "1"}):
        yield


def start_cluster(nodes: int, *, log_to_driver: bool = False, **node_args) -> Cluster:
    """A head and ``nodes - 1`` worker nodes on this machine, each started with ``node_args``
    (``num_cpus``, ``object_store_memory``, ...), and this driver connected to them. The
    dashboard is off; the nodes started here free released objects every 100 ms, as a Ray that
    ``trims_ray.init`` starts does (``trims_ray._gc.quick_frees``). Stop it with
    :func:`stop_cluster`."""

    def start() -> Cluster:
        cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
        try:
            for _ in range(nodes - 1):
                cluster.add_node(**node_args)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=log_to_driver)
        except BaseException:
            stop_cluster(cluster)
            raise
        return cluster

    with quick_frees():
        return retry_slow_start(start)


def stop_cluster(cluster: Cluster) -> None:
    """Disconnects this driver and stops every node of ``cluster`` (waiting for their processes)."""
    try:
        ray.shutdown()
    finally:
        cluster.shutdown()


@contextlib.contextmanager
def local_cluster(nodes: int, **node_args) -> Iterator[Cluster]:
    """:func:`start_cluster` for the ``with`` block, stopped on the way out."""
    cluster = start_cluster(nodes, **node_args)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


def _descendants() -> dict[int, psutil.Process]:
    return {p.pid: p for p in psutil.Process().children(recursive=True)}


def _stop(procs: list[psutil.Process], timeout_s: float = 10.0) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout_s)


@contextlib.contextmanager
def own_ray(nodes: int, cpus: int, object_store_bytes: int) -> Iterator[list[str]]:
    """Our own Ray (never one left running on the machine) of ``nodes`` nodes with ``cpus`` CPUs
    each, its object store preallocated (``preallocated_object_store``); yields node ids, the
    head first, and shuts it down on the way out."""
    if ray.is_initialized():
        raise RuntimeError("this benchmark starts its own Ray: run it where Ray is not initialized")
    args = {"num_cpus": cpus, "object_store_memory": object_store_bytes}
    if nodes == 1:
        with preallocated_object_store():
            init_local(include_dashboard=False, log_to_driver=False, **args)
        try:
            yield [ray.get_runtime_context().get_node_id()]
        finally:
            ray.shutdown()
        return
    with preallocated_object_store(), local_cluster(nodes, **args) as cluster:
        yield [n.node_id for n in cluster.list_all_nodes()]
