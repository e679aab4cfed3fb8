"""Calling the cluster API before Ray or trims_ray is initialized fails with a clear TrimsError."""

from __future__ import annotations

import pytest
import ray

import trims_ray
from trims_ray import TrimsError


def test_api_before_init_says_to_call_init():
    assert not ray.is_initialized()

    @trims_ray.function(model="m")
    def f(m):
        return 1

    for call in (f.remote, trims_ray.stats, lambda: trims_ray.prefetch("m"), lambda: trims_ray.evict("m")):
        with pytest.raises(TrimsError, match=r"trims_ray\.init"):
            call()
    with pytest.raises(TrimsError, match=r"trims_ray\.init"):
        with trims_ray.open("m"):
            pass
    trims_ray.shutdown()  # harmless without Ray


def test_init_with_an_unreachable_s3_store_says_so_before_starting_anything(monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore would retry a refused port for ~15 s
    with pytest.raises(trims_ray.StoreUnavailableError, match="cannot reach the S3 endpoint"):
        trims_ray.init(store="s3://models/x", storage_options={"endpoint_url": dead})
    assert not ray.is_initialized()
