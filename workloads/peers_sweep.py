"""The hit overhead by model size (``python -m workloads.bench peers --sweep``): a
``@trims_ray.function`` call on one resident model against a plain Ray task doing the same tiny
work with no model, for models of 10 MiB to 1 GiB. ``bench overhead``'s approach and helpers
(workloads.bench), with synthetic models of the chosen sizes instead of a 4 KB one.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import ray

import trims_ray
from workloads import bench
from workloads.bench import MiB, _ms
from workloads.peers import verdict

__all__ = ["SweepRow", "print_sweep", "sweep_overhead"]


@dataclass
class SweepRow:
    mb: int
    nbytes: int
    plain: list[float]
    decorated: list[float]

    @property
    def added_s(self) -> float:
        return statistics.median(self.decorated) - statistics.median(self.plain)


def _first_bias_sum(model) -> float:
    """The tiny work of the sweep: the sum of the first layer's first 32 biases."""
    return bench.plain_sum(model.layers[0].bias[:32])


def sweep_overhead(sizes_mb: Sequence[int], calls: int, directory: str | None, warmup: int = 10) -> list[SweepRow]:
    """``bench overhead``'s measurement for one resident synthetic model of each size: sequential
    calls, decorated and plain interleaved, timed in the driver."""
    need = max(bench._host_need(mb) for mb in sizes_mb)
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="trims-peers-", dir=directory) as tmp,
        bench.ray_with_trims(tmp, need * 3 // MiB + 256, host_bytes=need, nodes=1),
    ):
        plain = ray.remote(bench.plain_sum)
        for mb in sizes_mb:
            name = f"sweep-{mb}"
            module = bench.synthetic(mb)()
            bias = module.layers[0].bias.detach()[:32].clone()
            info = trims_ray.register(name, module, factory=f"workloads.bench:synthetic_{mb}")
            del module
            trims_ray.prefetch(name, tier="host")
            decorated = trims_ray.function(_first_bias_sum, model=name)
            expected = bench.plain_sum(bias)
            for _ in range(warmup):
                assert ray.get(decorated.remote()) == expected == ray.get(plain.remote(bias))
            times: dict[str, list[float]] = {"plain": [], "decorated": []}
            submit = {"plain": lambda bias=bias: plain.remote(bias), "decorated": decorated.remote}
            for i in range(calls):
                for kind in ("plain", "decorated") if i % 2 == 0 else ("decorated", "plain"):
                    started = time.perf_counter()
                    value = ray.get(submit[kind]())
                    times[kind].append(time.perf_counter() - started)
                    assert value == expected, f"{kind} call on {name}: {value} != {expected}"
            rows.append(SweepRow(mb, info.nbytes, times["plain"], times["decorated"]))
            trims_ray.evict(name)  # one model resident at a time
            print(f"  sweep: {mb} MiB measured", flush=True)
    return rows


def print_sweep(rows: Sequence[SweepRow], calls: int) -> None:
    print(
        f"\nhit overhead by model size: {calls} sequential calls of each, interleaved, on one node of {bench.RAY_CPUS} CPUs; a "
        "@trims_ray.function on the resident model against a plain Ray task doing the same tiny work "
        "(a 32-element sum) with no model; medians, ms end to end from the driver"
    )
    header = f"{'MiB':>6} {'plain ms':>9} {'decorated ms':>13} {'added ms':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.mb:>6} {_ms(statistics.median(r.plain)):>9.3f} {_ms(statistics.median(r.decorated)):>13.3f} {_ms(r.added_s):>9.3f}")
    for r in rows:
        print(f"GOAL added <= 0.5 ms at {r.mb} MiB: {_ms(r.added_s):.3f} ms, {verdict(_ms(r.added_s) <= 0.5)}")
