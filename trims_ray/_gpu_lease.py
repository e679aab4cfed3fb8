"""The task's side of the GPU tier: lease a model from the holder of the GPU this task runs on,
map the holder's allocation through CUDA IPC, and build the module on meta with its tensors as
views of that one allocation, so that a GPU hit copies no byte of weights.

``trims_ray.open`` and ``@trims_ray.function`` call ``acquire_gpu`` first when the task has a
GPU, and fall back to the host tier when it returns None (no GPU, no holder, tier off, the
GPU policy did not admit the model, or the GPU has no room for it now). Ray and CUDA are
imported only when used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ._gpu_ipc import DeviceIdentity, attach_layer_waits, materialize_views, module_waits
from ._protocol import GpuGrant, Holder, Resolved

__all__ = ["model_from_grant", "GpuLease", "acquire_gpu", "task_gpu_label"]

log = logging.getLogger("trims_ray")



def _cuda_buffer(handle, device: DeviceIdentity):
    from ._cuda import import_allocation, local_device_index

    return import_allocation(handle, local_device_index(device))


def _cuda_waiter(events: tuple, device: DeviceIdentity) -> Callable[[int], None]:
    """Makes the current stream wait (on the GPU, not the CPU) for the holder's layer events."""
    import torch

    from ._cuda import local_device_index

    where = torch.device("cuda", local_device_index(device))
    opened = [torch.cuda.Event.from_ipc_handle(where, handle) for handle in events]
    return lambda group: torch.cuda.current_stream(where).wait_event(opened[group])


def model_from_grant(
    grant: GpuGrant,
    *,
    open_buffer: Callable[[object, DeviceIdentity], Any] = _cuda_buffer,
    layer_waiter: Callable[[tuple, DeviceIdentity], Callable[[int], None]] = _cuda_waiter,
) -> tuple[Any, Any, list]:
    """The model of a GPU grant: (module or state dict whose tensors are views of the holder's
    allocation, that allocation as a uint8 tensor, hooks to remove when done).

    For a pipelined grant (``grant.events`` not empty), each module waits for its layer's
    event before it runs, so the first layers compute while later ones still transfer.

    Args:
        grant: what the holder's ``acquire`` returned.
        open_buffer: maps a handle to a 1-D uint8 tensor in this process (default: CUDA IPC,
            on this process's index of the grant's GPU).
        layer_waiter: turns the grant's events into ``wait(group)`` (default: CUDA stream waits).

    Raises:
        TrimsError: this process does not see the grant's GPU.
    """
    manifest, device = grant.manifest, grant.device
    buffer = open_buffer(grant.handle, device)
    blob = buffer[grant.offset : grant.offset + manifest.nbytes]
    model = materialize_views(manifest, blob)
    hooks: list = []
    if grant.events:
        wait = layer_waiter(grant.events, device)
        if isinstance(model, dict):
            wait(len(grant.events) - 1)  # no modules to hook: wait for the last layer
        else:
            hooks = attach_layer_waits(model, module_waits(manifest, grant.groups), wait)
    return model, buffer, hooks


class GpuLease:
    """A leased model on this task's GPU, as a context manager yielding the model.

    On exit it waits for this process's work on the GPU (a kernel still reading the weights
    must finish before the holder may free them), drops its views and ends the lease.
    """

    def __init__(self, grant: GpuGrant, release: Callable[[], object], **model_options: Any) -> None:
        self.grant = grant
        self._release = release
        self._options = model_options
        self.model: Any = None
        self._buffer = None
        self._hooks: list = []

    @property
    def tier(self) -> str:
        return self.grant.tier

    def __enter__(self) -> Any:
        try:
            self.model, self._buffer, self._hooks = model_from_grant(self.grant, **self._options)
        except BaseException:
            self._release()
            raise
        return self.model

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self._buffer is not None and getattr(self._buffer, "is_cuda", False):
                import torch

                torch.cuda.synchronize(self._buffer.device)
        finally:
            for hook in self._hooks:
                hook.remove()
            self.model = self._buffer = None
            self._hooks = []
            self._release()


def task_gpu_label() -> str | None:
    """Ray's id of the GPU this task computes on (its current CUDA device), or None when Ray
    gave it no GPU."""
    import ray

    if not ray.is_initialized():
        return None
    ids = ray.get_gpu_ids()
    if not ids:
        return None
    import torch

    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return str(ids[current]) if current < len(ids) else None


def _holder(node_id: str, label: str):
    from .actors._naming import gpu_tier_actor

    return gpu_tier_actor(node_id, label)


def acquire_gpu(
    name: str, tenant: str, *, hint: Resolved | None = None, pipelined: bool = False
) -> tuple[GpuLease | None, Resolved | None]:
    """Leases ``name`` from the GPU holder of this task's GPU.

    Returns:
        (lease, hint). The lease is None when the GPU tier cannot serve the model here (the task
        has no GPU, its node has no holder for it, the tier is off, the GPU policy did not
        admit the model, or the GPU has no room for it now: its bytes are leased or being
        swapped in, or other processes hold the memory): the caller then uses the host tier, passing it ``hint``, what the name
        resolved to so far (the one given, or the holder's resolution), so that the host tier
        does not resolve the name again. Use a lease as ``with lease as model:``; the lease ends
        when the block does.

    Raises:
        ModelNotFoundError: no such model for ``tenant``.
        CapacityError: it can never fit this GPU's budget.
        IntegrityError: its bytes failed verification.
    """
    import ray

    from ._cluster import call

    label = task_gpu_label()
    if label is None:
        return None, hint
    node_id = ray.get_runtime_context().get_node_id()
    holder = _holder(node_id, label)
    if holder is None:
        return None, hint
    try:
        grant = call(holder.acquire.remote(name, tenant, Holder.this_process(), None, pipelined, hint))
    except ray.exceptions.RayActorError:
        from .actors._naming import forget_gpu_tier_actor

        forget_gpu_tier_actor(node_id, label)
        log.warning("trims_ray: GPU holder %s of node %s is gone: using the host tier", label, node_id)
        return None, hint
    if grant is None:
        return None, hint
    if grant.bypass:  # it carries the manifest the holder served: the host tier needs no other
        return None, Resolved.of(grant.manifest)
    return GpuLease(grant, lambda: holder.release.remote(grant.lease_id)), hint
