"""Benchmarks that print side-by-side ratios measured in one run (DESIGN.md, Benchmarks).

    python -m workloads.bench load [--mb 500] [--repeats 3] [--dir DIR] [--no-s3]

``load``: the store reader's rate for one blob from local disk (page cache dropped for the file
before every read with POSIX_FADV_DONTNEED) and from an S3 server on loopback (moto), against the
raw sequential read of the same bytes measured the same way in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from trims_ray import ModelStore
from trims_ray._reader import read_blob

RAW_BLOCK = 16 * 1024 * 1024


def synthetic_weights(nbytes: int, *, seed: int = 0, tensors: int = 8) -> dict[str, torch.Tensor]:
    """``tensors`` float32 tensors of random bits adding up to about ``nbytes``."""
    rng = np.random.default_rng(seed)
    per = max(nbytes // tensors // 4, 1)
    return {
        f"layer{i}.weight": torch.from_numpy(rng.integers(0, 2**31, per, dtype=np.int32)).view(torch.float32)
        for i in range(tensors)
    }


def drop_page_cache(path: str) -> None:
    """Evicts a file's clean pages from the page cache, so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_local_read(path: str, out: np.ndarray) -> float:
    """Seconds to read the file sequentially in 16 MiB blocks into ``out`` (the disk's rate)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        view, offset = memoryview(out), 0
        started = time.perf_counter()
        while offset < len(out):
            n = os.preadv(fd, [view[offset : offset + RAW_BLOCK]], offset)
            if n == 0:
                raise EOFError(path)
            offset += n
        return time.perf_counter() - started
    finally:
        os.close(fd)


@dataclass
class LoadRow:
    source: str
    nbytes: int
    raw: list[float]
    verified: list[float]
    unverified: list[float]

    def rate(self, samples: list[float]) -> float:
        return self.nbytes / statistics.median(samples)


def measure(repeats: int, steps: dict[str, Callable[[], float]], before: Callable[[], None]) -> dict[str, list[float]]:
    """Runs each step ``repeats`` times, interleaved so drift hits all alike; returns seconds."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            before()
            samples[name].append(step())
    return samples


def bench_load(mb: int, repeats: int, directory: str | None, with_s3: bool) -> list[LoadRow]:
    weights = synthetic_weights(mb * 1024 * 1024)
    rows: list[LoadRow] = []
    with tempfile.TemporaryDirectory(prefix="trims-bench-", dir=directory) as tmp:
        store = ModelStore(tmp)
        started = time.perf_counter()
        info = store.register("load-bench", weights, tenant="bench")
        register_s = time.perf_counter() - started
        manifest = store.manifest("load-bench", tenant="bench")
        path = store.blob_path(info.sha256)
        # One output buffer for every method, touched before timing: first touches of fresh
        # memory cost 0.3-1.8 ms/MiB on these VMs and would otherwise be charged to whoever
        # reads first.
        out = np.ones(info.nbytes, dtype=np.uint8)
        hash_started = time.perf_counter()
        hashlib.sha256(memoryview(out)).digest()
        sha256_rate = info.nbytes / (time.perf_counter() - hash_started)
        print(
            f"blob: {info.nbytes / 1e6:.1f} MB ({len(manifest.chunks.digests)} chunks of "
            f"{manifest.chunks.chunk_bytes >> 20} MiB); registered in {register_s:.2f} s; "
            f"sha256 on one core: {sha256_rate / 1e9:.2f} GB/s; {os.cpu_count()} cores",
            flush=True,
        )
        samples = measure(
            repeats,
            {
                "raw": lambda: raw_local_read(path, out),
                "verified": lambda: store.read(manifest, out=out)[1].seconds,
                "unverified": lambda: read_blob(store.fs, path, out=out, options=store.read_options)[1].seconds,
            },
            before=lambda: drop_page_cache(path),
        )
        rows.append(LoadRow("local disk (page cache dropped)", info.nbytes, **samples))
        if with_s3:
            rows.append(_bench_s3(weights, out, repeats))
    return rows


def _bench_s3(weights: dict[str, torch.Tensor], out: np.ndarray, repeats: int) -> LoadRow:
    from workloads.s3server import create_bucket, moto_server, s3_storage_options

    with moto_server() as endpoint:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        create_bucket(endpoint, bucket)
        store = ModelStore(f"s3://{bucket}/store", storage_options=s3_storage_options(endpoint))
        info = store.register("load-bench", weights, tenant="bench")
        manifest = store.manifest("load-bench", tenant="bench")
        path = store.blob_path(info.sha256)

        def raw() -> float:
            # What a function does without trims_ray: one GET of the whole object.
            started = time.perf_counter()
            data = store.fs.cat_file(path)
            elapsed = time.perf_counter() - started
            assert len(data) == info.nbytes
            return elapsed

        samples = measure(
            repeats,
            {
                "raw": raw,
                "verified": lambda: store.read(manifest, out=out)[1].seconds,
                "unverified": lambda: read_blob(store.fs, path, out=out, options=store.read_options)[1].seconds,
            },
            before=lambda: None,
        )
        return LoadRow("S3 on loopback (moto server)", info.nbytes, **samples)


def print_load_table(rows: list[LoadRow], repeats: int) -> None:
    print(f"\nload: medians of {repeats} interleaved runs; GB/s = 1e9 bytes/s")
    header = f"{'source':34} {'raw sequential':>15} {'reader verified':>16} {'ratio':>6} {'reader unverified':>18} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for row in rows:
        raw, verified, unverified = row.rate(row.raw), row.rate(row.verified), row.rate(row.unverified)
        print(
            f"{row.source:34} {raw / 1e9:>10.3f} GB/s {verified / 1e9:>11.3f} GB/s {verified / raw:>6.2f} "
            f"{unverified / 1e9:>13.3f} GB/s {unverified / raw:>6.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workloads.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    load = sub.add_parser("load", help="store reader rate vs the raw read rate, disk and S3")
    load.add_argument("--mb", type=int, default=500, help="blob size in MiB (default 500)")
    load.add_argument("--repeats", type=int, default=3, help="runs per method (default 3)")
    load.add_argument("--dir", default=None, help="directory for the local store (default: system temp)")
    load.add_argument("--no-s3", action="store_true", help="skip the S3 measurement")
    args = parser.parse_args(argv)
    if args.mb < 1 or args.repeats < 1:
        parser.error("--mb and --repeats must be positive")
    rows = bench_load(args.mb, args.repeats, args.dir, not args.no_s3)
    print_load_table(rows, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
