"""CUDA for the GPU tier: ``CudaDevice`` (the ``GpuDevice`` of a real GPU, used by the holder)
and the task side's import of a holder's allocation through CUDA IPC.

One allocation per model (``torch.empty(n, dtype=uint8)``), sized so that the caching allocator
gives it a segment of its own: one IPC handle then maps exactly that model and nothing of
another, and freeing it returns the whole segment to the driver. Swap-in copies from the host
tier's shared object without staging: the mapping is registered with ``cudaHostRegister``
(page-locked in place) and copied on a side stream group by group, with an interprocess event
after each group so that a task can compute on the first layers while later ones transfer.
Everything CUDA is imported lazily: this module imports on machines without a GPU.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ._errors import TrimsError
from ._gpu_ipc import DeviceIdentity, LayerGroup, local_index, quiet_from_numpy
from ._nvml import normalize_uuid, uuid_matches
from ._devices import DeviceMemory

__all__ = [
    "MIN_SEGMENT",
    "segment_bytes",
    "CudaIpcHandle",
    "rebuild_args",
    "import_allocation",
    "device_uuid",
    "local_device_index",
    "HostRegistration",
    "CudaDevice",
    "cuda_available",
]

log = logging.getLogger("trims_ray")

MiB = 1024 * 1024
# PyTorch's caching allocator (CUDACachingAllocator.cpp: kMinLargeAlloc, kRoundLarge) gives a
# request of at least 10 MiB a cudaMalloc of its own, rounded up to 2 MiB; a request of exactly
# that rounded size fills the segment, leaving no remainder another tensor could be split off.
MIN_SEGMENT = 10 * MiB
_ROUND = 2 * MiB
# cudaHostRegister flags (cuda_runtime_api.h).
_REGISTER_DEFAULT = 0x0
_REGISTER_READ_ONLY = 0x8
# Bounce buffers when the host mapping cannot be registered.
_STAGE_BYTES = 64 * MiB


def segment_bytes(nbytes: int) -> int:
    """The size to request (and account) for a model of ``nbytes``: one whole segment."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    return -(-max(nbytes, MIN_SEGMENT) // _ROUND) * _ROUND


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU in this process (False on a CPU build of torch)."""
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # a broken driver install may raise instead of answering
        return False


def _torch_cuda():
    import torch

    if not torch.cuda.is_available():
        raise TrimsError(
            f"the GPU tier needs CUDA, and torch {torch.__version__} in this process sees no GPU "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    return torch


# -- the handle and the task side ------------------------------------------------------------------


@dataclass(frozen=True)
class CudaIpcHandle:
    """What ``UntypedStorage._share_cuda_()`` returns for one allocation, by name, plus its
    length. Picklable; the same handle serves every task on the GPU.

    The device index is not part of it: each receiving process supplies its own (see
    ``rebuild_args``), as Ray's CUDA_IPC transport replaces it.
    """

    storage_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool
    nbytes: int


def rebuild_args(handle: CudaIpcHandle, device_index: int) -> tuple:
    """The positional arguments of ``torch.multiprocessing.reductions.rebuild_cuda_tensor`` for
    a 1-D uint8 tensor over the whole allocation on this process's ``cuda:device_index``.

    The order is that function's signature in torch 2.4 to 2.13 (tensor_cls, tensor_size,
    tensor_stride, tensor_offset, storage_cls, dtype, storage_device, storage_handle,
    storage_size_bytes, storage_offset_bytes, requires_grad, ref_counter_handle,
    ref_counter_offset, event_handle, event_sync_required); a unit test checks it against the
    installed torch.
    """
    import torch

    return (
        torch.Tensor,
        (handle.nbytes,),
        (1,),
        0,
        torch.UntypedStorage,
        torch.uint8,
        device_index,
        handle.storage_handle,
        handle.storage_size_bytes,
        handle.storage_offset_bytes,
        False,
        handle.ref_counter_handle,
        handle.ref_counter_offset,
        handle.event_handle,
        handle.event_sync_required,
    )


def import_allocation(handle: CudaIpcHandle, device_index: int):
    """Maps a holder's allocation into this process: a uint8 CUDA tensor over the same device
    memory (no copy). Opening the same handle again in this process reuses the mapping.

    Raises:
        TrimsError: no CUDA here.
        RuntimeError: CUDA could not open the handle (the holder died, or another GPU).
    """
    _torch_cuda()
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(*rebuild_args(handle, device_index))


def device_uuid(index: int) -> str | None:
    """The UUID of this process's ``cuda:index`` from torch, or None when torch does not
    report it."""
    import torch

    raw = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if raw is None:
        return None
    try:
        return normalize_uuid(str(raw))
    except ValueError:
        return None


def local_device_index(device: DeviceIdentity, visible: str | None = None) -> int:
    """This process's index of the GPU ``device``: mapped from ``CUDA_VISIBLE_DEVICES``
    (``visible``, default this process's), then checked against the UUID torch reports; when
    they disagree (CUDA numbering the GPUs in another order than NVML), found by UUID.

    Raises:
        TrimsError: this process does not see that GPU.
    """
    torch = _torch_cuda()
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count()
    guess = local_index(device, visible)
    if guess is not None and guess < count:
        found = device_uuid(guess)
        if found is None or uuid_matches(device.uuid, found):
            return guess
    for index in range(count):
        found = device_uuid(index)
        if found is not None and uuid_matches(device.uuid, found):
            return index
    raise TrimsError(
        f"this process does not see GPU {device.uuid} (Ray's GPU {device.label} on node "
        f"{device.node_id or '?'}); CUDA_VISIBLE_DEVICES={visible!r}: run the task with num_gpus "
        "so that Ray gives it that GPU, or lease from the holder of a GPU it has"
    )


# -- host memory ---------------------------------------------------------------------------------


class HostRegistration:
    """Page-locks an existing host mapping in place with ``cudaHostRegister`` (for DMA at full
    rate, with no staging copy) until ``close``. ``ok`` is False when CUDA refused it (the
    caller then stages through pinned buffers)."""

    def __init__(self, array: np.ndarray) -> None:
        torch = _torch_cuda()
        self._cudart = torch.cuda.cudart()
        self.address = int(array.__array_interface__["data"][0])
        self.nbytes = int(array.nbytes)
        self.ok = False
        self.error = ""
        if self.nbytes == 0:
            return
        success = self._cudart.cudaError.success
        # Plasma is mapped read-write into every worker; a read-only mapping needs the flag.
        for flags in (_REGISTER_DEFAULT, _REGISTER_READ_ONLY):
            result = self._cudart.cudaHostRegister(self.address, self.nbytes, flags)
            if result == success:
                self.ok = True
                return
            self.error = str(self._cudart.cudaGetErrorString(result))

    def close(self) -> None:
        if self.ok:
            self.ok = False
            result = self._cudart.cudaHostUnregister(self.address)
            if result != self._cudart.cudaError.success:
                log.warning("trims_ray: cudaHostUnregister failed: %s", self._cudart.cudaGetErrorString(result))


# -- the device ------------------------------------------------------------------------------------


@dataclass(eq=False)
class CudaBuffer:
    """One model's allocation on the GPU (``tensor``: uint8, ``segment_bytes`` long)."""

    tensor: object
    nbytes: int
    share: tuple | None = None  # what _share_cuda_ returned, once exported


class CudaCopyJob:
    """Copies enqueued on the device's side stream (see ``CudaDevice.copy_in``)."""

    def __init__(self, stream, events: list, registration: HostRegistration | None, on_layer, keep: tuple) -> None:
        self.stream = stream
        self._events = events
        self.events = tuple(e.ipc_handle() for e in events)
        self.local_events = tuple(events)  # for a consumer in this same process
        self._registration = registration
        self._on_layer = on_layer
        self._keep = keep  # the host tensor and mapping must outlive the copies

    def wait(self) -> None:
        try:
            for i, event in enumerate(self._events):
                event.synchronize()
                if self._on_layer is not None:
                    self._on_layer(i)
        finally:
            # Unregistering memory a copy still reads is undefined: wait for all of them.
            self.stream.synchronize()
            if self._registration is not None:
                self._registration.close()
            self._keep = ()


class CudaDevice:
    """The GpuDevice of one CUDA GPU, ``cuda:index`` of this process.

    Raises:
        TrimsError: no CUDA in this process, or no such device.
    """

    def __init__(self, index: int = 0) -> None:
        torch = _torch_cuda()
        if not 0 <= index < torch.cuda.device_count():
            raise TrimsError(f"no cuda:{index} here: torch sees {torch.cuda.device_count()} GPU(s)")
        if "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower():
            log.warning(
                "trims_ray: PYTORCH_CUDA_ALLOC_CONF enables expandable segments in the GPU holder; "
                "its IPC handles then need the pidfd path: unset it for the holder"
            )
        self.torch = torch
        self.index = index
        self.device = torch.device("cuda", index)
        self.stream = torch.cuda.Stream(device=self.device)
        # Allocation and freeing are serialized so that empty_cache() never races a new model's
        # allocation into a segment about to be released.
        self._lock = threading.Lock()

    def uuid(self) -> str | None:
        return device_uuid(self.index)

    def memory(self) -> DeviceMemory:
        free, total = self.torch.cuda.mem_get_info(self.index)
        return DeviceMemory(int(total), int(free))

    def footprint(self, nbytes: int) -> int:
        return segment_bytes(nbytes)

    def allocate(self, nbytes: int) -> CudaBuffer:
        torch = self.torch
        size = segment_bytes(nbytes)
        with self._lock:
            # A cached free block could be split to serve this request and share a segment
            # with it: release every cached block first (the holder allocates nothing else).
            if torch.cuda.memory_reserved(self.device) > torch.cuda.memory_allocated(self.device):
                torch.cuda.empty_cache()
            try:
                tensor = torch.empty(size, dtype=torch.uint8, device=self.device)
            except torch.cuda.OutOfMemoryError as exc:
                raise MemoryError(str(exc).splitlines()[0]) from None
        # Swap-ins write it on the side stream: the allocator must not reuse the block before
        # those writes end. Recorded now, since once exported (_share_cuda_) the allocator no
        # longer tracks streams for it.
        tensor.record_stream(self.stream)
        return CudaBuffer(tensor, nbytes)

    def export(self, buffer: CudaBuffer) -> CudaIpcHandle:
        if buffer.share is None:
            buffer.share = buffer.tensor.untyped_storage()._share_cuda_()
        _, handle, size, offset, ref_counter, ref_offset, event, event_required = buffer.share
        return CudaIpcHandle(handle, int(size), int(offset), ref_counter, int(ref_offset), event, bool(event_required),
                             int(buffer.tensor.numel()))

    def copy_in(
        self,
        buffer: CudaBuffer,
        host: np.ndarray,
        groups: Sequence[LayerGroup],
        on_layer: Callable[[int], None] | None = None,
    ) -> CudaCopyJob:
        """Enqueues the copy of ``host`` into ``buffer`` on the side stream, group by group, an
        interprocess event after each; returns without waiting for the copies. Where the host
        mapping cannot be registered, copies through two pinned bounce buffers instead (and
        returns when they are enqueued, the last ones still in flight)."""
        torch = self.torch
        registration = HostRegistration(host)
        if not registration.ok:
            log.warning("trims_ray: cudaHostRegister failed (%s): staging through pinned buffers", registration.error)
        src = quiet_from_numpy(host)
        dst = buffer.tensor
        stream = self.stream
        events = []
        try:
            stream.wait_stream(torch.cuda.current_stream(self.device))  # the allocation comes first
            stager = None if registration.ok else _Stager(torch, stream)
            with torch.cuda.stream(stream):
                for group in groups:
                    for start, end in group.ranges:
                        if stager is None:
                            dst[start:end].copy_(src[start:end], non_blocking=True)
                        else:
                            stager.copy(dst[start:end], host[start:end])
                    event = torch.cuda.Event(interprocess=True)
                    event.record(stream)
                    events.append(event)
        except BaseException:
            stream.synchronize()  # nothing may still read the host memory once unregistered
            registration.close()
            raise
        return CudaCopyJob(stream, events, registration if registration.ok else None, on_layer, (src, host, stager))

    def free(self, buffer: CudaBuffer) -> None:
        torch = self.torch
        with self._lock:
            if buffer.share is not None:
                # The holder's own reference from _share_cuda_: dropping it lets torch free the
                # block now instead of parking it until some consumer's count reaches zero (the
                # lease table, not torch's counter, says when no task uses it).
                torch.UntypedStorage._release_ipc_counter_cuda(buffer.share[4], buffer.share[5])
                buffer.share = None
            buffer.tensor = None
            torch.cuda.ipc_collect()
            torch.cuda.empty_cache()


class _Stager:
    """Host-to-device copies through two pinned bounce buffers, for host memory CUDA would not
    register: fill one while the other's copy runs."""

    def __init__(self, torch, stream) -> None:
        self.torch = torch
        self.buffers = [torch.empty(_STAGE_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.done = [None, None]
        self.stream = stream
        self.turn = 0

    def copy(self, dst, host: np.ndarray) -> None:
        for start in range(0, len(host), _STAGE_BYTES):
            chunk = host[start : start + _STAGE_BYTES]
            i, self.turn = self.turn, 1 - self.turn
            if self.done[i] is not None:
                self.done[i].synchronize()  # its previous copy must have left the buffer
            staging = self.buffers[i][: len(chunk)]
            staging.numpy()[:] = chunk
            dst[start : start + len(chunk)].copy_(staging, non_blocking=True)
            self.done[i] = self.torch.cuda.Event()
            self.done[i].record(self.stream)
