"""Tests of the store reader (read_blob) on a local disk, fsspec's memory filesystem and a real
S3 server (moto), and of ReadOptions and its environment variables.
"""

from __future__ import annotations

import hashlib
import os
import uuid

import fsspec
import numpy as np
import pytest
import s3fs

from tests.conftest import S3_KEY, S3_SECRET
from trims_ray import IntegrityError, ReadOptions, ReadStats
from trims_ray._hashing import digest_blob
from trims_ray._reader import read_blob

# Not a multiple of any chunk size below, so the last ranged read is a short one.
LOCAL_SIZE = 5 * 1024 * 1024 + 1237
OPTIONS = {
    "4k-serial": ReadOptions(chunk_bytes=4096, concurrency=1),
    "64k-x8": ReadOptions(chunk_bytes=64 * 1024, concurrency=8),
    "chunk-over-file": ReadOptions(chunk_bytes=64 * 1024 * 1024, concurrency=4),
}
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_read(buffer: np.ndarray, stats: ReadStats, data: bytes) -> None:
    assert isinstance(buffer, np.ndarray)
    assert buffer.dtype == np.uint8 and buffer.ndim == 1
    assert len(buffer) == len(data)
    assert buffer.tobytes() == data
    assert stats.nbytes == len(data)
    assert stats.seconds > 0
    assert stats.bytes_per_second > 0
    assert stats.bytes_per_second == pytest.approx(len(data) / stats.seconds)


@pytest.fixture(scope="module")
def local_blob(tmp_path_factory) -> tuple[str, bytes]:
    """A random local file shared by the module's tests (written once: 5 MB is not free)."""
    data = os.urandom(LOCAL_SIZE)
    path = tmp_path_factory.mktemp("reader") / "blob.safetensors"
    path.write_bytes(data)
    return str(path), data


@pytest.fixture
def local_fs():
    return fsspec.filesystem("file")


