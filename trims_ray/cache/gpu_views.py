"""What one GPU's tier tells others, in snapshots taken under its lock: its counters, its
leases, which blobs are on the device or on their way (and their manifests), and the report
placement ranks GPUs by. A mixin of ``gpu_tier.GpuTier`` (it reads the tier's lock and tables
and changes nothing), kept apart so that the tier's module holds its logic alone, as
``node_views`` is for the node cache.
"""

from __future__ import annotations

from .._manifest import Manifest
from .._protocol import TierStats

__all__ = ["GPU", "GpuTierViews", "off_stats"]

GPU = "gpu"


def off_stats() -> TierStats:
    """The GPU tier's stats on a node without a usable GPU (capacity 0); the reason travels
    beside it (see ``gpu_holder.gpu_status``)."""
    return TierStats()


class GpuTierViews:
    """The read-only views of a ``GpuTier`` (see the module's doc)."""

    def held_manifest(self, key: str) -> Manifest | None:
        """The manifest of the model on this GPU under ``key`` (ready or swapping in), or None:
        what a holder checks a task's ``Resolved`` hint against (``ManifestCache.get``), since
        every manifest acquired here was resolved by the holder first."""
        with self._lock:
            entry = self._resident.get(key)
            return None if entry is None else entry.manifest

    def stats(self) -> TierStats:
        """A snapshot of the tier's counters; bytes include swap-ins in flight."""
        with self._lock:
            return TierStats(**vars(self._stats))

    def leases(self) -> int:
        with self._lock:
            return len(self._leases)

    def resident(self) -> dict[str, str]:
        """``cache_key`` -> "gpu" (ready) or "loading" (being swapped in)."""
        with self._lock:
            return self._residency()

    def report(self) -> dict:
        """What placement needs of this GPU, in one snapshot: residency per blob, budget, use,
        leases and waiters per blob, and (tenant, name, nbytes) per blob."""
        with self._lock:
            return {
                "device": self.identity,
                "residency": self._residency(),
                "gpu_capacity": self.budget,
                "gpu_used": self._used(),
                "in_flight": {k: e.leases for k, e in self._resident.items() if e.leases},
                "models": {
                    k: (e.manifest.tenant, e.manifest.name, e.manifest.nbytes) for k, e in self._resident.items()
                },
            }

    def _residency(self) -> dict[str, str]:
        """``cache_key`` -> "gpu" or "loading" (under the tier's lock)."""
        return {k: GPU if e.ready.is_set() else "loading" for k, e in self._resident.items()}
