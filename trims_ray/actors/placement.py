"""The placement logic of the cluster: where each model is, and where an invocation should go.

Node caches report residency (model -> tier), their host capacity and the invocations in flight;
``Placement`` keeps the cluster-wide table and ranks nodes by the expected start-up time of an
invocation there: GPU-resident, then host-resident, then disk-resident, else the best node to
load on, each plus the queue ahead of it. Callers cache ``table()`` (versioned) so that routing
does not cost a round trip. A plain class, no Ray: the placement actor (next) only wires it up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .._errors import CapacityError

__all__ = ["Placement", "NodeInfo", "Route", "TIERS"]

TIERS = ("gpu", "host", "disk")


@dataclass
class NodeInfo:
    """What placement knows of a node: its host budget and use, and its queue."""

    host_capacity: int
    host_used: int = 0
    in_flight: int = 0
    last_report: float = 0.0


@dataclass(frozen=True)
class Route:
    """A routing decision: the node, the tier the model is in there (None: it loads there), and
    the expected start-up time in seconds that ranked it first."""

    node: str
    tier: str | None
    expected_s: float


@dataclass
class _Demand:
    in_flight: int = 0


@dataclass
class Placement:
    """Cluster-wide residency and routing.

    Args:
        handoff_s: expected start-up of a hit, by tier (seconds).
        load_bytes_per_s: expected load rate by source: "disk" (the node's disk tier) and "store".
        service_s: expected time one queued invocation adds.
        copy_when_in_flight: invocations in flight per copy above which a hot model should get
            another copy (ModelMesh-style copy scaling).
        clock: monotonic time source.
    """

    handoff_s: dict[str, float] = field(default_factory=lambda: {"gpu": 0.002, "host": 0.01, "disk": 0.01})
    load_bytes_per_s: dict[str, float] = field(default_factory=lambda: {"disk": 0.5e9, "store": 0.1e9})
    service_s: float = 0.05
    copy_when_in_flight: int = 4
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._nodes: dict[str, NodeInfo] = {}
        self._where: dict[str, dict[str, str]] = {}  # model key -> {node: best tier there}
        self._demand: dict[str, _Demand] = {}
        self.version = 0

    # -- membership and reports ----------------------------------------------------------------

    def node_joined(self, node: str, host_capacity: int) -> None:
        if host_capacity < 0:
            raise ValueError(f"host_capacity must be >= 0, got {host_capacity}")
        self._nodes[node] = NodeInfo(host_capacity, last_report=self.clock())
        self.version += 1

    def node_left(self, node: str) -> None:
        """Forgets a node and everything resident on it (nothing is served from a dead node)."""
        if self._nodes.pop(node, None) is None:
            return
        for where in self._where.values():
            where.pop(node, None)
        self.version += 1

    def report(self, node: str, *, residency: dict[str, str], host_used: int, in_flight: int) -> None:
        """A node's full snapshot: model key -> tier ("gpu", "host" or "disk"), replacing the last.

        Raises:
            KeyError: the node has not joined.
            ValueError: an unknown tier.
        """
        info = self._nodes[node]
        for key, tier in residency.items():
            if tier not in TIERS:
                raise ValueError(f"unknown tier {tier!r} for {key}")
        changed = False
        for key, where in self._where.items():
            if node in where and key not in residency:
                del where[node]
                changed = True
        for key, tier in residency.items():
            where = self._where.setdefault(key, {})
            if where.get(node) != tier:
                where[node] = tier
                changed = True
        info.host_used, info.in_flight, info.last_report = host_used, in_flight, self.clock()
        if changed:
            self.version += 1

    # -- routing -------------------------------------------------------------------------------

    def route(self, key: str, nbytes: int) -> Route:
        """The node with the least expected start-up time for an invocation of ``key``.

        Raises:
            CapacityError: no node's host tier can ever hold ``nbytes`` (before any task starts).
            LookupError: there are no nodes.
        """
        if not self._nodes:
            raise LookupError("no nodes with a trims_ray cache")
        best: Route | None = None
        for node, tier in self._where.get(key, {}).items():
            info = self._nodes[node]
            cost = self.handoff_s[tier] + self._queue_s(info)
            if tier == "disk":
                cost += nbytes / self.load_bytes_per_s["disk"]
            if best is None or cost < best.expected_s:
                best = Route(node, tier, cost)
        load_cost = nbytes / self.load_bytes_per_s["store"]
        for node, info in self._nodes.items():
            if info.host_capacity < nbytes:
                continue
            cost = load_cost + self._queue_s(info)
            if best is None or cost < best.expected_s:
                best = Route(node, None, cost)
        if best is None:
            largest = max(i.host_capacity for i in self._nodes.values())
            raise CapacityError(
                f"model {key} needs {nbytes} bytes, more than any node's host tier can hold "
                f"(largest: {largest}): raise the host budget or add a bigger node"
            )
        return best

    def _queue_s(self, info: NodeInfo) -> float:
        return info.in_flight * self.service_s

    def started(self, key: str, node: str) -> None:
        """An invocation of ``key`` was sent to ``node`` (counts until ``finished``)."""
        self._nodes[node].in_flight += 1
        self._demand.setdefault(key, _Demand()).in_flight += 1

    def finished(self, key: str, node: str) -> None:
        info = self._nodes.get(node)
        if info is not None and info.in_flight:
            info.in_flight -= 1
        demand = self._demand.get(key)
        if demand is not None and demand.in_flight:
            demand.in_flight -= 1

    def copies_wanted(self, key: str, nbytes: int) -> list[str]:
        """Nodes that should load another copy of a hot model: one more copy when the in-flight
        invocations per existing host/GPU copy exceed ``copy_when_in_flight``, on the node that
        would start it soonest among those without one."""
        copies = [n for n, t in self._where.get(key, {}).items() if t in ("gpu", "host")]
        demand = self._demand.get(key, _Demand()).in_flight
        if not copies or demand <= self.copy_when_in_flight * len(copies):
            return []
        candidates = [
            (self._queue_s(info), node)
            for node, info in self._nodes.items()
            if node not in copies and info.host_capacity - info.host_used >= nbytes
        ]
        return [min(candidates)[1]] if candidates else []

    def table(self) -> tuple[int, dict[str, dict[str, str]]]:
        """The versioned residency table callers cache: (version, model key -> {node: tier})."""
        return self.version, {k: dict(v) for k, v in self._where.items() if v}
