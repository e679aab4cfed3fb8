"""``python -m workloads.bench build``: what building a zoo model on the meta device costs with
its initialisers run (plain ``torch.device("meta")``) and with trims_ray's build, which skips
them; interleaved in one process, medians.

A task builds the module this way around the cached weights on every first use, so this is part
of a hit's time (no Ray involved here: the build alone).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from trims_ray._factory import build_on_meta, resolve_factory
from workloads.zoo import ZOO, zoo_model

__all__ = ["bench_build", "print_build"]


def _plain_meta(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.device("meta"):
        return factory()


def bench_build(names: list[str], repeats: int) -> list[tuple[str, float, float]]:
    """Per model: (name, median ms with initialisers, median ms with trims_ray's build)."""
    rows = []
    for name in names:
        factory = resolve_factory({"import": zoo_model(name).factory})
        _plain_meta(factory), build_on_meta(factory)  # imports and first-call costs, untimed
        plain, skipped = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            _plain_meta(factory)
            plain.append(time.perf_counter() - started)
            started = time.perf_counter()
            build_on_meta(factory)
            skipped.append(time.perf_counter() - started)
        rows.append((name, statistics.median(plain) * 1000, statistics.median(skipped) * 1000))
    return rows


def print_build(rows: list[tuple[str, float, float]], repeats: int) -> None:
    print(f"module build on the meta device, median of {repeats}, ms (one process, interleaved)")
    header = f"{'model':14} {'with initialisers':>18} {'trims_ray build':>16} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for name, plain_ms, skipped_ms in rows:
        print(f"{name:14} {plain_ms:18.1f} {skipped_ms:16.1f} {plain_ms / skipped_ms:6.2f}x")


def default_names() -> str:
    return ",".join(ZOO)