@pytest.fixture
def memory_blob():
    """A random blob in fsspec's (process-global) memory filesystem, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/trims-reader-{uuid.uuid4().hex}"
    data = os.urandom(1024 * 1024 + 77)
    fs.pipe_file(f"{root}/blob", data)
    yield fs, f"{root}/blob", data
    fs.rm(root, recursive=True)


@pytest.fixture
def s3(s3_endpoint, s3_bucket):
    fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, client_kwargs={"endpoint_url": s3_endpoint})
    return fs, s3_bucket


# --- local disk ----------------------------------------------------------------------------------


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_local_read_matches_file_and_verifies(local_fs, local_blob, options):
    path, data = local_blob
    buffer, stats = read_blob(local_fs, path, nbytes=len(data), sha256=sha256_of(data), options=options)
    assert_read(buffer, stats, data)


def test_local_read_without_checks_uses_env_options(local_fs, local_blob, monkeypatch):
    path, data = local_blob
    monkeypatch.setenv("TRIMS_RAY_READ_CHUNK_BYTES", "8192")
    monkeypatch.setenv("TRIMS_RAY_READ_CONCURRENCY", "3")
    buffer, stats = read_blob(local_fs, path)
    assert_read(buffer, stats, data)
    # options=None reads the environment: a bad value there must surface, not be ignored.
    monkeypatch.setenv("TRIMS_RAY_READ_CHUNK_BYTES", "lots")
    with pytest.raises(ValueError, match="TRIMS_RAY_READ_CHUNK_BYTES"):
        read_blob(local_fs, path)


def test_local_read_into_out(local_fs, local_blob):
    path, data = local_blob
    out = np.zeros(len(data), dtype=np.uint8)
    buffer, stats = read_blob(local_fs, path, sha256=sha256_of(data), out=out, options=OPTIONS["64k-x8"])
    assert buffer is out
    assert_read(out, stats, data)


@pytest.mark.parametrize(
    "make_out, why",
    [
        (lambda n: np.zeros(n - 1, dtype=np.uint8), "bytes"),
        (lambda n: np.zeros(n + 1, dtype=np.uint8), "bytes"),
        (lambda n: np.zeros(n, dtype=np.int8), "uint8"),
        (lambda n: np.zeros((1, n), dtype=np.uint8), "1-D"),
        (lambda n: bytearray(n), "numpy"),
    ],
    ids=["short", "long", "int8", "2-D", "bytearray"],
)
def test_bad_out_is_value_error(local_fs, local_blob, make_out, why):
    path, data = local_blob
    with pytest.raises(ValueError, match=why):
        read_blob(local_fs, path, out=make_out(len(data)))


def test_read_only_out_is_value_error(local_fs, local_blob):
    path, data = local_blob
    out = np.zeros(len(data), dtype=np.uint8)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        read_blob(local_fs, path, out=out)
    assert not out.any()  # nothing was written into it


def test_wrong_sha256_is_integrity_error_naming_both_digests(local_fs, local_blob):
    path, data = local_blob
    wrong = sha256_of(data + b"x")
    with pytest.raises(IntegrityError) as info:
        read_blob(local_fs, path, sha256=wrong, options=OPTIONS["64k-x8"], source="model resnet50")
    message = str(info.value)
    assert wrong in message
    assert sha256_of(data) in message
    assert "model resnet50" in message


@pytest.mark.parametrize("delta", [-1, 1, LOCAL_SIZE])
def test_wrong_nbytes_is_integrity_error(local_fs, local_blob, delta):
    path, data = local_blob
    with pytest.raises(IntegrityError) as info:
        read_blob(local_fs, path, nbytes=len(data) + delta, sha256=sha256_of(data))
    assert str(len(data)) in str(info.value) and str(len(data) + delta) in str(info.value)


def test_flipped_byte_is_caught(local_fs, tmp_path):
    # One changed byte in the middle of a multi-chunk file: the hash covers every chunk.
    data = bytearray(os.urandom(3 * 4096 + 5))
    expected = sha256_of(bytes(data))
    data[2 * 4096 + 1] ^= 1
    (tmp_path / "blob").write_bytes(data)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        read_blob(local_fs, str(tmp_path / "blob"), sha256=expected, options=OPTIONS["4k-serial"])


def test_no_range_is_still_reading_once_a_failed_read_has_raised(local_fs, tmp_path, monkeypatch):
    # Local reads share one pool per process. When a chunk fails, ranges already running must
    # end before the read raises: the loader reads the next source into the same buffer at once
    # (a late range would put bytes there that nothing verified), and the file's descriptor is
    # closed, its number free for the next file opened.
    import threading
    import time

    from trims_ray import _reader

    chunk = 64 * 1024
    data = bytearray(os.urandom(16 * chunk))
    _, chunks = digest_blob([bytes(data)], chunk_bytes=chunk)
    data[5] ^= 1  # the first chunk fails its check
    path = tmp_path / "blob"
    path.write_bytes(data)
    real_pread = _reader._pread_exactly
    lock, running, started = threading.Lock(), [0], [0]

    def slow_after_the_first(fd, view, offset, source):
        with lock:
            running[0] += 1
            started[0] += 1
        try:
            if offset:
                time.sleep(0.2)  # still reading when the first chunk fails
            real_pread(fd, view, offset, source)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(_reader, "_pread_exactly", slow_after_the_first)
    out = np.full(len(data), 0xAB, dtype=np.uint8)
    with pytest.raises(IntegrityError, match="bytes 0-65536"):
        read_blob(local_fs, str(path), nbytes=len(data), chunk_digests=chunks, out=out, options=OPTIONS["64k-x8"])
    with lock:
        assert running[0] == 0, f"{running[0]} range(s) still reading after the read raised"
        assert started[0] > 1  # others had started: the check above had something to catch
    when_raised = out.copy()
    time.sleep(0.3)
    assert np.array_equal(out, when_raised)


def test_missing_local_file(local_fs, tmp_path):
    with pytest.raises(FileNotFoundError):
        read_blob(local_fs, str(tmp_path / "nope"), options=OPTIONS["64k-x8"])


def test_empty_file(local_fs, tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_of(b"") == EMPTY_SHA256
    buffer, stats = read_blob(local_fs, str(tmp_path / "empty"), nbytes=0, sha256=EMPTY_SHA256)
    assert buffer.dtype == np.uint8 and buffer.shape == (0,)
    assert stats.nbytes == 0 and stats.seconds > 0
    with pytest.raises(IntegrityError):
        read_blob(local_fs, str(tmp_path / "empty"), sha256=sha256_of(b"\0"))


# --- generic path: memory filesystem and S3 ------------------------------------------------------


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_memory_fs_read(memory_blob, options):
    fs, path, data = memory_blob
    buffer, stats = read_blob(fs, path, nbytes=len(data), sha256=sha256_of(data), options=options)
    assert_read(buffer, stats, data)


def test_memory_fs_faults(memory_blob):
    fs, path, data = memory_blob
    out = np.empty(len(data), dtype=np.uint8)
    buffer, _ = read_blob(fs, path, out=out, options=OPTIONS["64k-x8"])
    assert buffer is out and out.tobytes() == data
    with pytest.raises(IntegrityError, match=sha256_of(data)):
        read_blob(fs, path, sha256="0" * 64, options=OPTIONS["64k-x8"])
    with pytest.raises(IntegrityError):
        read_blob(fs, path, nbytes=len(data) - 1)
    with pytest.raises(FileNotFoundError):
        read_blob(fs, path + "-missing")


def test_an_object_store_gets_ranges_of_several_small_chunks_each_verified(memory_blob, monkeypatch):
    # Small models are digested in small chunks (hashed on every core); an object store is
    # still asked for ranges of options.chunk_bytes, and every chunk in them is verified.
    fs, path, data = memory_blob
    _, chunks = digest_blob([data], chunk_bytes=4096)
    requests: list[tuple[int, int]] = []
    real_cat_file = fs.cat_file

    def counted(p, start=None, end=None, **kw):
        requests.append((start, end))
        return real_cat_file(p, start=start, end=end, **kw)

    monkeypatch.setattr(fs, "cat_file", counted)
    options = ReadOptions(chunk_bytes=65536, concurrency=4)
    buffer, _ = read_blob(fs, path, nbytes=len(data), chunk_digests=chunks, options=options)
    assert buffer.tobytes() == data
    assert len(requests) == -(-len(data) // 65536) < len(chunks.digests)
    assert all(end - start >= 65536 for start, end in sorted(requests)[:-1])

    bad = bytearray(data)
    bad[300_000] ^= 1  # in chunk 73 (bytes 299008-303104), inside the 5th range
    fs.pipe_file(path, bytes(bad))
    with pytest.raises(IntegrityError, match="bytes 299008-303104"):
        read_blob(fs, path, nbytes=len(data), chunk_digests=chunks, options=options)


# S3 sizes keep the number of HTTP requests small (each ranged GET is a round trip to moto).
S3_CASES = {
    "4k-serial": (40 * 1024 + 100, OPTIONS["4k-serial"]),
    "64k-x8": (1024 * 1024 + 4321, OPTIONS["64k-x8"]),
    "chunk-over-file": (1024 * 1024 + 4321, OPTIONS["chunk-over-file"]),
}


@pytest.mark.parametrize("size, options", S3_CASES.values(), ids=S3_CASES.keys())
def test_s3_read(s3, size, options):
    fs, bucket = s3
    data = os.urandom(size)
    path = f"{bucket}/models/blob"
    fs.pipe_file(path, data)
    out = np.empty(size, dtype=np.uint8)
    buffer, stats = read_blob(fs, path, nbytes=size, sha256=sha256_of(data), out=out, options=options)
    assert buffer is out
    assert_read(buffer, stats, data)


def test_s3_faults(s3):
    fs, bucket = s3
    data = os.urandom(100_000)
    path = f"{bucket}/blob"
    fs.pipe_file(path, data)
    with pytest.raises(IntegrityError) as info:
        read_blob(fs, path, sha256="f" * 64, options=OPTIONS["64k-x8"])
    assert "f" * 64 in str(info.value) and sha256_of(data) in str(info.value)
    with pytest.raises(IntegrityError):
        read_blob(fs, path, nbytes=len(data) + 1)
    with pytest.raises(FileNotFoundError):
        read_blob(fs, f"{bucket}/missing")
    fs.pipe_file(f"{bucket}/empty", b"")
    buffer, stats = read_blob(fs, f"{bucket}/empty", nbytes=0, sha256=EMPTY_SHA256)
    assert len(buffer) == 0 and stats.nbytes == 0


# --- ReadOptions ---------------------------------------------------------------------------------


def test_read_options_defaults_and_bounds():
    default = ReadOptions()
    assert default.chunk_bytes == 16 * 1024 * 1024 and default.concurrency == 8
    assert ReadOptions(chunk_bytes=4096, concurrency=1).chunk_bytes == 4096
    assert ReadOptions(concurrency=256).concurrency == 256


@pytest.mark.parametrize("chunk_bytes", [0, -4096, 100, 4095, "x", 1.5, 4096.0, True, None])
def test_read_options_rejects_chunk_bytes(chunk_bytes):
    with pytest.raises(ValueError, match="chunk_bytes"):
        ReadOptions(chunk_bytes=chunk_bytes)


@pytest.mark.parametrize("concurrency", [0, -1, 257, 1000, "8", 2.0, True])
def test_read_options_rejects_concurrency(concurrency):
    with pytest.raises(ValueError, match="concurrency"):
        ReadOptions(concurrency=concurrency)


def test_read_options_from_env(monkeypatch):
    assert ReadOptions.from_env() == ReadOptions()  # conftest clears both variables
    monkeypatch.setenv("TRIMS_RAY_READ_CHUNK_BYTES", "65536")
    monkeypatch.setenv("TRIMS_RAY_READ_CONCURRENCY", " 3 ")
    assert ReadOptions.from_env() == ReadOptions(chunk_bytes=65536, concurrency=3)
    monkeypatch.setenv("TRIMS_RAY_READ_CHUNK_BYTES", "  ")  # blank means unset
    assert ReadOptions.from_env() == ReadOptions(concurrency=3)


@pytest.mark.parametrize(
    "var, value",
    [
        ("TRIMS_RAY_READ_CHUNK_BYTES", "64k"),
        ("TRIMS_RAY_READ_CHUNK_BYTES", "1.5"),
        ("TRIMS_RAY_READ_CONCURRENCY", "many"),
    ],
)
def test_read_options_from_env_rejects_non_integer(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError) as info:
        ReadOptions.from_env()
    assert var in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize(
    "var, value", [("TRIMS_RAY_READ_CHUNK_BYTES", "100"), ("TRIMS_RAY_READ_CONCURRENCY", "0")]
)
def test_read_options_from_env_rejects_out_of_range(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError):
        ReadOptions.from_env()
