"""The demo (README's main-job command): register the model zoo into the default local store and
show what the store does with it.

For each zoo model: build it with seeded random weights, register it (content-addressed blob +
manifest), read it back with the verified parallel reader (page cache dropped first on a local
store, so the read comes from the disk), rebuild the module around the read buffer, and check
that its output equals the original's. Prints one row per model.

    python -m workloads.demo [--models resnet50,gpt2] [--store URI]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from trims_ray import ModelStore
from trims_ray._api import caller_tenant, current_store
from trims_ray._fsio import is_local
from trims_ray._store import materialize
from workloads.bench import drop_page_cache
from workloads.zoo import ZOO, build, zoo_model


def run_demo(names: list[str], store: ModelStore) -> list[dict]:
    tenant = caller_tenant()
    rows = []
    for name in names:
        entry = zoo_model(name)
        model = build(name, seed=0)
        started = time.perf_counter()
        info = store.register(name, model, tenant=tenant, factory=entry.factory)
        write_s = time.perf_counter() - started

        manifest = store.manifest(name, tenant=tenant)
        if is_local(store.fs):
            drop_page_cache(store.blob_path(info.sha256))
        buffer, stats = store.read(manifest)
        rebuilt = materialize(manifest, buffer)
        example = entry.example_input(1, seq_len=16, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            same = _outputs_equal(model(example), rebuilt(example))
        rows.append(
            {
                "model": name,
                "params": sum(p.numel() for p in model.parameters()),
                "bytes": info.nbytes,
                "write": info.nbytes / write_s,
                "read": stats.bytes_per_second,
                "same": same,
                "sha256": info.sha256,
            }
        )
        _print_row(rows[-1])
        del model, rebuilt, buffer
    return rows


def _outputs_equal(a, b) -> bool:
    if isinstance(a, tuple):
        return all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


_HEADER = f"{'model':12} {'parameters':>13} {'bytes':>15} {'store write':>12} {'verified read':>14}  {'output':8} sha256"


def _print_row(row: dict) -> None:
    print(
        f"{row['model']:12} {row['params']:>13,} {row['bytes']:>15,} "
        f"{row['write'] / 1e6:>7.0f} MB/s {row['read'] / 1e6:>9.0f} MB/s  "
        f"{'same' if row['same'] else 'DIFFERS':8} {row['sha256'][:12]}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workloads.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(ZOO), help=f"comma-separated zoo models (default: all of {', '.join(ZOO)})")
    parser.add_argument("--store", default=None, help="store URI (default: $TRIMS_RAY_STORE or ~/.cache/trims_ray/store)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for name in names:
        if name not in ZOO:
            parser.error(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    store = ModelStore(args.store) if args.store else current_store()
    print(f"trims_ray demo: registering {len(names)} zoo models into {store.uri} as tenant {caller_tenant()!r}")
    print("write = build blob + sha256 + atomic write; read = parallel ranged read + per-chunk sha256"
          + (" from disk (page cache dropped)" if is_local(store.fs) else ""))
    print(_HEADER)
    print("-" * len(_HEADER))
    rows = run_demo(names, store)
    if not all(row["same"] for row in rows):
        print("demo: a rebuilt model's output differs from the original", file=sys.stderr)
        return 1
    print(f"\n{len(rows)} models registered; every rebuilt model gives the original's output.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
