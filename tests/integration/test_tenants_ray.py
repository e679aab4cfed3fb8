"""Tenants on a real single-node Ray: another tenant's private model is invisible (the same
ModelNotFoundError as a missing name) or refused (AccessDeniedError) on every API path, and never
served; refusals are counted per tenant in stats; identical weights of two tenants are a miss for
the second; per-tenant quotas hold; a corrupted resident copy is found by scrub (on demand and
periodic), dropped and reloaded.

The driver switches tenants through ``$TRIMS_RAY_TENANT`` (init is called without a tenant);
tasks that call ``trims_ray.open`` get theirs from their runtime_env, as a job's workers would.
"""

from __future__ import annotations

import pytest
import ray
import torch
from safetensors.torch import save_file

import trims_ray
from trims_ray import AccessDeniedError, CapacityError, ModelNotFoundError
from trims_ray._cluster import node_cache_actor
from trims_ray._protocol import cache_key
from trims_ray.cli import main as cli_main

from .conftest import HOST_BUDGET, wait_for
from .multinode import corrupt_resident_copy

MiB = 1024 * 1024


def weights(mb: float, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(int(mb * MiB / 4), generator=gen)}


def checksum(model) -> float:
    return float(model["w"].double().sum())


def expected(w: dict[str, torch.Tensor]) -> float:
    return float(w["w"].double().sum())


@pytest.fixture
def trims(ray_node, tmp_path):
    """Starts trims_ray on the module's Ray with the given CacheConfig fields; shuts it down."""

    def start(**fields) -> str:
        fields = {"host_bytes": HOST_BUDGET, **fields}
        config = trims_ray.CacheConfig(
            disk_dir=str(tmp_path / "disk"), lease_check_s=0.2, caller_timeout_s=3.0, report_s=0.2, **fields
        )
        trims_ray.init(store=str(tmp_path / "store"), config=config)
        return trims_ray.ModelStore(str(tmp_path / "store")).uri

    try:
        yield start
    finally:
        trims_ray.shutdown()


def act_as(monkeypatch, tenant: str) -> None:
    monkeypatch.setenv("TRIMS_RAY_TENANT", tenant)


def host(ray_node: str) -> trims_ray.TierStats:
    return trims_ray.stats().nodes[ray_node].tiers["host"]


@ray.remote(num_cpus=0)
def open_as_worker(attempts: list[tuple[str, str | None]]) -> list[tuple[str, str]]:
    """Opens each (name, tenant) in this worker (whose tenant its runtime_env sets); returns
    ("served", checksum) or (error class, message) for each."""
    out = []
    for name, tenant in attempts:
        try:
            with trims_ray.open(name, tenant=tenant) as model:
                out.append(("served", str(checksum(model))))
        except trims_ray.TrimsError as exc:
            out.append((type(exc).__name__, str(exc)))
    return out


