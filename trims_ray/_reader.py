"""The store reader: one blob into one preallocated buffer by parallel ranged reads, verified
on the way, so that nothing unverified is ever handed on.

Ranged reads run in a thread pool (``os.preadv`` straight into the buffer on a local disk; ranged
GETs on an object store). With chunk digests (every manifest has them) each worker hashes the
chunks it just read (a local file is read a chunk at a time, an object store in ranges of several
chunks), so verification runs on all cores; with only a whole-blob sha256 the calling
thread hashes the completed prefix in order, overlapping one hash stream with the I/O. hashlib
and the reads release the GIL. Local reads share one pool per process, made once: a pool of its
own for every read started and ended its threads each time (a verified 20 MiB read from the page
cache took 12.2 and 10.7 ms so, 10.2 and 10.1 ms with the shared pool: ``python -m
workloads.bench buffers --mb 20 --repeats 30``, alternately). An object store's reads keep a pool
each, so that one read's ranged requests do not queue behind another's.

Ranged reads from an object store that fail in a way that may pass (see ``_fsio.is_transient``)
are retried here, and only here, with exponential backoff; when one range runs out of tries the
whole read gives up with a StoreUnavailableError naming the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from ._config import ReadOptions
from ._errors import IntegrityError
from ._fsio import is_local, is_transient, store_gave_up
from ._hashing import ChunkDigests, chunk_ranges

__all__ = ["ReadStats", "read_blob", "copy_verified"]

log = logging.getLogger("trims_ray")
T = TypeVar("T")


@dataclass(frozen=True)
class ReadStats:
    """How a read went: bytes, wall seconds, the rate in bytes per second, and how many
    requests were sent again after a failure that passed."""

    nbytes: int
    seconds: float
    retries: int = 0

    @property
    def bytes_per_second(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else float("inf")


def read_blob(
    fs,
    path: str,
    *,
    nbytes: int | None = None,
    sha256: str | None = None,
    chunk_digests: ChunkDigests | None = None,
    out: np.ndarray | None = None,
    options: ReadOptions | None = None,
    source: str | None = None,
) -> tuple[np.ndarray, ReadStats]:
    """Reads the file at ``path`` into one buffer with parallel ranged reads.

    Args:
        fs: an fsspec filesystem.
        path: the file within ``fs``.
        nbytes: the size the caller expects (from a manifest); a different size is an
            IntegrityError. None reads whatever size the file has.
        sha256: the expected hex digest; the bytes are hashed as they arrive and a mismatch is an
            IntegrityError. None skips verification (for reading outside input to be parsed).
        chunk_digests: expected per-chunk digests; each chunk is verified by the thread that
            read it (in parallel) and ``sha256`` is then not recomputed.
        out: a writable 1-D uint8 array of exactly the file's size to read into (for example a
            buffer whose pages are already mapped); None allocates one.
        options: chunk size and parallelism; defaults to ``ReadOptions.from_env()``.
        source: what to call the file in messages; defaults to ``path``.

    Returns:
        The buffer and the read's stats. The timing covers the reads and the verification.

    Raises:
        IntegrityError: wrong size, short read, or sha256 mismatch. Nothing is returned then, and
            the caller must not use ``out``.
        StoreUnavailableError: an object store kept failing a request (refused or dropped
            connections, timeouts, 5xx answers) through ``options.retries`` retries.
        ValueError: ``out`` has the wrong size, type or is read-only.
        FileNotFoundError: no file at ``path``.
    """
    options = options or ReadOptions.from_env()
    source = source or path
    started = time.perf_counter()
    local = is_local(fs)
    retry = _Retrier(fs, source, options)
    fd = os.open(path, os.O_RDONLY) if local else None
    try:
        size = os.fstat(fd).st_size if local else retry(lambda: fs.size(path), "its size")
        if nbytes is not None and size != nbytes:
            raise IntegrityError(
                f"{source}: has {size} bytes, the manifest says {nbytes}; the blob is truncated "
                "or replaced: re-register the model"
            )
        buffer = _check_out(out, size) if out is not None else np.empty(size, dtype=np.uint8)
        if chunk_digests is not None:
            checks = chunk_digests.ranges(size)
            if len(checks) != len(chunk_digests.digests):
                raise IntegrityError(
                    f"{source}: has {size} bytes, which is {len(checks)} chunks, but the manifest "
                    f"lists {len(chunk_digests.digests)} chunk digests"
                )
            expected = dict(zip(checks, chunk_digests.digests))
            # A local file is read chunk by chunk, so that every core hashes; an object store
            # gets ranged requests of at least options.chunk_bytes (small chunks would multiply
            # the requests), each verifying the chunks it holds.
            within = _grouped(checks, 1 if local else options.chunk_bytes)
            ranges = list(within)
        else:
            ranges = chunk_ranges(size, options.chunk_bytes)
            expected, within = {}, {}
        hasher = hashlib.sha256() if sha256 is not None and not expected else None

        def read_range(start: int, end: int) -> None:
            if local:
                _pread_exactly(fd, memoryview(buffer[start:end]), start, source)
            else:
                data = retry(lambda: fs.cat_file(path, start=start, end=end), f"bytes {start}-{end}")
                if len(data) != end - start:
                    raise IntegrityError(
                        f"{source}: short read at {start}: {len(data)} of {end - start} bytes"
                    )
                buffer[start:end] = np.frombuffer(data, dtype=np.uint8)
            for check in within.get((start, end), ()):
                _check_chunk(buffer, *check, expected[check], source)

        pool = _local_pool(options.concurrency) if local else ThreadPoolExecutor(options.concurrency, "trims-read")
        futures: list[Future] = []
        try:
            for start, end in ranges:
                futures.append(pool.submit(read_range, start, end))
            for (start, end), future in zip(ranges, futures):
                future.result()
                if hasher is not None:
                    hasher.update(memoryview(buffer[start:end]))
        except BaseException:
            retry.stop()  # ranges backing off for a retry give up rather than wait
            for future in futures:
                future.cancel()
            # No range may write into the buffer, or read the file, once this raises: a caller
            # may read another source into the buffer at once (the loader falls back from a bad
            # disk copy to the store).
            wait(futures)
            raise
        finally:
            if not local:
                pool.shutdown(wait=True)
        if hasher is not None and hasher.hexdigest() != sha256:
            raise IntegrityError(
                f"{source}: sha256 mismatch: the manifest says {sha256}, the bytes hash to "
                f"{hasher.hexdigest()}; nothing was kept: re-register the model or repair the store"
            )
        return buffer, ReadStats(size, time.perf_counter() - started, retry.retries)
    finally:
        if fd is not None:
            os.close(fd)


_local_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (pid, threads) -> pool
_local_pools_lock = threading.Lock()


def _local_pool(threads: int) -> ThreadPoolExecutor:
    """This process's pool for local reads of ``threads`` threads (made on first use; a forked
    child makes its own, its parent's threads not being there)."""
    key = (os.getpid(), threads)
    with _local_pools_lock:
        pool = _local_pools.get(key)
        if pool is None:
            pool = _local_pools[key] = ThreadPoolExecutor(threads, "trims-read-local")
        return pool


