"""The process tier on a real Ray (``trims_ray._process_tier``, ``trims_ray.cache.pins``): a
worker keeps the model it built between tasks, with no lease or actor call on a warm hit; the
node counts it once, asks it back when it must (an evict, a load that needs the room), and reaps
the pins of a worker that died.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
import torch
from torch import nn

import trims_ray
from tests.integration.conftest import wait_for
from trims_ray._protocol import process_start

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(256, 512)
        self.fc2 = nn.Linear(512, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _weights(mb: float, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(int(mb * MiB / 4), generator=gen)}


@trims_ray.function(num_cpus=1)
def _where(model, x):
    """The answer, the tier the model came from, this worker's pid and the module's id."""
    from trims_ray import _lease

    with torch.inference_mode():
        y = model(x) if isinstance(model, nn.Module) else model["w"][:16].sum()
    return y, _lease.served_tier(), os.getpid(), id(model)


def _node(ray_node: str) -> trims_ray.NodeStats:
    return trims_ray.stats().nodes[ray_node]


def test_a_worker_keeps_the_model_between_tasks_and_the_node_counts_its_hits(cache, ray_node):
    model = Net().eval()
    trims_ray.register("net", model, factory=f"{__name__}:Net")
    call = _where.options(model="net")
    x = torch.randn(2, 256)
    with torch.inference_mode():
        expected = model(x)

    answers = [ray.get(call.remote(x)) for _ in range(6)]
    assert all(torch.equal(y, expected) for y, *_ in answers)
    tiers = [tier for _, tier, _, _ in answers]
    assert tiers[0] == "store" and "process" in tiers[1:], tiers
    # Served from the process tier: the same module object in the same worker, built once.
    kept = {(pid, ident) for _, tier, pid, ident in answers if tier == "process"}
    assert len({pid for pid, _ in kept}) == len(kept), kept

    # No lease is held between tasks: the worker holds a pin, and its hits reach the node.
    stats = wait_for(lambda: (s := _node(ray_node)).tiers["host"].hits >= tiers.count("process") and s, what="hits")
    assert stats.leases == 0 and stats.pinned >= 1
    assert stats.tiers["host"].loads == 1 and stats.tiers["host"].models == 1


def test_an_evict_takes_the_model_back_from_the_worker_and_frees_the_object_store(cache, ray_node):
    trims_ray.register("m", _weights(8, seed=1))
    call = _where.options(model="m")
    for _ in range(3):
        ray.get(call.remote(None))
    before = _node(ray_node)
    assert before.pinned >= 1

    assert trims_ray.evict("m", tier="host")[ray_node]["host"] == "evicted"
    after = _node(ray_node)
    assert after.pinned == 0 and after.tiers["host"].bytes_used == 0
    try:
        wait_for(lambda: _node(ray_node).object_store_bytes_used <= before.object_store_bytes_used - 8 * MiB, what="store freed")
    except AssertionError as failure:  # say who still holds what (failed once in a CI-like run)
        from ray._private.internal_api import memory_summary

        raise AssertionError(f"{failure}: {before.object_store_bytes_used} B before, now {_node(ray_node)}\n{memory_summary(stats_only=False)}") from None
    # The next task leases and loads it again, and keeps it again.
    value, tier, _, _ = ray.get(call.remote(None))
    assert tier in ("disk", "store") and float(value) == float(_weights(8, seed=1)["w"][:16].sum())


def test_a_load_that_needs_the_room_of_a_kept_model_gets_it_from_the_worker(ray_node, tmp_path):
    # A host tier with room for one 12 MiB model: the second model's load asks the worker for
    # the first, which gives it back, and the budget is never exceeded. lru keeps every miss;
    # gdsf may rightly keep a and serve b unkept (a, b, a, b: swapping gains no hit).
    config = trims_ray.CacheConfig(host_bytes=14 * MiB, disk_dir=str(tmp_path / "disk"), lease_check_s=0.2, policy="lru")
    trims_ray.init(store=str(tmp_path / "store"), config=config)
    try:
        trims_ray.register("a", _weights(12, seed=2))
        trims_ray.register("b", _weights(12, seed=3))
        for name, seed in (("a", 2), ("b", 3), ("a", 2), ("b", 3)):
            value, tier, _, _ = ray.get(_where.options(model=name).remote(None))
            assert float(value) == float(_weights(12, seed=seed)["w"][:16].sum())
            assert tier != "bypass", tier  # the room came back from the worker in time
            host = _node(ray_node).tiers["host"]
            assert host.bytes_used <= host.capacity and host.models == 1
        assert _node(ray_node).tiers["host"].evictions >= 3
    finally:
        trims_ray.shutdown()


def test_a_worker_gives_a_model_back_while_every_default_thread_of_the_cache_waits(ray_node, tmp_path, monkeypatch):
    # Two misses of b wait in the node's cache for the room a kept model (a) holds, on the only
    # two threads of its default group here (64 by default, and as many misses in a burst).
    # The worker's release must not queue behind them: it ends their wait, and b is kept.
    # (Queued, it ran when both waits had run out: b was served unkept, twice.)
    from trims_ray._cluster import node_cache_actor
    from trims_ray.actors import node_cache_actor as actor_module

    monkeypatch.setattr(actor_module, "_ACTOR_CONCURRENCY", 2)  # read when init starts the cache
    config = trims_ray.CacheConfig(host_bytes=14 * MiB, disk_dir=str(tmp_path / "disk"), lease_check_s=0.2, policy="lru")
    trims_ray.init(store=str(tmp_path / "store"), config=config)
    try:
        trims_ray.register("a", _weights(12, seed=9))
        trims_ray.register("b", _weights(12, seed=10))
        ray.get(_where.options(model="a").remote(None))
        assert _node(ray_node).pinned == 1
        actor = node_cache_actor(ray_node)
        grants = ray.get([actor.acquire.remote("b", "default", None) for _ in range(2)])
        for grant in grants:
            ray.get(actor.release.remote(grant.lease_id))
        host = _node(ray_node).tiers["host"]
        assert (host.models, host.bypasses) == (1, 0), [g.tier for g in grants]
        assert sorted(g.tier for g in grants) == ["host", "store"]
    finally:
        trims_ray.shutdown()


def test_workers_past_the_polls_the_cache_lets_wait_poll_once_a_period_and_still_give_back(ray_node, tmp_path, monkeypatch):
    # The reclaim group has 2 threads here (64 by default), and one poll may wait in it: the
    # other worker's polls are answered at once. It must poll again a period later, not spin,
    # and an evict must still get the model back from both workers in time.
    import psutil

    from trims_ray.actors import node_cache_actor as actor_module

    monkeypatch.setattr(actor_module, "_RECLAIM_CONCURRENCY", 2)  # read when init starts the cache
    trims_ray.init(store=str(tmp_path / "store"), config=trims_ray.CacheConfig(disk_dir=str(tmp_path / "disk")))
    try:
        trims_ray.register("m", _weights(4, seed=12))
        call = _where.options(model="m")
        pids = set()
        for _ in range(20):  # until both workers keep it
            pids |= {pid for _, tier, pid, _ in ray.get([call.remote(None), call.remote(None)])}
            if len(pids) == 2 and _node(ray_node).pinned == 2:
                break
        assert _node(ray_node).pinned == 2, pids
        workers = [psutil.Process(pid) for pid in pids]
        before = sum(w.cpu_times().user + w.cpu_times().system for w in workers)
        time.sleep(3.0)
        used = sum(w.cpu_times().user + w.cpu_times().system for w in workers) - before
        assert used < 0.5, f"the workers used {used:.2f} s of CPU in 3 s with nothing to do"
        assert trims_ray.evict("m", tier="host")[ray_node]["host"] == "evicted"
        assert _node(ray_node).pinned == 0
    finally:
        trims_ray.shutdown()


def test_the_pins_of_a_worker_that_died_are_reaped(cache, ray_node):
    trims_ray.register("m", _weights(4, seed=4))
    _, _, pid, _ = ray.get(_where.options(model="m").remote(None))
    assert _node(ray_node).pinned == 1
    start = process_start(pid)

    os.kill(pid, signal.SIGKILL)  # the Ray worker our own task ran in
    wait_for(lambda: process_start(pid) != start, what="the worker gone")
    wait_for(lambda: _node(ray_node).pinned == 0, what="its pin reaped")
    assert trims_ray.evict("m", tier="host")[ray_node]["host"] == "evicted"


@ray.remote(num_cpus=1)
def _keep_failing_at(name: str, step: str) -> str:
    """Opens ``name`` as a decorated task does when its process keeps the model (a pin, not a
    lease), with one step failing: "get" (the object, after the pinned grant) or "protect"
    (mprotect, before the kept model exists). Returns the error it raised."""
    from trims_ray import _api, _lease, _process_tier

    module, attr = {"get": (_lease, "get"), "protect": (_process_tier, "protect_array")}[step]
    real = getattr(module, attr)

    def fail(*args, **kwargs):
        raise OSError(f"{step} failed (injected)")

    setattr(module, attr, fail)
    try:
        with _lease._open_as(name, _api.caller_tenant(), keep=True):
            return "no failure"
    except OSError as exc:
        return str(exc)
    finally:
        setattr(module, attr, real)


@pytest.mark.parametrize("step", ["get", "protect"])
def test_a_pin_whose_model_was_never_kept_ends_with_the_failure(cache, ray_node, step):
    # Nothing in the process keeps the model, so nothing would ever give its pin back: before,
    # the pin lasted as long as the worker, the node counted its bytes, and an evict waited
    # for an answer that could not come ("deferred").
    trims_ray.register("m", _weights(4, seed=9))
    assert ray.get(_keep_failing_at.remote("m", step)) == f"{step} failed (injected)"
    stats = wait_for(lambda: (s := _node(ray_node)).pinned == 0 and s.leases == 0 and s, what="the pin ended")
    assert stats.tiers["host"].models == 1
    assert trims_ray.evict("m", tier="host")[ray_node]["host"] == "evicted"
    value, tier, _, _ = ray.get(_where.options(model="m").remote(None))
    assert tier in ("disk", "store") and float(value) == float(_weights(4, seed=9)["w"][:16].sum())


@trims_ray.function(num_cpus=1, max_retries=0)
def _cancelled_while_its_pin_is_answered(model):
    """A task cancelled while ``give`` waits for the answer to the pin its process asked for
    after the caller's grant (the wait is made to raise as Ray's cancel does there)."""
    from trims_ray import _process_tier

    real = _process_tier.wait_in_task

    def cancelled(*args, **kwargs):
        _process_tier.wait_in_task = real
        raise KeyboardInterrupt  # what ray.cancel raises in the task's main thread

    _process_tier.wait_in_task = cancelled  # only ``give`` calls it, and only with a pin to confirm
    return os.getpid()


def test_a_model_whose_task_was_cancelled_in_give_can_still_be_given_back(cache, ray_node):
    # The first call of a model leases at submit (no node shows it yet): its process asks for a
    # pin of its own, and ``give`` reads the answer. Cancelled in that wait, the task left the
    # model "in use" for good: asked back, it was never dropped, and the pin held.
    trims_ray.register("m", _weights(4, seed=11))
    with pytest.raises(ray.exceptions.RayError):  # nothing raises unless give confirmed a pin
        ray.get(_cancelled_while_its_pin_is_answered.options(model="m").remote())
    wait_for(lambda: _node(ray_node).pinned == 1, what="the worker's pin")
    assert trims_ray.evict("m", tier="host")[ray_node]["host"] == "evicted"
    assert _node(ray_node).pinned == 0


def test_a_kept_model_stays_read_only(cache, ray_node, tmp_path):
    trims_ray.register("m", _weights(1, seed=5))
    expected = float(_weights(1, seed=5)["w"][:16].sum())
    call = _where.options(model="m")
    for _ in range(4):  # both workers keep it
        ray.get(call.remote(None))
    seen = tmp_path / "tier"

    @trims_ray.function(model="m", num_cpus=1, max_retries=0)
    def vandal(model):
        from trims_ray import _lease

        seen.write_text(_lease.served_tier())
        model["w"].add_(1.0)  # a write into shared memory: must fault, not land
        return "wrote"

    with pytest.raises((ray.exceptions.WorkerCrashedError, ray.exceptions.RayTaskError)):
        ray.get(vandal.remote())
    assert seen.read_text() == "process"  # it was the kept model it tried to change
    for _ in range(3):
        value, _, _, _ = ray.get(call.remote(None))
        assert float(value) == expected


def test_models_kept_from_a_cache_that_restarted_are_dropped(cache, ray_node):
    # A restarted cache actor keeps its Ray id but not its objects or pins: what workers kept
    # from its earlier start must not be served on as if the node still counted it.
    from trims_ray._cluster import node_cache_actor

    trims_ray.register("m", _weights(2, seed=6))
    call = _where.options(model="m")
    for _ in range(4):
        ray.get(call.remote(None))
    ray.kill(node_cache_actor(ray_node), no_restart=False)

    seen = []

    def served_by_the_new_cache() -> bool:
        # Anything but the kept model: the old cache is gone, so a lease is the new one's (a
        # "host" hit too, when placement had it prefetch the model meanwhile).
        _, tier, pid, _ = ray.get(call.remote(None))
        seen.append((tier, pid))
        return tier != "process"

    try:
        wait_for(served_by_the_new_cache, timeout=30, interval=0.2, what="a load by the restarted cache")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; tiers and workers seen: {seen}") from None
    host = _node(ray_node).tiers["host"]
    assert host.models == 1 and host.loads >= 1
    wait_for(lambda: ray.get(call.remote(None))[1] == "process", what="kept again, from the new cache")


# A worker of its own (another runtime_env gets another worker), whose reclaim thread waits a
# minute after a failed poll instead of a second: long enough that only being woken explains
# an ask answered within an evict's wait.
_SLOW_POLLS = {"env_vars": {"TRIMS_RAY_TEST_SLOW_POLLS": "1"}}


@trims_ray.function(num_cpus=1, runtime_env=_SLOW_POLLS)
def _where_polling_slowly(model):
    from trims_ray import _lease
    from trims_ray._process_tier import process_tier

    process_tier().poll_s = 60.0
    return _lease.served_tier(), os.getpid()


def test_a_model_kept_from_a_restarted_cache_is_given_back_at_once(cache, ray_node):
    # The worker's reclaim thread, whose poll failed when the cache died, must poll the new
    # start as soon as the worker keeps a model from it, or that start's asks wait unheard.
    from trims_ray._cluster import node_cache_actor

    trims_ray.register("m", _weights(2, seed=8))
    call = _where_polling_slowly.options(model="m")
    pids = {ray.get(call.remote())[1] for _ in range(3)}
    try:
        ray.kill(node_cache_actor(ray_node), no_restart=False)
        wait_for(lambda: ray.get(call.remote())[0] != "process", timeout=30, interval=0.2, what="a lease from the new start")
        pids.add(ray.get(call.remote())[1])
        assert _node(ray_node).pinned == 1
        assert trims_ray.evict("m", tier="host")[ray_node]["host"] == "evicted"
        assert _node(ray_node).pinned == 0
    finally:
        for pid in pids:  # workers of this test alone: their minute-long pauses go with them
            os.kill(pid, signal.SIGKILL)


# A worker of its own again, so that no other test's kept model keeps its reclaim thread polling.
_IDLE = {"env_vars": {"TRIMS_RAY_TEST_IDLE_POLLS": "1"}}


@trims_ray.function(num_cpus=1, runtime_env=_IDLE)
def _kept_alone(model):
    return os.getpid()


@ray.remote(num_cpus=1, runtime_env=_IDLE)
def _polling() -> tuple[int, bool, int]:
    """This worker's pid, whether its reclaim thread polls, and how many models it keeps."""
    from trims_ray._process_tier import process_tier

    tier = process_tier()
    return os.getpid(), tier.polling, len(tier)


