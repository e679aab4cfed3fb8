"""A peer fetch in bounded slices (issue 16 item 18): the borrower reads a blob a peer's host
tier lends it slice by slice, at most a few slices at once, verifies each of the manifest's
chunks and copies into its own host-tier buffer, so it never holds more than a bounded number of
bytes beyond the copy its host budget counts. Before, it pulled the lender's whole object into
its own object store (a second, uncounted copy of the blob) and copied from that.

The lender here is a real NodeCache (no Ray) holding a real model's blob, lent as a peer's
cache actor lends it; ``read_range`` hands out fresh arrays, as Ray hands the borrower each
slice it returns, and the test watches (by weak references) how many of them are alive at once.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import pytest
import torch

from trims_ray import IntegrityError
from trims_ray._manifest import Manifest
from trims_ray._protocol import cache_key
from trims_ray.cache.host_loader import PEER_CHUNK_BYTES, PEER_CHUNKS_IN_FLIGHT, read_in_chunks

# Fixtures reused from the node cache's tests (pytest finds them by name in this module).
from .test_node_cache import TENANT, blob, disk_dir, make_cache, memory, served, use  # noqa: F401

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def real_model() -> torch.nn.Module:
    """Two 2048x2048 layers: a blob of a little over 32 MiB, so 4 MiB manifest chunks
    (``chunk_bytes_for``), 8 full and 1 short: each 8 MiB peer slice completes two."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 2048))


@pytest.fixture
def lent(make_cache, file_store, tmp_path):
    """A peer's host-tier copy of a real model, lent; yields (manifest, the lent blob, the
    store's bytes of it). The lend is released afterwards."""
    info = file_store.register("m", real_model(), tenant=TENANT)
    peer = make_cache(disk_dir=tmp_path / "peer-disk")
    assert use(peer, "m") == "store"
    grant = peer.lend(cache_key(info))
    manifest = grant.manifest
    assert len(manifest.chunks.digests) == 9 and manifest.nbytes > 32 * MiB  # several chunks
    lent_blob = grant.handle[grant.offset : grant.offset + manifest.nbytes]
    try:
        yield manifest, lent_blob, blob(file_store, info.sha256)
    finally:
        assert peer.release(grant.lease_id)


