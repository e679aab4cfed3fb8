"""The reader's retries against a real S3 server (moto) whose endpoint goes away mid-read, through
a proxy that can cut it and bring it back (tests/flaky_proxy.py): a read survives an outage
shorter than its retries, gives up with a StoreUnavailableError that names the file after them,
and never retries what cannot pass. Also the retry settings and their environment variables.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading

import pytest
import s3fs
import torch

from tests.conftest import S3_KEY, S3_SECRET, s3_options
from tests.flaky_proxy import FlakyProxy
from trims_ray import ModelStore, ReadOptions, StoreUnavailableError
from trims_ray._fsio import is_transient, open_fs
from trims_ray._reader import read_blob

MiB = 1024 * 1024
BLOB_BYTES = 3 * MiB
# 12 ranged reads, 4 at a time, answered at 4 MB/s per connection: the read is in flight for
# about 0.2 s per round, long enough to cut it in the middle.
OPTIONS = dict(chunk_bytes=256 * 1024, concurrency=4)


@pytest.fixture
def proxy(s3_endpoint):
    flaky = FlakyProxy(s3_endpoint.removeprefix("http://"), rate=4e6)
    yield flaky
    flaky.close()


@pytest.fixture
def blob(s3_endpoint, s3_bucket) -> tuple[str, bytes]:
    """A random blob on the S3 server (written directly, not through the proxy)."""
    data = os.urandom(BLOB_BYTES)
    fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, client_kwargs={"endpoint_url": s3_endpoint})
    path = f"{s3_bucket}/blob.safetensors"
    fs.pipe_file(path, data)
    return path, data


def through(proxy: FlakyProxy):
    """A filesystem that reaches the server through the proxy, set up as trims_ray sets up its
    stores (one try in s3fs, one quick retry in botocore), so that the reader's retries are the
    ones under test."""
    fs, _ = open_fs("s3://anything", {**s3_options(proxy.endpoint), "skip_instance_cache": True})
    return fs


def cut_after(proxy: FlakyProxy, nbytes: int, *, back_after_s: float | None) -> threading.Event:
    """Cuts the endpoint once ``nbytes`` went through, in the middle of the read (the proxy's
    own forwarding thread cuts it), and restores it ``back_after_s`` later."""
    return proxy.cut_when_answered(nbytes, back_after_s=back_after_s)


def test_an_outage_shorter_than_the_retries_is_ridden_out(proxy, blob):
    path, data = blob
    options = ReadOptions(**OPTIONS, retries=4, retry_backoff_s=0.2)
    cutter = cut_after(proxy, MiB, back_after_s=0.5)
    buffer, stats = read_blob(through(proxy), path, sha256=hashlib.sha256(data).hexdigest(), options=options)
    assert cutter.wait(10)
    assert buffer.tobytes() == data
    assert stats.retries >= 1


def test_an_endpoint_that_stays_away_gives_a_clear_error_after_the_retries(proxy, blob):
    path, data = blob
    options = ReadOptions(**OPTIONS, retries=2, retry_backoff_s=0.05)
    cutter = cut_after(proxy, MiB, back_after_s=None)
    with pytest.raises(StoreUnavailableError) as info:
        read_blob(through(proxy), path, sha256=hashlib.sha256(data).hexdigest(), options=options, source=f"s3://{path}")
    assert cutter.wait(10)
    message = str(info.value)
    assert info.value.reason == "endpoint"
    assert f"s3://{path}" in message and proxy.endpoint in message
    assert "tries" in message and "nothing of it was kept" in message and "Check that" in message


def test_no_retries_means_the_first_failure_is_final(proxy, blob, caplog):
    path, _ = blob
    proxy.cut()
    with caplog.at_level(logging.WARNING, logger="trims_ray"):
        with pytest.raises(StoreUnavailableError, match="1 tries"):
            read_blob(through(proxy), path, options=ReadOptions(**OPTIONS, retries=0))
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


def test_what_cannot_pass_is_not_retried(proxy, s3_bucket, caplog):
    with caplog.at_level(logging.WARNING, logger="trims_ray"):
        with pytest.raises(FileNotFoundError):
            read_blob(through(proxy), f"{s3_bucket}/no-such-blob", options=ReadOptions(**OPTIONS))
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


def test_the_store_comes_back_for_the_next_read(proxy, s3_bucket):
    store = ModelStore(
        f"s3://{s3_bucket}/models",
        storage_options=s3_options(proxy.endpoint),
        read_options=ReadOptions(retries=1, retry_backoff_s=0.05),
    )
    store.register("m", {"w": torch.arange(300_000, dtype=torch.float32)}, tenant="default")
    manifest = store.manifest("m", tenant="default")
    proxy.cut()
    with pytest.raises(StoreUnavailableError) as info:
        store.read(manifest)
    assert store.blob_path(manifest.sha256) in str(info.value)
    proxy.restore()
    buffer, _ = store.read(manifest)
    assert hashlib.sha256(buffer).hexdigest() == manifest.sha256


# --- which failures may pass ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError(errno.ECONNRESET, "reset"),
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
        TimeoutError("timed out"),
        OSError(errno.EBUSY, "SlowDown"),  # what s3fs makes of throttling and 503
        OSError(errno.EREMOTEIO, "InternalError"),  # ... and of 500
    ],
    ids=lambda e: type(e).__name__ + (f"-{e.errno}" if getattr(e, "errno", None) else ""),
)
def test_transient_failures(exc):
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        FileNotFoundError(errno.ENOENT, "NoSuchKey"),
        PermissionError(errno.EACCES, "AccessDenied"),
        OSError(errno.EINVAL, "InvalidRange"),
        ValueError("bad"),
        StoreUnavailableError("already given up"),  # a ConnectionError, but our final word
    ],
    ids=lambda e: type(e).__name__,
)
def test_lasting_failures(exc):
    assert not is_transient(exc)


def test_a_transient_cause_makes_the_failure_transient():
    wrapped = OSError(errno.EIO, "request failed")
    wrapped.__cause__ = ConnectionResetError("reset by peer")
    assert is_transient(wrapped)


# --- settings ------------------------------------------------------------------------------------


def test_retry_defaults_give_up_within_a_few_seconds():
    default = ReadOptions()
    assert default.retries == 3 and default.retry_backoff_s == 0.5
    # The longest the backoff can wait in all: 0.5 + 1 + 2 s.
    assert sum(default.retry_backoff_s * 2**i for i in range(default.retries)) == 3.5


@pytest.mark.parametrize("retries", [-1, 11, 1.0, "3", True, None])
def test_read_options_rejects_retries(retries):
    with pytest.raises(ValueError, match="retries"):
        ReadOptions(retries=retries)


@pytest.mark.parametrize("backoff", [-0.1, 61, float("nan"), float("inf"), "1", None, True])
def test_read_options_rejects_backoff(backoff):
    with pytest.raises(ValueError, match="retry_backoff_s"):
        ReadOptions(retry_backoff_s=backoff)


def test_retry_settings_from_env(monkeypatch):
    monkeypatch.setenv("TRIMS_RAY_READ_RETRIES", "5")
    monkeypatch.setenv("TRIMS_RAY_READ_BACKOFF_S", " 0.25 ")
    assert ReadOptions.from_env() == ReadOptions(retries=5, retry_backoff_s=0.25)
    monkeypatch.setenv("TRIMS_RAY_READ_BACKOFF_S", "soon")
    with pytest.raises(ValueError, match="TRIMS_RAY_READ_BACKOFF_S"):
        ReadOptions.from_env()
