"""The GPU holder actor: a thin Ray wrapper that gives a GpuTier its CUDA device, host bytes
leased from the node cache actor, a lease reaper, and the calls tasks make.

One per GPU per node, named ``trims_ray:gpu:<node id>:<Ray's GPU id>`` in namespace
"trims_ray", pinned to its node, detached. It reserves no GPU (``num_gpus=0``: the GPU stays
the tasks'); its environment names its GPU by UUID (``_gpu_ipc.holder_env``) so that it sees
exactly that GPU as ``cuda:0``. Without a usable GPU it still starts, and says why in ``stats``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import asdict, replace

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .._config import check_budget
from .._errors import TrimsError
from .._gc import freeze_startup_objects
from .._gpu_ipc import DeviceIdentity, holder_env, node_gpus
from .._malloc import ACTOR_ENV
from .._manifest import Manifest
from .._manifest_cache import ManifestCache
from .._metrics import export_gpu_tier
from .._raycalls import call, get
from .._nvml import GpuInfo, inventory, uuid_matches
from .._store import ModelStore
from ..cache.gpu_tier import GpuTier, GpuTierConfig, off_stats
from ._budgets import with_recorded_gpu_budget
from ._naming import NAMESPACE, forget_node_cache_actor, gpu_tier_actor_name, node_cache_actor
from .._protocol import STORE, Caller, GpuGrant, Holder, Resolved, cache_key

__all__ = [
    "gpu_tier_actor_name",
    "start_gpu_tier_actor",
    "start_gpu_tier_actors",
    "combine_gpu_stats",
    "node_gpu_stats",
    "node_gpu_residency",
    "GpuTierActor",
]

log = logging.getLogger("trims_ray")

# Enough threads that tasks waiting on a swap-in do not block hits on other models.
_ACTOR_CONCURRENCY = 64


def start_gpu_tier_actor(
    node_id: str,
    label: str,
    uuid: str,
    store_uri: str,
    storage_options: dict | None,
    config: GpuTierConfig,
) -> ray.actor.ActorHandle:
    """Gets or creates the holder of one GPU (returns at once; it starts on its node)."""
    return (
        ray.remote(GpuTierActor)
        .options(
            name=gpu_tier_actor_name(node_id, label),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            num_gpus=0,  # the GPU's memory is shared with, not taken from, the tasks
            max_concurrency=_ACTOR_CONCURRENCY,
            max_restarts=-1,
            max_task_retries=2,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            runtime_env={"env_vars": {**ACTOR_ENV, **holder_env(uuid)}},  # see _malloc
        )
        .remote(node_id, label, uuid, store_uri, storage_options, config)
    )


def start_gpu_tier_actors(
    node_id: str,
    store_uri: str,
    storage_options: dict | None,
    config: GpuTierConfig,
    *,
    visible: str | None,
    ray_gpus: int | None,
) -> tuple[dict[str, ray.actor.ActorHandle], str]:
    """Starts a holder for every GPU Ray manages on this node; call it ON that node (the node
    cache actor does), since NVML answers for the node it runs on.

    Args:
        visible: ``CUDA_VISIBLE_DEVICES`` as the raylet has it (``os.environ.get`` in a
            ``num_gpus=0`` actor).
        ray_gpus: the node's "GPU" resource from ``ray.nodes()``.

    Returns:
        ({Ray's GPU id: holder}, "") or ({}, why the GPU tier is off on this node).
    """
    gpus, reason = node_gpus(visible, inventory(), ray_gpus)
    handles = {
        label: start_gpu_tier_actor(node_id, label, gpu.uuid, store_uri, storage_options, config) for label, gpu in gpus
    }
    return handles, reason


def combine_gpu_stats(per_gpu: dict[str, dict], reason: str = "") -> dict:
    """A node's GPU tier from its holders' ``stats()``: the counters summed into one "gpu"
    TierStats (as a dict), each GPU's own stats, and whether the tier is on (and why not).

    Args:
        per_gpu: Ray's GPU id -> that holder's ``stats()``.
        reason: why the node has no holders ("" when it has some).
    """
    total = asdict(off_stats())
    for stats in per_gpu.values():
        for counter, value in stats["tiers"]["gpu"].items():
            total[counter] += value
    enabled = any(s["enabled"] for s in per_gpu.values())
    why = reason or "; ".join(s["reason"] for s in per_gpu.values() if s["reason"])
    return {"enabled": enabled, "reason": "" if enabled else why, "tier": total, "gpus": per_gpu}


def node_gpu_stats(holders: dict[str, ray.actor.ActorHandle], reason: str, timeout_s: float = 5.0) -> dict:
    """``combine_gpu_stats`` of the holders of one node (a holder that does not answer within
    ``timeout_s`` is reported off, with the error as its reason)."""
    refs = {label: holder.stats.remote() for label, holder in holders.items()}
    per_gpu = {}
    for label, ref in refs.items():
        try:
            per_gpu[label] = get(ref, timeout=timeout_s)
        except Exception as exc:  # a dead or busy holder must not break the node's stats
            per_gpu[label] = {"enabled": False, "reason": f"GPU {label}: holder unreachable ({exc})",
                              "tiers": {"gpu": asdict(off_stats())}, "device": {}, "leases": 0}
    return combine_gpu_stats(per_gpu, reason)


def node_gpu_residency(holders: dict[str, ray.actor.ActorHandle], timeout_s: float = 5.0) -> dict[str, str]:
    """``cache_key`` -> "gpu" for every model ready on one of the node's GPUs, to merge into the
    node's residency report (placement ranks "gpu" first)."""
    refs = [holder.report.remote() for holder in holders.values()]
    residency: dict[str, str] = {}
    for ref in refs:
        try:
            report = get(ref, timeout=timeout_s)
        except Exception:  # an unreachable holder serves nothing: report nothing for it
            continue
        residency.update({k: t for k, t in report.get("residency", {}).items() if t == "gpu"})
    return residency


class _NodeHostSource:
    """HostSource on the node cache actor: a swap-in holds a host lease on the model's plasma
    object for as long as it copies, under this process's own Holder."""

    def __init__(self, node_id: str, store: ModelStore) -> None:
        self.node_id = node_id
        self.store = store

    def _node(self) -> ray.actor.ActorHandle:
        return node_cache_actor(self.node_id)

    # -- the calls to the node's cache (over Ray; a test makes them in its own process) --------

    def _acquire(self, manifest: Manifest, hint: Resolved):
        try:
            return call(self._node().acquire.remote(manifest.name, manifest.tenant, Holder.this_process(), None, hint))
        except ray.exceptions.RayActorError:
            forget_node_cache_actor(self.node_id)  # replaced since: look it up again next time
            raise

    def _object(self, grant) -> np.ndarray:
        return get(grant.ref)

    def _release(self, lease_id: int | str) -> None:
        self._node().release.remote(lease_id)

    def _held(self, key: str) -> Manifest | None:
        return call(self._node().held_manifest.remote(key))

    # -- HostSource ------------------------------------------------------------------------------

    def held_manifest(self, key: str) -> Manifest | None:
        """The manifest of the node's host copy under ``key`` (``NodeCache.held_manifest``), or
        None: no copy there, or the node's cache cannot be asked now."""
        try:
            return self._held(key)
        except (ray.exceptions.RayError, TrimsError) as exc:  # TrimsError: no such actor now
            forget_node_cache_actor(self.node_id)  # replaced since, perhaps: look it up again
            log.debug("trims_ray: node cache %s not asked for %s: %s", self.node_id, key, exc)
            return None

    @contextlib.contextmanager
    def open(self, manifest: Manifest) -> Iterator[tuple[np.ndarray, str]]:
        # The hint spares the node a resolution of the name: its host copy, if it has one,
        # is of this very manifest. Asked as the manifest's owner, which may see it.
        grant = self._acquire(manifest, Resolved.of(manifest))
        if grant.bypass or grant.manifest.sha256 != manifest.sha256:
            # Bypass: the host tier's policy did not keep it. Another blob: the name was
            # re-registered since this holder resolved it, and the node (holding no copy of
            # this one) served what the name means now. The task asked before the register,
            # so it gets the manifest it was resolved to, as a hint is served (the store
            # keeps every blob): read here, verified, for this copy only.
            if not grant.bypass:
                self._release(grant.lease_id)
            buffer, _ = self.store.read(manifest)
            yield buffer, STORE
            return
        try:
            obj = self._object(grant)
            offset = grant.offset
            yield obj[offset : offset + manifest.nbytes], grant.tier
        finally:
            obj = None  # the plasma mapping must be gone before the object can be freed
            self._release(grant.lease_id)


class GpuTierActor:
    """Ray actor body around GpuTier for one GPU (made remote with ``start_gpu_tier_actor``).

    Args:
        node_id: the node (hex).
        label: Ray's id of the GPU on the node ("0", ...).
        uuid: the GPU's UUID; the actor's ``cuda:0`` must be this GPU.
        store_uri, storage_options: the model store (names are resolved here, per tenant).
        config: budget, policy, and how long a resolved manifest is trusted
            (``config.manifest_ttl_s``: the node cache passes its CacheConfig's).
        manifest_ttl_s: overrides ``config.manifest_ttl_s``.
    """

    def __init__(
        self,
        node_id: str,
        label: str,
        uuid: str,
        store_uri: str,
        storage_options: dict | None,
        config: GpuTierConfig,
        manifest_ttl_s: float | None = None,
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.store = ModelStore(store_uri, storage_options=storage_options)
        ttl_s = config.manifest_ttl_s if manifest_ttl_s is None else manifest_ttl_s
        self.manifests = ManifestCache(lambda name, tenant: self.store.manifest(name, tenant=tenant), ttl_s)
        # Swap-ins read the node's host tier, whose copies also vouch for a task's hint.
        self.host = _NodeHostSource(node_id, self.store)
        gpu = inventory().by_uuid(uuid)
        index = gpu.index if gpu is not None else (int(label) if label.isdigit() else 0)
        self.identity = DeviceIdentity(uuid, index, label, node_id)
        self.gpu: GpuInfo | None = gpu
        self.tier: GpuTier | None = None
        self.reason = ""
        try:
            from .._cuda import CudaDevice  # CUDA only where a holder runs

            device = CudaDevice(0)
            seen = device.uuid()
            if seen is not None and not uuid_matches(uuid, seen):
                raise TrimsError(f"the holder's cuda:0 is {seen}, not {uuid}: CUDA_VISIBLE_DEVICES was overridden")
            # A GPU budget changed since ``config`` was given (``set_budget``): this holder may
            # be one Ray restarted, or one started on a node that joined after the change.
            self.config = config = with_recorded_gpu_budget(config, node_id, device.memory().total)
            self.tier = GpuTier(device=device, identity=self.identity, host=self.host, config=config)
        except TrimsError as exc:
            self.reason = f"GPU {label}: {exc}"
            log.warning("trims_ray: GPU tier off on node %s: %s", node_id, self.reason)
        self._stop = threading.Event()
        if self.tier is not None:
            threading.Thread(target=self._reap_forever, name="trims-gpu-reaper", daemon=True).start()
            self.manifests.start_refreshing(self._stop)
        freeze_startup_objects()  # what Ray's node-wide gc.collect would walk for nothing (``_gc``)

    def _reap_forever(self) -> None:
        while not self._stop.wait(self.config.lease_check_s):
            self.tier.reap()
            export_gpu_tier(self.node_id, self.tier)  # Ray metrics, tier "gpu"; never raises

    def _resolve(self, name: str, tenant: str, hint: Resolved | None = None) -> Manifest:
        """The manifest ``name`` means for ``tenant``: what this holder resolved lately, else the
        task's ``hint`` when this GPU or the node's host tier holds that very manifest (a miss
        swapped in from the host tier resolves nothing), else resolved here."""
        return self.manifests.get(name, tenant, hint=hint, held=self._held_manifest)

    def _held_manifest(self, key: str) -> Manifest | None:
        on_gpu = self.tier.held_manifest(key) if self.tier is not None else None
        return on_gpu if on_gpu is not None else self.host.held_manifest(key)

    # -- the calls tasks make ------------------------------------------------------------------

    def ping(self) -> str:
        return self.identity.uuid

    def acquire(
        self,
        name: str,
        tenant: str,
        holder: Holder | None,
        lease_id: str | None = None,
        pipelined: bool = False,
        hint: Resolved | None = None,
    ) -> GpuGrant | None:
        """Leases a model on this GPU for ``holder`` (a task's process on this node), swapping it
        in on a miss. None when the GPU tier is off here, and a bypass grant when the GPU has
        no room for it now (leased, swapping in, or other processes' memory): the task uses the
        host tier either way, rather than failing for a busy GPU.
        ``hint``: what the task's caller resolved ``name`` to (checked, see ``_resolve``).

        Raises:
            TypeError: a Caller as holder (a GPU lease is held by the task that maps it).
            CapacityError: the model cannot fit this GPU's budget at all.
            ModelNotFoundError, IntegrityError: as GpuTier.acquire.
        """
        if isinstance(holder, Caller):
            raise TypeError("a GPU lease is held by the task's own process (Holder), not by its caller")
        if self.tier is None:
            return None
        manifest = self._resolve(name, tenant, hint)
        return self.tier.acquire(manifest, holder, lease_id, pipelined=pipelined, bypass_when_busy=True)

    def claim(self, lease_id: int | str, holder: Holder) -> bool:
        return self.tier is not None and self.tier.claim(lease_id, holder)

    def release(self, lease_id: int | str) -> bool:
        return self.tier is not None and self.tier.release(lease_id)

    def evict(self, name: str, tenant: str) -> str:
        """"evicted", "deferred" (leased: goes on release), "absent" (or the tier is off)."""
        if self.tier is None:
            return "absent"
        return self.tier.evict(cache_key(self._resolve(name, tenant)))

    def set_budget(self, nbytes: int) -> dict[str, int]:
        """Changes this GPU's budget now (``GpuTier.set_budget``); with the tier off, only the
        config a later start would use.

        Raises:
            ValueError: not a non-negative int, or more than the GPU's memory.
        """
        if self.tier is None:
            result = {"budget": check_budget(nbytes, "the GPU budget"), "bytes_used": 0, "evicted": 0, "over_budget": 0}
        else:
            result = self.tier.set_budget(nbytes)
        self.config = replace(self.config, budget_bytes=nbytes)
        return result

    def prefetch(self, name: str, tenant: str) -> str:
        """Swaps a model in ahead of traffic; returns where it was found ("gpu", "host", ...).

        Raises:
            TrimsError: the GPU tier is off here.
        """
        if self.tier is None:
            raise TrimsError(f"cannot prefetch onto GPU {self.identity.label} of node {self.node_id}: {self.reason}")
        return self.tier.prefetch(self._resolve(name, tenant))

    def stats(self) -> dict:
        """This GPU's tier counters, device identity and memory, and whether the tier is on."""
        device = {"uuid": self.identity.uuid, "label": self.identity.label, "index": self.identity.index}
        if self.tier is None:
            return {"enabled": False, "reason": self.reason, "tiers": {"gpu": asdict(off_stats())},
                    "device": device, "leases": 0}
        memory = self.tier.device.memory()
        return {
            "enabled": True,
            "reason": "",
            "tiers": {"gpu": asdict(self.tier.stats())},
            "device": {**device, "name": self.gpu.name if self.gpu else "", "total": memory.total, "free": memory.free},
            "leases": self.tier.leases(),
            "swap_rate": self.tier.swap_rate,
        }

    def report(self) -> dict:
        """This GPU's residency snapshot for the node's report to placement ({} when off)."""
        if self.tier is None:
            return {}
        report = self.tier.report()
        report["device"] = asdict(report["device"])
        return report

    def shutdown(self) -> None:
        """Stops the reaper and frees every model not leased."""
        self._stop.set()
        if self.tier is not None:
            self.tier.close()
