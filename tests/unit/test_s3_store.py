"""The S3 store's configuration and failure modes against a real S3 server (moto on loopback):
endpoint and credentials from the environment, and errors that say which thing is missing.
"""

from __future__ import annotations

import time

import pytest
import torch

from trims_ray import ModelStore, StoreUnavailableError

from ..conftest import S3_KEY, S3_SECRET, free_port, s3_options


def test_endpoint_and_credentials_from_the_usual_aws_variables(monkeypatch, s3_endpoint, s3_bucket):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    store = ModelStore(f"s3://{s3_bucket}/env")
    info = store.register("m", {"w": torch.arange(6.0)}, tenant="default")
    # A second store object (another process would do the same) sees the model.
    again = ModelStore(f"s3://{s3_bucket}/env")
    assert again.manifest("m", tenant="default").sha256 == info.sha256
    assert torch.equal(again.load("m", tenant="default")["w"], torch.arange(6.0))


def test_unreachable_endpoint_says_so(s3_bucket):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = ModelStore(f"s3://{s3_bucket}/x", storage_options={"key": S3_KEY, "secret": S3_SECRET, "endpoint_url": dead})
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="cannot reach the S3 endpoint") as exc:
        store.register("m", {"w": torch.zeros(1)}, tenant="default")
    assert exc.value.reason == "endpoint" and dead in str(exc.value)
    assert time.monotonic() - started < 60  # retried, then gave up: no hang
    with pytest.raises(StoreUnavailableError, match="cannot reach"):
        store.manifest("m", tenant="default")


def test_missing_credentials_say_so(monkeypatch, tmp_path, s3_endpoint, s3_bucket):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    # skip_instance_cache: s3fs would otherwise reuse a filesystem made earlier in this process
    # with credentials, since its cache is keyed on arguments, not on the environment.
    store = ModelStore(
        f"s3://{s3_bucket}/x",
        storage_options={"endpoint_url": s3_endpoint, "skip_instance_cache": True},
    )
    with pytest.raises(StoreUnavailableError, match="no usable S3 credentials") as exc:
        store.manifest("m", tenant="default")
    assert exc.value.reason == "credentials" and "AWS_ACCESS_KEY_ID" in str(exc.value)


def test_missing_bucket_says_so_and_creates_nothing(s3_endpoint):
    store = ModelStore("s3://no-such-bucket-xyz/models", storage_options=s3_options(s3_endpoint))
    with pytest.raises(StoreUnavailableError, match="does not exist") as exc:
        store.register("m", {"w": torch.zeros(1)}, tenant="default")
    assert exc.value.reason == "bucket"
    assert not store.fs.exists("no-such-bucket-xyz")
