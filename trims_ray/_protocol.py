"""The vocabulary that crosses processes and layers: tier and source names, cache keys, who
holds a lease, grants, and the statistics a node reports.

It sits at the bottom of the package: it imports nothing of trims_ray (the manifest and the GPU
identities are named in annotations only), so the store, the cache core, the actors and the
client all speak it. A grant that crosses a process is a frozen dataclass (``HostGrant`` from a
node's cache to a task, ``GpuGrant`` from a GPU holder to a task), read by attribute.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ray

    from ._gpu_ipc import DeviceIdentity, LayerGroup
    from ._manifest import Manifest, ModelInfo

__all__ = [
    "ASSUMED_LOAD_RATES",
    "ASSUMED_SWAP_RATE",
    "HOST",
    "DISK",
    "PEER",
    "STORE",
    "BYPASS",
    "NOT_FOUND",
    "DENIED",
    "cache_key",
    "Resolved",
    "Holder",
    "Caller",
    "process_start",
    "holder_alive",
    "Grant",
    "HostGrant",
    "GpuGrant",
    "TierStats",
    "TenantStats",
    "USE_DECAY_S",
    "RecentUses",
]

HOST, DISK, PEER, STORE = "host", "disk", "peer", "store"
# Load rates assumed before a node measured its own (bytes/s), to price misses and choose where to
# load: a local disk, a peer's memory over Ray's object transfer (an order of magnitude faster
# than a cloud store), the cloud store; and host to GPU, about PCIe 4 x16.
ASSUMED_LOAD_RATES = {DISK: 0.5e9, PEER: 1e9, STORE: 0.1e9}
ASSUMED_SWAP_RATE = 20e9
# The grant of a miss the host tier's policy did not admit: the task loads the model itself,
# and nothing is kept or evicted for it.
BYPASS = "bypass"
# The two refusals a tenant can meet, counted per tenant (TenantStats): a name that resolves to
# nothing it may see, and naming another tenant explicitly.
NOT_FOUND, DENIED = "not_found", "denied"
# How fast a node forgets a model's uses (seconds, the time constant of an exponential decay):
# its recent request rate is the decayed count over this, which placement weighs to choose the
# node whose eviction a new load would cost least.
USE_DECAY_S = 30.0


@dataclass(frozen=True)
class RecentUses:
    """A model's uses on a node, as a count decayed with ``USE_DECAY_S``, at ``at`` (wall-clock
    seconds: the value crosses nodes, whose monotonic clocks differ). Changes only when the
    model is used, so a node's report stays the same while nothing happens."""

    count: float = 0.0
    at: float = 0.0

    def count_at(self, now: float) -> float:
        return self.count * math.exp(-max(0.0, now - self.at) / USE_DECAY_S)

    def used(self, now: float, times: int = 1) -> RecentUses:
        return RecentUses(self.count_at(now) + times, now)

    def per_s(self, now: float) -> float:
        """Uses per second lately."""
        return self.count_at(now) / USE_DECAY_S



def cache_key(model: Manifest | ModelInfo) -> str:
    """The key of a model's blob in every tier of a node and in placement: ``<tenant>/<sha256>``.

    Per tenant, not per blob: identical weights registered by two tenants are two entries (two
    loads, two copies), so that a hit never tells one tenant that another holds the same bytes.
    A public model's owner is "public", so its one copy serves every tenant.
    """
    return f"{model.tenant}/{model.sha256}"


@dataclass(frozen=True)
class Resolved:
    """What a model name resolved to, as one hop of an invocation passes it to the next (the
    caller to the node's cache and the task, a task to its GPU holder, a holder to the node's
    cache), so that the name is resolved once per invocation. A hint, not a proof: the hop that
    receives it serves a manifest it can vouch for itself, else resolves the name as without
    it (``ManifestCache.get``). The manifest itself stays behind: its tensor index and chunk
    digests are kilobytes, pickled on every call.

    Attributes:
        key: the manifest's ``cache_key`` (``<tenant>/<sha256>``).
        fingerprint: the manifest's ``fingerprint`` (sha256 of its document): two registrations
            of one blob share the key, not this.
    """

    key: str
    fingerprint: str

    @classmethod
    def of(cls, manifest: Manifest) -> Resolved:
        return cls(cache_key(manifest), manifest.fingerprint)


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: a process on this node, named so that PID reuse is not mistaken for
    the same process (``start`` is the process start time from /proc)."""

    pid: int
    start: int

    @classmethod
    def this_process(cls) -> Holder:
        return cls(os.getpid(), process_start(os.getpid()))


@dataclass(frozen=True)
class Caller:
    """Who holds a lease taken at submit time: the submitting process, anywhere in the cluster,
    until its task's result exists. It is alive while it keeps polling placement."""

    id: str


