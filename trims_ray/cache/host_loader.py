"""The load pipeline of a node's host tier: where a miss reads its blob from (the first source
that has it: the node's disk tier, a peer node's host tier, the store; verified chunk by chunk),
what each source's loads measured, and the disk copies written behind the loads. Cache core, no
Ray: ``node_cache.NodeCache`` reads every miss through a ``HostLoader``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import numpy as np

from .._errors import IntegrityError
from .._fsio import write_atomically
from .._hashing import chunk_ranges
from .._manifest import Manifest
from .._protect import GUARD_BYTES
from .._protocol import ASSUMED_LOAD_RATES, DISK, PEER, STORE, cache_key
from .._reader import read_blob
from .._store import ModelStore
from .disk_tier import LOCAL_FS, DiskTier
from .host_entry import HostMemory
from .load_buffers import LoadBuffers

__all__ = [
    "LEND_CALL_TIMEOUT_S",
    "PEER_CHUNK_BYTES",
    "PEER_CHUNKS_IN_FLIGHT",
    "HostLoader",
    "WriteBehind",
    "lend_ttl_s",
    "peer_copy_timeout_s",
    "read_in_chunks",
]

log = logging.getLogger("trims_ray")

# A peer's copy of a blob from a node that lends it: how long the borrower waits for the lend
# call, then for the object's transfer. The lender's lease ends after ``lend_ttl_s`` even if the
# borrower never releases it (it died, or its release was lost), instead of after the
# unclaimed-lease ttl (minutes), which is meant for tasks that queue before they claim.
LEND_CALL_TIMEOUT_S = 5.0


def peer_copy_timeout_s(nbytes: int) -> float:
    """How long a borrower waits for a lent object of ``nbytes`` to arrive (50 MB/s at worst)."""
    return max(30.0, nbytes / 50e6)


def lend_ttl_s(nbytes: int) -> float:
    """How long a lend of ``nbytes`` may stay unreleased: the borrower's longest wait, and slack."""
    return LEND_CALL_TIMEOUT_S + peer_copy_timeout_s(nbytes) + 10.0


# A peer's blob comes over in slices (``read_in_chunks``), not as the lender's whole object:
# whatever a slice arrives in (Ray pulls a returned value whole into the borrower's object store)
# is held only until it is copied into the borrower's own host-tier buffer, the copy its budget
# counts, so a peer fetch holds at most PEER_CHUNKS_IN_FLIGHT * PEER_CHUNK_BYTES (16 MiB) beyond
# it, whatever the blob's size. Pulling the whole object held a second, uncounted copy of the
# blob for the length of the copy (issue 16 item 18). Two in flight keep the link busy while a
# slice is being copied; 8 MiB makes a request's round trip small next to its transfer.
PEER_CHUNK_BYTES = 8 * 1024 * 1024
PEER_CHUNKS_IN_FLIGHT = 2