class Lender:
    """``read_range`` over a lent blob, as the actor's Ray call gives it: each slice a fresh
    array (the object Ray pulls into the borrower's store). Records every request, the calls
    running at once, and the bytes of slices requested and not yet freed by the borrower."""

    def __init__(self, data: np.ndarray, corrupt_at: int | None = None, short_at: int | None = None) -> None:
        self.data = data
        self.corrupt_at = corrupt_at
        self.short_at = short_at
        self.requests: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self.calls = self.max_calls = 0
        self.held = self.max_held = 0
        self.overlapped = threading.Event()  # two calls ran at once

    def _free(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes

    def __call__(self, offset: int, length: int) -> np.ndarray:
        with self._lock:
            self.requests.append((offset, length))
            self.calls += 1
            self.max_calls = max(self.max_calls, self.calls)
            self.held += length  # from the request on: what is in flight is the borrower's
            self.max_held = max(self.max_held, self.held)
            if self.calls > 1:
                self.overlapped.set()
        try:
            if len(self.requests) == 1:
                # The first request waits (a while at most) for a second one: a loop that
                # pipelines sends it now; one that does not is caught by ``overlapped``.
                self.overlapped.wait(2.0)
            piece = np.array(self.data[offset : offset + length])
            if self.corrupt_at is not None and offset <= self.corrupt_at < offset + length:
                piece[self.corrupt_at - offset] ^= 0xFF
            if self.short_at is not None and offset <= self.short_at < offset + length:
                piece = piece[:-1].copy()
            extra = length - len(piece)
            if extra:
                self._free(extra)
            weakref.finalize(piece, self._free, len(piece))  # held until the borrower drops it
            return piece
        except BaseException:
            self._free(length)
            raise
        finally:
            with self._lock:
                self.calls -= 1


def out_for(manifest: Manifest) -> np.ndarray:
    return np.zeros(manifest.nbytes, dtype=np.uint8)


@pytest.mark.parametrize(
    "chunk_bytes, in_flight",
    [
        (PEER_CHUNK_BYTES, PEER_CHUNKS_IN_FLIGHT),  # what the actor uses
        (5 * MiB + 4097, 3),  # slices that straddle the manifest's chunks
        (40 * MiB, 2),  # one slice bigger than the blob
    ],
)
def test_a_peer_blob_arrives_exactly_with_bounded_bytes_in_flight(lent, chunk_bytes, in_flight):
    manifest, lent_blob, stored = lent
    lender = Lender(lent_blob)
    out = out_for(manifest)
    read_in_chunks(manifest, out, lender, source="peer", chunk_bytes=chunk_bytes, in_flight=in_flight)
    assert out.tobytes() == stored  # exact bytes
    # Every byte asked for once, in slices of at most chunk_bytes.
    assert sorted(lender.requests) == [
        (start, min(chunk_bytes, manifest.nbytes - start)) for start in range(0, manifest.nbytes, chunk_bytes)
    ]
    # The fault: never more than in_flight slices held beyond ``out`` (not a whole blob).
    assert lender.max_calls <= in_flight
    assert lender.max_held <= in_flight * chunk_bytes < manifest.nbytes or len(lender.requests) == 1
    assert lender.held == 0  # every slice freed once copied
    if len(lender.requests) > 1:
        assert lender.overlapped.is_set()  # the next slice is asked for while one is on its way


def test_the_default_bound_is_a_few_mib():
    # What a peer fetch may hold beyond the counted copy, whatever the blob's size.
    assert PEER_CHUNK_BYTES * PEER_CHUNKS_IN_FLIGHT <= 16 * MiB and PEER_CHUNKS_IN_FLIGHT >= 2


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_corrupt_peer_slice_is_refused(lent, where):
    manifest, lent_blob, _ = lent
    at = {"first": 0, "middle": 16 * MiB + 123, "last": manifest.nbytes - 1}[where]
    lender = Lender(lent_blob, corrupt_at=at)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        read_in_chunks(manifest, out_for(manifest), lender, source="peer")
    assert lender.max_held <= PEER_CHUNKS_IN_FLIGHT * PEER_CHUNK_BYTES and lender.held == 0


def test_a_short_peer_slice_is_refused(lent):
    manifest, lent_blob, _ = lent
    lender = Lender(lent_blob, short_at=20 * MiB)
    with pytest.raises(IntegrityError, match="short"):
        read_in_chunks(manifest, out_for(manifest), lender, source="peer")


def test_a_failed_request_stops_the_copy(lent):
    manifest, lent_blob, _ = lent
    asked = []

    def failing(offset: int, length: int) -> np.ndarray:
        asked.append(offset)
        if offset >= PEER_CHUNK_BYTES:
            raise TimeoutError("the lender did not answer")
        return np.array(lent_blob[offset : offset + length])

    with pytest.raises(TimeoutError):
        read_in_chunks(manifest, out_for(manifest), failing, source="peer")
    # No more requests than were in flight when the failure came back.
    assert len(asked) <= 1 + PEER_CHUNKS_IN_FLIGHT


@pytest.mark.parametrize("bad", [dict(chunk_bytes=0), dict(in_flight=0)])
def test_bad_bounds_are_refused(lent, bad):
    manifest, lent_blob, _ = lent
    with pytest.raises(ValueError):
        read_in_chunks(manifest, out_for(manifest), Lender(lent_blob), source="peer", **bad)


def test_a_miss_reads_a_peer_in_chunks_and_falls_back_to_the_store_on_a_bad_one(make_cache, file_store, tmp_path):
    # The node cache's peer_read as the actor builds it: lend, read in chunks, release; a bad
    # chunk sends the load to the store (the host tier keeps nothing of the peer's bytes).
    info = file_store.register("m", real_model(), tenant=TENANT)
    peer = make_cache(disk_dir=tmp_path / "peer-disk")
    use(peer, "m")
    corrupt: list[int | None] = [None]
    lenders: list[Lender] = []

    def from_peer(manifest: Manifest, out: np.ndarray) -> bool:
        grant = peer.lend(cache_key(manifest))
        try:
            lenders.append(Lender(grant.handle[grant.offset : grant.offset + manifest.nbytes], corrupt_at=corrupt[0]))
            read_in_chunks(manifest, out, lenders[-1], source="peer")
            return True
        finally:
            peer.release(grant.lease_id)

    cache = make_cache(peer_read=from_peer, disk_dir=tmp_path / "disk-1")
    assert use(cache, "m") == "peer"
    grant = cache.acquire("m", TENANT, None)
    assert served(grant) == blob(file_store, info.sha256)
    cache.release(grant.lease_id)
    corrupt[0] = info.nbytes // 2
    other = make_cache(peer_read=from_peer, disk_dir=tmp_path / "disk-2")
    assert use(other, "m") == "store"
    grant = other.acquire("m", TENANT, None)
    assert served(grant) == blob(file_store, info.sha256)
    other.release(grant.lease_id)
    assert all(lender.max_held <= PEER_CHUNKS_IN_FLIGHT * PEER_CHUNK_BYTES for lender in lenders)
    assert peer.leases() == 0  # every lend released