def test_another_tenants_model_is_invisible_or_denied_on_every_path(trims, ray_node, monkeypatch, capsys, tmp_path):
    store = trims()
    act_as(monkeypatch, "alice")
    secret_w, shared_w = weights(1, seed=1), weights(1, seed=2)
    trims_ray.register("secret", secret_w)
    trims_ray.register("shared", shared_w, tenant="public")
    trims_ray.prefetch("secret")  # resident: still invisible to bob

    act_as(monkeypatch, "bob")

    def same_error(call) -> None:
        """``call(name)`` fails for alice's private name exactly as for a name nobody has."""
        with pytest.raises(ModelNotFoundError) as hidden:
            call("secret")
        with pytest.raises(ModelNotFoundError) as missing:
            call("nosuch")
        assert str(hidden.value).replace("secret", "NAME") == str(missing.value).replace("nosuch", "NAME")

    # list
    assert [(m.tenant, m.name) for m in trims_ray.list_models()] == [("public", "shared")]
    with pytest.raises(AccessDeniedError):
        trims_ray.list_models(tenant="alice")
    # register
    with pytest.raises(AccessDeniedError, match="tenant 'bob' cannot register models for tenant 'alice'"):
        trims_ray.register("secret", weights(1, seed=9), tenant="alice")
    # prefetch, evict
    same_error(lambda name: trims_ray.prefetch(name))
    same_error(lambda name: trims_ray.evict(name))
    with pytest.raises(AccessDeniedError):
        trims_ray.prefetch("secret", tenant="alice")
    with pytest.raises(AccessDeniedError):
        trims_ray.evict("secret", tenant="alice")
    # @function: refused at .remote(), before any task starts
    same_error(lambda name: trims_ray.function(model=name)(checksum).remote())
    shared_fn = trims_ray.function(model="shared")(checksum)
    assert ray.get(shared_fn.remote()) == expected(shared_w)
    # open, in a task of bob's job
    bob_worker = open_as_worker.options(runtime_env={"env_vars": {"TRIMS_RAY_TENANT": "bob"}})
    outcomes = ray.get(bob_worker.remote([("secret", None), ("nosuch", None), ("secret", "alice"), ("shared", None)]))
    (hidden, hidden_msg), (missing, missing_msg), (denied, denied_msg), shared = outcomes
    assert (hidden, missing, denied) == ("ModelNotFoundError", "ModelNotFoundError", "AccessDeniedError")
    assert hidden_msg.replace("secret", "NAME") == missing_msg.replace("nosuch", "NAME")
    assert "tenant 'bob' cannot open models for tenant 'alice'" in denied_msg
    assert shared == ("served", str(expected(shared_w)))
    # the CLI: one line, exit code 1
    save_file(weights(0.1), str(tmp_path / "w.safetensors"))
    for argv, fragment in [
        (["push", str(tmp_path / "w.safetensors"), "--store", store, "--tenant", "alice"], "cannot register models"),
        (["prefetch", "secret", "--tenant", "alice"], "cannot prefetch models for tenant 'alice'"),
        (["evict", "secret"], "no model named 'secret' for tenant 'bob'"),
    ]:
        code = cli_main(argv)
        _, err = capsys.readouterr()
        assert code == 1 and err.count("\n") == 1 and fragment in err, err
    act_as(monkeypatch, "bob")  # the CLI's init() leaves the tenant to the environment: still bob

    # stats: bob sees bob only, with every refusal counted (the @function ones are reported by
    # this process to its node's cache without waiting, so they may come a moment later)
    not_found = 2 + 2 + 2 + 2 + 1  # prefetch, evict, .remote(), open in a task, CLI evict
    denied = 1 + 1 + 1 + 1 + 1 + 2  # list, register, prefetch, evict, open in a task, CLI
    node = wait_for(lambda: (n := trims_ray.stats().to_dict()["nodes"][ray_node])["tenants"]["bob"]["denied"] == denied and n)
    assert set(node["tenants"]) == {"bob"}
    assert (node["tenants"]["bob"]["not_found"], node["tenants"]["bob"]["denied"]) == (not_found, denied)
    assert node["tiers"]["host"]["models"] == 2  # alice's secret and the public model: counts, no names

    # alice's model was never served to bob: it is still alice's only lease-free copy, one load
    act_as(monkeypatch, "alice")
    alice = trims_ray.stats().nodes[ray_node].tenants
    assert set(alice) == {"alice"} and (alice["alice"].not_found, alice["alice"].denied) == (0, 0)
    secret_fn = trims_ray.function(model="secret")(checksum)
    assert ray.get(secret_fn.remote()) == expected(secret_w)
    assert host(ray_node).loads == 2


