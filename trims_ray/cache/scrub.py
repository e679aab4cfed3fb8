"""Scrub: re-hashing the host tier's copies against their manifests, so that a copy changed in
shared memory (a stray write, a bit flip) stops being served and is loaded again. Cache core, no
Ray: ``NodeCache.scrub`` runs it (the node cache actor does, every ``scrub_s``); ``NodeScrub``,
a mixin of ``node_cache.NodeCache``, is that method and the reload of a corrupt copy.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable

from .._manifest import Manifest
from .._protect import GUARD_BYTES
from .._protocol import cache_key
from .host_entry import HostEntry, HostMemory
from .host_tier import HostTier
from .pins import wait_until_gone

__all__ = ["NodeScrub", "scrub_host_tier"]

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


class NodeScrub:
    """``scrub`` of a ``NodeCache`` (it uses the cache's lock, host tier, memory and leases)."""

    def scrub(self) -> dict[str, int]:
        """Re-hashes every copy ready in the host tier against its manifest's chunk digests
        (the digests every read was verified with), one model at a time.

        A copy that no longer matches (a stray write into shared memory, a bit flip) leaves the
        table at once, so no new lease gets it: unleased, it is freed now; leased, when its last
        lease ends (those holders already have it mapped). It is then reloaded, verified, from
        the disk tier or the store (force: as a prefetch); if that fails (no room while the bad
        copy is still leased, store down) it is logged and left to the next miss.

        Returns:
            {"scrubbed": copies hashed, "corrupt": copies dropped, "reloaded": copies reloaded}.
        """
        return scrub_host_tier(self.host, self._lock, self.memory, reload=self._reload)

    def _reload(self, manifest: Manifest) -> None:
        """Loads a model into the host tier as a prefetch does, leasing nothing; first waits
        (``reclaim_wait_s``) for processes that keep the corrupt copy to give it back."""
        with self._lock:
            key = cache_key(manifest)
            asked = [e for e in self.host.condemned.values() if cache_key(e.manifest) == key and e.leases == e.pins]
        wait_until_gone(asked, self._gone, self.reclaim_wait_s)
        self.release(self._acquire(manifest, None, None, force=True).lease_id)


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
