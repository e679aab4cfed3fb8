"""Keeps trims_ray's long-lived actors from holding on to memory they have freed (glibc only).

glibc gives each thread that allocates an arena of its own (up to eight per core) and keeps what
is freed there for reuse. A node cache's threads (Ray's, and those that serve its calls and read
blobs) allocate and free blob-sized buffers and request state, so the actor's private memory
grew by 25-58 MiB over a soak and stayed after the final evict, although its Python objects
grew by a few MiB (measured with tracemalloc). The arena count must be set before those threads
first allocate, which for Ray's own threads is before the actor's ``__init__``: so it travels in
the actor's environment (``ACTOR_ENV``, Ray's runtime_env), read when its process starts. After
an evict, ``give_back_free_memory`` hands the arenas' free pages back to the OS. Both do
nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes

__all__ = ["ACTOR_ENV", "give_back_free_memory"]

# Two arenas bound what the threads keep; one would make every thread wait on the same lock.
ACTOR_ENV = {"MALLOC_ARENA_MAX": "2"}


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, the C library's among them
        libc.malloc_trim  # noqa: B018 - glibc has it; others may not
    except (OSError, AttributeError):
        return None
    return libc


def give_back_free_memory() -> bool:
    """Returns the free pages of every arena to the OS (glibc's ``malloc_trim(0)``). Returns
    whether any memory was released; False where the call does not exist."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))
