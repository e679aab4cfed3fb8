"""The records placement exchanges: what node caches report (``NodeReport``, numbered by
``ReportSequence``), what placement knows of each node (``NodeInfo``, ``task_slots``), and what it
hands out (``Snapshot`` for callers to cache, ``Route`` for one invocation). Data only, no
decisions: those are ``placement.Placement``'s. A plain module, no Ray.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["NodeInfo", "NodeReport", "ReportSequence", "Route", "Snapshot", "TIERS", "LOADING", "REPORTED_TIERS", "task_slots"]

TIERS = ("gpu", "host", "disk")
# A model whose load into the host tier is under way on a node: an invocation sent there waits
# for that load instead of starting a second one elsewhere.
LOADING = "loading"
# What a node's report may say of a model it has.
REPORTED_TIERS = frozenset((*TIERS, LOADING))


@dataclass
class NodeInfo:
    """What placement knows of a node: its host budget and use, task slots and queue."""

    host_capacity: int
    host_used: int = 0
    slots: float = 1  # the node's CPUs: how many 1-CPU invocations it runs at once
    in_flight: int = 0
    last_report: float = 0.0
    gpus: float = 0.0  # the node's GPUs
    # What a load there could evict, evict-first first: (key, bytes, RecentUses count, at).
    evictable: tuple[tuple[str, int, float, float], ...] = ()


def task_slots(info: NodeInfo, cpus: float = 1.0, gpus: float = 0.0) -> float:
    """How many invocations that ask for ``cpus`` CPUs and ``gpus`` GPUs each the node runs at
    once (at least one; unbounded for one that asks for neither), as Ray schedules them."""
    limits = []
    if cpus > 0:
        limits.append(info.slots / cpus)
    if gpus > 0:
        limits.append(info.gpus / gpus if info.gpus > 0 else 1.0)  # GPUs not reported: one
    if not limits:
        return math.inf
    return max(1, math.floor(min(limits) + 1e-9))


@dataclass(frozen=True)
class NodeReport:
    """A node cache's full snapshot, replacing its previous one.

    Attributes:
        residency: model key (blob sha256) -> best tier it is in there ("gpu", "host", "disk")
            or "loading" while its host load is under way.
        host_capacity: the host tier's byte budget.
        host_used: bytes the host tier holds or has reserved for loads in flight.
        in_flight: model key -> leases held now (invocations running or queued there).
        slots: the node's CPUs (1-CPU invocations it runs at once).
        gpus: the node's GPUs.
        models: model key -> (tenant, name, nbytes) of one model that resolves to it, so that
            placement can ask another node to load a copy. Never sent to callers.
        gpu: model key -> "gpu" for every model ready on one of the node's GPUs, kept apart
            from ``residency`` (the host side) because only a GPU task can use a GPU copy. A
            "gpu" in ``residency`` itself means the same, with the host side unknown.
        seq: where this report stands among the node's reports (``ReportSequence``); None:
            unordered, always applied.
        evictable: what a load into the host tier could evict now, in the node's eviction
            order: (model key, accounted bytes, and its recent uses there: ``RecentUses``'s
            count and time), so that placement loads where the eviction costs least.
    """

    residency: dict[str, str]
    host_capacity: int
    host_used: int = 0
    in_flight: dict[str, int] = field(default_factory=dict)
    slots: float = 1
    models: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    gpu: dict[str, str] = field(default_factory=dict)
    seq: tuple[int, int] | None = None
    gpus: float = 0.0
    evictable: list[tuple[str, int, float, float]] = field(default_factory=list)


# Epochs handed out in this process, so that two sequences started within one clock tick are
# still ordered.
_epoch_lock = threading.Lock()
_last_epoch = 0


class ReportSequence:
    """Numbers one node cache's reports in the order they are taken.

    Ray may deliver them out of that order: a report whose call timed out can still run after a
    newer one, calls to a threaded actor run concurrently, and a call is retried across a
    placement restart. Placement applies a report only if it is newer than the last it applied
    from that node. A number is (epoch, count): the epoch is the wall-clock time the cache
    started (so a cache restarted on the node outranks its predecessor), the count orders one
    cache's reports.
    """

    def __init__(self) -> None:
        global _last_epoch
        with _epoch_lock:
            _last_epoch = self._epoch = max(time.time_ns(), _last_epoch + 1)
        self._count = 0
        self._lock = threading.Lock()

    def stamp(self, build: Callable[[], dict]) -> dict:
        """``build()``'s report with its number, taken under one lock: a report built later
        always gets a higher number."""
        with self._lock:
            report = build()
            self._count += 1
            return {**report, "seq": (self._epoch, self._count)}


@dataclass(frozen=True)
class Route:
    """A routing decision: the node, the tier the model is in there (None: it loads there), and
    the expected start-up time in seconds that ranked it first."""

    node: str
    tier: str | None
    expected_s: float


@dataclass(frozen=True)
class Snapshot:
    """What callers cache: the residency table and each node's figures, at one version."""

    version: int
    where: dict[str, dict[str, str]]  # the host side: model key -> {node: host, loading or disk}
    # node -> (host_capacity, host_used, slots (CPUs), in_flight, GPUs, evictable)
    nodes: dict[str, tuple[int, int, float, int, float, tuple]]
    gpu: dict[str, tuple[str, ...]] = field(default_factory=dict)  # model key -> nodes, on a GPU
