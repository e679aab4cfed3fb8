"""The typed errors of trims_ray's public contract (see DESIGN.md, "Errors").

Errors cross process boundaries (a task raises, the driver catches), so every class keeps a
constructor that pickle can call with the message alone; extra details ride in ``__dict__``,
which ``BaseException.__reduce__`` carries along.
"""

from __future__ import annotations

__all__ = [
    "TrimsError",
    "ModelNotFoundError",
    "ModelFormatError",
    "IntegrityError",
    "CapacityError",
    "AccessDeniedError",
    "StoreUnavailableError",
]


class TrimsError(Exception):
    """Base class of every error trims_ray raises on purpose."""


class ModelNotFoundError(TrimsError, KeyError):
    """No model of that name is visible to the caller's tenant.

    Also a ``KeyError``, so ``except KeyError`` works as for a mapping. The message is the same
    whether the name does not exist or belongs to another tenant, so names do not leak.
    """

    def __str__(self) -> str:
        # KeyError.__str__ would wrap the message in quotes.
        return str(self.args[0]) if self.args else ""


class ModelFormatError(TrimsError):
    """Weights or a manifest are malformed: the message names the source and what is wrong."""


class IntegrityError(TrimsError):
    """Bytes read from a tier do not match the manifest's sha256; nothing of them is kept."""


class CapacityError(TrimsError):
    """A model does not fit a tier's byte budget, even after evicting everything evictable."""


class AccessDeniedError(TrimsError, PermissionError):
    """The caller named a tenant it does not act as."""


class StoreUnavailableError(TrimsError, ConnectionError):
    """The model store cannot be used: endpoint unreachable, credentials missing, no bucket.

    ``reason`` says which ("endpoint", "credentials", "bucket" or "io").
    """

    def __init__(self, message: str, *, reason: str = "io") -> None:
        super().__init__(message)
        self.reason = reason