class _Retrier:
    """The retries of one blob read, shared by its ranged reads.

    A request that fails in a way that may pass is sent again after a backoff that doubles each
    time (with jitter, so that many readers do not retry in step). After ``options.retries``
    retries it gives up with a StoreUnavailableError; giving up, or ``stop``, makes every other
    range of the read give up at once instead of waiting out its own backoff.
    """

    def __init__(self, fs, source: str, options: ReadOptions) -> None:
        self.fs = fs
        self.source = source
        self.options = options
        self.retries = 0
        self._lock = threading.Lock()
        self._over = threading.Event()
        self._started = time.perf_counter()

    def __call__(self, request: Callable[[], T], what: str) -> T:
        wait = self.options.retry_backoff_s
        for attempt in range(self.options.retries + 1):
            try:
                return request()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                last = exc
            if attempt == self.options.retries or self._over.is_set():
                break
            pause = wait * random.uniform(0.5, 1.0)
            log.warning(
                "trims_ray: reading %s of %s failed (%s: %s); retry %d of %d in %.2f s",
                what,
                self.source,
                type(last).__name__,
                last,
                attempt + 1,
                self.options.retries,
                pause,
            )
            with self._lock:
                self.retries += 1
            if self._over.wait(pause):
                break
            wait *= 2
        self._over.set()
        raise store_gave_up(self.fs, self.source, last, attempt + 1, time.perf_counter() - self._started) from last

    def stop(self) -> None:
        self._over.set()


def copy_verified(
    src: np.ndarray, out: np.ndarray, chunk_digests: ChunkDigests, *, source: str, concurrency: int = 8
) -> ReadStats:
    """Copies ``src`` into ``out`` chunk by chunk on a thread pool, verifying each copied chunk
    against ``chunk_digests`` (for bytes that arrive other than from a file: a peer's memory).

    Raises:
        IntegrityError: sizes differ or a chunk does not match; ``out`` must not be used then.
        ValueError: ``out`` has the wrong size, type or is read-only.
    """
    started = time.perf_counter()
    _check_out(out, len(src))
    ranges = chunk_digests.ranges(len(src))
    if len(ranges) != len(chunk_digests.digests):
        raise IntegrityError(
            f"{source}: has {len(src)} bytes, which is {len(ranges)} chunks, but the manifest "
            f"lists {len(chunk_digests.digests)} chunk digests"
        )

    def copy_range(start: int, end: int, digest: str) -> None:
        out[start:end] = src[start:end]
        # Hash the copy, not the source: what is verified is what will be served.
        _check_chunk(out, start, end, digest, source)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="trims-copy") as pool:
        for future in [pool.submit(copy_range, s, e, d) for (s, e), d in zip(ranges, chunk_digests.digests)]:
            future.result()
    return ReadStats(len(src), time.perf_counter() - started)


def _grouped(checks: list[tuple[int, int]], at_least: int) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Consecutive chunks joined into ranges of at least ``at_least`` bytes (the last range may
    be shorter): range -> the chunks in it, in order."""
    grouped: dict[tuple[int, int], list[tuple[int, int]]] = {}
    group: list[tuple[int, int]] = []
    for check in checks:
        group.append(check)
        if group[-1][1] - group[0][0] >= at_least:
            grouped[(group[0][0], group[-1][1])] = group
            group = []
    if group:
        grouped[(group[0][0], group[-1][1])] = group
    return grouped


def _check_chunk(buffer: np.ndarray, start: int, end: int, expected: str, source: str) -> None:
    digest = hashlib.sha256(memoryview(buffer[start:end])).hexdigest()
    if digest != expected:
        raise IntegrityError(
            f"{source}: sha256 mismatch in bytes {start}-{end}: the manifest says "
            f"{expected}, the bytes hash to {digest}; nothing was kept: "
            "re-register the model or repair the store"
        )


def _check_out(out: np.ndarray, size: int) -> np.ndarray:
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 1:
        raise ValueError("out must be a 1-D numpy uint8 array")
    if len(out) != size:
        raise ValueError(f"out has {len(out)} bytes, the file has {size}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    return out


def _pread_exactly(fd: int, view: memoryview, offset: int, source: str) -> None:
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise IntegrityError(f"{source}: file ended at byte {offset} while reading")
        view = view[n:]
        offset += n
