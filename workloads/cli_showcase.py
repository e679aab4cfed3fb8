"""What ``trims-ray ls`` and ``trims-ray status`` show on a cluster: a three-node local Ray
(``ray.cluster_utils.Cluster``), trims_ray on it with a local store, a few small models
registered and prefetched into different tiers of different nodes, and the two commands run as a
second driver would run them (a subprocess given ``--address``), their output printed.

    python -m workloads.cli_showcase [--json]

The models: two of this driver's tenant ("default"), one public, and one of another tenant
("bob"), resident too, which the listing must not show (only the tier totals count it).
Everything it starts is stopped on the way out, the temporary store and disk tier removed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import ray
import torch

import trims_ray
from trims_ray._cluster import node_cache_actor
from workloads import local_ray

MiB = 1024 * 1024


def weights(mb: float, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(int(mb * MiB / 4), generator=gen)}


def trims_ray_cli(*argv: str, address: str) -> str:
    """``trims-ray ARGV --address ADDRESS`` in a subprocess, as an operator runs it; its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRIMS_RAY_TENANT", "RAY_ADDRESS")}
    done = subprocess.run(
        [sys.executable, "-m", "trims_ray.cli", *argv, "--address", address],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"trims-ray {' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def populate(root: str, nodes: list[str]) -> None:
    """Registers the models and places them: what the listing then shows."""
    trims_ray.register("resnet-mini", weights(6, 0))
    trims_ray.register("bert-mini", weights(3, 1))
    trims_ray.register("cold-mini", weights(1, 2))  # registered, resident nowhere
    trims_ray.register("embeddings", weights(2, 3), tenant="public")
    trims_ray.ModelStore(f"{root}/store").register("bobs-secret", weights(4, 4), tenant="bob")

    head, second, third = nodes
    trims_ray.prefetch("resnet-mini", tier="host", nodes=[head, second])
    trims_ray.prefetch("bert-mini", tier="disk", nodes=[third])
    trims_ray.prefetch("bert-mini", tier="host", nodes=[second])
    trims_ray.prefetch("embeddings", tier="host", nodes=[third])
    # Another tenant's model, resident on the head: asked of its cache as bob's own driver would.
    ray.get(node_cache_actor(head).prefetch.remote("bobs-secret", "bob", "host"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workloads.cli_showcase", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="also print 'trims-ray ls --format json'")
    args = parser.parse_args(argv)
    if ray.is_initialized():
        parser.error("it starts its own Ray: run it where Ray is not initialized")
    with tempfile.TemporaryDirectory(prefix="trims-showcase-") as root:
        cluster = local_ray.start_cluster(3, num_cpus=1, object_store_memory=128 * MiB)
        try:
            nodes = [n.node_id for n in cluster.list_all_nodes()]
            config = trims_ray.CacheConfig(host_bytes=48 * MiB, disk_dir=f"{root}/disk", report_s=0.2)
            trims_ray.init(store=f"{root}/store", config=config)
            populate(root, nodes)
            address = ray.get_runtime_context().gcs_address
            print(f"# a 3-node local Ray at {address}; nodes in the order added: {', '.join(n[:12] for n in nodes)}")
            for command in [["ls"], ["status"]] + ([["ls", "--format", "json"]] if args.json else []):
                print(f"\n$ trims-ray {' '.join(command)}")
                print(trims_ray_cli(*command, address=address), end="")
        finally:
            try:
                trims_ray.shutdown()
            finally:
                local_ray.stop_cluster(cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
