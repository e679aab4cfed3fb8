"""mprotect-based write protection of leased blobs, on real shared memory.

Writes that must fault run in a forked child (they kill it with SIGSEGV); the mapping is
MAP_SHARED, so the parent would see any write that got through. Page permissions in the parent
are also read from /proc/self/maps, which checks protection without faulting.
"""

from __future__ import annotations

import ctypes
import errno
import faulthandler
import mmap
import multiprocessing
import os
import resource
import signal
import threading
import traceback

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trims_ray import _protect
from trims_ray._protect import (
    GUARD_BYTES,
    PAGE,
    ProtectToken,
    ReadOnlyGuard,
    is_enabled,
    page_span,
    protect_array,
    read_only,
)

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux")

SEGV = -signal.SIGSEGV


# --------------------------------------------------------------------------------- helpers


def _child_main(fn):
    # pytest enables faulthandler; without this the expected faults print tracebacks. No core
    # files either.
    faulthandler.disable()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        ok = fn()
    except BaseException:
        traceback.print_exc()
        os._exit(3)
    os._exit(0 if ok is None or ok is True else 4)


def in_child(fn, timeout: float = 20.0) -> int:
    """Runs ``fn`` in a forked child; returns its exit code (-SIGSEGV if it faulted; 4 if it
    returned False; 3 if it raised)."""
    proc = multiprocessing.get_context("fork").Process(target=_child_main, args=(fn,))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail("child process hung")
    return proc.exitcode


