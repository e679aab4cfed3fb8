"""Store credentials never come back from an actor call: with an S3 store whose keys were given to
``trims_ray.init`` as storage options (moto on loopback), what placement and the node caches hand
to callers has no keys, and processes without them still work: a worker resolves names through
placement, and a task whose miss the host tier did not keep reads the blob through its node's
cache (one small single-node cluster for the module, see conftest).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import ray
import torch

import trims_ray
from trims_ray._cluster import node_cache_actor, placement_actor
from trims_ray._errors import StoreUnavailableError
from trims_ray._lease import _own_copy
from trims_ray._protocol import BYPASS, HostGrant

from ..conftest import s3_options

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024


def weights(mb: float, seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(int(mb * MiB / 4), generator=torch.Generator().manual_seed(seed))}


def total(model) -> float:
    return float(model["w"].double().sum())


@ray.remote(num_cpus=0)
def own_copy(grant: HostGrant) -> float:
    """The model a bypass grant's task reads, in a worker without the store's keys."""
    return float(_own_copy(grant)["w"].double().sum())


def expected(w: dict[str, torch.Tensor]) -> float:
    return float(w["w"].double().sum())


@pytest.fixture
def s3_with_keys(ray_node, tmp_path, s3_endpoint, s3_bucket):
    """trims_ray on an S3 store whose keys only the driver's init was given; yields the options
    and the store as the driver opened it."""
    options = s3_options(s3_endpoint)
    config = trims_ray.CacheConfig(host_bytes=10 * MiB, disk_dir=str(tmp_path / "disk"))
    trims_ray.init(store=f"s3://{s3_bucket}/models", storage_options=options, config=config)
    try:
        yield options, trims_ray.ModelStore(f"s3://{s3_bucket}/models", storage_options=options)
    finally:
        trims_ray.shutdown()


def test_actor_calls_never_return_the_stores_keys_and_workers_still_work(ray_node, s3_with_keys):
    options, store = s3_with_keys
    uri, spec_options = ray.get(placement_actor().store_spec.remote())
    assert uri.startswith("s3://")
    assert spec_options == {"endpoint_url": options["endpoint_url"]}, spec_options
    assert ray.get(placement_actor().credentials_withheld.remote()) is True

    models = {f"m{i}": weights(1, seed=i) for i in range(2)}
    once = weights(1, seed=9)
    for name, w in models.items():
        trims_ray.register(name, w)
    trims_ray.register("once", once)
    fn = trims_ray.function(total)

    @ray.remote(num_cpus=0)
    def nested(name: str) -> float:
        # A worker of its own: the keys were never in its environment, and it is not the
        # driver that opened the store; it resolves the name through placement.
        assert "AWS_ACCESS_KEY_ID" not in os.environ and "AWS_SECRET_ACCESS_KEY" not in os.environ
        return ray.get(fn.options(model=name).remote())

    for _ in range(2):
        for name, w in models.items():
            assert ray.get(nested.remote(name)) == expected(w)

    # A miss the host tier does not keep is read by its task, from where its grant says: here
    # the store without its keys, which this worker cannot read, so the node's cache reads it.
    manifest = store.manifest("once", tenant="default")
    bypass = HostGrant(0, None, manifest, 0, BYPASS, ray_node, uri, spec_options, relayed=True)
    assert ray.get(own_copy.remote(bypass)) == expected(once)
    with pytest.raises(StoreUnavailableError):  # what a task told to read the store itself meets
        ray.get(own_copy.remote(dataclasses.replace(bypass, relayed=False)))
    # The relay reads only what the name means now.
    with pytest.raises(trims_ray.ModelNotFoundError):
        ray.get(node_cache_actor(ray_node).read_bypassed.remote("once", "default", "0" * 64))
