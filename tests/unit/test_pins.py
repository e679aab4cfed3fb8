"""Process pins in the node cache (``trims_ray.cache.pins``): the leases of worker processes that
keep a model built between tasks. They count the bytes once, never let the copy be freed while
held, are not invocations for placement, and can be asked back: by an evict, or when the host
tier needs their room. No Ray: the numpy HostMemory double and a file:// store.
"""

from __future__ import annotations

# ruff: noqa: F811 - the fixtures imported below are test arguments by the same names
import threading
import time

import pytest

from tests.unit.test_node_cache import (  # noqa: F401 - fixtures are found by name
    TENANT,
    cost,
    disk_dir,
    make_cache,
    memory,
    served,
    blob,
    weights,
)
from trims_ray._protocol import HOST, Holder, cache_key

pytestmark = pytest.mark.timeout(60)

ME = Holder.this_process()
WORKER = Holder(ME.pid, ME.start + 1)  # another process (the holder_alive double decides)


def _process(cache, holder, give_back: threading.Event | None = None) -> threading.Thread:
    """A worker process's reclaim thread: waits to be asked, then releases what it was asked for
    (once ``give_back`` is set, if given)."""

    def run() -> None:
        asked = cache.wait_asked(holder, 10.0)
        if give_back is not None:
            give_back.wait(10.0)
        for pin_id in asked:
            cache.release(pin_id)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_pin_holds_the_copy_counts_it_once_and_is_not_an_invocation(make_cache, file_store):
    info = file_store.register("m", weights(1), tenant=TENANT)
    cache = make_cache(holder_alive=lambda holder: True)
    grant = cache.acquire("m", TENANT, WORKER, pin=True)
    assert grant.pinned and served(grant) == blob(file_store, info.sha256)
    second = cache.acquire("m", TENANT, ME)  # a task's plain lease beside it
    assert not second.pinned

    assert (cache.pinned(), cache.leases()) == (1, 1)
    assert cache.stats()[HOST].bytes_used == cost(info)  # one copy, counted once
    assert cache.report()["in_flight"] == {cache_key(grant.manifest): 1}  # the task, not the pin
    cache.release(second.lease_id)
    assert cache.report()["in_flight"] == {}
    assert cache.stats()[HOST].models == 1  # the pin keeps it


def test_only_a_process_can_pin(make_cache, file_store):
    from trims_ray._protocol import Caller

    file_store.register("m", weights(1), tenant=TENANT)
    cache = make_cache()
    assert not cache.acquire("m", TENANT, Caller("c" * 32), "c" * 32 + ":1", pin=True).pinned
    assert not cache.acquire("m", TENANT, None, pin=True).pinned
    assert cache.pinned() == 0


def test_an_evict_asks_the_pinning_process_and_frees_the_copy_when_it_gives_it_back(make_cache, file_store, memory):
    file_store.register("m", weights(1), tenant=TENANT)
    cache = make_cache(holder_alive=lambda holder: True)
    grant = cache.acquire("m", TENANT, WORKER, pin=True)
    process = _process(cache, WORKER)

    assert cache.evict("m", TENANT, HOST) == {HOST: "evicted"}  # waited for the process
    process.join(5)
    assert cache.pinned() == 0 and cache.stats()[HOST].bytes_used == 0
    assert not cache.release(grant.lease_id)  # given back already


def test_an_evict_a_process_does_not_answer_stays_deferred_and_the_copy_stays_counted(make_cache, file_store):
    info = file_store.register("m", weights(1), tenant=TENANT)
    cache = make_cache(holder_alive=lambda holder: True, reclaim_wait_s=0.2)
    grant = cache.acquire("m", TENANT, WORKER, pin=True)

    assert cache.evict("m", TENANT, HOST) == {HOST: "deferred"}
    assert cache.stats()[HOST].bytes_used == cost(info)  # still mapped by the process
    assert cache.wait_asked(WORKER, 0.1) == [grant.lease_id]  # asked, once
    assert cache.wait_asked(WORKER, 0.05) == []
    cache.release(grant.lease_id)
    assert cache.stats()[HOST].bytes_used == 0


