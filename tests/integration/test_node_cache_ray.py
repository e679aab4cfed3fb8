"""The node cache on a real single-node Ray: every invariant of DESIGN.md that applies on one node
(leases, eviction frees memory, byte accounting, single flight, integrity, read-only, zero copy),
and the API's answers to bad input.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch
from torch import nn

import trims_ray
from trims_ray import CapacityError, IntegrityError, ModelNotFoundError, TrimsError
from trims_ray._cluster import forget_node_cache_actor, node_cache_actor, placement_actor
from trims_ray._malloc import ACTOR_ENV
from trims_ray._protocol import Holder

from .conftest import HOST_BUDGET, wait_for


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(256, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def weights(mb: float, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(int(mb * 1024 * 1024 / 4), generator=gen)}


def node_stats(node_id: str) -> trims_ray.NodeStats:
    return trims_ray.stats().nodes[node_id]


# -- the API end to end ----------------------------------------------------------------------


def test_function_gets_a_working_module_and_hits_after_the_first_call(cache, ray_node):
    model = SmallNet().eval()
    trims_ray.register("small", model, factory=f"{__name__}:SmallNet")

    @trims_ray.function(model="small", num_cpus=1)
    def classify(m, x):
        with torch.inference_mode():
            return m(x)

    x = torch.randn(4, 256)
    with torch.inference_mode():
        expected = model(x)
    for _ in range(3):
        assert torch.equal(ray.get(classify.remote(x)), expected)
    # Hits served by the workers that keep the model reach the node with their next poll.
    wait_for(lambda: node_stats(ray_node).tiers["host"].hits >= 2, what="the workers' hits counted")
    host = node_stats(ray_node).tiers["host"]
    assert (host.loads, host.misses, host.hits, host.models) == (1, 1, 2, 1)
    ray.get(node_cache_actor(ray_node).drain.remote())  # the disk copy is written in the background
    assert node_stats(ray_node).tiers["disk"].models == 1


def test_bare_decorator_and_options_like_ray(cache):
    trims_ray.register("a", {"w": torch.ones(3)})
    trims_ray.register("b", {"w": torch.full((3,), 2.0)})

    @trims_ray.function
    def total(m):
        return float(m["w"].sum())

    with pytest.raises(ValueError, match="no model"):
        total.remote()
    assert ray.get(total.options(model="a").remote()) == 3.0
    assert ray.get(total.options(model="b", num_cpus=0.5).remote()) == 6.0
    with pytest.raises(TypeError, match=r"\.remote"):
        total(None)


def test_open_inside_a_plain_ray_task_and_an_actor(cache):
    trims_ray.register("m", {"w": torch.arange(5.0)})

    @ray.remote
    def task():
        with trims_ray.open("m") as sd:
            return float(sd["w"].sum())

    @ray.remote
    class Server:
        def total(self):
            with trims_ray.open("m") as sd:
                return float(sd["w"].sum())

    assert ray.get(task.remote()) == 10.0
    assert ray.get(Server.remote().total.remote()) == 10.0


# -- invariants ----------------------------------------------------------------------------


def test_zero_copy_every_parameter_lies_in_the_shared_object(cache):
    trims_ray.register("small", SmallNet(), factory=f"{__name__}:SmallNet")

    @ray.remote
    def check():
        forget_node_cache_actor()  # this worker may have served an earlier test's (killed) cache
        actor = node_cache_actor()
        grant = ray.get(actor.acquire.remote("small", "default", Holder.this_process()))
        try:
            obj = ray.get(grant.ref)
            lo, hi = obj.ctypes.data, obj.ctypes.data + obj.nbytes
            with trims_ray.open("small") as model:
                tensors = list(model.parameters()) + list(model.buffers())
                inside = [lo <= t.data_ptr() and t.data_ptr() + t.nbytes <= hi for t in tensors]
            return len(inside), all(inside), obj.flags.writeable
        finally:
            actor.release.remote(grant.lease_id)

    count, all_inside, writeable = ray.get(check.remote())
    assert count == 4 and all_inside and not writeable


def test_a_task_cannot_change_the_weights_others_see(cache):
    original = weights(1)
    trims_ray.register("w", original)

    @trims_ray.function(model="w", max_retries=0)
    def vandal(sd):
        sd["w"].add_(1.0)  # a write into shared memory: must fault, not land
        return "wrote"

    @trims_ray.function(model="w")
    def reader(sd):
        return sd["w"].clone()

    with pytest.raises((ray.exceptions.WorkerCrashedError, ray.exceptions.RayTaskError)):
        ray.get(vandal.remote())
    assert torch.equal(ray.get(reader.remote()), original["w"])


def test_single_flight_32_concurrent_requests_load_once(cache, ray_node):
    trims_ray.register("cold", weights(8))

    def use(_):
        with trims_ray.open("cold") as sd:
            return float(sd["w"][0])

    with ThreadPoolExecutor(32) as pool:
        values = list(pool.map(use, range(32)))
    assert len(set(values)) == 1
    host = node_stats(ray_node).tiers["host"]
    assert host.loads == 1 and host.hits + host.misses == 32
    wait_for(lambda: node_stats(ray_node).leases == 0)


def test_concurrent_tasks_share_one_load(cache, ray_node):
    trims_ray.register("cold", weights(4))

    @trims_ray.function(model="cold", num_cpus=0.25)
    def first(sd):
        return float(sd["w"][0])

    assert len(set(ray.get([first.remote() for _ in range(8)]))) == 1
    assert node_stats(ray_node).tiers["host"].loads == 1


@ray.remote
class ModelHolder:
    """An actor that holds a lease on a model for a while, and then sums its weights."""

    def hold(self, name: str, seconds: float) -> float:
        with trims_ray.open(name) as sd:
            time.sleep(seconds)
            return float(sd["w"].sum())


def test_leased_model_survives_evict_and_goes_when_released(cache, ray_node):
    trims_ray.register("held", weights(8))
    result = ModelHolder.remote().hold.remote("held", 3.0)
    wait_for(lambda: node_stats(ray_node).leases == 1)
    assert trims_ray.evict("held", tier="host")[ray_node]["host"] == "deferred"
    assert node_stats(ray_node).tiers["host"].models == 1
    assert ray.get(result) == pytest.approx(float(weights(8)["w"].sum()), rel=1e-5)
    wait_for(lambda: node_stats(ray_node).tiers["host"].bytes_used == 0)


def test_eviction_really_frees_object_store_memory(cache, ray_node):
    size = 16 * 1024 * 1024
    trims_ray.register("big", weights(16))
    before = node_stats(ray_node).object_store_bytes_used
    assert trims_ray.prefetch("big")[ray_node] == "store"
    loaded = node_stats(ray_node).object_store_bytes_used
    assert loaded - before >= size
    assert trims_ray.evict("big", tier="host")[ray_node]["host"] == "evicted"
    wait_for(lambda: node_stats(ray_node).object_store_bytes_used <= loaded - size)


def test_host_budget_is_respected_and_lru_evicts(lru_cache, ray_node):
    for i in range(4):  # 20 MiB each against a 64 MiB budget: three fit
        trims_ray.register(f"m{i}", weights(20, seed=i))
    for i in range(4):
        trims_ray.prefetch(f"m{i}")
        host = node_stats(ray_node).tiers["host"]
        assert host.bytes_used <= host.capacity == HOST_BUDGET
    host = node_stats(ray_node).tiers["host"]
    assert host.models == 3 and host.evictions == 1
    assert trims_ray.evict("m0", tier="host")[ray_node]["host"] == "absent"  # the LRU one went


def test_integrity_failure_leaves_nothing_cached(cache, ray_node):
    info = trims_ray.register("bad", weights(2))
    path = cache.blob_path(info.sha256)
    data = bytearray(cache.fs.cat_file(path))
    data[-5] ^= 0xFF
    cache.fs.pipe_file(path, bytes(data))

    @trims_ray.function(model="bad")
    def use(sd):
        return 1

    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        ray.get(use.remote())
    stats = node_stats(ray_node)
    assert stats.tiers["host"].bytes_used == 0 and stats.tiers["host"].models == 0
    assert stats.tiers["disk"].models == 0 and stats.leases == 0


def test_lease_of_a_dead_worker_is_reclaimed(cache, ray_node):
    trims_ray.register("m", weights(1))

    @ray.remote(max_retries=0)
    def die_holding():
        with trims_ray.open("m"):
            os._exit(1)

    with pytest.raises(ray.exceptions.WorkerCrashedError):
        ray.get(die_holding.remote())
    wait_for(lambda: node_stats(ray_node).leases == 0)
    assert trims_ray.evict("m", tier="host")[ray_node]["host"] == "evicted"


def test_lease_taken_for_a_decorated_task_is_reclaimed_when_it_dies(cache, ray_node):
    trims_ray.register("m", weights(1))

    @trims_ray.function(model="m", max_retries=0)
    def die_holding(sd):
        os._exit(1)  # the caller ends the lease when the task's (failed) result exists

    with pytest.raises(ray.exceptions.WorkerCrashedError):
        ray.get(die_holding.remote())
    wait_for(lambda: node_stats(ray_node).leases == 0)
    assert trims_ray.evict("m", tier="host")[ray_node]["host"] == "evicted"


def test_leases_of_a_caller_that_dies_are_reclaimed(cache, ray_node, tmp_path):
    # A second driver submits a decorated task (its lease is the caller's until the result
    # exists), then dies. Its task dies with it (Ray kills a dead owner's workers) and the node
    # cache, hearing from placement that the caller stopped polling, ends the lease.
    trims_ray.register("m", weights(1))
    script = tmp_path / "caller.py"
    script.write_text(
        "import os, sys, time, ray, trims_ray\n"
        f"ray.init(address={ray.get_runtime_context().gcs_address!r}, log_to_driver=False)\n"
        f"trims_ray.init(store={str(tmp_path / 'store')!r})\n"
        "fn = trims_ray.function(model='m')(lambda m: time.sleep(600))\n"
        "ref = fn.remote()\n"
        "while sum(n.leases for n in trims_ray.stats().nodes.values()) < 1:\n"
        "    time.sleep(0.05)\n"
        "print('leased', flush=True)\n"
        "os._exit(0)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert "leased" in done.stdout, done.stderr[-2000:]
    # Reclaimed after the caller timeout (3 s here) and the reaper's next round.
    wait_for(lambda: node_stats(ray_node).leases == 0, timeout=30)
    assert trims_ray.evict("m", tier="host")[ray_node]["host"] == "evicted"


def test_a_miss_the_policy_does_not_admit_is_served_from_the_tasks_own_copy(ray_node, tmp_path):
    # GDSF with admission: two hot models fill most of the host tier; a model asked for once
    # that would evict them is served (by the task loading it itself) and nothing is evicted.
    config = trims_ray.CacheConfig(host_bytes=10 * 1024 * 1024, policy="gdsf", disk_dir=str(tmp_path / "disk"))
    trims_ray.init(store=str(tmp_path / "store"), config=config)
    try:
        for i in range(2):
            trims_ray.register(f"hot{i}", weights(3, seed=i))
        big = weights(6, seed=9)
        trims_ray.register("once", big)
        total = trims_ray.function(lambda m: float(m["w"].double().sum()))
        for _ in range(4):
            for i in range(2):
                ray.get(total.options(model=f"hot{i}").remote())
        # The policy hears of the hits workers served from the models they keep with their
        # next poll: the admission below must weigh them.
        wait_for(lambda: node_stats(ray_node).tiers["host"].hits >= 6, what="the workers' hits counted")
        assert ray.get(total.options(model="once").remote()) == float(big["w"].double().sum())
        host = node_stats(ray_node).tiers["host"]
        assert (host.models, host.bypasses, host.evictions, host.loads) == (2, 1, 0, 2)
        # A second request counts for it: the policy may admit it now; either way it is served.
        with trims_ray.open("once") as model:
            assert torch.equal(model["w"], big["w"])
    finally:
        trims_ray.shutdown()


def test_tasks_queued_behind_busy_slots_take_no_lease_until_they_start(ray_node, tmp_path):
    # Two tasks hold the node's two CPUs; three more, each for another model, queue behind them.
    # Leases taken at submit would pin all five models' bytes, more than the host tier holds, so
    # the last would be served past the cache (a bypass). Queued tasks lease when they start.
    # lru: every miss is admitted, so a bypass here can only come from leases (gdsf would refuse
    # the last newcomer, asked for once, against models asked for as often).
    config = trims_ray.CacheConfig(host_bytes=10 * 1024 * 1024, disk_dir=str(tmp_path / "disk"), policy="lru")
    trims_ray.init(store=str(tmp_path / "store"), config=config)
    go = tmp_path / "go"
    try:
        models = {name: weights(2.5, seed=i) for i, name in enumerate(["a", "b", "c", "d"])}
        for name, w in models.items():
            trims_ray.register(name, w)

        @trims_ray.function(num_cpus=1)
        def use(m, wait_for_file):
            while wait_for_file and not os.path.exists(wait_for_file):
                time.sleep(0.02)
            from trims_ray._lease import served_tier

            return float(m["w"].double().sum()), served_tier()

        blockers = [use.options(model="a").remote(str(go)) for _ in range(2)]
        wait_for(lambda: node_stats(ray_node).leases == 2, what="the two blockers' leases")
        queued = {name: use.options(model=name).remote("") for name in ["b", "c", "d"]}
        time.sleep(1.0)  # time for any lease taken at submit to be granted and reported
        assert node_stats(ray_node).leases == 2
        go.touch()
        for name, ref in [("a", blockers[0]), ("a", blockers[1]), *queued.items()]:
            total, tier = ray.get(ref)
            assert total == float(models[name]["w"].double().sum())
            assert tier != "bypass", name
        assert node_stats(ray_node).tiers["host"].bypasses == 0
    finally:
        trims_ray.shutdown()


# -- bad input -----------------------------------------------------------------------------


def test_init_with_another_store_than_the_running_one_says_so(cache, tmp_path):
    with pytest.raises(TrimsError, match="already runs on this cluster with store"):
        trims_ray.init(store=str(tmp_path / "elsewhere"))
    trims_ray.register("m", weights(0.1))  # this process still registers into the running store
    assert trims_ray.prefetch("m")


def test_unknown_model_and_unregistered_function_model(cache):
    @trims_ray.function(model="never-registered")
    def f(m):
        return 1

    with pytest.raises(ModelNotFoundError, match="never-registered"):
        ray.get(f.remote())
    with pytest.raises(ModelNotFoundError):
        trims_ray.prefetch("nope")
    with pytest.raises(ValueError):
        trims_ray.function(model="../etc")(lambda m: 1)


def test_model_larger_than_the_host_budget(cache, ray_node):
    trims_ray.register("huge", weights(80))  # > 64 MiB budget

    @trims_ray.function(model="huge")
    def f(m):
        return 1

    with pytest.raises(CapacityError, match="budget"):
        ray.get(f.remote())
    assert node_stats(ray_node).tiers["host"].bytes_used == 0


def test_another_tenants_model_is_not_found(cache, monkeypatch):
    monkeypatch.setenv("TRIMS_RAY_TENANT", "alice")
    trims_ray.register("secret", weights(0.1))
    monkeypatch.setenv("TRIMS_RAY_TENANT", "bob")

    @trims_ray.function(model="secret")
    def f(m):
        return 1

    with pytest.raises(ModelNotFoundError):
        ray.get(f.remote())


def test_api_after_shutdown_says_to_init(ray_node, tmp_path):
    trims_ray.shutdown()

    @trims_ray.function(model="m")
    def f(m):
        return 1

    with pytest.raises(TrimsError, match="init"):
        f.remote()
    with pytest.raises(TrimsError, match="init"):
        with trims_ray.open("m"):
            pass


def test_shutdown_forgets_every_handle_and_the_next_init_works(ray_node, tmp_path):
    """What this process kept of trims_ray (actor handles, router, session, stores) goes with
    shutdown, so that an init on the same Ray serves again from the new actors; the router's
    threads have ended when shutdown returns (none is left in a Ray call, ray#31145)."""
    from trims_ray import _api, _routing
    from trims_ray.actors import _naming

    store = str(tmp_path / "store")
    config = trims_ray.CacheConfig(host_bytes=HOST_BUDGET, disk_dir=str(tmp_path / "disk"))
    expected = weights(0.5)["w"][:4]

    @trims_ray.function(model="w")
    def first(m):
        return m["w"][:4].clone()

    for _ in range(2):
        trims_ray.init(store=store, config=config)
        try:
            trims_ray.register("w", weights(0.5))
            assert torch.equal(ray.get(first.remote()), expected)
            assert _naming._handles and _routing._router is not None and _api.session_store() is not None
            threads = list(_routing._router._threads)
            assert threads[0].is_alive() and threads[1].is_alive()  # the long poll, the releases
            _routing.reset()  # what shutdown does first, while every actor still answers
            assert [t.name for t in threads if t.is_alive()] == []
        finally:
            trims_ray.shutdown()
        assert not _naming._handles and _routing._router is None and not _api._stores
        assert _api._session == {"store": None, "tenant": None}


def test_without_a_gpu_the_gpu_tier_is_off_and_says_why(cache):
    trims_ray.register("tiny", {"w": torch.ones(8)})
    node = trims_ray.stats().nodes[ray.get_runtime_context().get_node_id()]
    assert node.gpu["enabled"] is False
    assert "no GPU" in node.gpu["reason"]
    assert node.tiers["gpu"].capacity == 0 and node.tiers["gpu"].models == 0
    assert trims_ray.stats().to_dict()["nodes"][ray.get_runtime_context().get_node_id()]["gpu"]["enabled"] is False
    with pytest.raises(trims_ray.TrimsError, match="no GPU"):
        trims_ray.prefetch("tiny", tier="gpu")
    node_id = ray.get_runtime_context().get_node_id()
    assert trims_ray.evict("tiny", tier="gpu") == {node_id: {"gpu": "absent"}}
    assert trims_ray.evict("tiny")[node_id]["gpu"] == "absent"


@ray.remote(num_cpus=0)
class _AnswersLikeAGpuHolder:
    def stats(self) -> dict:
        return {"enabled": True, "reason": "", "tiers": {"gpu": {"hits": 3}}, "device": {}, "leases": 0}

    def report(self) -> dict:
        return {"residency": {"default/abc": "gpu", "default/def": "host"}}


def test_a_node_reports_a_dead_gpu_holder_off_and_serves_nothing_from_it(ray_node):
    # What the node actor asks its GPU holders (stats, residency) on a machine without a GPU: a
    # holder that died is reported off with why, and placement is told nothing is on it.
    from trims_ray.actors.gpu_tier_actor import node_gpu_residency, node_gpu_stats

    alive, dead = _AnswersLikeAGpuHolder.remote(), _AnswersLikeAGpuHolder.remote()
    ray.get([alive.report.remote(), dead.report.remote()])
    ray.kill(dead)
    # ray.kill returns before the actor is gone: calls made meanwhile may still be answered, so
    # ask until one is refused (a holder that never dies fails the test at the deadline).
    deadline = time.monotonic() + 30
    while True:
        try:
            ray.get(dead.report.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            break
        assert time.monotonic() < deadline, "the killed holder still answers after 30 s"
        time.sleep(0.05)
    stats = node_gpu_stats({"0": alive, "1": dead}, "")
    assert stats["enabled"] is True and stats["tier"]["hits"] == 3
    assert stats["gpus"]["1"]["enabled"] is False
    assert stats["gpus"]["1"]["reason"].startswith("GPU 1: holder unreachable")
    only_dead = node_gpu_stats({"1": dead}, "")
    assert only_dead["enabled"] is False and "GPU 1: holder unreachable" in only_dead["reason"]
    assert node_gpu_residency({"0": alive, "1": dead}) == {"default/abc": "gpu"}


def test_trims_ray_actors_start_with_few_malloc_arenas(cache):
    # Read by glibc when the process starts (see trims_ray._malloc): the actors' own environment.
    def environment(_actor) -> dict:
        return {k: os.environ.get(k) for k in ACTOR_ENV}

    node = ray.get_runtime_context().get_node_id()
    for actor in (node_cache_actor(node), placement_actor()):
        assert ray.get(actor.__ray_call__.remote(environment)) == ACTOR_ENV
