"""Placement and routing invariants under awkward interleavings, without Ray: a placement restart
whose rebuild outlasts the callers' timeout, reports that arrive late or out of order, copy
scaling across a re-registration, CPU tasks and GPU residency, and ``.options()`` reuse.

The placement actor's body runs in this process: Ray's calls (the node list, actor handles,
``ray.get``) are replaced by calls into real ``NodeCache`` objects, and its clock by one the test
moves, so that "the rebuild took 20 s" takes no time.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import trims_ray
from trims_ray import CacheConfig, ModelStore, TrimsError
from trims_ray._protocol import Holder, cache_key
from trims_ray.actors import placement_actor as pa
from trims_ray.cache.node_cache import NodeCache
from trims_ray.cache.placement import NodeReport, Placement

pytestmark = pytest.mark.timeout(60)

MB = 1024 * 1024
TENANT = "default"
ME = Holder.this_process()


# -- an in-process stand-in for Ray around the placement actor's body -----------------------------


class Clock:
    """The placement actor's ``time`` module: monotonic time the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Ref:
    """What ``.remote()`` returns here: the call already ran; ``get`` hands out its outcome."""

    def __init__(self, fn, args, kwargs) -> None:
        try:
            self.value, self.error = fn(*args, **kwargs), None
        except Exception as exc:  # noqa: BLE001 - re-raised by get, as ray.get would
            self.value, self.error = None, exc


def get(ref: Ref, timeout: float | None = None):
    if ref.error is not None:
        raise ref.error
    return ref.value


class Handle:
    """An actor handle whose calls run in this process, at once."""

    def __init__(self, target) -> None:
        self._target = target

    def __getattr__(self, name: str):
        method = getattr(self._target, name)
        return types.SimpleNamespace(remote=lambda *a, **k: Ref(method, a, k), options=lambda **_: self)


class Memory:
    """HostMemory for a node: publish copies the buffer into a read-only array."""

    def publish(self, buffer: np.ndarray) -> np.ndarray:
        copy = np.array(buffer, copy=True)
        copy.flags.writeable = False
        return copy

    def view(self, handle: np.ndarray) -> np.ndarray:
        return handle


class Node:
    """A node cache as the placement actor sees it: a real NodeCache behind an actor's methods.
    ``report_delay_s``: how far the clock moves while it builds a report (a slow node)."""

    def __init__(self, store_uri: str, disk_dir, clock: Clock, report_delay_s: float = 0.0) -> None:
        self.cache = NodeCache(
            store=ModelStore(store_uri),
            memory=Memory(),
            host_budget=64 * MB,
            disk_dir=disk_dir,
            disk_budget=64 * MB,
            manifest_ttl_s=0.0,  # each use resolves anew: the test re-registers names
        )
        self.clock = clock
        self.report_delay_s = report_delay_s

    def report(self) -> dict:
        self.clock.now += self.report_delay_s
        return {**self.cache.report(), "slots": 1}

    def prefetch(self, name: str, tenant: str, tier: str, key: str | None = None) -> str:
        return self.cache.prefetch(name, tenant, tier, key=key)

    def evict(self, name: str, tenant: str, tier: str | None, key: str | None = None) -> dict:
        return self.cache.evict(name, tenant, tier, key=key)

    def host_keys(self) -> set[str]:
        return set(self.cache.host.entries)


@pytest.fixture
def env(monkeypatch, tmp_path):
    """Builds in-process placement actors over real node caches; yields a factory."""
    clock = Clock()
    nodes: dict[str, Node] = {}
    alive: set[str] = set()
    actors = []
    monkeypatch.setattr(pa, "time", clock)
    monkeypatch.setattr(pa, "ray", types.SimpleNamespace(get=get))
    monkeypatch.setattr(pa, "alive_nodes", lambda: set(alive))
    monkeypatch.setattr(pa, "start_node_cache_actor", lambda node, *args: Handle(nodes[node]))
    monkeypatch.setattr(pa, "node_cache_actor", lambda node: Handle(nodes[node]))
    monkeypatch.setattr(pa, "remember_node_cache_actors", lambda handles: None)
    monkeypatch.setattr(pa, "_kill_quietly", lambda name: None)
    monkeypatch.setattr(pa, "record_decision", lambda *args: None)
    store_uri = str(tmp_path / "store")
    ModelStore(store_uri)

    def add_node(node: str, report_delay_s: float = 0.0) -> Node:
        nodes[node] = Node(store_uri, tmp_path / "disk" / node, clock, report_delay_s)
        alive.add(node)
        return nodes[node]

    def start(**config) -> pa.PlacementActor:
        # report_s=60: the actor's own watch thread stays out of the way; the test drives it.
        actor = pa.PlacementActor(store_uri, None, CacheConfig(report_s=60, **config))
        actor.placement.clock = clock.monotonic  # copy scaling's timers run on the test's clock
        actors.append(actor)
        return actor

    yield types.SimpleNamespace(
        clock=clock, nodes=nodes, alive=alive, add_node=add_node, start=start, store=ModelStore(store_uri)
    )
    for actor in actors:
        actor._stop.set()


def weights(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(seed))}