def test_an_ask_whose_answer_never_reached_its_process_is_made_again_until_the_pin_ends(make_cache, file_store):
    file_store.register("m", weights(1), tenant=TENANT)
    cache = make_cache(holder_alive=lambda holder: True, reclaim_wait_s=0.1)
    cache.pins.ask_again_after_s = 0.2
    grant = cache.acquire("m", TENANT, WORKER, pin=True)
    assert cache.evict("m", TENANT, HOST) == {HOST: "deferred"}

    assert cache.wait_asked(WORKER, 0.1) == [grant.lease_id]  # this answer is "lost"
    assert cache.wait_asked(WORKER, 0.05) == []  # not again at once
    time.sleep(0.25)
    assert cache.wait_asked(WORKER, 0.05) == [grant.lease_id]  # asked again
    cache.release(grant.lease_id)
    time.sleep(0.25)
    assert cache.wait_asked(WORKER, 0.05) == []  # the pin ended: nothing to ask


def test_a_poll_past_the_waiting_limit_is_answered_at_once_and_still_gets_its_asks(make_cache, file_store):
    # The node cache's actor has a fixed number of threads for polls; a poll that waited for
    # one queued behind the others' waits, and an ask reached its process late.
    for name in "ab":
        file_store.register(name, weights(1), tenant=TENANT)
    cache = make_cache(holder_alive=lambda holder: True, reclaim_wait_s=0.1)
    cache.pins.max_waiting = 1
    other = Holder(ME.pid, ME.start + 2)
    grant_a = cache.acquire("a", TENANT, WORKER, pin=True)
    grant_b = cache.acquire("b", TENANT, other, pin=True)
    waiting = []
    first = threading.Thread(target=lambda: waiting.append(cache.wait_asked(WORKER, 10.0)), daemon=True)
    first.start()
    time.sleep(0.3)  # WORKER's poll waits now

    started = time.monotonic()
    assert cache.wait_asked(other, 5.0) == []  # the one waiting place is taken: at once
    assert time.monotonic() - started < 1.0
    assert cache.evict("b", TENANT, HOST) == {HOST: "deferred"}  # nobody to tell it now
    assert cache.wait_asked(other, 5.0) == [grant_b.lease_id]  # its next poll gets it
    assert cache.evict("a", TENANT, HOST) == {HOST: "deferred"}
    first.join(5)
    assert waiting == [[grant_a.lease_id]]  # the waiting poll was answered as before
    for grant in (grant_a, grant_b):
        cache.release(grant.lease_id)
    assert cache.pinned() == 0


def test_a_load_takes_the_room_of_a_pinned_model_once_its_process_gives_it_back(make_cache, file_store):
    a = file_store.register("a", weights(1), tenant=TENANT)
    b = file_store.register("b", weights(2), tenant=TENANT)
    cache = make_cache(host_budget=cost(a), holder_alive=lambda holder: True)
    pin = cache.acquire("a", TENANT, WORKER, pin=True)
    give_back = threading.Event()
    process = _process(cache, WORKER, give_back)
    used_while_waiting = []

    def answer_later() -> None:
        used_while_waiting.append(cache.stats()[HOST].bytes_used)
        give_back.set()

    threading.Timer(0.1, answer_later).start()
    grant = cache.acquire("b", TENANT, ME)  # needs a's room: asks WORKER, waits for it
    process.join(5)

    assert grant.tier != "bypass" and served(grant) == blob(file_store, b.sha256)
    assert used_while_waiting == [cost(a)]  # never over the budget: b waited for a's bytes
    assert cache.stats()[HOST].bytes_used == cost(b) <= cache.host_budget
    assert cache.pinned() == 0 and not cache.release(pin.lease_id)
    assert cache.stats()[HOST].evictions == 1


def test_misses_of_one_model_that_wait_for_room_together_ask_back_one_model(make_cache, file_store):
    # Three requests for b come while the room it needs is being given back. The first asks a
    # process for a (the least recently used); the others must wait for that same room, not
    # each ask back another kept model (c), which would be lost to the process for nothing.
    a = file_store.register("a", weights(1), tenant=TENANT)
    b = file_store.register("b", weights(2), tenant=TENANT)
    c = file_store.register("c", weights(3), tenant=TENANT)
    cache = make_cache(host_budget=cost(a) + cost(c), holder_alive=lambda holder: True)
    cache.acquire("a", TENANT, WORKER, pin=True)
    pin_c = cache.acquire("c", TENANT, WORKER, pin=True)
    give_back = threading.Event()
    process = _process(cache, WORKER, give_back)
    grants = []
    requests = [threading.Thread(target=lambda: grants.append(cache.acquire("b", TENANT, ME))) for _ in range(3)]
    for request in requests:
        request.start()
    threading.Timer(0.5, give_back.set).start()  # all three are waiting by then
    for request in requests:
        request.join(10)
    process.join(5)

    tiers = sorted(g.tier for g in grants)
    assert tiers == [HOST, HOST, "store"], tiers  # one load, which the others joined
    assert all(served(g) == blob(file_store, b.sha256) for g in grants)
    host = cache.stats()[HOST]
    assert host.evictions == 1 and host.models == 2 and host.bytes_used == cost(b) + cost(c)
    assert cache.pinned() == 1 and cache.release(pin_c.lease_id)  # c stayed with its process
    # Three requests, three uses for placement to weigh (the retries after waiting are not uses).
    assert 2.5 < cache.host.uses[cache_key(b)].count <= 3.0


