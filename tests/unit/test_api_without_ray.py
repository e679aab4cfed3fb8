"""Calling the cluster API before Ray or trims_ray is initialized fails with a clear TrimsError."""

from __future__ import annotations

import pytest
import ray

import trims_ray
from trims_ray import TrimsError


def test_api_before_init_says_to_call_init():
    assert not ray.is_initialized()

    @trims_ray.function(model="m")
    def f(m):
        return 1

    for call in (f.remote, trims_ray.stats, lambda: trims_ray.prefetch("m"), lambda: trims_ray.evict("m")):
        with pytest.raises(TrimsError, match=r"trims_ray\.init"):
            call()
    with pytest.raises(TrimsError, match=r"trims_ray\.init"):
        with trims_ray.open("m"):
            pass
    trims_ray.shutdown()  # harmless without Ray