def push(actor: pa.PlacementActor, env, node: str) -> None:
    """The node's report reaches placement (as its report thread sends it)."""
    actor.report(node, env.nodes[node].report())


# -- 14: a placement restart must not reap every caller's leases ---------------------------------


def test_a_rebuild_longer_than_the_caller_timeout_does_not_make_callers_dead(env):
    env.add_node("n0", report_delay_s=20.0)  # the rebuild waits 20 s for this node's snapshot
    actor = env.start(caller_timeout_s=15.0)
    # No caller has had a chance to poll this placement yet: nobody is dead.
    assert actor.callers_alive(["c1", "c2"]) == [True, True]
    actor.snapshot(caller="c2")  # c2 polls once the placement is up
    env.clock.now += 14.0
    assert actor.callers_alive(["c1", "c2"]) == [True, True]
    env.clock.now += 2.0  # a full timeout after the placement was ready: c1 never came back
    assert actor.callers_alive(["c1", "c2"]) == [False, False]
    actor.snapshot(caller="c2")
    assert actor.callers_alive(["c1", "c2"]) == [False, True]


# -- 15: reports apply in the order the node took them; a node that left stays gone ---------------


def test_a_report_older_than_one_applied_is_ignored():
    p = Placement()
    newer = NodeReport({"m": "host"}, 64 * MB, seq=(7, 2))
    older = NodeReport({}, 64 * MB, seq=(7, 1))  # taken before, arrives after (its call timed out)
    p.report("n0", newer)
    assert not p.report("n0", older)
    assert p.holders("m") == {"n0": "host"}
    restarted = NodeReport({}, 64 * MB, seq=(8, 1))  # the node's cache restarted: a new epoch
    assert p.report("n0", restarted)
    assert p.holders("m") == {}


def test_a_late_report_does_not_bring_back_a_node_that_left():
    p = Placement()
    p.report("n0", NodeReport({}, 64 * MB, seq=(1, 1)))
    p.report("n1", NodeReport({"m": "host"}, 64 * MB, seq=(1, 1)))
    p.node_left("n1")
    late = NodeReport({"m": "host"}, 64 * MB, seq=(1, 2))  # sent before it died, applied after
    assert not p.report("n1", late)
    assert p.nodes() == ["n0"] and p.holders("m") == {}
    assert p.route("m", MB).node == "n0"
    # Ray lists it alive again (membership): its next report counts, its old ones still do not.
    p.node_alive("n1")
    assert not p.report("n1", NodeReport({}, 64 * MB, seq=(1, 1)))
    assert p.report("n1", NodeReport({"m": "host"}, 64 * MB, seq=(1, 3)))
    assert p.nodes() == ["n0", "n1"] and p.holders("m") == {"n1": "host"}


def test_a_node_caches_reports_are_numbered_in_the_order_they_are_taken():
    from trims_ray.cache.placement import ReportSequence

    first = ReportSequence()
    stamped = [first.stamp(lambda: {"residency": {}})["seq"] for _ in range(3)]
    assert stamped == sorted(stamped) and len(set(stamped)) == 3
    # A cache that restarts on the node numbers its reports after every one of the old cache's.
    assert ReportSequence().stamp(dict)["seq"] > stamped[-1]


def test_the_placement_actor_ignores_a_report_from_a_node_ray_lost(env):
    env.add_node("n0")
    env.add_node("n1")
    actor = env.start()
    env.store.register("m", weights(1), tenant=TENANT)
    env.nodes["n1"].cache.prefetch("m", TENANT)
    late = env.nodes["n1"].report()
    env.alive.discard("n1")
    actor.sync()
    assert actor.members() == ["n0"]
    actor.report("n1", late)  # its call was in flight when the node died
    assert actor.members() == ["n0"] and actor.holders(cache_key(env.store.manifest("m", tenant=TENANT))) == {}


# -- 16: copy scaling acts on the blob that is hot, not on whatever its name means now ------------


def make_hot(env, actor, name: str, node: str, leases: int = 6) -> tuple[str, list]:
    """``name`` held on ``node`` with ``leases`` invocations in flight; returns its key and the
    leases' grants."""
    cache = env.nodes[node].cache
    grants = [cache.acquire(name, TENANT, ME) for _ in range(leases)]
    push(actor, env, node)
    return cache_key(env.store.manifest(name, tenant=TENANT)), grants


def scale(env, actor, rounds: int, push_nodes: tuple[str, ...] = ()) -> None:
    """``rounds`` of the placement's copy scaling, one (fake) second apart."""
    for _ in range(rounds):
        for node in push_nodes:
            push(actor, env, node)
        actor._scale_copies()
        env.clock.now += 1.0


def test_copy_scaling_loads_the_hot_blob_once_its_name_has_settled(env):
    env.add_node("n0")
    env.add_node("n1")
    actor = env.start()
    env.store.register("m", weights(1), tenant=TENANT)
    hot, _ = make_hot(env, actor, "m", "n0")
    scale(env, actor, 4)  # until the name has meant that blob longer than nodes trust a name
    assert env.nodes["n1"].host_keys() == {hot}


