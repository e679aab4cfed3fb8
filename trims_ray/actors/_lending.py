"""A peer's blob copied from the node cache that lends it, slice by slice (``copy_lent``), and
the lender's record of a lend (``Lent``): the two ends of peer fetch over Ray's object transfer,
apart so that ``node_cache_actor`` holds the actor alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import ray

from .._manifest import Manifest
from .._raycalls import get
from ..cache.host_loader import peer_copy_timeout_s, read_in_chunks

__all__ = ["Lent", "copy_lent"]


def copy_lent(lender: ray.actor.ActorHandle, peer: str, lease_id: str, manifest: Manifest, out: np.ndarray) -> None:
    """Copies the blob ``lender`` lent under ``lease_id`` into ``out``, verified, slice by slice
    (``lend_chunk``), never as the lender's whole object: Ray pulls an object whole into this
    node's store, a second copy of the blob beside ``out`` (our own, counted copy) that no budget
    counted (issue 16 item 18). Each slice is a small object of its own, freed once copied
    (``read_in_chunks`` bounds them). The whole copy keeps to the time the lend is granted for
    (``peer_copy_timeout_s``). Raises TimeoutError (the copy took too long, or the lend ended),
    RayError (the lender died or refused a slice), IntegrityError (a slice does not match)."""
    deadline = time.monotonic() + peer_copy_timeout_s(manifest.nbytes)

    def read_range(offset: int, length: int) -> np.ndarray:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"peer {peer} took over {peer_copy_timeout_s(manifest.nbytes):.0f} s to lend")
        piece = get(lender.lend_chunk.remote(lease_id, offset, length), timeout=left)
        if piece is None:
            raise TimeoutError(f"peer {peer} ended the lend of {manifest.sha256} (its ttl passed)")
        return piece

    read_in_chunks(manifest, out, read_range, source=f"peer {peer}")


@dataclass
class Lent:
    """A lend a peer reads slice by slice: the lent object's handle, where the blob lies in it,
    when the lend's lease ends at the latest, and the object mapped (on the first slice)."""

    handle: object
    offset: int
    nbytes: int
    expires: float
    view: np.ndarray | None = None
