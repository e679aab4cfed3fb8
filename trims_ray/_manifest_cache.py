"""Resolved manifests, trusted for a while: what a model name means for a tenant, as the first
process of an invocation that needs it looks it up (the caller's router, else the node cache or
the GPU holder a task asks).

A name is resolved through the store (two or three reads: reachability, the tenant's manifest,
then the public one), which costs tens of milliseconds on S3: in the replay it was most of a
host-tier hit's latency, paid on the caller and on the node every ``ttl_s``. So a manifest is
trusted for ``ttl_s`` and, while it is being used, read again in the background before it
expires (``refresh``): a model in steady use never waits for the store, and a re-registered name
is still seen within ``ttl_s`` of its registration. A manifest not used since its last read is left
to expire; its next use reads the store itself.

A name is resolved once per invocation: each later hop gets a ``Resolved`` hint and serves,
without reading the store, its own trusted manifest of the name, else the manifest of a copy it
holds (resolved by itself when the copy was taken) whose fingerprint the hint names, when that
manifest is the asking tenant's or public. Anything else is resolved as if no hint had come: a
hint cannot name another tenant's private model nor a manifest this process never resolved. A
caller's hint is at most ``ttl_s`` old, so a re-registered name is still seen within ``ttl_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ._errors import ModelNotFoundError
from ._manifest import Manifest
from ._names import PUBLIC_TENANT
from ._protocol import Resolved

__all__ = ["ManifestCache"]

log = logging.getLogger("trims_ray")


@dataclass
class _Resolved:
    manifest: Manifest
    read_at: float  # when the read that produced it started
    used: bool = False  # used since that read


class ManifestCache:
    """(tenant, name) -> Manifest, each trusted ``ttl_s`` seconds from the start of its read.

    Args:
        read: ``read(name, tenant)``, the store's resolution (it raises the store's errors).
        ttl_s: how long a read is trusted; 0 reads on every use.
        clock: monotonic time source (injected by tests).
    """

    def __init__(self, read: Callable[[str, str], Manifest], ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s < 0:
            raise ValueError(f"ttl_s must be >= 0, got {ttl_s}")
        self._read = read
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], _Resolved] = {}

    def get(
        self,
        name: str,
        tenant: str,
        *,
        hint: Resolved | None = None,
        held: Callable[[str], Manifest | None] | None = None,
    ) -> Manifest:
        """The manifest ``name`` means for ``tenant``, read from the store unless trusted.

        Args:
            hint: what an earlier hop of the same invocation resolved ``name`` to for ``tenant``.
                When this cache has no trusted manifest of the name, the hint saves the read if
                ``held`` vouches for it.
            held: ``held(cache_key)``: the manifest of the copy this process holds under that
                key (one it resolved itself before keeping the copy), or None.

        Raises:
            whatever ``read`` raises (ModelNotFoundError, ModelFormatError, ...).
        """
        key = (tenant, name)
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and now - entry.read_at < self.ttl_s:
                # Our own read outranks a hint. A hinted use does not keep the entry refreshed:
                # the caller that resolved the name keeps its own fresh.
                if hint is None:
                    entry.used = True
                return entry.manifest
        if hint is not None and held is not None:
            copy = held(hint.key)
            # A copy of the very manifest the caller resolved (this process's own read of it),
            # of a tenant the caller may see. Anything else, another tenant's private model
            # included, is resolved below: that one is then not found, as a missing name is.
            if (
                copy is not None
                and copy.fingerprint == hint.fingerprint
                and copy.name == name
                and copy.tenant in (tenant, PUBLIC_TENANT)
            ):
                return copy
        manifest = self._read(name, tenant)
        if self.ttl_s > 0:
            with self._lock:
                self._entries[key] = _Resolved(manifest, now)
        return manifest

    def refresh(self) -> int:
        """Reads again every manifest used since its last read and past half its ``ttl_s``, and
        forgets those expired unused; returns how many were read. A name that no longer exists
        is forgotten; a read that fails otherwise leaves the old one to expire (its next use then
        reads the store itself and meets the error)."""
        now = self._clock()
        with self._lock:
            due = [k for k, e in self._entries.items() if e.used and now - e.read_at >= self.ttl_s / 2]
            for key in [k for k, e in self._entries.items() if not e.used and now - e.read_at >= self.ttl_s]:
                del self._entries[key]
        for tenant, name in due:
            started = self._clock()
            try:
                manifest = self._read(name, tenant)
            except ModelNotFoundError:
                with self._lock:
                    self._entries.pop((tenant, name), None)
                continue
            except Exception as exc:  # the store is unreachable, say: the use that needs it will say so
                log.debug("trims_ray: background manifest read of %s/%s failed: %s", tenant, name, exc)
                continue
            with self._lock:
                self._entries[(tenant, name)] = _Resolved(manifest, started)
        return len(due)

    def refresh_until(self, stop: threading.Event) -> None:
        """Runs ``refresh`` four times per ``ttl_s`` until ``stop`` is set (a thread's target):
        a manifest in use is read again when between half and three quarters of its ttl old."""
        if self.ttl_s <= 0:
            return
        while not stop.wait(max(self.ttl_s / 4, 0.05)):
            try:
                self.refresh()
            except Exception as exc:  # the thread must go on
                log.warning("trims_ray: manifest refresh failed: %s", exc)

    def start_refreshing(self, stop: threading.Event, name: str = "trims-manifests") -> threading.Thread:
        """Starts ``refresh_until(stop)`` in a daemon thread; returns the thread."""
        thread = threading.Thread(target=self.refresh_until, args=(stop,), name=name, daemon=True)
        thread.start()
        return thread

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
