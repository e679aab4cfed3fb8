"""One model on one GPU (``Resident``: its allocation, its swap-in's state, its leases) and the
GPU tier's CapacityError messages; the tier itself is ``gpu_tier.GpuTier``.

An entry's memory has one owner at a time, and only the owner frees it: the swap-in while it
allocates and copies (``copying``: the copy engine writes into the allocation), then the tier.
An entry the tier drops while its copy still runs is freed by the swap-in when the copy ends
(``free_after_copy``), never under it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .._gpu_ipc import LayerGroup
from .._manifest import Manifest

__all__ = ["Resident", "check_fits_device", "too_big", "no_room", "device_short", "cannot_allocate"]


@dataclass(eq=False)  # entries are compared by identity
class Resident:
    manifest: Manifest
    nbytes: int  # accounted: the allocation's footprint
    buffer: object | None = None
    handle: object | None = None
    groups: tuple[LayerGroup, ...] = ()
    events: tuple = ()
    started: threading.Event = field(default_factory=threading.Event)  # copies enqueued
    ready: threading.Event = field(default_factory=threading.Event)  # every byte on the device
    error: BaseException | None = None  # detached: waiters each raise a copy of it
    busy: bool = False  # it failed for want of device memory: "not now", not "never"
    leases: int = 0  # leases held and acquires waiting on this entry
    evict_when_idle: bool = False
    copying: bool = True  # the swap-in owns the allocation: it may be writing into it
    free_after_copy: bool = False  # dropped while copying: the swap-in frees it when done
    source: str = ""
    layers_done: int = 0


def _what(manifest: Manifest) -> str:
    return f"{manifest.tenant}/{manifest.name}"


def check_fits_device(budget: int, total: int, gpu: str, remedy: str = "") -> None:
    """Raises ValueError when a GPU ``budget`` exceeds the ``total`` bytes of GPU ``gpu``
    (``remedy``: what to do instead, appended to the message)."""
    if budget > total:
        raise ValueError(f"GPU budget of {budget} bytes exceeds the {total} bytes of GPU {gpu}{remedy}")


def too_big(manifest: Manifest, need: int, gpu: str, budget: int) -> str:
    return (
        f"model {_what(manifest)} needs {need} bytes on GPU {gpu}, whose budget is {budget}: raise "
        "the GPU budget (budget_bytes or budget_fraction) or run it from the host tier"
    )


def no_room(manifest: Manifest, need: int, gpu: str, budget: int, busy: int) -> str:
    return (
        f"model {_what(manifest)} needs {need} bytes on GPU {gpu}, but {busy} of its {budget} "
        "budget bytes are leased or being swapped in: retry when they are released, or raise the "
        "GPU budget"
    )


def device_short(manifest: Manifest, need: int, gpu: str, room: int) -> str:
    return (
        f"model {_what(manifest)} needs {need} bytes on GPU {gpu}, which has {room} free for it "
        "now (other processes use the rest): retry later, or lower the GPU budget so that tasks "
        "keep their memory"
    )


def cannot_allocate(manifest: Manifest, need: int, gpu: str, exc: BaseException) -> str:
    return f"GPU {gpu} could not allocate {need} bytes for {_what(manifest)}: {exc}; retry later or lower the GPU budget"
