"""Whole-blob and per-chunk sha256: the digests must equal hashlib over the same bytes however
the blob is cut into pieces, and a reader must reject a blob whose chunk list does not fit.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trims_ray import IntegrityError, ModelFormatError
from trims_ray._hashing import (
    MIN_CHUNK_BYTES,
    PARALLEL_CHUNKS,
    ChunkDigests,
    chunk_bytes_for,
    chunk_ranges,
    digest_blob,
)
from trims_ray._reader import read_blob

MiB = 1024 * 1024


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=40_000),
    cuts=st.lists(st.integers(min_value=0, max_value=40_000), max_size=8),
    chunk_bytes=st.sampled_from([4096, 5000, 65536]),
)
def test_digests_match_hashlib_however_the_blob_is_cut(data, cuts, chunk_bytes):
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    pieces = [memoryview(data)[a:b] for a, b in zip(bounds, bounds[1:])]
    whole, chunks = digest_blob(pieces, chunk_bytes=chunk_bytes)
    assert whole == hashlib.sha256(data).hexdigest()
    expected = [hashlib.sha256(data[s:e]).hexdigest() for s, e in chunk_ranges(len(data), chunk_bytes)]
    assert list(chunks.digests) == expected and chunks.chunk_bytes == chunk_bytes


def test_reader_verifies_each_chunk_and_names_the_bad_one(tmp_path):
    import fsspec

    data = bytearray(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    path = tmp_path / "blob"
    path.write_bytes(data)
    fs = fsspec.filesystem("file")
    _, chunks = digest_blob([bytes(data)], chunk_bytes=8192)
    buffer, _ = read_blob(fs, str(path), nbytes=len(data), chunk_digests=chunks)
    assert buffer.tobytes() == bytes(data)

    data[20_000] ^= 0xFF  # inside the third chunk: bytes 16384-24576
    path.write_bytes(data)
    with pytest.raises(IntegrityError, match="bytes 16384-24576"):
        read_blob(fs, str(path), nbytes=len(data), chunk_digests=chunks)
    too_few = ChunkDigests(8192, chunks.digests[:-1])
    with pytest.raises(IntegrityError, match="chunk digests"):
        read_blob(fs, str(path), nbytes=len(data), chunk_digests=too_few)


def test_manifest_with_a_chunk_list_that_does_not_fit_is_rejected(file_store):
    import torch

    file_store.register("m", {"w": torch.zeros(10)}, tenant="default")
    path = file_store.manifest_path("default", "m")
    doc = json.loads(file_store.fs.cat_file(path))
    for broken in [
        {**doc, "chunk_sha256": doc["chunk_sha256"] * 2},
        {**doc, "chunk_sha256": ["zz" * 32]},
        {**doc, "chunk_bytes": 100},
        {k: v for k, v in doc.items() if k != "chunk_sha256"},
    ]:
        file_store.fs.pipe_file(path, json.dumps(broken).encode())
        with pytest.raises(ModelFormatError, match="chunk"):
            file_store.manifest("m", tenant="default")


@pytest.mark.parametrize(
    "nbytes, chunk_mib",
    [(0, 2), (1, 2), (20 * MiB, 2), (32 * MiB, 4), (100 * MiB, 8), (128 * MiB, 16), (10 * 1024 * MiB, 16)],
)
def test_small_blobs_get_chunks_enough_to_hash_on_every_core(nbytes, chunk_mib):
    assert chunk_bytes_for(nbytes) == chunk_mib * MiB
    if nbytes >= PARALLEL_CHUNKS * MIN_CHUNK_BYTES:
        assert len(chunk_ranges(nbytes, chunk_bytes_for(nbytes))) >= PARALLEL_CHUNKS
