"""A node cache actor lends a blob slice by slice on a real Ray (issue 16 item 18): ``lend_chunk``
serves bounded slices of a lend only while the lend lasts, and the borrower's copy
(``copy_lent``, what ``_peer_read`` runs against a peer) reads a whole blob through it,
verified, without ever getting the lender's object. One node: the Ray calls are the same as
between nodes; tests/integration/test_cluster_routing_ray.py copies between real nodes.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import ray
import torch

import trims_ray
from trims_ray._protocol import cache_key
from trims_ray.actors._naming import node_cache_actor
from trims_ray.actors._lending import copy_lent
from trims_ray.cache.host_loader import PEER_CHUNK_BYTES

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20


def test_a_lend_is_read_in_bounded_slices_while_it_lasts(cache, ray_node):
    gen = torch.Generator().manual_seed(18)
    info = trims_ray.register("m", {"w": torch.randn(5 * MiB, generator=gen)})  # 20 MiB: 3 slices
    assert trims_ray.prefetch("m", nodes=[ray_node]) == {ray_node: "store"}
    stored = cache.fs.cat_file(cache.blob_path(info.sha256))
    manifest = cache.manifest("m", tenant="default")
    actor = node_cache_actor(ray_node)

    lease_id = f"{uuid.uuid4().hex}:lend"
    grant = ray.get(actor.lend.remote(cache_key(manifest), lease_id))
    assert grant.lease_id == lease_id
    got = bytearray()
    for offset in range(0, manifest.nbytes, PEER_CHUNK_BYTES):
        piece = ray.get(actor.lend_chunk.remote(lease_id, offset, min(PEER_CHUNK_BYTES, manifest.nbytes - offset)))
        got += piece.tobytes()
        del piece
    assert bytes(got) == stored
    # No slice bigger than the bound, none outside the blob.
    for offset, length in ((0, PEER_CHUNK_BYTES + 1), (manifest.nbytes - 1, 2), (-1, 1), (0, 0)):
        with pytest.raises(ray.exceptions.RayTaskError, match="not a slice"):
            ray.get(actor.lend_chunk.remote(lease_id, offset, length))
    assert ray.get(actor.release.remote(lease_id))
    assert ray.get(actor.lend_chunk.remote(lease_id, 0, 1024)) is None  # the lend is over

    # The borrower's side, as _peer_read runs it against a peer.
    lease_id = f"{uuid.uuid4().hex}:lend"
    assert ray.get(actor.lend.remote(cache_key(manifest), lease_id)) is not None
    out = np.zeros(manifest.nbytes, dtype=np.uint8)
    try:
        copy_lent(actor, ray_node, lease_id, manifest, out)
    finally:
        assert ray.get(actor.release.remote(lease_id))
    assert out.tobytes() == stored
    # Every lend ended: an evict frees the copy at once.
    assert trims_ray.evict("m", tier="host")[ray_node]["host"] == "evicted"
