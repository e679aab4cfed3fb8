"""Keeping Ray's node-wide garbage collections rare and short where trims_ray runs.

When a node's object store is more than ``high_plasma_storage_usage`` (70%) full, its raylet
asks every worker process on the node for a full ``gc.collect()`` at once (at most once per
``global_gc_min_interval_s``, 30 s), to free ObjectRefs that only reference cycles hold.
"Sending Python GC request to N local workers" in the raylet's log says it happened.

A host tier that loads and evicts models reaches that mark without being full: the raylet frees
released objects in batches, every ``free_objects_period_milliseconds`` (1000 ms by default), so
evicted copies stay counted up to a second. In the peers benchmark (one node, 20 MiB models,
a miss every ~80 ms) the store's use went from 100 to 340 MB of 437 within each second, and a
request or two of every hundred waited for the collection that followed: one full collection
in a process that imported torch walks some 200,000 objects, 100 ms on an idle core of these
VMs, 120-275 ms with the node's five Ray processes collecting at once on two cores.

Two measures, each measured alone in docs/benchmarks.md ("Ray's global GC"):

- Rays that trims_ray starts (``trims_ray.init`` with no Ray running, and the tests' and
  benchmarks' own) free released objects every 100 ms (``quick_frees``); operators of a cluster
  started with ``ray start`` set the same variable there (docs/operations.md).
- trims_ray's long-lived processes (the node cache, placement, the GPU holders, and a worker once
  it keeps models in its process tier) move what exists when their state is built into the
  collector's permanent generation (``gc.freeze``): modules, classes, torch's operator tables,
  which live as long as the process. A later full collection walks only what came after. The
  price: a reference cycle among those objects that becomes garbage later is never collected,
  which is why it happens once per process and never in a driver. ``$TRIMS_RAY_GC_FREEZE=0``
  turns it off.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Mapping

from ._config import gc_freeze_from_env

__all__ = ["QUICK_FREES", "ray_env", "quick_frees", "freeze_startup_objects"]

# Ray reads ``RAY_<setting>`` from the environment of every process it starts (the raylet frees
# objects); 100 ms is ten small batches a second, where the default lets a second of a host
# tier's evicted copies count against the store.
QUICK_FREES = {"RAY_free_objects_period_milliseconds": "100"}


@contextlib.contextmanager
def ray_env(settings: Mapping[str, str]) -> Iterator[None]:
    """Within the block, this process's environment has ``settings`` (so the Ray processes
    started in the block inherit them), except those the user has set: theirs win. Restored on
    the way out."""
    added = [name for name in settings if name not in os.environ]
    for name in added:
        os.environ[name] = settings[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def quick_frees() -> contextlib.AbstractContextManager[None]:
    """``ray_env(QUICK_FREES)``: a Ray started within frees released objects every 100 ms."""
    return ray_env(QUICK_FREES)


_frozen = False


def freeze_startup_objects() -> None:
    """Moves every object the collector tracks now to its permanent generation, once per
    process (see the module's doc); a no-op with ``$TRIMS_RAY_GC_FREEZE=0``."""
    global _frozen
    if _frozen or not gc_freeze_from_env():
        return
    _frozen = True
    gc.freeze()