def test_a_load_that_cannot_wait_for_a_pinned_model_is_not_kept(make_cache, file_store):
    a = file_store.register("a", weights(1), tenant=TENANT)
    file_store.register("b", weights(2), tenant=TENANT)
    cache = make_cache(host_budget=cost(a), holder_alive=lambda holder: True, reclaim_wait_s=0.1)
    cache.acquire("a", TENANT, WORKER, pin=True)  # its process never answers

    grant = cache.acquire("b", TENANT, ME)
    assert grant.tier == "bypass"  # served, not kept: the budget holds a's bytes still
    assert cache.stats()[HOST].bytes_used == cost(a) <= cache.host_budget


def test_a_task_lease_is_never_asked_back(make_cache, file_store):
    a = file_store.register("a", weights(1), tenant=TENANT)
    file_store.register("b", weights(2), tenant=TENANT)
    cache = make_cache(host_budget=cost(a), holder_alive=lambda holder: True, reclaim_wait_s=0.1)
    held = cache.acquire("a", TENANT, ME)  # a running task's lease, not a pin

    assert cache.acquire("b", TENANT, ME).tier == "bypass"
    assert cache.wait_asked(ME, 0.05) == []
    assert served(held) == blob(file_store, a.sha256)


def test_a_dead_process_loses_its_pins_to_the_reaper(make_cache, file_store):
    file_store.register("m", weights(1), tenant=TENANT)
    alive = {WORKER: True}
    cache = make_cache(holder_alive=lambda holder: alive.get(holder, True), reclaim_wait_s=0.05)
    cache.acquire("m", TENANT, WORKER, pin=True)
    assert cache.evict("m", TENANT, HOST) == {HOST: "deferred"}

    alive[WORKER] = False
    assert cache.reap() == 1
    assert cache.pinned() == 0 and cache.stats()[HOST].bytes_used == 0


def test_a_pin_after_the_fact_is_refused_once_the_model_left(make_cache, file_store):
    file_store.register("m", weights(1), tenant=TENANT)
    cache = make_cache(holder_alive=lambda holder: True)
    grant = cache.acquire("m", TENANT, ME)
    key = cache_key(grant.manifest)
    assert cache.pin(key, WORKER, "a" * 32 + ":1")
    assert cache.pinned() == 1
    cache.release(grant.lease_id)

    cache.release("a" * 32 + ":1")
    cache.evict("m", TENANT, HOST)
    assert not cache.pin(key, WORKER, "a" * 32 + ":2")  # not here any more
    assert not cache.pin("nobody/" + "0" * 64, WORKER, "a" * 32 + ":3")
    # A pin released before it arrived (the process dropped the model first) is not granted.
    cache.acquire("m", TENANT, ME)
    cache.release("a" * 32 + ":4")
    assert not cache.pin(key, WORKER, "a" * 32 + ":4")
    assert cache.pinned() == 0


def test_hits_served_from_kept_models_count_as_host_hits_and_reach_the_policy(make_cache, file_store):
    a = file_store.register("a", weights(1), tenant=TENANT)
    file_store.register("b", weights(2), tenant=TENANT)
    c = file_store.register("c", weights(3), tenant=TENANT)
    cache = make_cache(host_budget=2 * cost(a), holder_alive=lambda holder: True)
    for name in ("a", "b"):
        cache.release(cache.acquire(name, TENANT, ME).lease_id)
    hits = cache.stats()[HOST].hits
    # "a" was used last by processes that keep it: the LRU victim for "c" must be "b".
    key_a = cache_key(file_store.manifest("a", tenant=TENANT))
    cache.note_hits({key_a: 5})
    assert cache.stats()[HOST].hits == hits + 5
    cache.release(cache.acquire("c", TENANT, ME).lease_id)
    in_host = set(cache.host.entries)
    assert in_host == {key_a, cache_key(file_store.manifest("c", tenant=TENANT))}, in_host
    assert cost(c) == cost(a)