def perms(address: int) -> str:
    """The permission field ('rw-s', 'r--s', ...) of the mapping holding ``address``."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return line.split()[1]
    raise AssertionError(f"{address:#x} is not mapped")


def writable(address: int) -> bool:
    return perms(address)[1] == "w"


@pytest.fixture
def shm():
    """A factory of numpy views over fresh MAP_SHARED anonymous memory (page aligned)."""
    maps = []

    def make(nbytes: int) -> np.ndarray:
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_SHARED)
        maps.append(mm)
        arr = np.frombuffer(mm, dtype=np.uint8)
        assert arr.flags.writeable and arr.ctypes.data % PAGE == 0
        arr[:] = np.arange(nbytes, dtype=np.uint64).astype(np.uint8)
        return arr

    yield make
    # Arrays may still export the buffers, so the maps are left to the garbage collector.


@pytest.fixture
def guard():
    g = ReadOnlyGuard()
    yield g
    assert g.held_spans() == {}, "test left spans protected"


@pytest.fixture(autouse=True)
def protection_on(monkeypatch):
    monkeypatch.delenv("TRIMS_RAY_PROTECT", raising=False)


def child_writes_numpy(arr: np.ndarray, index: int, value: int = 0xAB):
    def write():
        arr[index] = value

    return in_child(write)


def child_writes_torch(arr: np.ndarray):
    def write():
        torch.from_numpy(arr).add_(1)

    return in_child(write)


# ------------------------------------------------------------------------------- page_span


@pytest.mark.parametrize(
    "address, nbytes, expected",
    [
        (0, PAGE, (0, PAGE)),  # exactly one page
        (PAGE, PAGE, (PAGE, 2 * PAGE)),
        (PAGE + 1, 1, (PAGE, 2 * PAGE)),  # one byte inside a page
        (PAGE - 1, 2, (0, 2 * PAGE)),  # straddles a boundary
        (3 * PAGE + 100, 2 * PAGE, (3 * PAGE, 6 * PAGE)),  # unaligned start and end
        (5 * PAGE, 2 * PAGE + 1, (5 * PAGE, 8 * PAGE)),  # aligned start, unaligned end
        (5 * PAGE + 7, PAGE - 7, (5 * PAGE, 6 * PAGE)),  # unaligned start, aligned end
        (PAGE + 5, 0, (PAGE, PAGE)),  # zero length: empty
        (0, 0, (0, 0)),
    ],
)
def test_page_span_examples(address, nbytes, expected):
    assert page_span(address, nbytes) == expected


@settings(max_examples=500, deadline=None)
@given(address=st.integers(0, 2**47), nbytes=st.integers(0, 2**33))
def test_page_span_covers_is_aligned_and_minimal(address, nbytes):
    start, end = page_span(address, nbytes)
    assert start % PAGE == 0 and end % PAGE == 0 and start <= end
    if nbytes == 0:
        assert start == end
        return
    assert start <= address and address + nbytes <= end  # covers
    assert address - start < PAGE  # minimal: the first page holds the first byte
    assert end - (address + nbytes) < PAGE  # ... and the last page holds the last byte


@settings(max_examples=300, deadline=None)
@given(obj_address=st.integers(0, 2**47), blob=st.integers(0, 2**33))
def test_padding_keeps_the_span_inside_the_object(obj_address, blob):
    # [GUARD][blob][GUARD] at obj_address: the blob's page span never leaves the object.
    start, end = page_span(obj_address + GUARD_BYTES, blob)
    assert obj_address <= start and end <= obj_address + 2 * GUARD_BYTES + blob


def test_guard_bytes_is_at_least_4096_and_whole_pages():
    assert GUARD_BYTES >= 4096 and GUARD_BYTES >= PAGE and GUARD_BYTES % PAGE == 0


@pytest.mark.parametrize("address, nbytes", [(-1, 10), (0, -1), (2**64 - 1, 2)])
def test_page_span_rejects_bad_ranges(address, nbytes):
    with pytest.raises(ValueError):
        page_span(address, nbytes)


def test_page_span_rejects_non_integers():
    with pytest.raises(TypeError):
        page_span(1.5, 10)
    assert page_span(np.int64(PAGE), np.uint32(1)) == (PAGE, 2 * PAGE)


# ---------------------------------------------------------------------- protect and release


def test_protected_pages_read_fine_and_writes_fault_in_numpy_and_torch(shm, guard):
    arr = shm(4 * PAGE)
    blob = arr[PAGE : 3 * PAGE]
    original = arr.copy()
    token = guard.protect(blob.ctypes.data, blob.nbytes)
    try:
        assert guard.held_spans() == {(blob.ctypes.data, blob.ctypes.data + 2 * PAGE): 1}
        assert perms(blob.ctypes.data) == "r--s" and not writable(blob.ctypes.data + PAGE)
        assert np.array_equal(blob, original[PAGE : 3 * PAGE])  # reads work
        assert int(blob.sum()) == int(original[PAGE : 3 * PAGE].sum())

        assert child_writes_numpy(blob, 0) == SEGV
        assert child_writes_numpy(blob, blob.size - 1) == SEGV
        assert child_writes_torch(blob) == SEGV
        # A second child that only reads sees the original bytes through the shared mapping.
        expected = original[PAGE : 3 * PAGE].copy()
        assert in_child(lambda: bool(np.array_equal(blob, expected))) == 0
        assert np.array_equal(arr, original)  # nothing got through
        # Pages outside the span keep their protection.
        assert writable(arr.ctypes.data) and writable(arr.ctypes.data + 3 * PAGE)
    finally:
        guard.release(token)
    assert writable(blob.ctypes.data) and writable(blob.ctypes.data + PAGE)
    blob[0] = 0xAB  # writes work again in this very process
    torch.from_numpy(blob).add_(1)
    assert blob[0] == 0xAC and int(blob[-1]) == (int(original[3 * PAGE - 1]) + 1) % 256


def test_unprotected_shared_memory_is_really_shared(shm):
    # The control for the tests above: a child's write is visible here, so "unchanged" means
    # the write was stopped, not that it went to a private copy.
    arr = shm(PAGE)
    assert child_writes_numpy(arr, 10, 0xEE) == 0
    assert child_writes_torch(arr[100:200]) == 0
    assert arr[10] == 0xEE and arr[100] == 101


def test_identical_spans_are_reference_counted(shm, guard, monkeypatch):
    calls = []
    real = _protect._mprotect
    monkeypatch.setattr(_protect, "_mprotect", lambda *a: (calls.append(a), real(*a))[1])
    arr = shm(2 * PAGE)
    blob = arr[10:PAGE]  # both tokens have the same page span [0, PAGE)
    first = guard.protect(blob.ctypes.data, blob.nbytes)
    second = protect_array(arr[:100], guard)
    assert guard.held_spans() == {(arr.ctypes.data, arr.ctypes.data + PAGE): 2}
    assert len(calls) == 1  # only the first holder called mprotect

    guard.release(first)
    assert not writable(arr.ctypes.data)
    assert child_writes_numpy(arr, 50) == SEGV
    assert arr[50] == 50
    assert len(calls) == 1

    guard.release(second)
    assert len(calls) == 2 and calls[1][2] == mmap.PROT_READ | mmap.PROT_WRITE
    arr[50] = 0xFF
    assert arr[50] == 0xFF and guard.held_spans() == {}


def test_releasing_unknown_or_released_tokens_raises(shm, guard):
    arr = shm(PAGE)
    token = protect_array(arr, guard)
    guard.release(token)
    with pytest.raises(ValueError, match="not held"):
        guard.release(token)
    with pytest.raises(ValueError):
        span = (arr.ctypes.data, arr.ctypes.data + PAGE)
        guard.release(ProtectToken(arr.ctypes.data, PAGE, span, True))
    other = ReadOnlyGuard()
    foreign = protect_array(arr, other)
    try:
        with pytest.raises(ValueError):
            guard.release(foreign)
        assert not writable(arr.ctypes.data)  # the failed release changed nothing
    finally:
        other.release(foreign)
    assert writable(arr.ctypes.data)


def test_overlapping_spans_protect_their_union(shm, guard):
    arr = shm(4 * PAGE)
    base = arr.ctypes.data
    a = protect_array(arr[: 2 * PAGE], guard)  # pages 0, 1
    b = protect_array(arr[PAGE + 5 : 3 * PAGE - 5], guard)  # pages 1, 2
    assert [writable(base + i * PAGE) for i in range(4)] == [False, False, False, True]

    guard.release(a)
    # Page 0 is only A's: writable. Page 1 is still B's: read-only.
    assert [writable(base + i * PAGE) for i in range(4)] == [True, False, False, True]
    arr[0] = 0xAA
    assert child_writes_numpy(arr, PAGE + 1) == SEGV
    assert child_writes_numpy(arr, 2 * PAGE) == SEGV
    assert arr[PAGE + 1] == (PAGE + 1) % 256 and arr[2 * PAGE] == 0

    c = protect_array(arr[2 * PAGE : 4 * PAGE], guard)  # pages 2, 3 (page 2 shared with B)
    guard.release(b)
    assert [writable(base + i * PAGE) for i in range(4)] == [True, True, False, False]
    guard.release(c)
    assert all(writable(base + i * PAGE) for i in range(4))
    arr[:] = 7
    assert guard.held_spans() == {}


@pytest.mark.parametrize("offset", [0, 1, 100, PAGE - 1])
@pytest.mark.parametrize("blob_bytes", [1, PAGE, 10_000, 3 * PAGE + 17])
def test_padding_layout_keeps_the_span_within_the_object(shm, guard, offset, blob_bytes):
    # [GUARD][blob][GUARD] placed at an arbitrary (unaligned) offset of one mapping.
    size = 2 * GUARD_BYTES + blob_bytes
    arr = shm(offset + size + PAGE)
    obj = arr[offset : offset + size]
    blob = obj[GUARD_BYTES : GUARD_BYTES + blob_bytes]
    with read_only(blob, guard) as token:
        start, end = token.span
        assert obj.ctypes.data <= start and end <= obj.ctypes.data + obj.nbytes
        assert not writable(blob.ctypes.data) and not writable(blob.ctypes.data + blob_bytes - 1)
        obj[0] = 0x11  # the first and last guard bytes stay writable: no fault here
        obj[-1] = 0x22
        assert obj[0] == 0x11 and obj[-1] == 0x22
    assert guard.held_spans() == {}


def test_blob_write_faults_inside_a_padded_object(shm, guard):
    arr = shm(2 * GUARD_BYTES + 10_000 + 300)
    obj = arr[300:]
    blob = obj[GUARD_BYTES : GUARD_BYTES + 10_000]
    before = blob.copy()
    with read_only(blob, guard):
        assert child_writes_numpy(blob, 0) == SEGV
        assert child_writes_numpy(blob, blob.size - 1) == SEGV
        obj[0], obj[-1] = 1, 2
    assert np.array_equal(blob, before)


def test_read_only_releases_on_exception(shm, guard):
    arr = shm(PAGE)
    with pytest.raises(RuntimeError, match="boom"):
        with read_only(arr, guard):
            assert not writable(arr.ctypes.data)
            raise RuntimeError("boom")
    assert writable(arr.ctypes.data) and guard.outstanding() == 0
    arr[0] = 1


def test_module_helpers_use_the_process_wide_guard(shm):
    arr = shm(PAGE)
    token = _protect.protect(arr.ctypes.data, 10)
    try:
        assert _protect.GUARD.held_spans()[(arr.ctypes.data, arr.ctypes.data + PAGE)] >= 1
        assert not writable(arr.ctypes.data)
    finally:
        _protect.release(token)
    with read_only(arr):
        assert not writable(arr.ctypes.data)
    assert writable(arr.ctypes.data) and _protect.GUARD.held_spans() == {}


def test_zero_length_protects_nothing(shm, guard):
    arr = shm(PAGE)
    token = guard.protect(arr.ctypes.data + 5, 0)
    assert not token.active and guard.held_spans() == {} and writable(arr.ctypes.data)
    guard.release(token)
    with pytest.raises(ValueError):
        guard.release(token)


@pytest.mark.parametrize(
    "bad, exc",
    [
        ([1, 2, 3], TypeError),
        (np.zeros(PAGE, dtype=np.float32), ValueError),
        (np.zeros((2, PAGE), dtype=np.uint8), ValueError),
        (np.zeros(2 * PAGE, dtype=np.uint8)[::2], ValueError),
    ],
)
def test_protect_array_validates(bad, exc, guard):
    with pytest.raises(exc):
        protect_array(bad, guard)
    assert guard.outstanding() == 0


def test_mprotect_failure_raises_oserror_naming_the_range(guard):
    # Page 0 is never mapped (vm.mmap_min_addr), so mprotect fails with ENOMEM.
    with pytest.raises(OSError) as info:
        guard.protect(0, 10)
    assert info.value.errno == errno.ENOMEM
    assert "0x0" in str(info.value) and hex(PAGE) in str(info.value)
    assert guard.held_spans() == {} and guard.outstanding() == 0


def test_failed_protect_rolls_back_the_pieces_it_did(shm, guard):
    # Span = [mapped page][unmapped page]: the held span in the middle splits it in two pieces,
    # the first piece succeeds, the second fails; the first must be made writable again.
    mm = mmap.mmap(-1, 3 * PAGE, flags=mmap.MAP_SHARED)
    base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    inner = guard.protect(base + PAGE, PAGE)
    # Unmap page 2 only (munmap through ctypes; Python's mmap cannot unmap part of a map).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    assert libc.munmap(ctypes.c_void_p(base + 2 * PAGE), ctypes.c_size_t(PAGE)) == 0
    with pytest.raises(OSError) as info:
        guard.protect(base, 3 * PAGE)
    assert info.value.errno == errno.ENOMEM
    assert writable(base) and not writable(base + PAGE)
    assert guard.held_spans() == {(base + PAGE, base + 2 * PAGE): 1}
    guard.release(inner)
    assert writable(base + PAGE)


# ---------------------------------------------------------------------------- env switch


def test_env_switch_turns_protection_off(shm, guard, monkeypatch):
    arr = shm(2 * PAGE)
    monkeypatch.setenv("TRIMS_RAY_PROTECT", "0")
    assert not is_enabled()
    token = protect_array(arr, guard)
    assert isinstance(token, ProtectToken) and not token.active
    assert guard.held_spans() == {} and writable(arr.ctypes.data)
    assert child_writes_numpy(arr, 3, 0x5A) == 0  # no fault ...
    assert arr[3] == 0x5A  # ... and the write is shared
    guard.release(token)
    with pytest.raises(ValueError):  # still validated while off
        guard.release(token)
    with pytest.raises(ValueError):
        guard.protect(-1, 1)


def test_turning_protection_off_does_not_leak_a_held_span(shm, guard, monkeypatch):
    arr = shm(PAGE)
    token = protect_array(arr, guard)
    monkeypatch.setenv("TRIMS_RAY_PROTECT", "0")
    guard.release(token)  # protected while on: must still be restored
    assert writable(arr.ctypes.data) and guard.held_spans() == {}


@pytest.mark.parametrize("value, on", [("1", True), ("", True), ("0", False), ("off", False),
                                        ("False", False), ("yes", True)])
def test_is_enabled_reads_the_env_var(monkeypatch, value, on):
    monkeypatch.setenv("TRIMS_RAY_PROTECT", value)
    assert is_enabled() is on


# ------------------------------------------------------------------------------- threads


def test_concurrent_protect_and_release_end_clean(shm, guard):
    arr = shm(8 * PAGE)
    views = [arr[: 4 * PAGE], arr[10 : 4 * PAGE - 10], arr[2 * PAGE : 6 * PAGE], arr[7 * PAGE :]]
    errors = []
    start = threading.Barrier(16)

    def worker(i):
        try:
            start.wait()
            for n in range(150):
                view = views[(i + n) % len(views)]
                token = protect_array(view, guard)
                assert not writable(view.ctypes.data)
                guard.release(token)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    assert guard.held_spans() == {} and guard.outstanding() == 0
    assert all(writable(arr.ctypes.data + i * PAGE) for i in range(8))
    arr[:] = 3
    assert int(arr.sum()) == 3 * arr.size
