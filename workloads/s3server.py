"""A real S3-compatible server on loopback (moto's standalone server) for benchmarks and tests.

It runs in its own process, so that its request handling does not share a GIL with the code being
measured, and it is stopped by the PID this module started, never by name.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

__all__ = ["ACCESS_KEY", "SECRET_KEY", "free_port", "moto_server", "s3_storage_options", "create_bucket"]

ACCESS_KEY, SECRET_KEY = "trims-test-key", "trims-test-secret"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(*, start_timeout: float = 30.0) -> Iterator[str]:
    """Runs a moto S3 server on 127.0.0.1 and yields its endpoint URL.

    Raises:
        RuntimeError: the server did not answer within ``start_timeout`` seconds.
    """
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start (exit code {proc.poll()})") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.kill()
        proc.wait(timeout=10)


def s3_storage_options(endpoint: str) -> dict:
    """fsspec storage options for the moto server at ``endpoint``."""
    return {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": endpoint}


def create_bucket(endpoint: str, bucket: str) -> None:
    """Creates ``bucket`` on the server at ``endpoint``."""
    import s3fs

    fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, client_kwargs={"endpoint_url": endpoint})
    fs.mkdir(bucket)