def test_copy_scaling_does_not_load_another_blob_after_a_re_registration(env):
    env.add_node("n0")
    env.add_node("n1")
    actor = env.start()
    env.store.register("m", weights(1), tenant=TENANT)
    hot, _ = make_hot(env, actor, "m", "n0")
    env.store.register("m", weights(2), tenant=TENANT)  # the name now means another blob
    scale(env, actor, 4)
    assert env.nodes["n1"].host_keys() <= {hot}, "a copy of the hot model loaded the new blob"


def test_dropping_a_scaled_copy_never_evicts_the_blob_its_name_means_now(env):
    env.add_node("n0")
    env.add_node("n1")
    actor = env.start()
    env.store.register("m", weights(1), tenant=TENANT)
    hot, grants = make_hot(env, actor, "m", "n0")
    scale(env, actor, 4)
    assert env.nodes["n1"].host_keys() == {hot}  # placement's own copy
    for grant in grants:  # demand ends
        env.nodes["n0"].cache.release(grant.lease_id)
    # The name is re-registered, and a user prefetches its new blob on n1.
    env.store.register("m", weights(2), tenant=TENANT)
    newer = cache_key(env.store.manifest("m", tenant=TENANT))
    env.nodes["n1"].cache.prefetch("m", TENANT)
    assert env.nodes["n1"].host_keys() == {hot, newer}
    scale(env, actor, 20, push_nodes=("n0", "n1"))  # low demand for longer than drop_after_s
    assert newer in env.nodes["n1"].host_keys(), "dropping the old blob's copy evicted the new one"
    assert hot not in env.nodes["n1"].host_keys(), "the old blob's copy was not dropped (by its key)"


def test_a_node_asked_for_one_blob_never_loads_or_evicts_another(env):
    # The window placement's check cannot close: the name is re-registered after placement
    # decided and before the node resolves it. Asked by key, the node acts on that blob only.
    node = env.add_node("n0")
    env.store.register("m", weights(1), tenant=TENANT)
    old = cache_key(env.store.manifest("m", tenant=TENANT))
    env.store.register("m", weights(2), tenant=TENANT)
    # The node resolves the name anew on each use (manifest_ttl_s=0): it sees the new blob.
    assert node.prefetch("m", TENANT, "host", old) == "stale"
    assert node.host_keys() == set()
    node.prefetch("m", TENANT, "host")
    newer = cache_key(env.store.manifest("m", tenant=TENANT))
    assert node.host_keys() == {newer}
    assert node.evict("m", TENANT, "host", old) == {"host": "absent"}
    assert node.host_keys() == {newer}
    with pytest.raises(ValueError, match="not one of tenant"):
        node.evict("m", TENANT, "host", "someone-else/" + old.split("/", 1)[1])


# -- 17: a CPU task goes by host and disk residency; a GPU copy counts only for GPU tasks ----------


def test_a_cpu_task_ranks_nodes_by_host_residency_not_gpu():
    p = Placement()
    p.report("n0", NodeReport({"m": "gpu"}, 64 * MB))  # on n0's GPU (its host tier unknown)
    p.report("n1", NodeReport({"m": "host"}, 64 * MB))
    assert p.route("m", MB, gpu=False).node == "n1"
    assert p.route("m", MB, gpu=True).node == "n0"


def test_a_nodes_gpu_copy_does_not_hide_its_host_copy():
    p = Placement()
    p.report("n0", NodeReport({"m": "host"}, 64 * MB, gpu={"m": "gpu"}))
    p.report("n1", NodeReport({}, 64 * MB))
    cpu, gpu = p.route("m", MB, gpu=False), p.route("m", MB, gpu=True)
    assert (cpu.node, cpu.tier) == ("n0", "host") and (gpu.node, gpu.tier) == ("n0", "gpu")
    assert p.holders("m") == {"n0": "gpu"} and p.copies("m") == ["n0"]
    copy = Placement.from_snapshot(p.snapshot())  # a caller's copy knows both
    assert copy.route("m", MB, gpu=False) == cpu and copy.route("m", MB, gpu=True) == gpu
    v = p.version
    p.report("n0", NodeReport({"m": "host"}, 64 * MB))  # swapped off the GPU
    assert p.version > v and p.route("m", MB, gpu=True).tier == "host"


# -- 19: .options() with the same arguments reuses one Ray remote function ------------------------


def double(model, x):
    return 2 * x


def test_options_with_the_same_arguments_reuse_one_ray_remote_function():
    fn = trims_ray.function(num_cpus=1)(double)
    same = [fn.options(model="m1", runtime_env={"env_vars": {"A": "1"}}) for _ in range(3)]
    other_model = fn.options(model="m2", runtime_env={"env_vars": {"A": "1"}})
    other_options = fn.options(model="m1", runtime_env={"env_vars": {"A": "2"}})
    for f in [*same, other_model, other_options]:
        with pytest.raises(TrimsError):  # no Ray here: it builds its remote function, then stops
            f.remote(1)
    assert same[0]._remote is same[1]._remote is same[2]._remote
    assert other_model._remote is not same[0]._remote
    assert other_options._remote is not same[0]._remote
