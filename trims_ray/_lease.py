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
from collections.abc import Callable, Iterator
from typing import Any

import ray

from . import _api
from ._cluster import call, forget_node_actor, node_actor
from ._names import check_name
from ._protect import protect_array, release
from ._store import materialize
from .actors.node_cache import Holder

__all__ = ["open", "function", "ModelFunction"]

_HOLDER: Holder | None = None


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
        """Submits the task; the caller's tenant travels with it."""
        if self._model is None:
            raise ValueError(
                f"{self._fn.__name__} has no model: use @trims_ray.function(model=...) or "
                ".options(model=...)"
            )
        node_actor()  # fails clearly before submitting when trims_ray is not initialized
        if self._remote is None:
            self._remote = _make_remote(self._fn, self._model, self._options)
        return self._remote.remote(_api.caller_tenant(), *args, **kwargs)


def _make_remote(fn: Callable, model: str, options: dict):
    def run_with_model(tenant: str, *args, **kwargs):
        with open(model, tenant=tenant) as leased:
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
