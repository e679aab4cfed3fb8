"""The load pipeline of a node's host tier: where a miss reads its blob from (the first source
that has it: the node's disk tier, a peer node's host tier, the store; verified chunk by chunk),
what each source's loads measured, and the disk copies written behind the loads. Cache core, no
Ray: ``node_cache.NodeCache`` reads every miss through a ``HostLoader``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._errors import IntegrityError
from .._fsio import write_atomically
from .._manifest import Manifest
from .._protocol import ASSUMED_LOAD_RATES, DISK, PEER, STORE, cache_key
from .._reader import read_blob
from .._store import ModelStore
from .disk_tier import LOCAL_FS, DiskTier

__all__ = ["HostLoader", "WriteBehind"]

log = logging.getLogger("trims_ray")



class HostLoader:
    """Reads blobs for the host tier and measures the sources.

    Args:
        store: the model store (the cloud tier).
        disk: the node's disk tier, read first.
        lock: the node cache's lock, which guards the disk tier's bookkeeping and the rates.
    """

    def __init__(self, *, store: ModelStore, disk: DiskTier, lock: threading.Lock) -> None:
        self.store = store
        self.disk = disk
        self._lock = lock
        # Measured load rates by source (bytes/s, moving averages), for choosing between a peer
        # and the store; empty until the first load from each. Updated in place: NodeCache.rates
        # is this dict.
        self.rates: dict[str, float] = {}
        # One (source, tenant, name, nbytes, seconds) per load, drained by the metrics exporter
        # (trims_ray/_metrics.py); bounded, so that without one it keeps only the latest loads.
        self.load_events: deque[tuple[str, str, str, int, float]] = deque(maxlen=1024)

    def expected_load_s(self, nbytes: int, source: str) -> float:
        """What loading ``nbytes`` from ``source`` is expected to take, by measured rates."""
        return nbytes / self.rates.get(source, ASSUMED_LOAD_RATES[source])

    def read(
        self, manifest: Manifest, out: np.ndarray, peer_read: Callable[[Manifest, np.ndarray], bool] | None
    ) -> str:
        """Fills ``out`` with the verified blob from the first source that has it: the disk tier,
        a peer node (when one holds it and is expected to be faster), the store. Returns the
        source's name ("disk", "peer", "store") and records its rate.

        ``peer_read`` fills a buffer with the blob from another node's host tier and returns
        True, or returns False when no peer is expected to be faster than the store (None: no
        peers are asked).

        Raises:
            IntegrityError, StoreUnavailableError, ModelNotFoundError: from the store, the last
                source (a bad disk or peer copy falls through to the next source).
        """
        started = time.perf_counter()
        source = self._read_from_first(manifest, out, peer_read)
        seconds = time.perf_counter() - started
        self._record_rate(source, manifest.nbytes, seconds)
        self.load_events.append((source, manifest.tenant, manifest.name, manifest.nbytes, seconds))
        return source

    def _record_rate(self, source: str, nbytes: int, seconds: float) -> None:
        if seconds <= 0 or nbytes < 1024 * 1024:
            return  # tiny reads measure latency, not bandwidth
        rate = nbytes / seconds
        with self._lock:
            old = self.rates.get(source)
            self.rates[source] = rate if old is None else 0.7 * old + 0.3 * rate

    def _read_from_first(
        self, manifest: Manifest, out: np.ndarray, peer_read: Callable[[Manifest, np.ndarray], bool] | None
    ) -> str:
        key = cache_key(manifest)
        with self._lock:
            on_disk = key in self.disk.sizes
            if on_disk:
                self.disk.stats.hits += 1
                self.disk.policy.on_access(key)
            else:
                self.disk.stats.misses += 1
        if on_disk:
            try:
                read_blob(
                    LOCAL_FS,
                    str(self.disk.path(key)),
                    nbytes=manifest.nbytes,
                    chunk_digests=manifest.chunks,
                    out=out,
                    source=str(self.disk.path(key)),
                )
                return DISK
            except (IntegrityError, OSError) as exc:
                log.warning("trims_ray: dropping a bad disk copy of %s: %s", key, exc)
                with self._lock:
                    self.disk.read_failed(key)
        if peer_read is not None:
            try:
                if peer_read(manifest, out):
                    return PEER
            except (IntegrityError, OSError) as exc:
                log.warning("trims_ray: peer fetch of %s failed, reading the store: %s", key, exc)
        self.store.read(manifest, out=out)
        return STORE


class WriteBehind:
    """Disk copies written after the load that read their bytes, off the path of the invocation
    that missed: one thread, so that the disk's I/O stays sequential, and a count per blob, so
    that an evict of the disk tier meanwhile can cancel the copies still to come.

    Args:
        lock: the node cache's lock, which guards the counts and the disk tier (``cancel`` and
            ``cancelled`` are called under it).
        disk: the disk tier the copies go to, within its budget and its policy's admission.
        expected_load_s: what a load of so many bytes from a source costs (what a copy saves).
    """

    def __init__(
        self, lock: threading.Lock, disk: DiskTier, expected_load_s: Callable[[int, str], float]
    ) -> None:
        self._lock = lock
        self._disk = disk
        self._expected_load_s = expected_load_s
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trims-disk-write")
        self._queued: dict[str, int] = {}  # blob -> disk copies queued or being written
        self._cancelled: set[str] = set()  # blobs evicted while a copy was queued

    def submit(self, key: str, data: np.ndarray) -> None:
        """Queues ``write(key, data)``; ``data`` stays alive in the job until written, though the
        load has already moved on."""
        with self._lock:
            self._queued[key] = self._queued.get(key, 0) + 1
        self._writer.submit(self._run, key, data)

    def _run(self, key: str, data: np.ndarray) -> None:
        try:
            self.write(key, data)
        finally:
            with self._lock:
                self._queued[key] -= 1
                if not self._queued[key]:
                    del self._queued[key]
                    self._cancelled.discard(key)

    def write(self, key: str, data: np.ndarray, force: bool = False) -> None:
        """Keeps a disk copy of verified bytes, if the disk budget (and, unless ``force``, the
        disk policy's admission) allows; never fails a load."""
        with self._lock:
            saves = None if force else self._expected_load_s(len(data), STORE)
            if self.cancelled(key) or not self._disk.reserve(key, len(data), saves):
                return
        try:
            write_atomically(LOCAL_FS, str(self._disk.path(key)), [memoryview(data)])
        except BaseException as exc:
            with self._lock:
                if isinstance(exc, OSError):
                    self._disk.write_failed(key)  # counted; a deleted directory is recreated
                else:
                    self._disk.unreserve(key)
            if isinstance(exc, OSError):
                log.warning("trims_ray: disk tier write of %s failed: %s", key, exc)
                return
            raise
        # One step from "being written" to "on disk": no moment where another write of the same
        # blob could find neither and reserve it again.
        with self._lock:
            self._disk.unreserve(key)
            if self.cancelled(key):  # evicted while being written: it must not appear
                self._disk.path(key).unlink(missing_ok=True)
                return
            self._disk.adopt(key, len(data))

    def cancel(self, key: str) -> None:
        """Marks the copies of ``key`` queued or being written as unwanted (the write checks)."""
        if key in self._queued:
            self._cancelled.add(key)

    def cancelled(self, key: str) -> bool:
        return key in self._cancelled

    def drain(self) -> None:
        """Waits until the copies queued so far are written."""
        self._writer.submit(lambda: None).result()

    def close(self) -> None:
        """Finishes the copies queued and stops the writer."""
        self._writer.shutdown(wait=True)
