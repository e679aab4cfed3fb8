"""The placement logic of the cluster: where each model is, and where an invocation should go.

Node caches report residency (model -> tier), their host budget and use, their task slots and
the invocations in flight per model; ``Placement`` keeps the cluster-wide table and ranks nodes
by the expected start-up time of an invocation there: GPU-resident, then host-resident, then
disk-resident, else the best node to load on (from a peer's memory when one holds the model,
else from the store), each plus the queue ahead of it. The placement actor runs one
``Placement`` with the truth; every caller runs another, rebuilt from the actor's versioned
``snapshot()``, and routes locally so that an invocation costs no extra round trip. A plain
class, no Ray. The records it takes in and hands out (reports, snapshots, routes) are in
``placement_records``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .._errors import CapacityError
from .._protocol import ASSUMED_LOAD_RATES, RecentUses
from .placement_records import (
    LOADING,
    REPORTED_TIERS,
    TIERS,
    NodeInfo,
    NodeReport,
    ReportSequence,
    Route,
    Snapshot,
    task_slots,
)

# The records are imported from here as well: what placement takes in and hands out.
__all__ = ["Placement", "NodeInfo", "NodeReport", "ReportSequence", "Route", "Snapshot", "TIERS", "LOADING", "task_slots"]


@dataclass
class Placement:
    """Cluster-wide residency, routing and copy scaling.

    Args:
        handoff_s: expected start-up of a hit, by tier (seconds).
        load_bytes_per_s: expected load rate by source: "disk" (the node's disk tier), "peer"
            (another node's host tier, over Ray's object transfer) and "store".
        load_overhead_s: fixed cost of a load into the host tier besides moving the bytes (calls,
            allocating and publishing the object), paid before the hit's own handoff.
        service_s: expected time one invocation occupies a slot, until measured per model.
        copy_when_in_flight: invocations in flight per copy above which a hot model should get
            another copy (ModelMesh-style copy scaling).
        drop_after_s: how long demand must stay low before an extra copy is dropped.
        copy_timeout_s: how long a copy placement asked for may take to load before it asks
            again (elsewhere).
        evict_horizon_s: how far ahead a load's evictions are charged: a victim costs its
            reload times the requests expected for it within this time, at its recent rate.
        clock: monotonic time source.
        wall_clock: wall-clock time source (nodes stamp recent uses with it).
    """

    handoff_s: dict[str, float] = field(
        default_factory=lambda: {"gpu": 0.002, "host": 0.01, "disk": 0.01, LOADING: 0.01}
    )
    load_bytes_per_s: dict[str, float] = field(
        default_factory=lambda: dict(ASSUMED_LOAD_RATES)
    )
    load_overhead_s: float = 0.05
    service_s: float = 0.05
    copy_when_in_flight: int = 4
    drop_after_s: float = 10.0
    copy_timeout_s: float = 60.0
    evict_horizon_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self._nodes: dict[str, NodeInfo] = {}
        # model key -> {node: best host-side tier there}; GPU copies apart, since only a task
        # with a GPU can use one (a CPU task on that node is served by the host side).
        self._where: dict[str, dict[str, str]] = {}
        self._gpu: dict[str, set[str]] = {}  # model key -> nodes with it ready on a GPU
        self._seq: dict[str, tuple[int, int]] = {}  # node -> number of its last report applied
        self._left: set[str] = set()  # nodes that left: their late reports must not re-add them
        self._key_in_flight: dict[str, dict[str, int]] = {}  # model key -> {node: in flight}
        self._service: dict[str, float] = {}  # model key -> measured seconds per invocation
        self._models: dict[str, tuple[str, str, int]] = {}
        self._scaled: dict[str, set[str]] = {}  # copies placement itself asked for
        self._low_since: dict[str, float] = {}
        self._pending: dict[str, tuple[str, float]] = {}  # model key -> (node, asked at)
        self.version = 0

    # -- membership and reports ----------------------------------------------------------------

    def node_joined(self, node: str, host_capacity: int, slots: float = 1) -> None:
        if host_capacity < 0:
            raise ValueError(f"host_capacity must be >= 0, got {host_capacity}")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self._left.discard(node)
        if node in self._nodes:
            info = self._nodes[node]
            info.host_capacity, info.slots = host_capacity, slots
            return
        self._nodes[node] = NodeInfo(host_capacity, slots=slots, last_report=self.clock())
        self.version += 1

    def node_left(self, node: str) -> None:
        """Forgets a node and everything resident on it (nothing is served from a dead node).
        Its reports are ignored from now on, late ones included, until ``node_alive``."""
        self._left.add(node)
        if self._nodes.pop(node, None) is None:
            return
        for table in (self._where, self._key_in_flight):
            for key in [k for k, per_node in table.items() if per_node.pop(node, None) is not None and not per_node]:
                del table[key]
        for key in [k for k, nodes in self._gpu.items() if node in nodes]:
            self._gpu[key].discard(node)
            if not self._gpu[key]:
                del self._gpu[key]
        for nodes in self._scaled.values():
            nodes.discard(node)
        self.version += 1

    def node_alive(self, node: str) -> None:
        """Membership (Ray) lists ``node`` alive: its reports count again. Those older than the
        last one applied before it left still do not."""
        self._left.discard(node)

    def nodes(self) -> list[str]:
        return sorted(self._nodes)

    def report(self, node: str, report: NodeReport) -> bool:
        """Replaces a node's snapshot; a node not seen before joins. Returns False, changing
        nothing, for a report older than the node's last one applied (``NodeReport.seq``) and
        for a node that left (a report sent before it died must not bring it back).

        Raises:
            ValueError: an unknown tier.
        """
        for key, tier in report.residency.items():
            if tier not in REPORTED_TIERS:
                raise ValueError(f"unknown tier {tier!r} for {key}")
        if node in self._left:
            return False
        if report.seq is not None:
            seq = tuple(report.seq)
            last = self._seq.get(node)
            if last is not None and seq <= last:
                return False
            self._seq[node] = seq
        if node not in self._nodes:
            self.node_joined(node, report.host_capacity, report.slots)
        info = self._nodes[node]
        info.host_capacity, info.slots, info.gpus = report.host_capacity, max(1, report.slots), report.gpus
        info.evictable = tuple(tuple(victim) for victim in report.evictable)
        host_side = {k: t for k, t in report.residency.items() if t != "gpu"}
        on_gpu = {k for k, t in report.residency.items() if t == "gpu"}
        on_gpu.update(k for k, t in report.gpu.items() if t == "gpu")
        changed = self._report_gpu(node, on_gpu)
        for key in [k for k, per_node in self._where.items() if node in per_node and k not in host_side]:
            del self._where[key][node]
            if not self._where[key]:
                del self._where[key]
            if key not in on_gpu:
                self._scaled.get(key, set()).discard(node)
            changed = True
        for key, tier in host_side.items():
            per_node = self._where.setdefault(key, {})
            if per_node.get(node) != tier:
                per_node[node] = tier
                changed = True
        for key in [k for k, per_node in self._key_in_flight.items() if node in per_node]:
            del self._key_in_flight[key][node]
            if not self._key_in_flight[key]:
                del self._key_in_flight[key]
        for key, count in report.in_flight.items():
            if count > 0:
                self._key_in_flight.setdefault(key, {})[node] = count
        self._models.update(report.models)
        info.host_used, info.in_flight = report.host_used, sum(report.in_flight.values())
        info.last_report = self.clock()
        if changed:
            self.version += 1
        return True

    def _report_gpu(self, node: str, on_gpu: set[str]) -> bool:
        """Replaces the set of models on ``node``'s GPUs; True if it changed."""
        changed = False
        for key in [k for k, nodes in self._gpu.items() if node in nodes and k not in on_gpu]:
            self._gpu[key].discard(node)
            if not self._gpu[key]:
                del self._gpu[key]
            changed = True
        for key in on_gpu:
            nodes = self._gpu.setdefault(key, set())
            if node not in nodes:
                nodes.add(node)
                changed = True
        return changed

    # -- what callers cache --------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return Snapshot(
            self.version,
            {k: dict(v) for k, v in self._where.items()},
            {
                n: (i.host_capacity, i.host_used, i.slots, i.in_flight, i.gpus, i.evictable)
                for n, i in self._nodes.items()
            },
            {k: tuple(sorted(v)) for k, v in self._gpu.items()},
        )

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot, *, previous: Placement | None = None, **settings) -> Placement:
        """A caller's copy of the placement actor's table, to route locally; ``previous`` (the
        copy it replaces) passes on the service times measured so far."""
        placement = cls(**settings)
        placement._where = {k: dict(v) for k, v in snapshot.where.items()}
        placement._gpu = {k: set(v) for k, v in snapshot.gpu.items()}
        for node, (capacity, used, slots, in_flight, gpus, evictable) in snapshot.nodes.items():
            placement._nodes[node] = NodeInfo(capacity, used, slots, in_flight, gpus=gpus, evictable=evictable)
        placement.version = snapshot.version
        if previous is not None:
            placement._service = previous._service
        return placement

    def at_least_in_flight(self, node: str, count: int) -> None:
        """Raises a node's in-flight figure to ``count`` (invocations a caller knows of that the
        node may not have reported yet)."""
        info = self._nodes.get(node)
        if info is not None and info.in_flight < count:
            info.in_flight = count

    def queued(self, node: str, cpus: float = 1.0, gpus: float = 0.0) -> bool:
        """Whether an invocation asking for ``cpus`` and ``gpus`` sent to ``node`` now would
        wait for a free slot."""
        info = self._nodes.get(node)
        return info is not None and info.in_flight >= task_slots(info, cpus, gpus)

    def holders(self, key: str, *, gpu: bool = True) -> dict[str, str]:
        """Node -> best tier for every node that has ``key`` (or is loading it); ``gpu``: False
        for the host side alone (what a task without a GPU can use)."""
        where = dict(self._where.get(key, {}))
        if gpu:
            where.update(dict.fromkeys(self._gpu.get(key, ()), "gpu"))
        return where

    def table(self) -> tuple[int, dict[str, dict[str, str]]]:
        """(version, model key -> {node: best tier})."""
        return self.version, {k: v for k in self.keys() if (v := self.holders(k))}

    # -- routing -------------------------------------------------------------------------------

    def route(self, key: str, nbytes: int, *, gpu: bool = True, cpus: float = 1.0, gpus: float = 0.0) -> Route:
        """The node with the least expected start-up time for an invocation of ``key``.

        ``gpu``: whether the invocation can use a copy on a GPU (a task that asks for one);
        False ranks nodes by their host side alone (host, loading, disk). ``cpus``, ``gpus``:
        what the invocation asks Ray for, which sets how many run at once on a node
        (``task_slots``): the queue ahead of it is the invocations in flight beyond those.

        Raises:
            CapacityError: no node's host tier can ever hold ``nbytes`` (before any task starts).
            LookupError: there are no nodes.
        """
        nodes = self._nodes
        if not nodes:
            raise LookupError("no nodes with a trims_ray cache")
        service = self._service.get(key, self.service_s)
        rates = self.load_bytes_per_s
        # A load pays its own overhead and the bytes' transfer, then the host tier's handoff.
        load_base = self.handoff_s["host"] + self.load_overhead_s
        best_node, best_tier, best_cost = None, None, float("inf")
        where = self.holders(key, gpu=gpu)
        has_copy = False
        if where:
            for node, tier in where.items():
                info = nodes.get(node)
                if info is None:
                    continue
                if tier == "disk":
                    cost = load_base + nbytes / rates["disk"]
                elif tier == LOADING:  # about half of it still to come, on average
                    cost = self.handoff_s["host"] + 0.5 * nbytes / rates["store"]
                else:
                    cost = self.handoff_s[tier]
                    has_copy = True
                cost += (info.in_flight // task_slots(info, cpus, gpus)) * service
                if cost < best_cost:
                    best_node, best_tier, best_cost = node, tier, cost
        # Loading on a node without it: from a peer's memory when one holds it, else the store.
        load_cost = load_base + nbytes / rates["peer" if has_copy else "store"]
        if load_cost < best_cost:
            for node, info in nodes.items():
                if info.host_capacity < nbytes or node in where:
                    continue
                cost = load_cost + (info.in_flight // task_slots(info, cpus, gpus)) * service
                if cost >= best_cost:
                    continue  # what it would evict only adds to that
                evicting = self.eviction_cost(info, nbytes)
                # What it would evict costs their expected reloads; a node that cannot make room
                # (everything leased) would serve it without keeping it: a load the next one pays again.
                cost += load_cost if evicting is None else evicting
                must_evict = info.host_capacity - info.host_used < nbytes
                if must_evict and any(tier != "disk" for tier in where.values()):
                    # A second copy in memory, for a queue, holds its bytes long after the queue
                    # is gone (copy scaling adds copies for lasting demand): one more load.
                    cost += load_cost
                if cost < best_cost:
                    best_node, best_tier, best_cost = node, None, cost
        if best_node is None:
            largest = max(i.host_capacity for i in nodes.values())
            raise CapacityError(
                f"model {key} needs {nbytes} bytes, more than any node's host tier can hold "
                f"(largest: {largest}): raise the host budget or add a bigger node"
            )
        return Route(best_node, best_tier, best_cost)

    def eviction_cost(self, info: NodeInfo, nbytes: int) -> float | None:
        """The reloads a load of ``nbytes`` on this node is expected to cause (seconds): the
        models it reported evicting first, until the load fits, each its load from the store
        times the requests expected for it within ``evict_horizon_s`` at its recent rate
        there; charged pro rata to the bytes the load takes of those it frees (the last victim
        usually frees more than needed, and what is left serves the next load). 0 when it fits
        already; None when what the node can evict is not enough."""
        free = info.host_capacity - info.host_used
        if free >= nbytes:
            return 0.0
        now, cost, freed = self.wall_clock(), 0.0, 0
        reload_base = self.handoff_s["host"] + self.load_overhead_s
        for _key, size, count, at in info.evictable:
            asked = RecentUses(count, at).per_s(now) * self.evict_horizon_s
            cost += asked * (reload_base + size / self.load_bytes_per_s["store"])
            freed += size
            if free + freed >= nbytes:
                return cost * (nbytes - free) / freed
        return None

    def started(self, key: str, node: str) -> None:
        """An invocation of ``key`` was sent to ``node`` (counts until ``finished``)."""
        info = self._nodes.get(node)
        if info is not None:
            info.in_flight += 1
        per_node = self._key_in_flight.setdefault(key, {})
        per_node[node] = per_node.get(node, 0) + 1

    def finished(self, key: str, node: str | None, seconds: float | None = None) -> None:
        """An invocation ended on ``node`` (None: counted as ended already); ``seconds``, the
        time it occupied its slot when known, refines the model's service time."""
        info = self._nodes.get(node) if node is not None else None
        if info is not None and info.in_flight:
            info.in_flight -= 1
        per_node = self._key_in_flight.get(key)
        if per_node and per_node.get(node):
            per_node[node] -= 1
        if seconds is not None and seconds >= 0:
            old = self._service.get(key)
            self._service[key] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def loading(self, key: str, node: str, nbytes: int = 0) -> None:
        """Marks ``key`` as loading on ``node`` until the node's next report says otherwise, so
        that the caller's next invocations join that load instead of starting another; with
        ``nbytes``, the load's bytes count as used there and what it evicts as gone, so that
        the caller's next load does not count on the same room."""
        info = self._nodes.get(node)
        if info is None:
            return
        if node not in self._where.get(key, {}) and nbytes > 0:
            info.host_used += nbytes
            victims = list(info.evictable)
            while victims and info.host_capacity - info.host_used < 0:
                _victim, size, _count, _at = victims.pop(0)
                info.host_used -= size
            info.evictable = tuple(victims)
        self._where.setdefault(key, {}).setdefault(node, LOADING)

    # -- copies of hot models ------------------------------------------------------------------

    def demand(self, key: str) -> int:
        return sum(self._key_in_flight.get(key, {}).values())

    def copies(self, key: str) -> list[str]:
        return sorted(n for n, t in self.holders(key).items() if t in ("gpu", "host"))

    def copies_wanted(self, key: str, nbytes: int) -> list[str]:
        """Nodes that should load another copy of a hot model: one more copy when the in-flight
        invocations per existing host/GPU copy exceed ``copy_when_in_flight``, on the node that
        would start it soonest among those with room and without one."""
        copies = self.copies(key)
        pending = self._pending.get(key)
        if pending is not None:
            node, asked = pending
            if node in copies or node not in self._nodes or self.clock() - asked > self.copy_timeout_s:
                del self._pending[key]
            else:
                return []  # one copy at a time: wait for the last one to land
        demand = self.demand(key)
        if not copies or demand <= self.copy_when_in_flight * len(copies):
            return []
        busy = set(self.holders(key))
        candidates = [
            (info.in_flight / info.slots, node)
            for node, info in self._nodes.items()
            if node not in busy and info.host_capacity - info.host_used >= nbytes
        ]
        return [min(candidates)[1]] if candidates else []

    def copy_made(self, key: str, node: str) -> None:
        """Records that ``node`` was asked for a copy by scaling (only those are dropped)."""
        self._scaled.setdefault(key, set()).add(node)
        self._pending[key] = (node, self.clock())
        self._low_since.pop(key, None)

    def copies_unwanted(self, key: str) -> list[str]:
        """Scaled copies to drop: demand has fitted in one copy fewer, with room to spare, for
        ``drop_after_s``. Copies a user prefetched, or that routing loaded, are left to the
        node's eviction policy. Proposed until ``copy_dropped`` says it is done."""
        scaled = [n for n in self.copies(key) if n in self._scaled.get(key, ())]
        copies = self.copies(key)
        if not scaled or len(copies) < 2:
            self._low_since.pop(key, None)
            return []
        if self.demand(key) * 2 > self.copy_when_in_flight * (len(copies) - 1):
            self._low_since.pop(key, None)
            return []
        now = self.clock()
        since = self._low_since.setdefault(key, now)
        if now - since < self.drop_after_s:
            return []
        per_node = self._key_in_flight.get(key, {})
        return [min(scaled, key=lambda n: (per_node.get(n, 0), n))]

    def copy_dropped(self, key: str, node: str) -> None:
        """A scaled copy is dropped (or left to the node's policy): scaling forgets it."""
        self._scaled.get(key, set()).discard(node)
        self._low_since.pop(key, None)

    def keys(self) -> list[str]:
        return list(dict.fromkeys([*self._where, *self._gpu]))

    def model_of(self, key: str) -> tuple[str, str, int] | None:
        """(tenant, name, nbytes) of a model that resolves to ``key``, to ask a node to load it."""
        return self._models.get(key)