def process_start(pid: int) -> int:
    """The start time of ``pid`` in clock ticks since boot, or -1 if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return -1
    # Field 22, counted after the ")" that closes the command name (which may hold spaces).
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def holder_alive(holder: Holder | Caller) -> bool:
    """Whether a local process holder still runs; a Caller cannot be checked from here (the
    actor asks placement) and counts as alive."""
    if isinstance(holder, Caller):
        return True
    # A holder whose start time could not be read is treated as gone rather than immortal, so
    # its leases are reclaimed instead of pinning the model forever.
    return holder.start >= 0 and process_start(holder.pid) == holder.start


@dataclass(frozen=True)
class Grant:
    """What the node cache's ``acquire`` (or ``lend``) hands its actor, in the actor's process:
    the lease, the shared object, where the blob lies in it. The actor sends the task a
    ``HostGrant`` made from it.

    Attributes:
        lease_id: release it with ``NodeCache.release``.
        handle: the host tier's handle of the model's object (a Ray ObjectRef in the actor);
            None for a bypass.
        manifest: the model's manifest.
        offset: where the blob starts in the object.
        tier: where it was found: "host" (hit), "disk", "peer" or "store" (loaded), or "bypass".
        pinned: the lease is a pin: its process may keep the model built after its task.
    """

    lease_id: int | str
    handle: object
    manifest: Manifest
    offset: int
    tier: str
    pinned: bool = False

    @property
    def bypass(self) -> bool:
        """The host tier's policy did not admit this miss: no lease, no object; the task reads
        the model itself."""
        return self.tier == BYPASS


@dataclass(frozen=True)
class HostGrant:
    """What a task (or a GPU holder, or a peer node) receives from a node's cache actor for a
    host-tier lease: ``acquire`` and ``lend`` return it across processes (Ray pickles it).

    Attributes:
        lease_id: the lease; end it with the actor's ``release(lease_id)``.
        ref: the Ray ObjectRef of the node's shared object that holds the blob (``ray.get`` gives
            a zero-copy, read-only uint8 array); None for a bypass. Nested in this object, so
            Ray hands the receiver the ref, not the value, and the receiver decides when to get.
        manifest: the model's manifest: dtype, shape and offset of every tensor, sha256, nbytes.
        offset: where the blob starts in the object (the blob is ``obj[offset:offset+nbytes]``).
        tier: where the node's cache found the model: "host" (a hit), "disk", "peer" or "store"
            (loaded for this request), or "bypass" (see ``bypass``). The value the replay
            records per request (``trims_ray._lease.served_tier``).
        node: the Ray node (hex) whose cache granted it; its object lives in that node's store.
        store_uri: for a bypass, the URI of the store the task reads the model from itself (its
            own process may not know the store, when Ray was started before trims_ray.init);
            None otherwise.
        storage_options: for a bypass, the fsspec options of that store (None: none), without
            credentials (they never leave trims_ray's actors).
        relayed: for a bypass, the store's credentials stayed with the node's cache: the task
            reads the blob through it (``NodeCacheActor.read_bypassed``), not from the store.
        pinned: the lease is a pin (``NodeCache.acquire(pin=True)``): the task's process keeps
            the model built after the task, and releases the lease when it drops it.
        actor_id: the granting cache actor's Ray id (hex): a process that keeps the model pins
            it on that very actor, not on one it looked up before that actor was replaced.
        incarnation: the granting cache's incarnation (a restarted actor keeps its Ray id, not
            its objects): a process drops what it kept from an incarnation that is gone.
    """

    lease_id: int | str
    ref: ray.ObjectRef | None
    manifest: Manifest
    offset: int
    tier: str
    node: str
    store_uri: str | None = None
    storage_options: dict | None = None
    pinned: bool = False
    actor_id: str = ""
    incarnation: str = ""
    relayed: bool = False

    @classmethod
    def of(
        cls,
        grant: Grant,
        node: str,
        store_uri: str | None = None,
        storage_options: dict | None = None,
        actor_id: str = "",
        incarnation: str = "",
        relayed: bool = False,
    ) -> HostGrant:
        """The message for the node cache's ``grant`` on ``node`` (the store only for a bypass)."""
        return cls(
            grant.lease_id,
            grant.handle,
            grant.manifest,
            grant.offset,
            grant.tier,
            node,
            store_uri,
            storage_options,
            grant.pinned,
            actor_id,
            incarnation,
            relayed,
        )

    @property
    def bypass(self) -> bool:
        """The host tier's policy did not admit this miss: there is no lease to end and no
        object; the task reads the model, verified, from ``store_uri`` itself."""
        return self.tier == BYPASS


