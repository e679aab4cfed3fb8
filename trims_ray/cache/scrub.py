"""Scrub: re-hashing the host tier's copies against their manifests, so that a copy changed in
shared memory (a stray write, a bit flip) stops being served and is loaded again. Cache core, no
Ray: ``NodeCache.scrub`` runs it (the node cache actor does, every ``scrub_s``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable

from .._manifest import Manifest
from .._protect import GUARD_BYTES
from .host_entry import HostEntry, HostMemory
from .host_tier import HostTier

__all__ = ["scrub_host_tier"]

log = logging.getLogger("trims_ray")


def scrub_host_tier(
    host: HostTier, lock: threading.Lock, memory: HostMemory, reload: Callable[[Manifest], object]
) -> dict[str, int]:
    """Re-hashes every copy ready in ``host``, one at a time, taking ``lock`` (the node cache's)
    for the bookkeeping only; drops a corrupt copy and calls ``reload`` for its model (which
    raises when it cannot). Returns the counts ``NodeCache.scrub`` describes."""
    done = {"scrubbed": 0, "corrupt": 0, "reloaded": 0}
    with lock:
        keys = [k for k, e in host.entries.items() if e.ready.is_set()]
    for key in keys:
        with lock:
            entry = host.entries.get(key)
            if entry is None or not entry.ready.is_set() or entry.evict_when_idle:
                continue  # gone, replaced by a load in flight, or on its way out
            # The scrub's own lease: an evict meanwhile waits for the hash to finish.
            entry.leases += 1
        intact = None  # not hashed: the view of the copy could not be had
        try:
            intact = _intact(entry, memory)
        finally:
            with lock:
                if intact is not None:
                    host.stats.scrubbed += 1
                    done["scrubbed"] += 1
                if intact is False and host.entries.get(key) is entry:
                    host.condemn(key, entry)
                    done["corrupt"] += 1
                host.unlease(entry)
        if intact is False:
            log.warning(
                "trims_ray: scrub found the host copy of %s/%s corrupt: dropped, reloading",
                entry.manifest.tenant, entry.manifest.name,
            )
            try:
                reload(entry.manifest)
                done["reloaded"] += 1
            except Exception as exc:  # the next miss loads it
                log.warning("trims_ray: reloading %s after scrub failed: %s", key, exc)
    return done


def _intact(entry: HostEntry, memory: HostMemory) -> bool:
    """Whether a published copy still matches its manifest, chunk by chunk."""
    view = getattr(memory, "view", None)
    published = view(entry.handle) if view is not None else entry.handle
    manifest = entry.manifest
    blob = memoryview(published[GUARD_BYTES : GUARD_BYTES + manifest.nbytes])
    chunks = manifest.chunks
    return len(blob) == manifest.nbytes and all(
        hashlib.sha256(blob[start:end]).hexdigest() == digest
        for (start, end), digest in zip(chunks.ranges(manifest.nbytes), chunks.digests)
    )
