"""LoadBuffers: a buffer is used again only once no view of it is left, never while one is, and
the idle ones stay within their bound (a node cache's loads using them: test_node_cache.py)."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from trims_ray.cache.load_buffers import GRANULE, LoadBuffers

MIB = 1024 * 1024


def address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def test_a_buffer_is_writable_of_the_size_asked_for_and_used_again_once_its_views_are_gone():
    buffers = LoadBuffers()
    first = buffers.take(3 * MIB + 5)
    assert (first.dtype, first.ndim, len(first), first.flags.writeable) == (np.uint8, 1, 3 * MIB + 5, True)
    first[:] = 7
    where = address(first)
    del first
    again = buffers.take(3 * MIB)
    assert address(again) == where
    assert buffers.made == 1
    # What the last load left is there: a load must write every byte it hands on.
    assert int(again[0]) == 7


def test_a_buffer_a_view_still_holds_is_never_handed_out_again():
    buffers = LoadBuffers()
    first = buffers.take(MIB)
    part = first[100:200]  # a view, as the read's threads and a queued disk copy hold
    del first
    gc.collect()
    second = buffers.take(MIB)
    assert buffers.made == 2 and address(second) != address(part) - 100
    second[:] = 1
    part[:] = 2
    assert not (second == 2).any()
    del part
    third = buffers.take(MIB)
    assert buffers.made == 2 and address(third) != address(second)


def test_buffers_taken_at_once_from_many_threads_never_overlap():
    buffers = LoadBuffers()
    failures: list[str] = []

    def load(tag: int) -> None:
        for _ in range(30):
            buffer = buffers.take(MIB + tag)
            buffer[:] = tag
            if not (buffer == tag).all():
                failures.append(f"thread {tag} saw another's bytes")
            del buffer

    threads = [threading.Thread(target=load, args=(tag,)) for tag in range(1, 7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert buffers.made <= 6  # one per thread at most were ever in use at once


def test_idle_buffers_stay_within_their_bound_and_trim_lets_them_go():
    buffers = LoadBuffers(keep_bytes=2 * GRANULE)
    held = [buffers.take(GRANULE) for _ in range(4)]
    del held
    assert buffers.idle_bytes() == 2 * GRANULE
    buffers.trim()
    assert buffers.idle_bytes() == 0
    buffers.take(GRANULE)
    assert buffers.made == 5


def test_a_small_blob_does_not_take_a_buffer_over_twice_its_size():
    buffers = LoadBuffers()
    big = buffers.take(8 * GRANULE)
    del big
    small = buffers.take(GRANULE)
    assert buffers.made == 2 and buffers.idle_bytes() == 8 * GRANULE
    del small
    medium = buffers.take(5 * GRANULE)  # 8 granules are within twice 5: used again
    assert buffers.made == 2 and len(medium) == 5 * GRANULE


def test_a_loader_that_has_not_loaded_for_idle_s_lets_every_idle_buffer_go():
    now = [0.0]
    buffers = LoadBuffers(idle_s=30.0, clock=lambda: now[0])
    short_load = buffers.take(GRANULE)
    now[0] = 20.0
    long_load = buffers.take(GRANULE)  # in use past idle_s: given back at 40, kept until 70
    del short_load
    now[0] = 40.0
    del long_load
    now[0] = 69.0
    buffers.trim_if_idle()
    assert buffers.idle_bytes() == 2 * GRANULE
    now[0] = 70.0
    buffers.trim_if_idle()
    assert buffers.idle_bytes() == 0


@pytest.mark.parametrize("nbytes", [0, -1])
def test_take_refuses_a_size_that_is_not_positive(nbytes):
    with pytest.raises(ValueError, match="nbytes"):
        LoadBuffers().take(nbytes)


def test_keep_bytes_cannot_be_negative():
    with pytest.raises(ValueError, match="keep_bytes"):
        LoadBuffers(keep_bytes=-1)
