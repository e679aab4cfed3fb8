"""``python -m workloads.bench buffers``: what the buffer a node cache reads a miss into costs.

One synthetic blob of ``--mb`` MiB is registered in a local store and read from the page cache
(nothing from the disk: this measures memory, not the device) into three kinds of buffer, in
turn, ``--repeats`` times:

- a new numpy array for every read, as the node cache's loads had before ``cache/load_buffers``;
- a new buffer from ``LoadBuffers`` for every read (its idle ones let go first);
- a ``LoadBuffers`` buffer used again, as a node that keeps loading gets.

Each is timed twice: the raw read alone (16 MiB preads), and the store's verified read (every
chunk's sha256, on the reader's threads), which is what a miss does. A new buffer costs a page
fault and the zeroing of every page the read writes to; one used again costs neither.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from trims_ray import ModelStore
from trims_ray.cache.load_buffers import LoadBuffers

__all__ = ["BUFFER_KINDS", "BuffersResult", "bench_buffers", "print_buffers"]

NEW_ARRAY, NEW_BUFFER, USED_BUFFER = "new numpy array", "new LoadBuffers buffer", "LoadBuffers buffer used again"
BUFFER_KINDS = (NEW_ARRAY, NEW_BUFFER, USED_BUFFER)


@dataclass
class BuffersResult:
    nbytes: int
    repeats: int
    raw_ms: dict[str, list[float]]
    verified_ms: dict[str, list[float]]


def bench_buffers(mb: int, repeats: int, directory: str | None) -> BuffersResult:
    from workloads.bench import raw_local_read, synthetic_weights, warm_page_cache

    raw_ms: dict[str, list[float]] = {kind: [] for kind in BUFFER_KINDS}
    verified_ms: dict[str, list[float]] = {kind: [] for kind in BUFFER_KINDS}
    with tempfile.TemporaryDirectory(prefix="trims-bench-", dir=directory) as tmp:
        store = ModelStore(tmp)
        info = store.register("buffers-bench", synthetic_weights(mb * 1024 * 1024), tenant="bench")
        manifest = store.manifest("buffers-bench", tenant="bench")
        path = store.blob_path(info.sha256)
        warm_page_cache(path)
        buffers = LoadBuffers()
        used = buffers.take(info.nbytes)
        used[:] = 0  # written once, as by an earlier load

        def buffer(kind: str) -> np.ndarray:
            if kind == NEW_ARRAY:
                return np.empty(info.nbytes, dtype=np.uint8)
            if kind == NEW_BUFFER:
                fresh = LoadBuffers(keep_bytes=0)  # keeps nothing: every take maps new memory
                return fresh.take(info.nbytes)
            return used

        for _ in range(repeats):
            for kind in BUFFER_KINDS:
                raw_ms[kind].append(raw_local_read(path, buffer(kind)) * 1000)
                out = buffer(kind)
                started = time.perf_counter()
                store.read(manifest, out=out)
                verified_ms[kind].append((time.perf_counter() - started) * 1000)
                del out
        del used
    return BuffersResult(info.nbytes, repeats, raw_ms, verified_ms)


def print_buffers(result: BuffersResult) -> None:
    print(
        f"buffers: a {result.nbytes / 2**20:.1f} MiB blob read from the page cache into each kind of "
        f"buffer, in turn, {result.repeats} times; medians, ms"
    )
    header = f"{'buffer':32} {'raw read':>9} {'verified read':>14}"
    print(header)
    print("-" * len(header))
    for kind in BUFFER_KINDS:
        print(f"{kind:32} {statistics.median(result.raw_ms[kind]):9.1f} {statistics.median(result.verified_ms[kind]):14.1f}")
    used_raw, new_raw = statistics.median(result.raw_ms[USED_BUFFER]), statistics.median(result.raw_ms[NEW_ARRAY])
    used_verified = statistics.median(result.verified_ms[USED_BUFFER])
    new_verified = statistics.median(result.verified_ms[NEW_ARRAY])
    print(
        f"a buffer used again against a new numpy array: raw read {used_raw / new_raw:.2f}x, "
        f"verified read {used_verified / new_verified:.2f}x"
    )
