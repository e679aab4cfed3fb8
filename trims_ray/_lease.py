"""The task's side: ``trims_ray.open`` (the TrIMS Open/Close pair as a lease) and
``@trims_ray.function``, which runs a function with its model as the first argument.

A lease gives the task a zero-copy view of the model's object in the node's shared memory. The
view's pages are made read-only in this process for as long as the lease lasts (plasma is mapped
writable into every worker, and ``torch.from_numpy`` ignores numpy's read-only flag), so a write
faults instead of changing what every other task sees. The model is valid only inside the lease.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from . import _api
from ._cluster import call, forget_node_actor, node_actor, sole_cache_node
from ._names import check_name
from ._protect import protect_array, release
from ._store import materialize
from .actors.node_cache import Holder

__all__ = ["open", "function", "ModelFunction"]

_HOLDER: Holder | None = None
# When the last decorated task in this process started (perf_counter), before its lease: lets a
# benchmark time "task start to usable module" for the decorated path. Not part of the API.
task_started = 0.0


def _this_holder() -> Holder:
    global _HOLDER
    if _HOLDER is None:
        _HOLDER = Holder.this_process()
    return _HOLDER


@contextlib.contextmanager
def open(name: str, *, tenant: str | None = None) -> Iterator[Any]:  # noqa: A001 - the TrIMS name
    """Leases a model from this node's cache for the duration of the ``with`` block.

    Works inside any Ray task or actor on a node with a trims_ray cache (and in the driver).

    Yields:
        The model as an ``nn.Module`` when it has a factory, else a state dict, whose tensors are
        read-only views of the node's shared copy. Do not keep them past the block.

    Raises:
        ModelNotFoundError: no such model for the caller's tenant.
        CapacityError: it cannot fit this node's host tier.
        IntegrityError: its bytes failed verification.
        TrimsError: trims_ray is not initialized on this cluster.
    """
    check_name(name)
    tenant = tenant or _api.caller_tenant()
    actor = node_actor()
    try:
        grant = call(actor.acquire.remote(name, tenant, _this_holder()))
    except ray.exceptions.RayActorError:
        # This process cached the handle of a cache actor that has since been replaced.
        forget_node_actor()
        actor = node_actor()
        grant = call(actor.acquire.remote(name, tenant, _this_holder()))
    with _use_grant(actor, grant) as model:
        yield model


@contextlib.contextmanager
def _use_grant(actor, grant: dict) -> Iterator[Any]:
    """The model of a granted lease, its pages read-only while in use; ends the lease after."""
    try:
        obj = ray.get(grant["refs"][0])
        manifest = grant["manifest"]
        blob = obj[grant["offset"] : grant["offset"] + manifest.nbytes]
        token = protect_array(blob)
        try:
            yield materialize(manifest, blob)
        finally:
            release(token)
    finally:
        # Fire and forget: if this message is lost or the process dies first, the node's reaper
        # ends the lease when it sees the process gone.
        actor.release.remote(grant["lease_id"])


class ModelFunction:
    """A Ray remote function whose first argument is a leased model (see ``function``)."""

    def __init__(self, fn: Callable, model: str | None, options: dict) -> None:
        if model is not None:
            check_name(model)
        self._fn = fn
        self._model = model
        self._options = options
        self._remote = None
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        raise TypeError(
            f"{self._fn.__name__} is a trims_ray function: call {self._fn.__name__}.remote(...)"
        )

    def options(self, **options) -> ModelFunction:
        """Like Ray's ``.options()``; ``model=`` switches the model as well."""
        model = options.pop("model", self._model)
        return ModelFunction(self._fn, model, {**self._options, **options})

    def remote(self, *args, **kwargs) -> ray.ObjectRef:
        """Submits the task; the caller's tenant travels with it.

        When the node the task will run on is known (a cluster with one cache node for now; the
        placement actor's route later), the lease is taken here, on this process's connection to
        that node's cache, and handed to the task as an argument: Ray resolves it before the task
        starts, so a fresh worker does not pay for finding and first calling the cache actor.
        """
        if self._model is None:
            raise ValueError(
                f"{self._fn.__name__} has no model: use @trims_ray.function(model=...) or "
                ".options(model=...)"
            )
        if self._remote is None:
            self._remote = _make_remote(self._fn, self._model, self._options)
        tenant = _api.caller_tenant()
        node = None if "scheduling_strategy" in self._options else sole_cache_node()
        if node is None:
            node_actor()  # fails clearly before submitting when trims_ray is not initialized
            return self._remote.remote(tenant, None, None, *args, **kwargs)
        actor = node_actor(node)
        grant = actor.acquire.remote(self._model, tenant, None)
        strategy = NodeAffinitySchedulingStrategy(node, soft=True)
        return self._remote.options(scheduling_strategy=strategy).remote(tenant, grant, actor, *args, **kwargs)


def _mark_task_start() -> None:
    # A module-level function: the closure below travels to workers by value (cloudpickle), with
    # a copy of this module's globals, so it must not assign module globals itself.
    global task_started
    task_started = time.perf_counter()


def _make_remote(fn: Callable, model: str, options: dict):
    def run_with_model(tenant: str, grant: dict | None, actor, *args, **kwargs):
        _mark_task_start()
        if grant is None:
            with open(model, tenant=tenant) as leased:
                return fn(leased, *args, **kwargs)
        # The lease was taken for us; name this process as its holder so that the reaper ends it
        # if we die. The grant's object ref, an argument of this task, keeps the object alive
        # until we finish even if the lease were reclaimed.
        actor.claim.remote(grant["lease_id"], _this_holder())
        with _use_grant(actor, grant) as leased:
            return fn(leased, *args, **kwargs)

    run_with_model.__name__ = getattr(fn, "__name__", "run_with_model")
    return ray.remote(**options)(run_with_model) if options else ray.remote(run_with_model)


def function(fn: Callable | None = None, *, model: str | None = None, **options) -> Any:
    """Decorates a function into a Ray task that receives a cached model as first argument.

    Works bare (``@trims_ray.function``, then ``.options(model=...)``) or with arguments
    (``@trims_ray.function(model="resnet50", num_cpus=1)``); every other keyword is a Ray task
    option, as in ``@ray.remote``.
    """
    if fn is not None:
        if not callable(fn):
            raise TypeError("trims_ray.function decorates a callable")
        return ModelFunction(fn, model, options)
    return lambda f: ModelFunction(f, model, options)
