"""Fixtures shared by every test: an isolated default store and caller, and a real S3 server.

The S3 server is moto's standalone HTTP server in a subprocess on 127.0.0.1 (see
workloads/s3server.py); only the PID it started is ever killed.
"""

from __future__ import annotations

import atexit
import os
import sys
import uuid

import pytest

import trims_ray
from workloads.s3server import ACCESS_KEY as S3_KEY
from workloads.s3server import SECRET_KEY as S3_SECRET
from workloads.s3server import create_bucket, free_port, moto_server
from workloads.s3server import s3_storage_options as s3_options

__all__ = ["S3_KEY", "S3_SECRET", "free_port", "s3_options", "make_store"]

_exit_status: int | None = None


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Ends the process with pytest's exit status once everything is reported, skipping the
    C++ static destructors of a normal exit. Ray 2.60 keeps the metric exporter thread of every
    ray.init of a process running after ray.shutdown; at exit, one that logs a failed export
    (its node is gone) while the destructors run dies in spdlog's registry with SIGSEGV (a core
    of a CI-like run: OpenTelemetryMetricExporter::Export -> RayLog::~RayLog -> spdlog's
    initialize_logger, while the main thread was in __run_exit_handlers). The test processes
    start many clusters, so about one pytest run in six of the Ray groups died so, after every
    test had passed."""
    if _exit_status is None:
        return
    # Python's own exit functions still run (Ray's shutdown of a cluster a test left running,
    # trims_ray's router and metrics); what is skipped is the interpreter's finalization and
    # the C exit handlers after them.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Every test gets its own default store and acts as the default tenant."""
    monkeypatch.setenv("TRIMS_RAY_STORE", (tmp_path / "default-store").as_uri())
    monkeypatch.delenv("TRIMS_RAY_TENANT", raising=False)
    # botocore must never look for credentials on the cloud metadata address: tests stay on
    # loopback.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for var in (
        "TRIMS_RAY_READ_CHUNK_BYTES",
        "TRIMS_RAY_READ_CONCURRENCY",
        "TRIMS_RAY_READ_RETRIES",
        "TRIMS_RAY_READ_BACKOFF_S",
        "TRIMS_RAY_TENANT_SHARE",
        "TRIMS_RAY_SCRUB_S",
        "TRIMS_RAY_GPU_BYTES",
        "TRIMS_RAY_GPU_FRACTION",
    ):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on loopback for the whole session; yields its endpoint URL."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket on the moto server; yields its name."""
    bucket = f"trims-{uuid.uuid4().hex[:12]}"
    create_bucket(s3_endpoint, bucket)
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
