"""What the GPU tier needs of a device and of the host tier, as protocols: the CUDA device
(``_cuda.CudaDevice``) and the test double (``cache.gpu_tier.FakeDevice``) implement them.

The devices layer's vocabulary: it names no implementation, so the cache core and CUDA both
import it from below.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ContextManager, Protocol

import numpy as np

if TYPE_CHECKING:
    from ._gpu_ipc import LayerGroup
    from ._manifest import Manifest

__all__ = ["DeviceMemory", "CopyJob", "GpuDevice", "HostSource"]


@dataclass(frozen=True)
class DeviceMemory:
    """Device memory in bytes: ``free`` counts every process's use of the GPU."""

    total: int
    free: int


class CopyJob(Protocol):
    """Copies enqueued by ``GpuDevice.copy_in``.

    Attributes:
        events: one exportable event per layer group (CUDA: the IPC handle bytes of an
            interprocess event recorded after the group's copies), for pipelined grants; empty
            when the device has none.
    """

    events: tuple

    def wait(self) -> None:
        """Blocks until every copy is done, calling the job's ``on_layer(i)`` as each group
        completes, in order; then releases the host memory's registration. Raises what the
        copies raised; releases the registration in any case."""


class GpuDevice(Protocol):
    """One GPU, as the tier uses it. Implementations: ``trims_ray._cuda.CudaDevice``,
    ``FakeDevice``."""

    def memory(self) -> DeviceMemory:
        """Total and free device memory now."""

    def footprint(self, nbytes: int) -> int:
        """Bytes an allocation for ``nbytes`` really takes (what the tier accounts)."""

    def allocate(self, nbytes: int) -> object:
        """One buffer of at least ``nbytes`` bytes, the only one in its device allocation.

        Raises:
            MemoryError: the device has no room for it.
        """

    def copy_in(
        self,
        buffer: object,
        host: np.ndarray,
        groups: Sequence[LayerGroup],
        on_layer: Callable[[int], None] | None = None,
    ) -> CopyJob:
        """Starts copying ``host`` (1-D uint8, the blob) into ``buffer`` at the same offsets,
        group by group in order; returns at once where the device copies asynchronously."""

    def export(self, buffer: object) -> object:
        """A picklable handle through which another process on this GPU maps the whole
        allocation (CUDA IPC); the same handle serves every task."""

    def free(self, buffer: object) -> None:
        """Frees the allocation, so that the device's free memory grows by its footprint."""


class HostSource(Protocol):
    """Where a swap-in reads a model's bytes: the node's host tier (a lease on its shared
    object, held while the copy runs)."""

    def open(self, manifest: Manifest) -> ContextManager[tuple[np.ndarray, str]]:
        """Leases the blob: yields (read-only 1-D uint8 view of exactly ``manifest.nbytes``,
        the tier it came from: "host" for a host hit, "disk"/"peer"/"store" when the host tier
        loaded it) and ends the host lease on exit.

        Raises:
            ModelNotFoundError, CapacityError, IntegrityError: as the host tier's acquire.
        """
