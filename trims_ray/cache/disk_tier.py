"""The disk tier of a node: verified, content-addressed blobs in a local directory under a byte
budget, kept across restarts. Cache core, no Ray: ``node_cache.NodeCache`` owns one, keeps its
bookkeeping under its own lock, and reads and writes the files outside it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from .._protocol import TierStats
from ..policy import EvictionPolicy, Outcome, decide_admission, shrink_victims
from .quotas import tenant_of, tenant_quota

__all__ = ["DiskTier", "LOCAL_FS"]

log = logging.getLogger("trims_ray")

# The filesystem the disk tier's files are read and written through (the verified reader and
# the atomic writer take an fsspec filesystem).
LOCAL_FS = LocalFileSystem()


class DiskTier:
    """Verified blobs in a directory, one file per cache key: ``<tenant>/<sha256>.safetensors``,
    under a byte budget and optional per-tenant quotas.

    Files are per tenant like host entries, because a disk hit is as visible a timing signal as
    a host hit: identical weights of two tenants are two files (see ``cache_key``). Files found
    at start-up are adopted (the tier persists across restarts); they are verified when read,
    like everything else. Not thread-safe on its own: NodeCache calls it under its lock for
    bookkeeping and does the I/O outside.
    """

    def __init__(
        self,
        directory: Path,
        budget: int,
        policy: EvictionPolicy,
        on_change: Callable[[], None] = lambda: None,
        quota: Callable[[str], int | None] = lambda tenant: None,
    ) -> None:
        self.directory = directory
        self.budget = budget
        self.policy = policy
        self.on_change = on_change
        self.quota = quota  # tenant -> the bytes it may hold here, None: no quota
        self.sizes: dict[str, int] = {}
        self.reserved: dict[str, int] = {}  # writes in flight count against the budget too
        self.stats = TierStats(capacity=budget)
        self.quota_denied: dict[str, int] = {}  # per tenant: disk copies its quota refused
        directory.mkdir(parents=True, exist_ok=True)
        self._directory_id = _directory_id(directory)  # to notice it deleted or replaced
        # Files directly in the directory are named as before tenants (by sha256 alone): whose
        # they are is unknown, so they go.
        stale = [*directory.glob("*.safetensors"), *directory.glob(".*.part"), *directory.glob("*/.*.part")]
        for path in stale:  # ...and temp files of writes that a crash interrupted
            path.unlink(missing_ok=True)
        for path in sorted(directory.glob("*/*.safetensors")):
            key = f"{path.parent.name}/{path.name.removesuffix('.safetensors')}"
            size = path.stat().st_size
            quota = self.quota(path.parent.name) if _is_cache_key(key) else None
            if (
                not _is_cache_key(key)
                or self.used + size > budget  # over a (smaller) new budget
                or (quota is not None and self.tenant_used(path.parent.name) + size > quota)
            ):
                path.unlink(missing_ok=True)
                continue
            self._track(key, size)

    @property
    def used(self) -> int:
        return sum(self.sizes.values()) + sum(self.reserved.values())

    def tenant_used(self, tenant: str) -> int:
        """Bytes of ``tenant``'s blobs here, writes in flight included."""
        return sum(n for held in (self.sizes, self.reserved) for k, n in held.items() if tenant_of(k) == tenant)

    def tenants(self) -> set[str]:
        """The tenants holding bytes here, writes in flight included."""
        return {tenant_of(k) for held in (self.sizes, self.reserved) for k in held}

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def _track(self, key: str, size: int) -> None:
        self.sizes[key] = size
        self.policy.on_insert(key, size, 0.0)
        self._refresh()

    def _refresh(self) -> None:
        self.stats.bytes_used, self.stats.models = self.used, len(self.sizes)
        self.on_change()

    def forget(self, key: str, *, evicted: bool) -> None:
        if key in self.sizes:
            del self.sizes[key]
            self.policy.on_remove(key)
            self.path(key).unlink(missing_ok=True)
            self.stats.evictions += evicted
            self._refresh()

    def reserve(self, key: str, nbytes: int, cost: float | None) -> bool:
        """Claims room for a write about to start (evicting if needed); False if it can't fit,
        the blob is already here or on its way, or the policy does not admit it at the price of
        its victims (``cost``: what a disk hit saves, seconds; None: admit in any case)."""
        self.check_directory()
        if key in self.sizes or key in self.reserved or not self.make_room(nbytes, key, cost):
            return False
        self.reserved[key] = nbytes
        self._refresh()
        return True

    def unreserve(self, key: str) -> None:
        del self.reserved[key]
        self._refresh()

    def make_room(self, nbytes: int, key: str, cost: float | None) -> bool:
        """Evicts least valuable blobs until ``nbytes`` fit; False (nothing evicted) if they
        can't, or if the policy would rather keep them than ``key``.

        A tenant over its quota makes room from its own blobs only: another tenant's are never
        evicted to let one exceed its share (a disk copy it cannot have is skipped, counted in
        ``quota_denials``; the load it came from is not failed).
        """
        tenant = tenant_of(key)
        decision = decide_admission(
            self.policy,
            key,
            nbytes,
            0.0 if cost is None else cost,
            budget=self.budget,
            used=self.used,
            sizes=self.sizes,  # writes in flight are not in it: every blob here is idle
            quota=tenant_quota(tenant, self.quota(tenant), self.tenant_used(tenant)),
            force=cost is None,
        )
        if decision.outcome is Outcome.OVER_QUOTA:
            self.stats.quota_denials += 1
            self.quota_denied[tenant] = self.quota_denied.get(tenant, 0) + 1
        elif decision.outcome is Outcome.REFUSED:
            self.stats.bypasses += 1
        if not decision.kept:
            return False
        for victim in decision.victims:
            self.forget(victim, evicted=True)
        return True

    def set_budget(self, budget: int) -> int:
        """Changes the budget now; lowered below the blobs written, those are deleted in the
        policy's eviction order until they fit. Writes already queued (reserved) are not
        counted here: each is decided when it lands (``adopt``). Returns how many blobs were
        deleted."""
        self.budget = budget
        self.stats.capacity = budget
        deleted = self._fit_budget()
        self._refresh()
        return deleted

    def _fit_budget(self, keep: str | None = None) -> int:
        """Deletes written blobs in the policy's eviction order until they fit the budget (it
        was lowered), never ``keep``; returns how many."""
        return self._shrink(self.sizes, self.budget, keep)

    def fit_tenant(self, tenant: str, limit: int, keep: str | None = None) -> int:
        """``_fit_budget`` for ``tenant``'s own blobs against its quota of ``limit`` bytes. Writes
        queued before are decided when they land (``adopt``)."""
        return self._shrink({k: n for k, n in self.sizes.items() if tenant_of(k) == tenant}, limit, keep)

    def _shrink(self, sizes: dict[str, int], limit: int, keep: str | None) -> int:
        """Deletes blobs of ``sizes`` (some of the tier's) in the policy's eviction order until
        they hold at most ``limit`` bytes, never ``keep``; returns how many (``forget``
        refreshes the figures)."""
        victims = shrink_victims(self.policy, sum(sizes.values()) - limit, sizes, lambda key: key in sizes and key != keep)
        for victim in victims:
            self.forget(victim, evicted=True)
        return len(victims)

    def adopt(self, key: str, size: int) -> None:
        """A blob written: from now on in the tier. One bigger than a budget, or its tenant's
        quota, lowered while it was being written is deleted at once; one that fits them but
        not beside the others makes room for itself (its tenant's own blobs for its quota), as
        if it were admitted now."""
        tenant = tenant_of(key)
        quota = self.quota(tenant)
        if size > self.budget or (quota is not None and size > quota):
            self.path(key).unlink(missing_ok=True)
            return
        self._track(key, size)
        self.stats.loads += 1
        self._fit_budget(keep=key)  # no-op unless the budget was lowered while it was written
        if quota is not None:
            self.fit_tenant(tenant, quota, keep=key)  # the same for a quota lowered meanwhile

    # -- faults: the disk full, the directory deleted, a file gone or bad ----------------------

    def read_failed(self, key: str) -> None:
        """A blob's file could not be read or failed verification: forgets it, counts the
        error, and recovers in case the whole directory went."""
        self.forget(key, evicted=False)
        self._failed()

    def write_failed(self, key: str) -> None:
        """A write reserved with ``reserve`` failed (disk full, file-size limit, directory
        deleted): releases its room, counts the error, and recovers."""
        self.unreserve(key)
        self._failed()

    def check_directory(self) -> None:
        """Recovers if the directory was deleted or replaced since it was last seen (a cheap
        stat, done before every write so that the blobs that went with it are not counted)."""
        if _directory_id(self.directory) != self._directory_id:
            log.warning("trims_ray: disk tier directory %s was deleted or replaced", self.directory)
            self._failed()

    def recover(self) -> int:
        """Recreates the directory if it is gone and forgets every blob whose file is missing or
        has changed size, so that the budget and stats count what is really there. Returns how
        many blobs were forgotten.

        Raises:
            OSError: the directory cannot be recreated.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self._directory_id = _directory_id(self.directory)
        gone = [key for key, size in self.sizes.items() if _file_size(self.path(key)) != size]
        for key in gone:
            self.forget(key, evicted=False)
        if gone:
            log.warning("trims_ray: disk tier %s: forgot %d blob(s) whose files are gone", self.directory, len(gone))
        return len(gone)

    def _failed(self) -> None:
        self.stats.errors += 1
        try:
            self.recover()
        except OSError as exc:  # tried again at the next failure or write
            log.warning("trims_ray: disk tier %s cannot recover yet: %s", self.directory, exc)
        self._refresh()


def _directory_id(directory: Path) -> tuple[int, int] | None:
    try:
        st = directory.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


_KEY_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}/[0-9a-f]{64}")


def _is_cache_key(key: str) -> bool:
    return _KEY_RE.fullmatch(key) is not None