def test_identical_weights_of_another_tenant_are_a_miss(trims, ray_node, monkeypatch):
    trims()
    same = weights(2, seed=3)
    act_as(monkeypatch, "alice")
    a_info = trims_ray.register("a-model", same)
    a_fn = trims_ray.function(model="a-model")(checksum)
    assert [ray.get(a_fn.remote()) for _ in range(2)] == [expected(same)] * 2
    wait_for(lambda: host(ray_node).hits >= 1, what="the worker's hit counted")  # with its next poll
    before = host(ray_node)
    assert (before.loads, before.hits) == (1, 1)  # alice's copy is hot

    act_as(monkeypatch, "bob")
    b_info = trims_ray.register("b-model", same)
    assert b_info.sha256 == a_info.sha256  # stored once
    b_fn = trims_ray.function(model="b-model")(checksum)
    assert ray.get(b_fn.remote()) == expected(same)
    after = host(ray_node)
    assert (after.loads, after.misses, after.hits) == (2, before.misses + 1, 1)  # a miss, not a hit
    assert trims_ray.stats().nodes[ray_node].tenants["bob"].host_bytes > 2 * MiB
    ray.get(node_cache_actor(ray_node).drain.remote())
    assert trims_ray.prefetch("b-model", tier="disk") == {ray_node: "disk"}  # bob's own disk copy
    assert trims_ray.stats().nodes[ray_node].tiers["disk"].models == 2


def test_a_tenant_over_its_share_evicts_its_own_models_and_a_quota_is_named(trims, ray_node, monkeypatch):
    budget = 16 * MiB
    # lru: the test names the model that goes (gdsf's choice among equals follows load times).
    trims(host_bytes=budget, tenant_share=0.5, tenant_quotas={"carol": {"host": MiB}}, policy="lru")  # 8 MiB per tenant
    act_as(monkeypatch, "bob")
    trims_ray.register("x", weights(3, seed=10))
    trims_ray.prefetch("x")  # the least recently used model of the node
    act_as(monkeypatch, "alice")
    for i, name in enumerate("abc"):
        trims_ray.register(name, weights(3, seed=11 + i))
        trims_ray.prefetch(name)  # c puts alice over 8 MiB: her own "a" goes, not bob's "x"
    stats = trims_ray.stats().nodes[ray_node]
    assert stats.tiers["host"].models == 3 and stats.tiers["host"].evictions == 1
    assert stats.tenants["alice"].host_bytes <= stats.tenants["alice"].host_quota == budget // 2
    assert trims_ray.prefetch("b") == {ray_node: "host"}
    act_as(monkeypatch, "bob")
    assert trims_ray.prefetch("x") == {ray_node: "host"}  # still there

    act_as(monkeypatch, "carol")
    trims_ray.register("big", weights(1.5, seed=20))
    with pytest.raises(CapacityError, match=rf"host quota of tenant 'carol' \({MiB} bytes\)"):
        trims_ray.prefetch("big")
    big_fn = trims_ray.function(model="big")(checksum)
    with pytest.raises(CapacityError):
        ray.get(big_fn.remote())
    carol = trims_ray.stats().nodes[ray_node].tenants["carol"]
    assert carol.quota_denials == 2 and carol.host_bytes == 0


def test_scrub_drops_a_corrupt_resident_copy_and_reloads_it(trims, ray_node):
    trims()
    w = weights(2, seed=30)
    info = trims_ray.register("m", w)
    fn = trims_ray.function(model="m")(checksum)
    assert ray.get(fn.remote()) == expected(w)
    ray.get(corrupt_resident_copy.remote(ray_node, cache_key(info)))
    assert ray.get(fn.remote()) != expected(w)  # the stray write reached every reader

    assert trims_ray.scrub() == {ray_node: {"scrubbed": 1, "corrupt": 1, "reloaded": 1}}
    assert ray.get(fn.remote()) == expected(w)
    stats = host(ray_node)
    assert (stats.scrubbed, stats.corrupt, stats.models, stats.loads) == (1, 1, 1, 2)
    assert trims_ray.scrub() == {ray_node: {"scrubbed": 1, "corrupt": 0, "reloaded": 0}}


def test_periodic_scrub_finds_a_corrupt_copy(trims, ray_node):
    trims(scrub_s=0.5)
    w = weights(2, seed=31)
    info = trims_ray.register("m", w)
    trims_ray.prefetch("m")
    ray.get(corrupt_resident_copy.remote(ray_node, cache_key(info)))
    wait_for(lambda: host(ray_node).corrupt == 1)
    fn = trims_ray.function(model="m")(checksum)
    assert ray.get(fn.remote()) == expected(w)
