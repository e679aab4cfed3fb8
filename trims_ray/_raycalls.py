"""``ray.get`` for trims_ray's own calls: errors that keep nothing alive once handled, and our
own errors from an actor raised as themselves. A leaf module, so that the actors (which
``_cluster`` imports) can use it at import time.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from ._errors import TrimsError

__all__ = ["get", "call", "wait_in_task"]


def get(refs, *, timeout: float | None = None):
    """``ray.get`` whose errors keep nothing alive once they are handled.

    ``ray.get`` raises the error of a failed object (an actor that died, an owner gone) from its
    own frame while a local there still holds that error: error -> traceback -> frame -> error,
    a reference cycle. It keeps every frame of the traceback alive, with the locals they hold
    when they finish, until Python's cyclic collector runs, which in a quiet process may be
    never. A caller that handles the error and goes on (a task whose lease failed leases again;
    a cache copying from its next peer) so kept what it picked up afterwards: ObjectRefs and
    views of model objects, which then stayed in the node's object store after being evicted
    (the soak's residue, issue 8). Clearing the finished frames' locals breaks the cycle, and
    the error is freed as soon as its handler is done; the traceback still shows where it came
    from.
    """
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayError as exc:
        traceback.clear_frames(exc.__traceback__)  # skips this frame, which is still running
        raise


def call(ref: ray.ObjectRef, *, timeout: float | None = None):
    """``get`` that re-raises our own errors from an actor as themselves, not wrapped."""
    try:
        return get(ref, timeout=timeout)
    except ray.exceptions.RayTaskError as exc:
        ours = getattr(exc, "cause", None)
        if not isinstance(ours, (TrimsError, ValueError, TypeError)):
            raise
    # Raised out of the handler, and no local left holding it: raised inside, Python would chain
    # the task error to it (as its __context__), and that error holds it as its cause; a local
    # would be in its own traceback. Either is a cycle like get()'s.
    try:
        raise ours
    finally:
        del ours


_waiter: ThreadPoolExecutor | None = None
_waiter_lock = threading.Lock()


def wait_in_task(get: Callable[[ray.ObjectRef], Any], ref: ray.ObjectRef) -> Any:
    """``get(ref)`` without making the task look blocked to Ray.

    A ``ray.get`` on a task's main thread hands the task's CPUs back while it waits, and Ray
    starts another worker (a fresh process that imports torch) for the next queued task: a burst
    of misses then turned every load wait into a new worker, and tasks queued for tens of seconds
    behind worker start-ups (measured in the replay). Ray does not release resources for a get
    on another thread, so the wait happens there; the task keeps its CPU slot as a plain task
    doing its own load would. The grant comes from the node's cache actor (num_cpus=0), so
    holding the slot cannot deadlock.
    """
    global _waiter
    if ray._private.worker.global_worker.mode != ray.WORKER_MODE:
        return get(ref)  # a driver holds no resources to release
    if _waiter is None:
        with _waiter_lock:
            if _waiter is None:
                _waiter = ThreadPoolExecutor(max_workers=4, thread_name_prefix="trims-wait")
    return _waiter.submit(get, ref).result()
