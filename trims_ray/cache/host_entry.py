"""One model's copy in a node's host tier (``HostEntry``), where such copies live
(``HostMemory``), and what a load that waits for room or a failed load hands its waiters
(``RoomPending``, ``detached``); the tier itself is ``host_tier.HostTier``. Cache core, no Ray.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .._manifest import Manifest

__all__ = ["HostEntry", "HostMemory", "RoomPending", "detached"]


def detached(error: BaseException) -> BaseException:
    """A copy of ``error`` without traceback, cause or context, for a load's waiters to raise.

    A failed load's error is kept on its entry for the waiters. Kept as raised, its traceback
    holds the loader's frames, whose locals hold the entry (and the blob's buffer): entry ->
    error -> traceback -> frame -> entry, a cycle that kept the buffer until the cyclic
    collector ran. Raised as one object by many waiters, each would add its own frames to it.
    Our errors pickle, so they copy; anything that does not is raised as it is.
    """
    try:
        return copy.copy(error)
    except Exception:
        return error


class HostMemory(Protocol):
    """Where host-tier objects live. The Ray actor implements it with ``ray.put``."""

    def publish(self, buffer: np.ndarray) -> object:
        """Copies ``buffer`` into shared memory; the returned handle keeps it alive.

        An implementation whose handle is not the array itself also defines
        ``view(handle) -> np.ndarray`` (the published bytes, for ``NodeCache.scrub``).
        """


class RoomPending(Exception):
    """Room for a load is being made from models only processes' pins held: they are evicted
    and asked back (``HostTier.admit`` with ``reclaim``); ask again once they are gone."""

    def __init__(self, entries: list[HostEntry]) -> None:
        super().__init__(f"{len(entries)} pinned model(s) asked back")
        self.entries = entries


@dataclass(eq=False)  # entries are told apart by identity (a key may have a dropped one and a new one)
class HostEntry:
    manifest: Manifest
    nbytes: int  # accounted bytes: the blob and its guard pages
    handle: object | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    leases: int = 0  # leases held, and requests waiting for its load
    pins: int = 0  # of those leases, the pins of processes that keep the model built (``pins``)
    evict_when_idle: bool = False  # it takes no new lease, and goes with its last one
    source: str = ""  # where the load read from: "disk", "peer" or "store"
    # What its cost in the policy was priced by (``HostTier._reweigh_residents``): a reload from
    # the disk tier or not, and at a rate measured on this node or an assumed one.
    priced_from_disk: bool = False
    priced_at_measured_rate: bool = True
