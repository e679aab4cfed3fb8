"""Ray Serve model multiplexing: the baseline a Ray user would deploy today (replay harness).

One replica per node; each keeps at most ``max_models`` models (``@serve.multiplexed``'s
``max_num_models_per_replica``: a count, not bytes) in its own process memory, loads a miss from
the same store trims_ray uses (read and verified by ``ModelStore.load``) and evicts its least
recently used model. workloads.replay drives it and compares it with trims_ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import ray
from ray import serve

from trims_ray import ModelStore

__all__ = ["APP_NAME", "multiplexed_serve"]

APP_NAME = "trims-replay-multiplexed"
PUBLIC = "public"

# Set by the loader when this request's model had to be loaded: Serve awaits the loader inside
# the request's own asyncio task, so the request sees what its loader did, and only that.
_loaded_here = contextvars.ContextVar("trims_replay_loaded", default=False)


class _Held:
    """A model a replica holds, counted in the replica's resident bytes until Serve unloads it
    (Serve calls a held model's ``__del__`` when it evicts it)."""

    def __init__(self, model: Any, model_id: str, resident: dict[str, _Held]) -> None:
        self.model = model
        self.nbytes = sum(t.nbytes for t in model.state_dict().values())
        self._model_id = model_id
        self._resident = resident
        resident[model_id] = self

    def __del__(self) -> None:
        # Called by Serve on eviction and again by the garbage collector: only this very copy
        # leaves the table (a reload of the same model may hold the name by then).
        if self._resident.get(self._model_id) is self:
            del self._resident[self._model_id]


class _Replica:
    """The replica's logic; ``multiplexed_serve`` adds the multiplexed loader with its cap."""

    def __init__(self, store_uri: str, storage_options: dict | None, work: Callable) -> None:
        self._store = ModelStore(store_uri, storage_options=storage_options)
        self._work = work
        self._node = ray.get_runtime_context().get_node_id()
        self._resident: dict[str, _Held] = {}

    async def _load(self, model_id: str) -> _Held:
        # In a thread: requests for models already held go on being served during a load.
        model = await asyncio.to_thread(self._store.load, model_id, tenant=PUBLIC)
        _loaded_here.set(True)
        return _Held(model, model_id, self._resident)

    async def ping(self) -> str:
        """A request that loads nothing (to start a handle's router before timing)."""
        return self._node

    async def __call__(self, seed: int) -> tuple[str, str, float, int]:
        """One request: (node id, "store" if this request loaded its model else "host",
        the work's result, bytes of models this replica holds now)."""
        _loaded_here.set(False)
        held = await self.get_model(serve.get_multiplexed_model_id())
        value = self._work(held.model, seed)
        tier = "store" if _loaded_here.get() else "host"
        return self._node, tier, value, sum(h.nbytes for h in list(self._resident.values()))


@contextlib.contextmanager
def multiplexed_serve(
    *,
    store_uri: str,
    storage_options: dict | None,
    max_models: int,
    replicas: int,
    work: Callable[[Any, int], float],
) -> Iterator[serve.handle.DeploymentHandle]:
    """Runs the multiplexed deployment on the connected Ray cluster; yields its handle and shuts
    Serve down on exit. Send a request with
    ``handle.options(multiplexed_model_id=name).remote(seed)``.

    Args:
        store_uri, storage_options: the model store replicas load from.
        max_models: models one replica may hold (``max_num_models_per_replica``).
        replicas: replicas, at most one per node (one per node when it equals the node count).
        work: ``work(model, seed) -> float``, the request's computation; importable by name.

    Raises:
        ValueError: max_models or replicas < 1.
    """
    if max_models < 1 or replicas < 1:
        raise ValueError(f"max_models and replicas must be >= 1, got {max_models}, {replicas}")

    class MultiplexedModels(_Replica):
        # The cap is fixed when the class is made, hence a class per deployment.
        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, model_id: str) -> _Held:
            return await self._load(model_id)

    deployment = serve.deployment(
        MultiplexedModels,
        name="multiplexed",
        num_replicas=replicas,
        max_replicas_per_node=1,
        ray_actor_options={"num_cpus": 1},
    )
    serve.start(proxy_location="Disabled")  # requests come through handles, not HTTP
    try:
        yield serve.run(
            deployment.bind(store_uri, storage_options, work), name=APP_NAME, route_prefix=None
        )
    finally:
        serve.shutdown()
