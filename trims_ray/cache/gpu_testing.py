"""Stand-ins for a GPU and for a node's host tier, so that the GPU tier runs without CUDA or a
cluster: ``FakeDevice`` (device memory as numpy arrays, with a copy gate and injected faults for
tests) and ``ArraySource`` (host bytes from arrays in this process, for tests and benchmarks).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .._devices import DeviceMemory
from .._errors import ModelNotFoundError
from .._manifest import Manifest

__all__ = ["FakeDevice", "ArraySource"]


@dataclass(eq=False)
class _FakeBuffer:
    id: int
    data: np.ndarray


class _FakeJob:
    def __init__(self, device: FakeDevice, buffer: _FakeBuffer, host: np.ndarray, groups, on_layer) -> None:
        self.events = tuple(f"fake-event-{buffer.id}-{i}" for i in range(len(groups)))
        self._run = (device, buffer, host, groups, on_layer)

    def wait(self) -> None:
        device, buffer, host, groups, on_layer = self._run
        for i, group in enumerate(groups):
            if device.gate is not None and i > 0 and not device.gate.wait(30):
                raise TimeoutError("FakeDevice: the test never opened the copy gate")
            if device.fail_copy is not None:
                raise device.fail_copy
            for start, end in group.ranges:
                buffer.data[start:end] = host[start:end]
            if on_layer is not None:
                on_layer(i)


class FakeDevice:
    """A GpuDevice in CPU memory, for tests: allocations are numpy arrays, handles are ids this
    process can ``open``, copies run in ``CopyJob.wait``.

    Args:
        total: the fake GPU's memory in bytes.
        granularity: allocations are rounded up to a multiple of this (as CUDA's are).
        gate: when set, each copy job stops before its second layer until the event is set
            (so that a test can hold a swap-in in flight after pipelined grants went out).

    Attributes:
        external: bytes "other processes" use (lowers ``memory().free``).
        fail_copy: an exception the next copies raise.
        allocations: live buffers by id; ``freed``: ids freed, in order.
    """

    def __init__(self, total: int, *, granularity: int = 1, gate: threading.Event | None = None) -> None:
        self.total = total
        self.granularity = granularity
        self.gate = gate
        self.external = 0
        self.fail_copy: BaseException | None = None
        self.allocations: dict[int, _FakeBuffer] = {}
        self.freed: list[int] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def memory(self) -> DeviceMemory:
        with self._lock:
            used = sum(len(b.data) for b in self.allocations.values()) + self.external
        return DeviceMemory(self.total, max(0, self.total - used))

    def footprint(self, nbytes: int) -> int:
        return -(-max(nbytes, 1) // self.granularity) * self.granularity

    def allocate(self, nbytes: int) -> _FakeBuffer:
        size = self.footprint(nbytes)
        if size > self.memory().free:
            raise MemoryError(f"fake GPU: {size} bytes asked, {self.memory().free} free")
        buffer = _FakeBuffer(next(self._ids), np.zeros(size, dtype=np.uint8))
        with self._lock:
            self.allocations[buffer.id] = buffer
        return buffer

    def copy_in(self, buffer, host, groups, on_layer=None) -> _FakeJob:
        return _FakeJob(self, buffer, host, groups, on_layer)

    def export(self, buffer: _FakeBuffer) -> tuple[str, int]:
        return ("fake", buffer.id)

    def open(self, handle: tuple[str, int]) -> np.ndarray:
        """The allocation a handle names (what a task on a real GPU maps through IPC).

        Raises:
            KeyError: it was freed.
        """
        return self.allocations[handle[1]].data

    def free(self, buffer: _FakeBuffer) -> None:
        with self._lock:
            del self.allocations[buffer.id]
            self.freed.append(buffer.id)


class ArraySource:
    """A HostSource over blobs in this process's memory (sha256 -> 1-D uint8 array), for tests
    and for benchmarks that run without Ray; counts the leases it gave.

    Args:
        blobs: the blobs, by sha256.
        tier: what ``open`` says the bytes came from.
    """

    def __init__(self, blobs: dict[str, np.ndarray] | None = None, tier: str = "host") -> None:
        self.blobs = dict(blobs or {})
        self.tier = tier
        self.opened: Counter[str] = Counter()
        self.open_now = 0
        self.gate: threading.Event | None = None  # when set, open waits for it (a slow host load)

    @contextlib.contextmanager
    def open(self, manifest: Manifest) -> Iterator[tuple[np.ndarray, str]]:
        """Yields the blob and ``tier``.

        Raises:
            ModelNotFoundError: no blob of that sha256.
        """
        blob = self.blobs.get(manifest.sha256)
        if blob is None:
            raise ModelNotFoundError(f"no host copy of {manifest.tenant}/{manifest.name} ({manifest.sha256})")
        self.opened[manifest.sha256] += 1
        if self.gate is not None and not self.gate.wait(30):
            raise TimeoutError("ArraySource: the test never opened the gate")
        self.open_now += 1
        try:
            yield blob, self.tier
        finally:
            self.open_now -= 1