def read_in_chunks(
    manifest: Manifest,
    out: np.ndarray,
    read_range: Callable[[int, int], object],
    *,
    source: str,
    chunk_bytes: int = PEER_CHUNK_BYTES,
    in_flight: int = PEER_CHUNKS_IN_FLIGHT,
) -> None:
    """Fills ``out`` with the blob of ``manifest``, read slice by slice with
    ``read_range(offset, length)`` (the blob's bytes [offset, offset + length), as a uint8 array
    or anything with the buffer protocol), each slice of at most ``chunk_bytes``, at most
    ``in_flight`` requested at once; a slice is dropped as soon as it is copied into ``out``, so
    at most ``in_flight * chunk_bytes`` bytes are held at once beyond ``out``. Each of the
    manifest's chunks is verified against its digest once all its bytes are in ``out`` (the
    copy is hashed: what is verified is what will be served), on other threads, so that hashing
    does not hold up the requests.

    Raises:
        IntegrityError: a slice of the wrong size, or a chunk that does not match; ``out`` must
            not be used then.
        ValueError: bad bounds, or ``out`` is not a writable uint8 array of the blob's size.
        Whatever ``read_range`` raises; no more requests are sent then, and those in flight are
            waited for (so that nothing reads the lender after this returns).
    """
    if chunk_bytes < 1 or in_flight < 1:
        raise ValueError(f"chunk_bytes and in_flight must be >= 1, got {chunk_bytes} and {in_flight}")
    nbytes = manifest.nbytes
    if out.dtype != np.uint8 or out.ndim != 1 or len(out) != nbytes or not out.flags.writeable:
        raise ValueError(f"out must be a writable 1-D uint8 array of {nbytes} bytes")
    digests = manifest.chunks
    checks = digests.ranges(nbytes)
    if len(checks) != len(digests.digests):
        raise IntegrityError(
            f"{source}: {nbytes} bytes is {len(checks)} chunks, but the manifest lists "
            f"{len(digests.digests)} chunk digests"
        )
    left = [end - start for start, end in checks]  # bytes of each chunk not in ``out`` yet

    def fetch(start: int, end: int) -> None:
        piece = np.frombuffer(read_range(start, end - start), dtype=np.uint8)
        got = len(piece)
        if got == end - start:
            out[start:end] = piece
        # Dropped here, before this slot's next request (what bounds the bytes held), and before
        # an error, whose traceback would keep this frame and the slice in it alive.
        del piece
        if got != end - start:
            raise IntegrityError(f"{source}: short slice at {start}: {got} of {end - start} bytes")

    def verify(index: int) -> None:
        start, end = checks[index]
        digest = hashlib.sha256(memoryview(out[start:end])).hexdigest()
        if digest != digests.digests[index]:
            raise IntegrityError(
                f"{source}: sha256 mismatch in bytes {start}-{end}: the manifest says "
                f"{digests.digests[index]}, the bytes hash to {digest}; nothing was kept"
            )

    slices = deque(chunk_ranges(nbytes, chunk_bytes))
    fetching: dict[Future, tuple[int, int]] = {}  # request -> its slice
    hashing: set[Future] = set()
    with (
        ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="trims-peer") as fetcher,
        ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="trims-peer-hash") as hasher,
    ):
        try:
            while slices or fetching or hashing:
                while slices and len(fetching) < in_flight:
                    start, end = slices.popleft()
                    fetching[fetcher.submit(fetch, start, end)] = (start, end)
                done, _ = wait([*fetching, *hashing], return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()  # a failed request or a bad chunk stops the copy at once
                    hashing.discard(future)
                    if future in fetching:
                        start, end = fetching.pop(future)
                        for index in range(start // digests.chunk_bytes, (end - 1) // digests.chunk_bytes + 1):
                            lo, hi = checks[index]
                            left[index] -= min(end, hi) - max(start, lo)
                            if not left[index]:  # the chunk is complete in ``out``
                                hashing.add(hasher.submit(verify, index))
        except BaseException:
            for future in [*fetching, *hashing]:
                future.cancel()
            # No local left holding a failed future: it holds the error, whose traceback holds
            # this frame (a cycle that would outlive the handler).
            fetching.clear()
            hashing.clear()
            done = future = None
            raise


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
        # What the loads read into: used again, so that a load's read does not fault in and
        # zero fresh pages (see load_buffers).
        self.buffers = LoadBuffers()

    def expected_load_s(self, nbytes: int, source: str) -> float:
        """What loading ``nbytes`` from ``source`` is expected to take, by measured rates."""
        rate = self.rates.get(source)
        if rate is None:
            rate = ASSUMED_LOAD_RATES[source]
            if source == DISK:
                # Until the node has read from its disk, a disk copy is expected to read no
                # slower than the store it saves a read from (the loader tries it first for that
                # reason). Priced at the assumed rate below the store's measured one, a resident
                # with a disk copy outweighed newcomers that the store would serve faster.
                rate = max(rate, self.rates.get(STORE, 0.0))
        return nbytes / rate

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

    def load(
        self,
        manifest: Manifest,
        nbytes: int,
        memory: HostMemory,
        peer_read: Callable[[Manifest, np.ndarray], bool] | None,
        keep_copy: Callable[[np.ndarray], object],
    ) -> tuple[str, object]:
        """Reads the blob (``read``) into a buffer of ``nbytes`` that has zeroed guard regions on
        both sides, hands verified bytes that did not come from the disk tier to ``keep_copy``
        (the disk copy), and publishes the buffer; returns the source and the handle."""
        buffer = self.buffers.take(nbytes)
        # Guard pages on both sides: tasks make the blob's pages read-only, and those pages must
        # hold nothing but this object.
        buffer[:GUARD_BYTES] = 0
        buffer[-GUARD_BYTES:] = 0
        view = buffer[GUARD_BYTES : GUARD_BYTES + manifest.nbytes]
        source = self.read(manifest, view, peer_read)
        if source != DISK:  # verified bytes from a peer or the store: keep a copy
            keep_copy(view)
        return source, memory.publish(buffer)

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

    A queued copy keeps its load's buffer (the blob's size, in this process) alive until it is
    written, so only copies that will be written are queued: the disk tier's room is reserved
    (its budget and its policy's admission decided) when the copy is submitted, not when it is
    written, and the bytes queued are bounded (``max_bytes``). A copy refused either way is
    skipped at once and its buffer freed with its load.

    Args:
        lock: the node cache's lock, which guards the counts and the disk tier (``cancel`` and
            ``cancelled`` are called under it).
        disk: the disk tier the copies go to, within its budget and its policy's admission.
        expected_load_s: what a load of so many bytes from a source costs (what a copy saves).
        max_bytes: bytes the copies queued or being written may hold (None: no bound but the disk
            budget); one copy is queued whatever its size when none is, so that a blob bigger
            than the bound still gets its disk copy.
    """

    def __init__(
        self,
        lock: threading.Lock,
        disk: DiskTier,
        expected_load_s: Callable[[int, str], float],
        max_bytes: int | None = None,
    ) -> None:
        self._lock = lock
        self._disk = disk
        self._expected_load_s = expected_load_s
        self.max_bytes = max_bytes
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trims-disk-write")
        self._queued: dict[str, int] = {}  # blob -> disk copies queued or being written
        self._queued_bytes = 0  # the bytes they hold
        self._reserved: set[str] = set()  # blobs whose room ``submit`` reserved, for their write
        self._cancelled: set[str] = set()  # blobs evicted while a copy was queued
        self.skipped = 0  # copies not queued because the queue was full

    def queued(self) -> tuple[int, int]:
        """(copies, bytes) queued or being written now."""
        with self._lock:
            return sum(self._queued.values()), self._queued_bytes

    def submit(self, key: str, data: np.ndarray) -> bool:
        """Queues ``write(key, data)`` if the disk tier admits the copy (its room is reserved
        now) and the queue has room for it; returns whether it was queued. ``data`` stays alive
        in the job until written, though the load has already moved on."""
        nbytes = len(data)
        with self._lock:
            if self.max_bytes is not None and self._queued_bytes and self._queued_bytes + nbytes > self.max_bytes:
                self.skipped += 1  # the disk is behind: this copy is left to a later load
                return False
            if self.cancelled(key) or not self._disk.reserve(key, nbytes, self._expected_load_s(nbytes, STORE)):
                return False
            self._reserved.add(key)
            self._queued[key] = self._queued.get(key, 0) + 1
            self._queued_bytes += nbytes
        self._writer.submit(self._run, key, data)
        return True

    def _run(self, key: str, data: np.ndarray) -> None:
        try:
            self.write(key, data)
        finally:
            with self._lock:
                if key in self._reserved:  # its write never claimed the room: give it back
                    self._reserved.discard(key)
                    self._disk.unreserve(key)
                self._queued_bytes -= len(data)
                self._queued[key] -= 1
                if not self._queued[key]:
                    del self._queued[key]
                    self._cancelled.discard(key)

    def write(self, key: str, data: np.ndarray, force: bool = False) -> None:
        """Keeps a disk copy of verified bytes, in the room ``submit`` reserved for it, else if
        the disk budget (and, unless ``force``, the disk policy's admission) allows; never fails
        a load."""
        with self._lock:
            if key in self._reserved:  # reserved when queued: this write claims that room
                self._reserved.discard(key)
                if self.cancelled(key):
                    self._disk.unreserve(key)
                    return
            else:
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

    def evict(self, key: str) -> str:
        """Evicts a blob from the disk tier, and cancels its copies still queued or being written
        (an evict of the disk tier must not see a copy appear afterwards). The caller holds the
        lock. Returns "evicted" or "absent"."""
        present = key in self._disk.sizes
        self._disk.forget(key, evicted=True)
        self.cancel(key)
        return "evicted" if present else "absent"

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
