"""Real models through the cache on a real Ray: every zoo architecture (transformers, torchvision,
timm; their small configs), registered from the module and from a sharded ``save_pretrained``
directory, invoked through ``@trims_ray.function`` and ``trims_ray.open`` on a store load, a
disk-tier hit and a host-tier hit. Every output must equal the original's bit for bit: the tasks
run with one thread (``num_cpus=1``) and so does the reference forward here.
"""

from __future__ import annotations

import pytest
import ray
import torch

import trims_ray
from tests.integration.conftest import wait_for
from trims_ray._cluster import node_cache_actor
from workloads import zoo

pytestmark = pytest.mark.slow

# One architecture per class: gpt2_medium's small variant is gpt2's.
ARCHITECTURES = [
    name for name, entry in zoo.ZOO.items() if entry.small_factory is not None and name != "gpt2_medium"
]
TIERS = ("store", "disk", "host")


def reference_output(model, example) -> torch.Tensor:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the num_cpus=1 tasks: float sums run in the same order
    try:
        return zoo.forward(model, example)
    finally:
        torch.set_num_threads(threads)


@trims_ray.function(num_cpus=1)
def through_function(model, example):
    """The output and the tier this invocation's model came from."""
    from trims_ray._lease import served_tier

    return zoo.forward(model, example), served_tier()


@ray.remote(num_cpus=1)
def through_open(name, example):
    from trims_ray._lease import served_tier

    with trims_ray.open(name) as model:
        return zoo.forward(model, example), served_tier()


def evict_until_gone(name: str, node_id: str, tier: str | None = None) -> None:
    """Evicts ``name`` and waits until its host copy has gone: a copy "deferred" (a worker
    that keeps it is asked for it, a caller's lease is being released) would serve the next
    task from that worker's process tier instead of the tier under test."""
    wait_for(
        lambda: trims_ray.evict(name, tier=tier)[node_id]["host"] != "deferred", what=f"{name} gone from the host tier"
    )


def put_in_tier(name: str, tier: str, node_id: str) -> None:
    """Leaves the model only in ``tier`` and below on this node (the store always has it)."""
    if tier == "store":
        evict_until_gone(name, node_id)
    elif tier == "disk":
        trims_ray.prefetch(name, tier="disk")
        ray.get(node_cache_actor(node_id).drain.remote())  # the disk copy is written in the background
        evict_until_gone(name, node_id, tier="host")
    else:
        trims_ray.prefetch(name, tier="host")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_zoo_architecture_comes_back_exact_from_every_tier_and_registration_form(
    cache, ray_node, tmp_path, arch
):
    entry = zoo.zoo_model(arch)
    model = zoo.build(arch, seed=1, small=True)
    example = entry.example_input(2, seq_len=12, generator=torch.Generator().manual_seed(2), small=True)
    directory = tmp_path / f"{arch}-checkpoint"
    zoo.save_checkpoint(model, directory, max_shard_size="40KB")
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    assert len(shards) >= 2, shards

    # A transformers directory needs no factory (its config.json names the class); torchvision
    # and timm checkpoints have no config, so they name the zoo's factory.
    factory = None if entry.library == "transformers" else entry.small_factory
    forms = {"module": (model, entry.small_factory), "directory": (str(directory), factory)}
    expected = reference_output(model, example)
    for form, (weights, form_factory) in forms.items():
        name = f"{arch}-{form}"
        trims_ray.register(name, weights, factory=form_factory)
        for tier in TIERS:
            for entry_point in ("function", "open"):
                put_in_tier(name, tier, ray_node)
                if entry_point == "function":
                    ref = through_function.options(model=name).remote(example)
                else:
                    ref = through_open.remote(name, example)
                output, served = ray.get(ref)
                where = f"{form} via {entry_point} from {tier}"
                assert served == tier, where
                assert output.dtype == expected.dtype and output.shape == expected.shape, where
                assert torch.equal(output, expected), (
                    f"{where}: max abs difference {(output - expected).abs().max().item()}"
                )
