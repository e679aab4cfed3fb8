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
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from . import _api, _routing
from ._cluster import call, forget_node_cache_actor, get, node_cache_actor
from ._raycalls import wait_in_task as _wait
from .actors._naming import require_running
from ._errors import TrimsError
from ._gpu_lease import acquire_gpu
from ._names import check_name
from ._process_tier import PROCESS, process_tier
from ._protect import protect_array, release
from ._protocol import BYPASS, DISK, HOST, PEER, STORE, Caller, Holder, HostGrant, Resolved, cache_key
from ._store import materialize

__all__ = ["open", "function", "ModelFunction"]

_HOLDER: Holder | None = None
# How long a task on a node without a cache waits for placement to start one (a node that joins
# gets its cache within a few seconds).
_NEW_NODE_WAIT_S = 30.0
# When the last decorated task in this process started (perf_counter), before its lease: lets a
# benchmark time "task start to usable module" for the decorated path. Not part of the API.
task_started = 0.0
# The tier the last lease in this process was served from ("process": the model this process
# kept, "gpu", "host", "disk", "peer", "store", "bypass"): lets the replay record each request's
# tier. Not part of the API.
_served_from = ""


def served_tier() -> str:
    """The tier this process's latest lease came from ("" before any); for benchmarks."""
    return _served_from