@dataclass(frozen=True)
class GpuGrant:
    """What a GPU tier's ``acquire`` hands out: in the holder's process, and as the message its
    holder actor returns to a task on the same GPU (Ray pickles it; the handle and the events
    are plain picklable data).

    Attributes:
        lease_id: the lease; end it with ``GpuTier.release`` (the holder actor's ``release``).
        handle: the device's handle of the model's allocation (a CUDA IPC handle; None for a
            bypass).
        manifest: the model's manifest: dtype, shape and offset of every tensor.
        offset: where the blob starts in the allocation.
        device: the GPU, for mapping to the task's own device index; ``device.node_id`` is
            the node (see ``node``).
        tier: "gpu" (resident: a hit, or joined a swap-in), or for the swap-in's leader where
            its bytes came from ("host", "disk", "peer", "store"); "bypass" when the policy did
            not admit the model (no lease: the task loads it onto its GPU itself).
        groups: for a pipelined grant of a swap-in still in flight, the layer groups; else ().
        events: one event handle per group (a task waits on event i before using group i's
            layers); () when every byte is already on the device.
    """

    lease_id: int | str
    handle: object
    manifest: Manifest
    offset: int
    device: DeviceIdentity
    tier: str
    groups: tuple[LayerGroup, ...] = ()
    events: tuple = ()

    @property
    def node(self) -> str:
        """The Ray node (hex) of the GPU, "" when unknown."""
        return self.device.node_id

    @property
    def bypass(self) -> bool:
        """The GPU policy did not admit the model: no lease and no handle (``acquire_gpu`` then
        returns None, and the task is served by the host tier)."""
        return self.tier == BYPASS


@dataclass
class TierStats:
    """Counters of one tier on one node; ``models`` is a count, so names do not leak."""

    bytes_used: int = 0
    capacity: int = 0
    models: int = 0
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    bypasses: int = 0  # misses served without keeping the model (its policy's admission said no)
    quota_denials: int = 0  # loads refused (or disk copies skipped) to keep a tenant within its quota
    scrubbed: int = 0  # resident copies re-hashed by scrub (host tier)
    corrupt: int = 0  # of those, copies that no longer matched their manifest and were dropped
    errors: int = 0  # reads or writes that failed (disk full, directory deleted, a bad file)
    bypass_bytes: int = 0  # host: bytes of the shared copies of bypassed misses, held while leased


@dataclass
class TenantStats:
    """One tenant on one node: the bytes it holds in each tier against its quota (None: no quota
    but the tier's budget), and the refusals it met here. ``not_found`` counts names that
    resolved to nothing the tenant may see (missing or another tenant's: the same thing to it);
    ``denied`` counts attempts to act as another tenant (reported by the caller's process)."""

    host_bytes: int = 0
    host_quota: int | None = None
    disk_bytes: int = 0
    disk_quota: int | None = None
    not_found: int = 0
    denied: int = 0
    quota_denials: int = 0
