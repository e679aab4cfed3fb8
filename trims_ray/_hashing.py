"""sha256 of a blob, whole and per fixed-size chunk.

The whole-blob digest is the blob's content address. The chunk digests let a reader verify
chunks in parallel as they arrive: a single sha256 stream runs at 0.2-0.3 GB/s per core on CPUs
without SHA extensions (measured here), far below a disk or network, so one stream would cap
every verified read. Chunks also let a consumer verify a prefix before using it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["CHUNK_BYTES", "MIN_CHUNK_BYTES", "ChunkDigests", "chunk_bytes_for", "chunk_ranges", "digest_blob"]

# The largest chunk: large enough that per-chunk overhead (a thread hand-off, a digest in the
# manifest) is small for big models.
CHUNK_BYTES = 16 * 1024 * 1024
# The smallest, and how many chunks a blob gets when it is small: a read verifies its chunks on
# all cores at once, so a 20 MiB model in 16 MiB chunks was hashed mostly by one core (11 of its
# 14 ms of sha256 here), in 2 MiB chunks by every core. Reads from an object store still send
# ranged GETs of ReadOptions.chunk_bytes (several chunks each): the chunk is what is hashed.
MIN_CHUNK_BYTES = 2 * 1024 * 1024
PARALLEL_CHUNKS = 8


def chunk_bytes_for(nbytes: int) -> int:
    """The chunk size a blob of ``nbytes`` is digested in: CHUNK_BYTES, halved (down to
    MIN_CHUNK_BYTES) while the blob would have fewer than PARALLEL_CHUNKS chunks."""
    size = CHUNK_BYTES
    while size > MIN_CHUNK_BYTES and nbytes < size * PARALLEL_CHUNKS:
        size //= 2
    return size


@dataclass(frozen=True)
class ChunkDigests:
    """sha256 hex digests of consecutive ``chunk_bytes`` slices of a blob (the last may be short)."""

    chunk_bytes: int
    digests: tuple[str, ...]

    def ranges(self, nbytes: int) -> list[tuple[int, int]]:
        return chunk_ranges(nbytes, self.chunk_bytes)


def chunk_ranges(nbytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """[start, end) of consecutive ``chunk_bytes`` slices of ``nbytes`` (the last may be short)."""
    return [(s, min(s + chunk_bytes, nbytes)) for s in range(0, nbytes, chunk_bytes)]


def digest_blob(pieces: Iterable[memoryview | bytes], *, chunk_bytes: int = CHUNK_BYTES) -> tuple[str, ChunkDigests]:
    """Hashes a blob given as consecutive pieces: its whole sha256 and its chunk digests.

    The chunks are hashed on a thread pool while this thread hashes the whole stream (hashlib
    releases the GIL), so the wall time is about one sha256 pass on two or more cores. The pieces
    must stay valid until this returns (views of live tensors are).
    """
    whole = hashlib.sha256()
    jobs = []
    pending: list[memoryview] = []
    filled = 0
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="trims-hash") as pool:
        for piece in pieces:
            piece = memoryview(piece).cast("B")
            whole.update(piece)
            while len(piece):
                take = min(len(piece), chunk_bytes - filled)
                pending.append(piece[:take])
                filled += take
                piece = piece[take:]
                if filled == chunk_bytes:
                    jobs.append(pool.submit(_sha256_hex, pending))
                    pending, filled = [], 0
        if pending:
            jobs.append(pool.submit(_sha256_hex, pending))
        digests = tuple(job.result() for job in jobs)
    return whole.hexdigest(), ChunkDigests(chunk_bytes, digests)


def _sha256_hex(pieces: list[memoryview]) -> str:
    h = hashlib.sha256()
    for piece in pieces:
        h.update(piece)
    return h.hexdigest()