def _note_served(tier: str) -> None:
    # A module function for the same reason as _mark_task_start (assigned here, not in a closure).
    global _served_from
    _served_from = tier


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
        read-only views of the node's shared copy. Do not keep them past the block. (When the
        cache's policy did not admit a miss, the model is this process's own verified copy.)

    ``tenant``: None for the caller's own (the name resolves there, then in "public"), or
    "public".

    Raises:
        ModelNotFoundError: no such model for the caller's tenant.
        CapacityError: it cannot fit this node's host tier.
        IntegrityError: its bytes failed verification.
        TrimsError: trims_ray is not initialized on this cluster.
        AccessDeniedError: ``tenant`` names another tenant.
    """
    check_name(name)
    with _open_as(name, _api.acting_tenant(tenant, "open models")) as model:
        yield model


@contextlib.contextmanager
def _open_as(name: str, tenant: str, hint: Resolved | None = None, keep: bool = False) -> Iterator[Any]:
    """``open`` for a tenant already checked (a decorated task gets its submitter's tenant).

    ``hint``: what the name resolved to for ``tenant`` (a decorated task's caller resolved it),
    or None: then the first cache asked resolves it and passes it on. ``keep``: the lease is a
    pin, and this process keeps the model built for its next tasks (``_process_tier``)."""
    # No lease unless this task has a GPU with a holder that admits the model.
    gpu_lease, hint = acquire_gpu(name, tenant, hint=hint)
    if gpu_lease is not None:
        _note_served("gpu")
        with gpu_lease as model:
            yield model
        return
    actor = _own_node_actor()
    try:
        grant = _wait(call, actor.acquire.remote(name, tenant, _this_holder(), None, hint, keep))
    except ray.exceptions.RayActorError:
        # This process cached the handle of a cache actor that has since been replaced.
        forget_node_cache_actor()
        actor = node_cache_actor()
        grant = _wait(call, actor.acquire.remote(name, tenant, _this_holder(), None, hint, keep))
    _note_served(grant.tier)
    if grant.bypass:
        yield _own_copy(grant)
        return
    if grant.pinned:  # the lease is this process's pin now: it ends when the model is dropped
        try:
            obj = _wait(get, grant.ref)
        except BaseException:  # nothing keeps it yet: end the pin here, or the node waits on it
            actor.release.remote(grant.lease_id)
            raise
        with _kept(process_tier().keep(tenant, grant, obj, actor, grant.lease_id, _this_holder())) as model:
            yield model
        return
    try:
        with _read_only_model(grant, _wait(get, grant.ref)) as model:
            yield model
    finally:
        # Fire and forget: if this message is lost or the process dies first, the node's reaper
        # ends the lease when it sees the process gone.
        actor.release.remote(grant.lease_id)


@contextlib.contextmanager
def _kept(kept) -> Iterator[Any]:
    """The model this process keeps, in use by the calling task until the block ends."""
    try:
        yield kept.model
    finally:
        process_tier().give(kept)


def _own_node_actor() -> ray.actor.ActorHandle:
    """This node's cache actor. On a node that joined a moment ago, Ray may run a task before
    placement has started the node's cache (it checks membership every ``report_s``, then the
    actor starts a worker): wait for it rather than fail an invocation that would succeed a
    second later (the soak lost one so)."""
    deadline = time.monotonic() + _NEW_NODE_WAIT_S
    while True:
        try:
            return node_cache_actor()
        except TrimsError:
            if time.monotonic() > deadline:
                raise
        require_running()  # raises at once where trims_ray is not running at all
        time.sleep(0.2)


def _own_copy(grant: HostGrant) -> Any:
    """The model of a miss the node's cache did not keep: read (verified) by this process from
    the node's store, or by the node's cache for it when the store's credentials stay there."""
    manifest = grant.manifest
    if grant.relayed:  # the store's credentials stay with the node's cache: read through it
        relay = node_cache_actor(grant.node).read_bypassed.remote(manifest.name, manifest.tenant, manifest.sha256)
        return materialize(manifest, _wait(call, relay))
    buffer, _ = _api.store_for(grant.store_uri, grant.storage_options).read(manifest)
    return materialize(manifest, buffer)


@contextlib.contextmanager
def _read_only_model(grant: HostGrant, obj) -> Iterator[Any]:
    """The model of a granted lease (``obj``: its object), its pages read-only while in use."""
    manifest = grant.manifest
    blob = obj[grant.offset : grant.offset + manifest.nbytes]
    token = protect_array(blob)
    try:
        yield materialize(manifest, blob)
    finally:
        release(token)


class ModelFunction:
    """A Ray remote function whose first argument is a leased model (see ``function``)."""

    def __init__(self, fn: Callable, model: str | None, options: dict, built: dict | None = None) -> None:
        if model is not None:
            check_name(model)
        self._fn = fn
        self._model = model
        self._options = options
        self._remote = None
        self._placed: dict[str, Any] = {}  # node -> the remote function with its affinity
        # (model, options) -> (remote function, its _placed), shared by every .options() copy of
        # this function: building one pickles and exports the function to Ray again, and the
        # demo and the replay call .options(model=...) for every request.
        self._built: dict = {} if built is None else built
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        raise TypeError(
            f"{self._fn.__name__} is a trims_ray function: call {self._fn.__name__}.remote(...)"
        )

    def options(self, **options) -> ModelFunction:
        """Like Ray's ``.options()``; ``model=`` switches the model as well."""
        model = options.pop("model", self._model)
        return ModelFunction(self._fn, model, {**self._options, **options}, self._built)

    def _build(self) -> tuple[Any, dict[str, Any]]:
        """The Ray remote function for this model and these options, and its per-node copies:
        the one built before for equal ones, else a new one."""
        try:
            key = (self._model, _frozen(self._options))
        except TypeError:  # an option value that cannot be compared: one for this copy alone
            return _make_remote(self._fn, self._model, self._options), {}
        with _built_lock:
            built = self._built.get(key)
            if built is None:
                built = self._built[key] = (_make_remote(self._fn, self._model, self._options), {})
        return built

    def remote(self, *args, **kwargs) -> ray.ObjectRef:
        """Submits the task to the node where it is expected to start soonest (the placement
        table this process caches: where the model is resident, and the queues), with a soft
        NodeAffinity so that a vanished node does not make it unschedulable.

        The lease is taken here, on that node's cache, and handed to the task inside a list, so
        Ray does not wait for it before scheduling: the lease and the task's start overlap, and
        a fresh worker does not pay for finding and first calling the cache actor. When the
        node's slots are all busy the task leases when it starts instead. A task that lands
        elsewhere (its node died; the lease failed) leases from its own node instead.

        Raises:
            ModelNotFoundError: no such model for the caller's tenant.
            CapacityError: no node's host tier can hold the model (no task is started).
            TrimsError: trims_ray is not initialized on this cluster.
        """
        if self._model is None:
            raise ValueError(
                f"{self._fn.__name__} has no model: use @trims_ray.function(model=...) or "
                ".options(model=...)"
            )
        if self._remote is None:
            self._remote, self._placed = self._build()
        tenant = _api.caller_tenant()
        router = _routing.router()
        if "scheduling_strategy" in self._options:
            # The caller placed the task itself: it leases from whatever node it runs on. It is
            # not routed, so not counted (loading, in flight) on a node it may never go to.
            hint = Resolved.of(router.manifest(self._model, tenant))
            return _returns(self._remote.remote(tenant, None, hint, *args, **kwargs), self._options)[0]
        # A task without a GPU is served by a node's host side: GPU copies do not rank it. How
        # many run at once on a node follows from what the task asks Ray for.
        demand = _demand(self._options)
        manifest, route = router.route(self._model, tenant, gpu=_wants_gpu(self._options), cpus=demand[0], gpus=demand[1])
        # The name is resolved here, once: the caches downstream are told what it resolved to.
        hint = Resolved.of(manifest)
        track = functools.partial(router.track, key=cache_key(manifest), node=route.node, labels=(tenant, self._model), demand=demand)
        if _wants_gpu(self._options) or route.tier == HOST or router.queued(route.node, *demand):
            # No lease taken here; the task leases when it starts. With a GPU, the holder of the
            # task's own GPU serves it (known only then), and a host lease would be wasted on a
            # GPU hit. A model in the node's host tier is most likely kept built by the process
            # the task lands in (``_process_tier``): a lease would cost the node's cache two
            # messages for nothing; a process that does not keep it leases its own, once.
            # Behind the node's busy slots, a lease taken now would pin its model (or the budget
            # of its load) for the whole wait: with a burst queued, every byte of the host tier
            # was leased and misses could only bypass it (measured in the replay).
            ref, service = _returns(self._placed_on(route.node).remote(tenant, None, hint, *args, **kwargs), self._options)
            # Counted in flight on its node and timed like any invocation; no lease to end.
            track(ref, release=_no_lease, service=service)
            return ref
        actor = node_cache_actor(route.node)
        # The caller holds the lease until the task's result exists, then ends it (the task
        # sends nothing: each message from a worker costs it most of a millisecond).
        lease_id = router.new_lease_id()
        grant = actor.acquire.remote(self._model, tenant, Caller(router.id), lease_id, hint)
        ref, service = _returns(self._placed_on(route.node).remote(tenant, [grant], hint, *args, **kwargs), self._options)
        track(ref, release=functools.partial(actor.release.remote, lease_id), service=service)
        return ref

    def _placed_on(self, node: str):
        """The remote function with a soft affinity to ``node``, built once per node."""
        remote = self._placed.get(node)
        if remote is None:
            strategy = NodeAffinitySchedulingStrategy(node, soft=True)
            remote = self._placed[node] = self._remote.options(scheduling_strategy=strategy)
        return remote


def _no_lease() -> None:
    pass


def _demand(options: dict) -> tuple[float, float]:
    """The CPUs and GPUs a task with these options asks Ray for (a task's default: one CPU)."""
    cpus = options.get("num_cpus")
    return (1.0 if cpus is None else float(cpus)), float(options.get("num_gpus") or 0)


def _returns(refs, options: dict) -> tuple[Any, ray.ObjectRef | None]:
    """What the caller gets (the result's ref), and the ref of the seconds the task measured
    it held its slot: None when the user chose the task's returns (``num_returns``), and then
    the task returns only what the function does (see ``_make_remote``)."""
    if "num_returns" in options:
        return refs, None
    return refs[0], refs[1]


_built_lock = threading.Lock()


def _frozen(value: Any) -> Any:
    """A hashable form of Ray task options that equal options share: dicts and lists by their
    items, option objects (scheduling strategies) by their attributes, the rest by their own
    equality (callables: by identity).

    Raises:
        TypeError: a value with none of these.
    """
    if isinstance(value, dict):
        return (dict, tuple(sorted((repr(k), _frozen(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_frozen(v) for v in value))
    if isinstance(value, (set, frozenset)):
        return (frozenset, frozenset(_frozen(v) for v in value))
    if not callable(value) and type(value).__hash__ is object.__hash__ and hasattr(value, "__dict__"):
        return (type(value), _frozen(vars(value)))
    hash(value)
    return (type(value), value)


def _wants_gpu(options: dict) -> bool:
    num_gpus = options.get("num_gpus") or 0
    return num_gpus > 0


# The tiers a task's model is loaded from rather than found ready (``served_tier``).
_LOADED_FROM = frozenset({DISK, PEER, STORE, BYPASS})


def _service_seconds(tier: str, started: float, ready: float, ended: float) -> float:
    """The seconds a task held its slot, as the router learns a model's service time from it:
    without the wait for its model when this task loaded it. Routing prices a load apart (its
    bytes over the source's rate), and the next invocations behind this one mostly find the
    model ready; counted in, a miss's load (tens to hundreds of ms, against a few ms of work)
    made a model's first invocation set its service time, and a queue of one on its node
    looked dearer than a load elsewhere until hits wore it down. ``tier``: where this task's
    model came from (``served_tier`` when it was ready, before the function could open others)."""
    if tier in _LOADED_FROM:
        return ended - ready
    return ended - started


def _mark_task_start() -> None:
    # A module-level function: the closure below travels to workers by value (cloudpickle), with
    # a copy of this module's globals, so it must not assign module globals itself.
    global task_started
    task_started = time.perf_counter()




def _granted(boxed: list | None) -> tuple[HostGrant, Any] | None:
    """The lease taken for this task at submit time and its object, or None when it cannot be
    used here: the task runs on another node than the lease's (its node died and Ray retried it
    elsewhere, or the soft affinity gave way), or that node's cache died (with its objects).
    The caller ends the lease when this task's result exists, whichever way it went."""
    if boxed is None:
        return None
    try:
        grant = _wait(call, boxed[0])
    except TrimsError:
        raise  # the model's own fault (not found, too big, corrupt): the same on every node
    except ray.exceptions.RayError:
        return None
    if grant.node != ray.get_runtime_context().get_node_id():
        return None
    if grant.bypass:
        return grant, None
    try:
        return grant, _wait(get, grant.ref)
    except ray.exceptions.RayError:
        return None  # the cache actor died after granting: its objects died with it


@contextlib.contextmanager
def _model_for_task(name: str, tenant: str, boxed: list | None, hint: Resolved, keep: bool) -> Iterator[Any]:
    """The model of a decorated task: the one this process kept (no lease, no build, no actor
    call), else from the lease its caller took at submit, else from a lease of its own; kept for
    the process's next tasks when ``keep`` and the node's cache lets it (a pin)."""
    tier = process_tier()
    # A caller that leased at submit (its routing table did not show the model here yet) had
    # the node count that request already: the kept model serves it without a second count.
    kept = tier.take(tenant, hint, count=boxed is None) if keep else None
    if kept is not None:
        _note_served(PROCESS)
        with _kept(kept) as model:
            yield model
        return
    granted = _granted(boxed)
    if granted is None:
        with _open_as(name, tenant, hint, keep) as model:
            yield model
        return
    grant, obj = granted
    _note_served(grant.tier)
    if obj is None:  # the node did not keep this miss: the task loads its own copy
        yield _own_copy(grant)
        return
    actor = _granting_actor(grant) if keep else None
    if actor is not None:
        # The caller's lease ends with this task: this process takes a pin of its own, asked for
        # now and answered by the task's end (a refusal, the model evicted meanwhile, drops it).
        pin_id = tier.new_pin_id()
        confirm = actor.pin.remote(cache_key(grant.manifest), _this_holder(), pin_id)
        with _kept(tier.keep(tenant, grant, obj, actor, pin_id, _this_holder(), confirm)) as model:
            yield model
        return
    with _read_only_model(grant, obj) as model:
        yield model


def _granting_actor(grant: HostGrant) -> ray.actor.ActorHandle | None:
    """This node's cache actor if it is the one that granted ``grant``, else None (it was
    replaced since: the model is used for this task alone)."""
    actor = node_cache_actor()
    if actor._actor_id.hex() != grant.actor_id:
        forget_node_cache_actor()  # a handle of an actor that was replaced, cached here
        actor = node_cache_actor()
    return actor if actor._actor_id.hex() == grant.actor_id else None


def _make_remote(fn: Callable, model: str, options: dict):
    def run_with_model(tenant: str, boxed: list | None, hint: Resolved, *args, **kwargs):
        # The function, its trims_ray.open calls and its nested invocations act as the tenant
        # that submitted it, whatever this worker's environment says.
        with _api.acting_as(tenant):
            return _run_with_model(tenant, boxed, hint, *args, **kwargs)

    gpu = _wants_gpu(options)
    # The task returns, beside the function's result, the seconds it held its slot: the caller's
    # router ranks nodes by that service time (end to end, a latency would count the queue).
    # Not when the user chose the returns (num_returns: a count, or a generator's streaming).
    timed = "num_returns" not in options

    def _run_with_model(tenant: str, boxed: list | None, hint: Resolved, *args, **kwargs):
        _mark_task_start()
        started = time.perf_counter()
        # A GPU task's model comes from its GPU's holder; the process tier keeps host views.
        try:
            with _model_for_task(model, tenant, boxed, hint, keep=not gpu) as leased:
                ready = time.perf_counter()
                # Read now: the function's own trims_ray.open calls note their tiers after it.
                tier = served_tier()
                result = fn(leased, *args, **kwargs)
        finally:
            if gpu and reused:
                _free_task_gpu_memory()
        return (result, _service_seconds(tier, started, ready, time.perf_counter())) if timed else result

    run_with_model.__name__ = getattr(fn, "__name__", "run_with_model")
    # Ray makes every task that asks for GPUs non-recyclable (max_calls=1, ray#29624): each one
    # would start a fresh worker (Python, torch, a CUDA context) before the model is even
    # mapped. A decorated task reuses its worker unless the user says otherwise, and gives back
    # the GPU memory it allocated itself after each call instead.
    reused = gpu and "max_calls" not in options
    if reused:
        options = {**options, "max_calls": 0}
    if timed:
        options = {**options, "num_returns": 2}
    return ray.remote(**options)(run_with_model) if options else ray.remote(run_with_model)


def _free_task_gpu_memory() -> None:
    """Returns the memory this task's own CUDA tensors left in torch's caching allocator to the
    GPU (the model's weights are the holder's, mapped by IPC, not in it)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


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
