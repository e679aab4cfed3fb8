"""Fixtures shared by every test: an isolated default store and caller, and a real S3 server.

The S3 server is moto's standalone HTTP server in a subprocess on 127.0.0.1 (its own process, so
its GIL does not slow the code under test); only the PID this fixture started is ever killed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

import trims_ray

S3_KEY, S3_SECRET = "trims-test-key", "trims-test-secret"


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Every test gets its own default store and acts as the default tenant."""
    monkeypatch.setenv("TRIMS_RAY_STORE", (tmp_path / "default-store").as_uri())
    monkeypatch.delenv("TRIMS_RAY_TENANT", raising=False)
    # botocore must never look for credentials on the cloud metadata address: tests stay on
    # loopback.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for var in ("TRIMS_RAY_READ_CHUNK_BYTES", "TRIMS_RAY_READ_CONCURRENCY"):
        monkeypatch.delenv(var, raising=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on loopback for the whole session; yields its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start (exit code {proc.poll()})")
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.kill()
        proc.wait(timeout=10)


def s3_options(endpoint: str) -> dict:
    return {"key": S3_KEY, "secret": S3_SECRET, "endpoint_url": endpoint}


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket on the moto server; yields its name."""
    import s3fs

    fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, client_kwargs={"endpoint_url": s3_endpoint})
    bucket = f"trims-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield bucket


def make_store(kind: str, tmp_path, request, **kwargs) -> trims_ray.ModelStore:
    if kind == "file":
        return trims_ray.ModelStore((tmp_path / "store").as_uri(), **kwargs)
    if kind == "memory":
        return trims_ray.ModelStore(f"memory://trims-{uuid.uuid4().hex}", **kwargs)
    if kind == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("s3_bucket")
        return trims_ray.ModelStore(
            f"s3://{bucket}/models", storage_options=s3_options(endpoint), **kwargs
        )
    raise ValueError(kind)


@pytest.fixture(params=["file", "memory", "s3"])
def store(request, tmp_path) -> trims_ray.ModelStore:
    """The same store tests run against each backend: local disk, memory and S3 (moto)."""
    return make_store(request.param, tmp_path, request)


@pytest.fixture
def file_store(tmp_path, request) -> trims_ray.ModelStore:
    return make_store("file", tmp_path, request)
