"""Write protection for leased model bytes: while a task holds a lease, the pages holding that
model's blob in plasma shared memory are made read-only in this process with mprotect(2), so an
in-place write (numpy, or torch, which ignores numpy's read-only flag) faults instead of silently
corrupting the one copy every task and tenant on the node shares. Releasing the lease restores
read-write, because plasma may later reuse that memory for an object this process writes.

The cache stores each object as ``[GUARD_BYTES padding][blob][GUARD_BYTES padding]``, so the
page span covering the blob (see :func:`page_span`) never reaches another object's bytes.

Overlapping spans: the guard keeps reference counts per distinct span and treats the protected
memory as the *union* of all held spans. Protecting a span only mprotects the pages no held span
covers yet; releasing the last holder of a span only restores the pages no remaining span
covers. This is per-page reference counting computed from intervals (a page is read-only while
any held span contains it), without a per-page table that would cost one entry per 4 KiB of a
multi-GB model. Overlaps are not refused: two models' spans cannot overlap given the padding,
but two leases on different slices of one blob can, and they must both be correct.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno as _errno
import mmap
import operator
import os
import threading
from collections.abc import Iterator

import numpy as np

from ._config import protection_from_env

__all__ = [
    "PAGE",
    "GUARD_BYTES",
    "ENV_VAR",
    "page_span",
    "is_enabled",
    "ProtectToken",
    "ReadOnlyGuard",
    "GUARD",
    "protect",
    "release",
    "protect_array",
    "read_only",
]

PAGE: int = mmap.PAGESIZE
# The padding the cache puts before and after a blob: 4096 bytes, rounded up to whole pages so
# that the page span of the blob never leaves the object even where pages are larger.
GUARD_BYTES: int = -(-4096 // PAGE) * PAGE


_PROT_READ = mmap.PROT_READ
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_ADDRESS_LIMIT = 1 << (8 * ctypes.sizeof(ctypes.c_void_p))


def is_enabled() -> bool:
    """False when ``$TRIMS_RAY_PROTECT`` is 0/false/no/off (e.g. for debugging); read per call."""
    return protection_from_env()


def _check_range(address: int, nbytes: int) -> tuple[int, int]:
    try:
        address, nbytes = operator.index(address), operator.index(nbytes)
    except TypeError:
        raise TypeError(
            f"address and nbytes must be integers, got {type(address).__name__} "
            f"and {type(nbytes).__name__}"
        ) from None
    if address < 0 or nbytes < 0:
        raise ValueError(f"address ({address:#x}) and nbytes ({nbytes}) must be >= 0")
    if address + nbytes > _ADDRESS_LIMIT:
        raise ValueError(f"range {address:#x}+{nbytes} runs past the end of the address space")
    return address, nbytes


def page_span(address: int, nbytes: int) -> tuple[int, int]:
    """The page-aligned ``[start, end)`` covering ``[address, address + nbytes)``.

    ``nbytes == 0`` gives an empty span (``start == end``).
    """
    address, nbytes = _check_range(address, nbytes)
    start = address - address % PAGE
    if nbytes == 0:
        return start, start
    end = -(-(address + nbytes) // PAGE) * PAGE
    return start, end


_libc_mprotect = None


def _mprotect_fn():
    global _libc_mprotect
    if _libc_mprotect is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.mprotect
        except (OSError, AttributeError):  # pragma: no cover - non-glibc fallbacks
            name = ctypes.util.find_library("c")
            if name is None:
                raise OSError(_errno.ENOSYS, "mprotect: no C library found") from None
            fn = ctypes.CDLL(name, use_errno=True).mprotect
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        _libc_mprotect = fn
    return _libc_mprotect


def _mprotect(start: int, end: int, prot: int) -> None:
    """mprotect(2) on ``[start, end)``; raises OSError naming the range on failure."""
    fn = _mprotect_fn()
    if fn(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(prot)) != 0:
        err = ctypes.get_errno()
        what = "PROT_READ" if prot == _PROT_READ else "PROT_READ|PROT_WRITE"
        raise OSError(
            err,
            f"mprotect([{start:#x}, {end:#x}), {end - start} bytes, {what}) failed: "
            f"{os.strerror(err)}",
        )


def _subtract(span: tuple[int, int], others) -> list[tuple[int, int]]:
    """The parts of ``span`` that no interval in ``others`` covers, in order."""
    start, end = span
    cuts = sorted((max(s, start), min(e, end)) for s, e in others if s < end and e > start)
    out, pos = [], start
    for s, e in cuts:
        if s > pos:
            out.append((pos, s))
        pos = max(pos, e)
    if pos < end:
        out.append((pos, end))
    return out


class ProtectToken:
    """What :meth:`ReadOnlyGuard.protect` hands back; pass it to :meth:`ReadOnlyGuard.release`.

    Compared by identity: each protect call gets its own token, released exactly once.
    """

    __slots__ = ("address", "nbytes", "span", "active")

    def __init__(self, address: int, nbytes: int, span: tuple[int, int], active: bool):
        self.address = address
        self.nbytes = nbytes
        self.span = span
        # False when protection was off (or the span empty): release then changes nothing.
        self.active = active

    def __repr__(self) -> str:
        state = "active" if self.active else "no-op"
        return (f"ProtectToken([{self.span[0]:#x}, {self.span[1]:#x}) for "
                f"{self.address:#x}+{self.nbytes}, {state})")


class ReadOnlyGuard:
    """Thread-safe registry of read-only page spans with reference counts.

    ``protect`` makes the page span of a byte range PROT_READ (a span already held just gains a
    reference, no syscall); ``release`` drops the reference and restores PROT_READ|PROT_WRITE on
    the pages that no held span covers any more. Held spans may overlap: protection is the union
    of the held spans (see the module docstring).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[int, int], int] = {}  # span -> holders (active tokens)
        self._tokens: set[ProtectToken] = set()  # every outstanding token, active or not

    def protect(self, address: int, nbytes: int) -> ProtectToken:
        """Makes the pages covering ``[address, address + nbytes)`` read-only in this process.

        Raises OSError (with errno) if mprotect fails; nothing stays registered or protected
        then. With protection disabled (``$TRIMS_RAY_PROTECT=0``) this only validates the
        arguments and returns a token.
        """
        address, nbytes = _check_range(address, nbytes)
        span = page_span(address, nbytes)
        token = ProtectToken(address, nbytes, span, active=is_enabled() and span[0] < span[1])
        with self._lock:
            if token.active:
                if span in self._counts:
                    self._counts[span] += 1
                else:
                    done: list[tuple[int, int]] = []
                    try:
                        for piece in _subtract(span, self._counts):
                            _mprotect(*piece, _PROT_READ)
                            done.append(piece)
                    except OSError:
                        for piece in done:
                            with contextlib.suppress(OSError):
                                _mprotect(*piece, _PROT_RW)
                        raise
                    self._counts[span] = 1
            self._tokens.add(token)
        return token

    def release(self, token: ProtectToken) -> None:
        """Drops one hold; restores read-write on pages no remaining span covers.

        An unknown or already released token raises ValueError. If restoring fails (OSError),
        the token is still consumed: the registry never holds a span whose holder is gone.
        """
        with self._lock:
            if token not in self._tokens:
                raise ValueError(f"{token!r} is not held by this guard (unknown or released)")
            self._tokens.remove(token)
            if not token.active:
                return
            span = token.span
            remaining = self._counts[span] - 1
            if remaining:
                self._counts[span] = remaining
                return
            del self._counts[span]
            for piece in _subtract(span, self._counts):
                _mprotect(*piece, _PROT_RW)

    def held_spans(self) -> dict[tuple[int, int], int]:
        """A snapshot of the protected spans and their reference counts."""
        with self._lock:
            return dict(self._counts)

    def outstanding(self) -> int:
        """How many tokens (including no-op ones) have not been released."""
        with self._lock:
            return len(self._tokens)


