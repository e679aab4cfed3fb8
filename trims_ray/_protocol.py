"""The vocabulary that crosses processes and layers: tier and source names, cache keys, who
holds a lease, grants, and the statistics a node reports.

It sits at the bottom of the package: it imports nothing of trims_ray (the manifest is named in
annotations only), so the store, the cache core, the actors and the client all speak it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._manifest import Manifest, ModelInfo

__all__ = [
    "HOST",
    "DISK",
    "PEER",
    "STORE",
    "BYPASS",
    "NOT_FOUND",
    "DENIED",
    "cache_key",
    "Holder",
    "Caller",
    "process_start",
    "holder_alive",
    "Grant",
    "TierStats",
    "TenantStats",
]

HOST, DISK, PEER, STORE = "host", "disk", "peer", "store"
# The grant of a miss the host tier's policy did not admit: the task loads the model itself,
# and nothing is kept or evicted for it.
BYPASS = "bypass"
# The two refusals a tenant can meet, counted per tenant (TenantStats): a name that resolves to
# nothing it may see, and naming another tenant explicitly.
NOT_FOUND, DENIED = "not_found", "denied"



def cache_key(model: Manifest | ModelInfo) -> str:
    """The key of a model's blob in every tier of a node and in placement: ``<tenant>/<sha256>``.

    Per tenant, not per blob: identical weights registered by two tenants are two entries (two
    loads, two copies), so that a hit never tells one tenant that another holds the same bytes.
    A public model's owner is "public", so its one copy serves every tenant.
    """
    return f"{model.tenant}/{model.sha256}"


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
    """What ``acquire`` hands a task: the lease, the shared object, where the blob lies in it."""

    lease_id: int | str
    handle: object
    manifest: Manifest
    offset: int
    tier: str  # where it was found: "host" (hit), "disk", "peer" or "store" (loaded), or "bypass"


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
