"""The grants that cross processes (trims_ray/_protocol.py): frozen dataclasses read by attribute,
which survive pickling (as Ray and multiprocessing send them), and say whether they are a bypass
without the reader comparing tier strings.
"""

from __future__ import annotations

import dataclasses
import pickle
import time

import pytest
import torch

from trims_ray import ModelStore
from trims_ray._gpu_ipc import DeviceIdentity, LayerGroup
from trims_ray._protocol import BYPASS, DISK, HOST, PEER, STORE, GpuGrant, Grant, HostGrant

pytestmark = pytest.mark.timeout(60)

UUID = "GPU-12345678-1234-1234-1234-123456789abc"


@pytest.fixture
def manifest():
    store = ModelStore(f"memory://protocol-{time.monotonic_ns()}")
    store.register("m", {"w.weight": torch.arange(16, dtype=torch.float32)}, tenant="alice")
    return store.manifest("m", tenant="alice")


def test_a_host_grant_is_the_node_caches_grant_with_its_node(manifest):
    grant = Grant(7, ("object", 1), manifest, 64, HOST)
    sent = HostGrant.of(grant, "node-a")
    assert (sent.lease_id, sent.ref, sent.manifest, sent.offset, sent.tier, sent.node) == (
        7, ("object", 1), manifest, 64, HOST, "node-a")  # fmt: skip
    assert sent.store_uri is None and sent.storage_options is None
    assert not sent.bypass and not grant.bypass


def test_a_bypass_says_so_and_names_the_store_to_read_from(manifest):
    grant = Grant(0, None, manifest, 0, BYPASS)
    sent = HostGrant.of(grant, "node-a", "s3://bucket/models", {"anon": True})
    assert grant.bypass and sent.bypass and sent.ref is None
    assert (sent.store_uri, sent.storage_options) == ("s3://bucket/models", {"anon": True})


@pytest.mark.parametrize("tier", [HOST, DISK, PEER, STORE, "gpu"])
def test_only_the_bypass_tier_is_a_bypass(manifest, tier):
    # The tier strings are what the replay records (served_tier); they stay as they were.
    assert not HostGrant(1, None, manifest, 0, tier, "n").bypass
    assert not GpuGrant(1, None, manifest, 0, DeviceIdentity(UUID, 0), tier).bypass


def test_grants_are_frozen(manifest):
    with pytest.raises(dataclasses.FrozenInstanceError):
        HostGrant(1, None, manifest, 0, HOST, "n").tier = BYPASS  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        GpuGrant(1, None, manifest, 0, DeviceIdentity(UUID, 0), HOST).lease_id = 2  # type: ignore[misc]


def test_grants_survive_pickling(manifest):
    host = HostGrant("caller-1", ("object", 1), manifest, 64, BYPASS, "node-a", "file:///store", None)
    assert pickle.loads(pickle.dumps(host)) == host
    group = LayerGroup(modules=("w",), ranges=((0, manifest.nbytes),))
    device = DeviceIdentity(UUID, 1, "1", "node-b")
    gpu = GpuGrant(3, ("segment", 9), manifest, 0, device, "gpu", (group,), (b"event",))
    back = pickle.loads(pickle.dumps(gpu))
    assert back == gpu and back.node == "node-b" and back.groups == (group,)