GUARD = ReadOnlyGuard()
"""The process-wide guard the helpers below use."""


def protect(address: int, nbytes: int) -> ProtectToken:
    """``GUARD.protect``."""
    return GUARD.protect(address, nbytes)


def release(token: ProtectToken) -> None:
    """``GUARD.release``."""
    GUARD.release(token)


def _array_range(arr: np.ndarray) -> tuple[int, int]:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"expected a numpy.ndarray, got {type(arr).__name__}")
    if arr.ndim != 1 or arr.dtype != np.uint8:
        raise ValueError(f"expected a 1-D uint8 array, got shape {arr.shape} dtype {arr.dtype}")
    if arr.nbytes and arr.strides[0] != 1:
        raise ValueError(f"expected a contiguous array, got stride {arr.strides[0]}")
    return arr.ctypes.data, arr.nbytes


def protect_array(arr: np.ndarray, guard: ReadOnlyGuard | None = None) -> ProtectToken:
    """Protects the pages under a contiguous 1-D uint8 array (a blob view into plasma)."""
    return (guard if guard is not None else GUARD).protect(*_array_range(arr))


@contextlib.contextmanager
def read_only(arr: np.ndarray, guard: ReadOnlyGuard | None = None) -> Iterator[ProtectToken]:
    """Protects ``arr``'s pages for the ``with`` block and releases them on exit, even on error.

    Yields the token.
    """
    guard = guard if guard is not None else GUARD
    token = protect_array(arr, guard)
    try:
        yield token
    finally:
        guard.release(token)
