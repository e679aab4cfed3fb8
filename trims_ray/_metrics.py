"""Every trims_ray metric, defined in one place and recorded through ``ray.util.metrics``: Ray's
metrics agent serves them on each node's metrics export port (``/metrics``) with its own
``ray_`` prefix, next to Ray's metrics, and counters gain Prometheus' ``_total`` suffix.

Who records what, never with an actor call of its own (a record is a local call into Ray's
core worker, 10-20 us with five tags), and never on the invocation path itself:

- the node cache actor, from its reporter thread: per-tier counters as the growth of NodeCache's
  ``TierStats`` since the last export, gauges of bytes, capacity, models and leases, and one
  load-latency sample per load from the cache's bounded queue of load events;
- the GPU holder, from its reaper thread: the same for tier "gpu";
- each caller process (its Router): one routing decision per invocation, and each invocation's
  latency, end to end at the caller (submit to result), batched in plain Python and handed to
  Ray by a background thread every second;
- the placement actor: the copies of hot models it asks for, and drops (batched the same way).

No metric carries a ``model`` label unless the cluster's ``CacheConfig.metrics_per_model`` asks
for it (each process learns it through ``set_per_model``): a label per model multiplies a
histogram's series by the number of models, which with thousands of models is millions of
series, so Ray Serve leaves it off too. ``tenant`` stays: tenants are few.

Metrics must never break the data path: exporting functions log and swallow their errors, and a
process where Ray's metrics cannot be created (no core worker) simply records nothing.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

__all__ = [
    "LOAD_SECONDS_BUCKETS",
    "INVOCATION_SECONDS_BUCKETS",
    "TIER_COUNTERS",
    "export_tiers",
    "export_node_cache",
    "export_gpu_tier",
    "record_route",
    "record_decision",
    "record_invocation",
    "flush",
    "set_per_model",
    "per_model",
]

log = logging.getLogger("trims_ray")

# Loads read a blob of a few MB to a few GB from disk, a peer or a cloud store: from a few ms to
# minutes.
LOAD_SECONDS_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
# An invocation on a warm model takes about a millisecond of overhead plus the model's compute;
# a cold one pays a load as well.
INVOCATION_SECONDS_BUCKETS = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
]  # fmt: skip

# TierStats counters exported as Prometheus counters, with the help text of each.
TIER_COUNTERS = {
    "hits": "Requests for a model that found it ready in the tier (count).",
    "misses": "Requests for a model the tier did not have ready: it was loaded, or the request "
    "joined a load in flight (count).",
    "loads": "Models loaded into the tier (count).",
    "evictions": "Models the tier's policy evicted to make room, or evicted on request (count).",
    "bypasses": "Misses served without keeping the model, because the tier's admission policy "
    "refused it (count).",
    "quota_denials": "Loads refused, or disk copies skipped, to keep a tenant within its quota (count).",
    "scrubbed": "Resident copies re-hashed against their manifest by scrub (count).",
    "corrupt": "Resident copies scrub found changed and dropped (count).",
    "errors": "Tier reads or writes that failed: disk full, directory deleted, a bad file (count).",
}
# TierStats fields exported as gauges: field -> (metric name, help text).
_TIER_GAUGES = {
    "bytes_used": ("trims_ray_tier_used_bytes", "Bytes the tier holds on the node, loads in flight included (bytes)."),
    "capacity": ("trims_ray_tier_capacity_bytes", "The tier's byte budget on the node (bytes)."),
    "models": ("trims_ray_tier_models", "Models resident in the tier on the node (count)."),
}
_TIER_TAGS = ("node", "tier")
# Each of these gains a "model" tag only where metrics_per_model is on.
_LOAD_TAGS = ("node", "source", "tenant")
_ROUTE_TAGS = ("node", "decision", "tier", "tenant")
_INVOCATION_TAGS = ("node", "tenant")


class _Metrics:
    """The metric objects of this process (Ray registers each with the process's core worker).

    Args:
        per_model: whether the load, routing and invocation metrics carry a ``model`` tag. Ray
            fixes a metric's tag keys when it is created, so this is decided once per process.
    """

    def __init__(self, per_model: bool = False) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.per_model = per_model
        model = ("model",) if per_model else ()

        self.tier_counters = {
            field: Counter(f"trims_ray_tier_{field}", description=help_text, tag_keys=_TIER_TAGS)
            for field, help_text in TIER_COUNTERS.items()
        }
        self.tier_gauges = {
            field: Gauge(name, description=help_text, tag_keys=_TIER_TAGS)
            for field, (name, help_text) in _TIER_GAUGES.items()
        }
        self.leases = Gauge(
            "trims_ray_leases",
            description="Leases held now on the tier's models; a leased model is never evicted (count).",
            tag_keys=_TIER_TAGS,
        )
        self.load_seconds = Histogram(
            "trims_ray_load_seconds",
            description="Time to read and verify a model's blob from its source (disk, peer or "
            "store) into the host tier; tenant is the model's owner (seconds).",
            boundaries=LOAD_SECONDS_BUCKETS,
            tag_keys=_LOAD_TAGS + model,
        )
        self.loaded_bytes = Counter(
            "trims_ray_loaded_bytes",
            description="Bytes loaded into the host tier, by source: disk, peer or store; tenant is "
            "the model's owner (bytes).",
            tag_keys=_LOAD_TAGS + model,
        )
        self.routing_decisions = Counter(
            "trims_ray_routing_decisions",
            description="Routing decisions (count). decision: hit (sent to a node that has the model "
            "in the tier named by tier, or is loading it), miss (sent to a node that must load it; "
            "tier none), copy (placement asked the node to load another copy of a hot model), "
            "drop (placement dropped such a copy). tenant: the caller's (hit, miss) or the "
            "model's (copy, drop).",
            tag_keys=_ROUTE_TAGS + model,
        )
        self.invocation_seconds = Histogram(
            "trims_ray_invocation_seconds",
            description="Latency of a @trims_ray.function invocation, end to end at the caller: "
            "from submission to its result existing, queueing, lease, load and the user function "
            "included (seconds).",
            boundaries=INVOCATION_SECONDS_BUCKETS,
            tag_keys=_INVOCATION_TAGS + model,
        )


_lock = threading.Lock()
_metrics: _Metrics | None = None
_unavailable = False
_per_model = False


def set_per_model(enabled: bool) -> None:
    """Sets whether this process's load, routing and invocation metrics carry a ``model`` label
    (``CacheConfig.metrics_per_model``). The actors call it when they start and each caller
    when it first routes, before their first record: Ray fixes a metric's tag keys when the
    metric is created (on the first record), so a later change is logged and ignored until the
    process restarts.

    Raises:
        TypeError: ``enabled`` is not a bool.
    """
    global _per_model
    if not isinstance(enabled, bool):
        raise TypeError(f"metrics_per_model must be a bool, got {type(enabled).__name__}")
    with _lock:
        _per_model = enabled
        if _metrics is not None and _metrics.per_model != enabled:
            log.warning(
                "trims_ray: this process's metrics were created %s a model label; "
                "metrics_per_model=%s takes effect when the process restarts",
                "with" if _metrics.per_model else "without",
                enabled,
            )


def per_model() -> bool:
    """Whether this process's metrics carry a ``model`` label (once they exist, what they were
    created with; before, what ``set_per_model`` last said, False by default)."""
    with _lock:
        return _metrics.per_model if _metrics is not None else _per_model


def _get() -> _Metrics | None:
    """This process's metrics, created on first use; None where Ray cannot record them."""
    global _metrics, _unavailable
    if _metrics is not None or _unavailable:
        return _metrics
    with _lock:
        if _metrics is None and not _unavailable:
            try:
                _metrics = _Metrics(per_model=_per_model)
            except Exception as exc:  # e.g. a Ray client process, which has no core worker
                _unavailable = True
                log.info("trims_ray: metrics are off in this process: %s", exc)
    return _metrics


