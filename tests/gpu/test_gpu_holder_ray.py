"""The GPU holder actor on a real GPU and a real (one-node) Ray: a task with ``num_gpus=1`` leases
a model from the holder of its GPU, first swapped in from the node's host tier (plasma, page-
locked in place), then as a hit; its weights are the holder's memory. Skipped without Ray.
"""

from __future__ import annotations

import os

import pytest

from tests.gpu._workers import example_ids, stack

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]


def _task_body() -> dict:
    import torch

    from trims_ray._gpu_lease import acquire_gpu

    lease, _ = acquire_gpu("stack", "default")
    if lease is None:
        return {"lease": None}
    with lease as model:
        buffer = lease._buffer
        lo, hi = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
        inside = all(lo <= p.data_ptr() < hi for p in model.parameters())
        with torch.inference_mode():
            logits = model(example_ids().to(buffer.device)).cpu()
    return {"lease": True, "tier": lease.tier, "inside": inside, "logits": logits}


def test_task_leases_from_the_holder_of_its_gpu(tmp_path):
    import torch

    import trims_ray
    from trims_ray.actors.gpu_tier_actor import start_gpu_tier_actors
    from trims_ray.cache.gpu_tier import GpuTierConfig
    from workloads.local_ray import init_local

    init_local(num_cpus=2, num_gpus=1, object_store_memory=512 * 1024**2, include_dashboard=False,
               log_to_driver=False)
    holders = {}
    try:
        store = (tmp_path / "store").as_uri()
        config = trims_ray.CacheConfig(host_bytes=256 * 1024**2, disk_dir=str(tmp_path / "disk"))
        trims_ray.init(store=store, config=config)
        reference = stack()
        trims_ray.register("stack", reference, factory="tests.gpu._workers:stack")
        node = ray.get_runtime_context().get_node_id()
        holders, reason = start_gpu_tier_actors(node, store, None, GpuTierConfig(budget_fraction=0.2),
                                            visible=os.environ.get("CUDA_VISIBLE_DEVICES"), ray_gpus=1)
        assert holders, reason
        task = ray.remote(num_gpus=1)(_task_body)
        first = ray.get(task.remote())
        second = ray.get(task.remote())
        assert first["lease"] and second["lease"]
        assert first["tier"] in ("host", "disk", "store") and second["tier"] == "gpu"
        assert first["inside"] and second["inside"]
        with torch.no_grad():
            expected = reference.cuda()(example_ids().cuda()).cpu()
        torch.testing.assert_close(second["logits"], expected, rtol=1e-4, atol=1e-4)
        (holder,) = holders.values()
        stats = ray.get(holder.stats.remote())
        assert stats["enabled"] and stats["tiers"]["gpu"]["hits"] >= 1 and stats["tiers"]["gpu"]["loads"] == 1
        assert ray.get(holder.evict.remote("stack", "default")) == "evicted"
        assert ray.get(holder.stats.remote())["tiers"]["gpu"]["bytes_used"] == 0
    finally:
        for handle in holders.values():
            ray.kill(handle)
        trims_ray.shutdown()
        ray.shutdown()
