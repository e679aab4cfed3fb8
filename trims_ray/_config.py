"""Settings read from the environment, in one place.

Every ``TRIMS_RAY_*`` variable trims_ray honours is read here and nowhere else, so that the list
of knobs is this file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["default_store_uri", "caller_tenant_from_env", "ReadOptions"]


def default_store_uri() -> str:
    """``$TRIMS_RAY_STORE``, else ``file://~/.cache/trims_ray/store`` (expanded)."""
    uri = os.environ.get("TRIMS_RAY_STORE", "").strip()
    if uri:
        return uri
    return (Path.home() / ".cache" / "trims_ray" / "store").as_uri()


def caller_tenant_from_env() -> str | None:
    """``$TRIMS_RAY_TENANT`` (Ray's runtime_env carries it to tasks), or None when unset."""
    tenant = os.environ.get("TRIMS_RAY_TENANT", "").strip()
    return tenant or None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True, kw_only=True)
class ReadOptions:
    """How the store reader splits a blob into parallel ranged reads.

    Args:
        chunk_bytes: size of one ranged read. Large enough that per-request overhead (an HTTP
            round trip for S3) is small, small enough that several are in flight per blob.
        concurrency: ranged reads in flight at once.
    """

    chunk_bytes: int = 16 * 1024 * 1024
    concurrency: int = 8

    def __post_init__(self) -> None:
        if type(self.chunk_bytes) is not int or self.chunk_bytes < 4096:
            raise ValueError(f"chunk_bytes must be an int >= 4096, got {self.chunk_bytes!r}")
        if type(self.concurrency) is not int or not 1 <= self.concurrency <= 256:
            raise ValueError(f"concurrency must be an int in 1..256, got {self.concurrency!r}")

    @classmethod
    def from_env(cls) -> ReadOptions:
        """Defaults overridden by ``$TRIMS_RAY_READ_CHUNK_BYTES`` / ``$TRIMS_RAY_READ_CONCURRENCY``."""
        base = cls()
        return cls(
            chunk_bytes=_env_int("TRIMS_RAY_READ_CHUNK_BYTES", base.chunk_bytes),
            concurrency=_env_int("TRIMS_RAY_READ_CONCURRENCY", base.concurrency),
        )