def _with_model(tags: dict[str, str], model: str, metrics: _Metrics) -> dict[str, str]:
    """``tags``, plus the model where these metrics were created with a model label."""
    if metrics.per_model:
        tags["model"] = model
    return tags


# -- tiers (node cache actor, GPU holder) ------------------------------------------------------


# Gauges are set again this often even when unchanged, so that a value Ray's export lost comes
# back (once here a node actor's gauges, each set once, never appeared on /metrics; not
# reproduced since, cause unknown).
_GAUGE_REFRESH_S = 2.0


class _Exported:
    """What one owner (a NodeCache, a GpuTier) last exported: counters grow only by the delta,
    and a gauge is set when it changed or ``_GAUGE_REFRESH_S`` passed (the node cache's reporter
    may run many times a second)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, str], int] = {}
        self.gauges: dict[tuple[str, str], int] = {}
        self.gauges_refreshed = float("-inf")


_exported: weakref.WeakKeyDictionary[Any, _Exported] = weakref.WeakKeyDictionary()


def _state(owner: object) -> _Exported:
    with _lock:
        state = _exported.get(owner)
        if state is None:
            state = _exported[owner] = _Exported()
        return state


def export_tiers(
    owner: object,
    node_id: str,
    tiers: Mapping[str, Any],
    leases: Mapping[str, int],
    load_events: deque | None = None,
) -> None:
    """Exports cumulative tier counters as metrics: each counter grows by what ``owner``'s
    counter grew since its last export; gauges take the current values.

    Args:
        owner: whose counters these are (the last exported values are kept per owner, weakly).
        node_id: the node (hex).
        tiers: tier name -> TierStats (or its ``asdict``).
        leases: tier name -> leases held there now.
        load_events: a deque of ``(source, tenant, name, nbytes, seconds)``, one per load; it is
            emptied (``popleft`` is safe while a loader appends).

    Never raises: a failure is logged at debug level and the calling thread goes on.
    """
    try:
        metrics = _get()
        if metrics is None:
            if load_events is not None:
                load_events.clear()
            return
        state = _state(owner)
        with state.lock:
            now = time.monotonic()
            if now - state.gauges_refreshed >= _GAUGE_REFRESH_S:
                state.gauges.clear()
                state.gauges_refreshed = now
            for tier, stats in tiers.items():
                values = asdict(stats) if is_dataclass(stats) else dict(stats)
                tags = {"node": node_id, "tier": tier}
                for field, counter in metrics.tier_counters.items():
                    value = int(values.get(field, 0))
                    last = state.counters.get((tier, field), 0)
                    # A smaller value means the counters started again (a new cache): all of
                    # it is new.
                    grown = value - last if value >= last else value
                    if grown > 0:
                        counter.inc(grown, tags)
                    state.counters[(tier, field)] = value
                gauges = [(field, gauge, values.get(field, 0)) for field, gauge in metrics.tier_gauges.items()]
                gauges.append(("leases", metrics.leases, leases.get(tier, 0)))
                for field, gauge, value in gauges:
                    if state.gauges.get((tier, field)) != int(value):
                        gauge.set(int(value), tags)
                        state.gauges[(tier, field)] = int(value)
        while load_events:
            try:
                source, tenant, name, nbytes, seconds = load_events.popleft()
            except IndexError:
                break
            tags = _with_model({"node": node_id, "source": source, "tenant": tenant}, name, metrics)
            metrics.load_seconds.observe(float(seconds), tags)
            if nbytes > 0:
                metrics.loaded_bytes.inc(int(nbytes), tags)
    except Exception:
        log.debug("trims_ray: metrics export failed", exc_info=True)


def export_node_cache(node_id: str, cache: Any) -> None:
    """Exports a NodeCache's host and disk tiers and its loads (the node cache actor's reporter
    thread calls this on every round). Never raises."""
    try:
        stats = cache.stats()
        leases = {"host": cache.leases()}
        events = getattr(cache, "load_events", None)
    except Exception:
        log.debug("trims_ray: node cache stats for metrics failed", exc_info=True)
        return
    export_tiers(cache, node_id, stats, leases, events)


def export_gpu_tier(node_id: str, tier: Any) -> None:
    """Exports one GPU holder's tier as tier "gpu" (the holder's reaper thread calls this; a
    node with several GPUs has one series per holder process, told apart by Ray's WorkerId
    label, so dashboards sum by node and tier). Never raises."""
    try:
        stats = {"gpu": tier.stats()}
        leases = {"gpu": tier.leases()}
    except Exception:
        log.debug("trims_ray: GPU tier stats for metrics failed", exc_info=True)
        return
    export_tiers(tier, node_id, stats, leases)


# -- callers and placement ---------------------------------------------------------------------

# How often a process hands its routing decisions and invocation latencies to Ray. Ray's own
# core worker reports to the node's agent only every few seconds, so a second adds little delay.
FLUSH_S = 1.0
# Latencies waiting for the flush; beyond this (a flusher that cannot keep up) the oldest go.
_MAX_PENDING_LATENCIES = 100_000


class _CallerBatch:
    """Routing decisions and invocation latencies of this process. The invocation path only
    bumps a dict entry or appends to a deque (well under a microsecond); a daemon thread hands
    them to Ray every ``FLUSH_S``, because one Ray record with five tags costs 10-20 us, which
    the route step of a call (about 30 us) would notice."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._decisions: dict[tuple[str, str, str, str, str], int] = {}
        self._latencies: deque[tuple[str, str, str, float]] = deque(maxlen=_MAX_PENDING_LATENCIES)
        self._flusher: threading.Thread | None = None

    def decision(self, labels: tuple[str, str, str, str, str]) -> None:
        with self._lock:
            self._decisions[labels] = self._decisions.get(labels, 0) + 1
            if self._flusher is None:
                self._start()

    def latency(self, node: str, tenant: str, model: str, seconds: float) -> None:
        self._latencies.append((node, tenant, model, seconds))
        if self._flusher is None:
            with self._lock:
                if self._flusher is None:
                    self._start()

    def _start(self) -> None:
        self._flusher = threading.Thread(target=self._flush_forever, name="trims-metrics", daemon=True)
        self._flusher.start()
        atexit.register(self.flush)  # runs before Ray's own exit handler (registered earlier)

    def _flush_forever(self) -> None:
        while True:
            time.sleep(FLUSH_S)
            self.flush()

    def flush(self) -> None:
        """Records what is pending in Ray's metrics now. Never raises."""
        with self._lock:
            decisions, self._decisions = self._decisions, {}
        try:
            metrics = _get()
            if metrics is not None:
                # Without a model label, the decisions of every model add up to one record.
                counts: dict[tuple[tuple[str, str], ...], int] = {}
                for (node, decision, tier, tenant, model), count in decisions.items():
                    tags = {"node": node, "decision": decision, "tier": tier, "tenant": tenant}
                    labels = tuple(_with_model(tags, model, metrics).items())
                    counts[labels] = counts.get(labels, 0) + count
                for labels, count in counts.items():
                    metrics.routing_decisions.inc(count, dict(labels))
            while self._latencies:
                try:
                    node, tenant, model, seconds = self._latencies.popleft()
                except IndexError:
                    break
                if metrics is not None:
                    tags = _with_model({"node": node, "tenant": tenant}, model, metrics)
                    metrics.invocation_seconds.observe(seconds, tags)
        except Exception:
            log.debug("trims_ray: metrics flush failed", exc_info=True)


_batch = _CallerBatch()


def record_decision(node: str, decision: str, tier: str | None, tenant: str, model: str) -> None:
    """Counts one routing decision (see the metric's help for the decisions)."""
    _batch.decision((node, decision, tier or "none", tenant, model))


def record_route(node: str, tier: str | None, tenant: str, model: str) -> None:
    """Counts a caller's routing of one invocation: a hit where the node has the model in some
    tier (or is loading it), a miss where it must load it (``tier`` None)."""
    _batch.decision((node, "miss" if tier is None else "hit", tier or "none", tenant, model))


def record_invocation(node: str, tenant: str, model: str, seconds: float) -> None:
    """Records one invocation's latency, end to end at the caller."""
    _batch.latency(node, tenant, model, seconds)


def flush() -> None:
    """Hands this process's pending routing decisions and latencies to Ray now (tests, and
    processes about to exit)."""
    _batch.flush()