def test_a_worker_that_keeps_no_model_any_more_stops_polling_until_it_keeps_one(cache, ray_node):
    trims_ray.register("m", _weights(1, seed=9))
    call = _kept_alone.options(model="m")
    pids = {ray.get(call.remote())}
    try:
        pid, polling, kept = ray.get(_polling.remote())
        pids.add(pid)
        assert pids == {pid} and polling and kept == 1, (pids, polling, kept)

        assert trims_ray.evict("m", tier="host")[ray_node]["host"] == "evicted"
        wait_for(lambda: ray.get(_polling.remote()) == (pid, False, 0), what="the reclaim thread asleep")

        assert ray.get(call.remote()) == pid  # kept again: the thread polls again, and hears asks
        assert ray.get(_polling.remote()) == (pid, True, 1)
        assert trims_ray.evict("m", tier="host")[ray_node]["host"] == "evicted"
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)


@trims_ray.function(num_cpus=1)
def _gc_state(model):
    """How many objects this worker's garbage collector has frozen, and its pid."""
    import gc

    return gc.get_freeze_count(), os.getpid()


def test_a_worker_that_keeps_models_freezes_its_start_up_objects_unless_told_not_to(cache, ray_node):
    # Ray's node-wide gc.collect then walks only what came after (``trims_ray._gc``).
    trims_ray.register("m", _weights(1, seed=7))
    frozen, pid = ray.get(_gc_state.options(model="m").remote())
    assert frozen > 10_000, frozen  # torch's import alone makes some 200,000 objects
    # Another runtime_env gets another worker, which reads the switch before it freezes.
    off = {"env_vars": {"TRIMS_RAY_GC_FREEZE": "0"}}
    frozen_off, pid_off = ray.get(_gc_state.options(model="m", runtime_env=off).remote())
    assert pid_off != pid and frozen_off == 0


def test_a_ray_of_our_own_frees_released_objects_every_100_ms(ray_node):
    # init_local starts the raylet as trims_ray.init would (``trims_ray._gc.quick_frees``),
    # and the setting stays out of this process's environment afterwards.
    import psutil
    from ray._private import ray_constants
    from ray._private.worker import _global_node

    raylet = _global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
    assert psutil.Process(raylet.pid).environ().get("RAY_free_objects_period_milliseconds") == "100"
    assert "RAY_free_objects_period_milliseconds" not in os.environ
