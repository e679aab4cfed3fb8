"""The buffers a node's loads read blobs into, used again from one load to the next.

A miss reads its blob into a buffer of this process, verifies it there and copies it into the
object store (``host_loader.HostLoader.load``). A new buffer for every load cost the kernel a page
fault and the zeroing of every page the read wrote to. In a one-node peers run (20 MiB models,
about a third of the requests missing) that was 17% of the node cache actor's CPU once the run
was warm, measured with ``perf record`` on the actor. ``python -m workloads.bench buffers`` read
256 MiB from the page cache in 192.9 ms into a new numpy array and in 29.8 ms into a buffer used
again (359.6 against 115.9 ms with every chunk verified, as a miss reads). A buffer used again
costs neither. Idle buffers are bounded in bytes and in time: a loader that has not loaded for
a while gives them all back. Cache core, no Ray.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable

import numpy as np

__all__ = ["GRANULE", "IDLE_S", "KEEP_IDLE_BYTES", "LoadBuffers"]

# Buffers are made in multiples of this (a huge page), so that blobs of about the same size
# share them.
GRANULE = 2 * 1024 * 1024
# The idle buffers kept at most, in bytes: this process's memory beyond the object store's. A
# blob bigger than this is read into a new buffer every time.
KEEP_IDLE_BYTES = 1024**3
# Seconds without a load after which every idle buffer is let go (``trim_if_idle``).
IDLE_S = 30.0


class LoadBuffers:
    """Writable buffers of a size asked for, each made from an idle one when one fits.

    A buffer goes back to the idle ones when no numpy view of it is left anywhere (the load's own,
    those the read's threads made, a disk copy still to be written), never before: its memory is
    the bytes of a load until then. Idle ones beyond ``keep_bytes`` are let go (their memory goes
    back to the OS at once: each is an anonymous mapping of its own, not malloc's).

    Args:
        keep_bytes: idle buffers kept at most, in bytes; 0 keeps none.
        idle_s: ``trim_if_idle`` lets every idle buffer go once no buffer was taken or given
            back for this long.
        clock: monotonic seconds.
    """

    def __init__(
        self, keep_bytes: int = KEEP_IDLE_BYTES, idle_s: float = IDLE_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if keep_bytes < 0:
            raise ValueError(f"keep_bytes must be >= 0, got {keep_bytes}")
        self.keep_bytes = keep_bytes
        self.idle_s = idle_s
        self._clock = clock
        self._last_used = clock()  # the latest take or give-back
        self.made = 0  # buffers made new (the rest of ``take``'s answers were used again)
        self._lock = threading.Lock()
        self._idle: list[mmap.mmap] = []
        # Buffers given back by the finalizer of their last view. It can run in any thread at any
        # point where a reference is dropped (a garbage collection inside ``take``'s lock among
        # them), so it only appends here, which needs no lock; ``take`` and ``trim`` move them
        # to ``_idle``.
        self._returned: deque[mmap.mmap] = deque()
        # A private mapping: ordinary anonymous memory (Python's default, MAP_SHARED, would be
        # shared memory, accounted as such).
        self._flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS

    def take(self, nbytes: int) -> np.ndarray:
        """A writable 1-D uint8 array of ``nbytes`` (its contents are whatever an earlier load
        left: write every byte that will be read)."""
        if nbytes <= 0:
            raise ValueError(f"nbytes must be > 0, got {nbytes}")
        size = -(-nbytes // GRANULE) * GRANULE
        with self._lock:
            self._last_used = self._clock()
            self._settle()
            # The smallest idle one that fits, if it is not over twice the size: a small blob
            # must not hold a big buffer that a big one could have used.
            fits = [m for m in self._idle if size <= len(m) <= 2 * size]
            storage = min(fits, key=len) if fits else None
            if storage is not None:
                self._idle.remove(storage)
            else:
                self.made += 1
        if storage is None:
            storage = mmap.mmap(-1, size, flags=self._flags)
        # A view object made for this loan alone: numpy views of the array keep it alive, and
        # its finalizer, which runs when the last of them is gone, hands the storage back.
        lent = (ctypes.c_uint8 * len(storage)).from_buffer(storage)
        finalizer = weakref.finalize(lent, self._give_back, storage)
        finalizer.atexit = False
        return np.frombuffer(lent, dtype=np.uint8, count=nbytes)

    def idle_bytes(self) -> int:
        """Bytes of the idle buffers (those given back since the last ``take`` included)."""
        with self._lock:
            self._settle()
            return sum(len(m) for m in self._idle)

    def trim(self, keep_bytes: int = 0) -> None:
        """Lets go of idle buffers until at most ``keep_bytes`` of them are left (0: all)."""
        with self._lock:
            self._settle(keep_bytes)

    def trim_if_idle(self) -> None:
        """Lets go of every idle buffer if none was taken or given back for ``idle_s``."""
        with self._lock:
            if self._clock() - self._last_used >= self.idle_s:
                self._settle(0)

    def _give_back(self, storage: mmap.mmap) -> None:
        # The finalizer of a loan's last view: no lock here (see ``_returned``).
        self._returned.append(storage)
        self._last_used = self._clock()

    def _settle(self, keep_bytes: int | None = None) -> None:
        """Under the lock: moves the buffers given back to the idle ones, then lets the oldest
        go while they hold more than ``keep_bytes`` (default: ``self.keep_bytes``)."""
        while self._returned:
            self._idle.append(self._returned.popleft())
        limit = self.keep_bytes if keep_bytes is None else keep_bytes
        held = sum(len(m) for m in self._idle)
        while self._idle and held > limit:
            # Dropped, not closed: the view that gave it back may not have released its export
            # yet; the mapping goes when its last reference does.
            held -= len(self._idle.pop(0))
