"""Tenants in the plain NodeCache (no Ray): entries keyed per tenant so that a hit never tells one
tenant what another holds, refusals counted per tenant, per-tenant byte quotas in the host and
disk tiers, the scrub of resident host copies, and the config fields behind them.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from trims_ray import CacheConfig, CapacityError, ModelNotFoundError, ModelStore
from trims_ray._protect import GUARD_BYTES
from trims_ray._protocol import BYPASS, DENIED, NOT_FOUND, Grant, Holder, cache_key
from trims_ray.cache.node_cache import NodeCache

pytestmark = pytest.mark.timeout(60)

ME = Holder.this_process()
BIG = 64 << 20


class WritableSharedMemory:
    """HostMemory for tests: each publish is a fresh copy that stays writable, so that a test can
    corrupt a resident copy in place (as a stray write into plasma would); weakly tracked, so a
    test can tell when the cache let go of one."""

    def __init__(self) -> None:
        self.published: list[weakref.ref] = []

    def publish(self, buffer: np.ndarray) -> np.ndarray:
        copy = np.array(buffer, copy=True)
        self.published.append(weakref.ref(copy))
        return copy

    def live(self) -> int:
        gc.collect()
        return sum(ref() is not None for ref in self.published)


def weights(seed: int, rows: int = 64, cols: int = 64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(rows, cols, generator=gen)}


def cost(info) -> int:
    return info.nbytes + 2 * GUARD_BYTES


def blob(store: ModelStore, sha: str) -> bytes:
    return store.fs.cat_file(store.blob_path(sha))


def served(grant: Grant) -> bytes:
    return bytes(grant.handle[grant.offset : grant.offset + grant.manifest.nbytes])


def use(cache: NodeCache, name: str, tenant: str) -> str:
    grant = cache.acquire(name, tenant, ME)
    cache.release(grant.lease_id)
    cache.drain()
    return grant.tier


def host_keys(cache: NodeCache) -> set[str]:
    return {k for k, tier in cache.report()["residency"].items() if tier == "host"}


@pytest.fixture
def memory() -> WritableSharedMemory:
    return WritableSharedMemory()


@pytest.fixture
def disk_dir(tmp_path) -> Path:
    return tmp_path / "disk"


@pytest.fixture
def make_cache(file_store, memory, disk_dir):
    caches: list[NodeCache] = []

    def make(**overrides) -> NodeCache:
        kwargs = dict(
            store=file_store,
            memory=memory,
            host_budget=BIG,
            disk_dir=disk_dir,
            disk_budget=BIG,
            manifest_ttl_s=60.0,
        )
        kwargs.update(overrides)
        caches.append(NodeCache(**kwargs))
        return caches[-1]

    yield make
    for cache in caches:
        cache.close()


# -- keys: per tenant ------------------------------------------------------------------------


def test_identical_weights_of_another_tenant_are_a_miss_in_every_tier(make_cache, file_store, memory, disk_dir):
    same = weights(1)
    alice = file_store.register("mine", same, tenant="alice")
    bob = file_store.register("ours", same, tenant="bob")
    assert alice.sha256 == bob.sha256  # one blob in the store: content addressing
    assert len(file_store.fs.ls(f"{file_store.root}/blobs/sha256")) == 1
    cache = make_cache()

    assert use(cache, "mine", "alice") == "store"
    assert use(cache, "mine", "alice") == "host"  # alice's copy is hot...
    assert use(cache, "ours", "bob") == "store"  # ...and bob's first open is still a miss
    host = cache.stats()["host"]
    assert (host.hits, host.misses, host.loads, host.models) == (1, 2, 2, 2)
    assert len(memory.published) == 2
    assert host_keys(cache) == {cache_key(alice), cache_key(bob)} == {f"alice/{alice.sha256}", f"bob/{bob.sha256}"}

    # The disk tier too: alice's disk copy does not make bob's reload a disk hit.
    assert (disk_dir / "alice" / f"{alice.sha256}.safetensors").exists()
    cache.evict("ours", "bob")
    assert not (disk_dir / "bob" / f"{bob.sha256}.safetensors").exists()
    cache.evict("mine", "alice", tier="host")
    assert use(cache, "ours", "bob") == "store"
    assert use(cache, "mine", "alice") == "disk"
    assert cache.stats()["disk"].hits == 1


def test_a_public_model_is_one_copy_for_every_tenant(make_cache, file_store, memory):
    info = file_store.register("shared", weights(2), tenant="public")
    cache = make_cache()
    assert use(cache, "shared", "alice") == "store"
    assert use(cache, "shared", "bob") == "host"
    assert host_keys(cache) == {f"public/{info.sha256}"} and len(memory.published) == 1
    # Its bytes are the public tenant's, not the tenant that happened to load it.
    tenants = cache.tenant_stats()
    assert tenants["public"].host_bytes == cost(info) and "alice" not in tenants


def test_a_peer_is_asked_for_the_tenants_own_key(make_cache, file_store):
    same = weights(3)
    file_store.register("mine", same, tenant="alice")
    bob = file_store.register("ours", same, tenant="bob")
    asked = []

    def peer_read(manifest, out) -> bool:
        asked.append(cache_key(manifest))
        return False

    cache = make_cache(peer_read=peer_read)
    use(cache, "ours", "bob")
    assert asked == [f"bob/{bob.sha256}"]
    assert cache.lend(f"alice/{bob.sha256}") is None  # nothing of alice's here to lend


# -- refusals: counted, no oracle ------------------------------------------------------------


def test_a_hidden_name_fails_exactly_as_a_missing_one_and_both_are_counted(make_cache, file_store, monkeypatch):
    file_store.register("secret", weights(4), tenant="alice")
    cache = make_cache()
    reads = []
    real_cat = file_store.fs.cat_file
    monkeypatch.setattr(file_store.fs, "cat_file", lambda path, *a, **k: (reads.append(path), real_cat(path, *a, **k))[1])

    errors = {}
    for name in ("secret", "nosuch"):
        reads.clear()
        with pytest.raises(ModelNotFoundError) as caught:
            cache.acquire(name, "bob", ME)
        errors[name] = (str(caught.value).replace(name, "NAME"), [p.replace(name, "NAME") for p in reads])
    # The same message and the same store reads (bob's own manifest, then public's), name aside.
    assert errors["secret"] == errors["nosuch"]
    assert len(errors["secret"][1]) == 2

    with pytest.raises(ModelNotFoundError):
        cache.evict("secret", "bob")
    with pytest.raises(ModelNotFoundError):
        cache.prefetch("secret", "bob")
    assert cache.stats()["host"].misses == 0  # refused before touching a tier
    cache.count_refusal(DENIED, "bob")  # what a caller's process reports after AccessDeniedError
    bob = cache.tenant_stats("bob")
    assert list(bob) == ["bob"]
    assert (bob["bob"].not_found, bob["bob"].denied) == (4, 1)
    assert "alice" not in cache.tenant_stats()  # alice met no refusal and holds nothing here
    with pytest.raises(ValueError):
        cache.count_refusal("other", "bob")
    with pytest.raises(ValueError):
        cache.count_refusal(NOT_FOUND, "../bob")


# -- quotas ----------------------------------------------------------------------------------


def test_a_tenant_over_its_share_evicts_its_own_models_never_anothers(make_cache, file_store):
    infos = {n: file_store.register(n, weights(10 + i), tenant="alice") for i, n in enumerate("abc")}
    x, y = (file_store.register(n, weights(20 + i), tenant="bob") for i, n in enumerate("xy"))
    unit = cost(x)
    cache = make_cache(host_budget=4 * unit, tenant_share=0.5)  # 2 models per tenant
    use(cache, "x", "bob")  # the least recently used model of the node...
    use(cache, "y", "bob")
    use(cache, "a", "alice")
    use(cache, "b", "alice")  # (the tier is full now)
    use(cache, "c", "alice")  # ...but alice is at her share: her own "a" goes
    assert host_keys(cache) == {cache_key(x), cache_key(y), cache_key(infos["b"]), cache_key(infos["c"])}
    stats = cache.tenant_stats()
    assert (stats["alice"].host_bytes, stats["alice"].host_quota) == (2 * unit, 2 * unit)
    assert stats["bob"].host_bytes == 2 * unit
    assert cache.stats()["host"].evictions == 1


def test_a_tenant_whose_own_models_are_leased_gets_capacity_error_naming_its_quota(make_cache, file_store):
    for i, n in enumerate("abc"):
        file_store.register(n, weights(30 + i), tenant="alice")
    x = file_store.register("x", weights(40), tenant="bob")
    unit = cost(x)
    cache = make_cache(host_budget=4 * unit, tenant_quotas={"alice": {"host": 2 * unit}})
    use(cache, "x", "bob")
    held = [cache.acquire(n, "alice", ME) for n in "ab"]
    with pytest.raises(CapacityError, match="tenant 'alice'.*host quota of"):
        cache.acquire("c", "alice", ME)
    assert cache_key(x) in host_keys(cache)  # bob's idle model was not touched
    assert cache.stats()["host"].quota_denials == 1
    assert cache.tenant_stats("alice")["alice"].quota_denials == 1
    for grant in held:
        cache.release(grant.lease_id)
    assert use(cache, "c", "alice") == "store"  # now one of hers can go


def test_a_model_bigger_than_the_quota_is_refused_without_evicting(make_cache, file_store):
    big = file_store.register("big", weights(50, rows=256), tenant="alice")
    small = file_store.register("small", weights(51), tenant="bob")
    cache = make_cache(tenant_quotas={"alice": {"host": cost(big) - 1}})
    use(cache, "small", "bob")
    with pytest.raises(CapacityError, match=rf"over the host quota of tenant 'alice' \({cost(big) - 1} bytes\)"):
        cache.acquire("big", "alice", ME)
    assert host_keys(cache) == {cache_key(small)}


def test_disk_quota_keeps_a_tenants_copies_within_it(make_cache, file_store, disk_dir):
    a, b = (file_store.register(n, weights(60 + i), tenant="alice") for i, n in enumerate("ab"))
    x = file_store.register("x", weights(62), tenant="bob")
    cache = make_cache(disk_budget=10 * a.nbytes, tenant_quotas={"alice": {"disk": a.nbytes}})
    use(cache, "x", "bob")
    use(cache, "a", "alice")
    use(cache, "b", "alice")  # alice's disk copy of a makes room for b
    on_disk = {f"{p.parent.name}/{p.name.removesuffix('.safetensors')}" for p in disk_dir.glob("*/*.safetensors")}
    assert on_disk == {cache_key(x), cache_key(b)}

    # A quota smaller than a model: its disk copy is skipped (counted), the load still serves.
    tight = make_cache(disk_dir=disk_dir.with_name("disk2"), tenant_quotas={"alice": {"disk": a.nbytes - 1}})
    assert use(tight, "a", "alice") == "store"
    assert tight.stats()["disk"].quota_denials == 1
    assert tight.tenant_stats("alice")["alice"].quota_denials == 1
    assert list(disk_dir.with_name("disk2").glob("*/*.safetensors")) == []


def test_disk_tier_restart_adopts_per_tenant_files_and_drops_unattributable_ones(make_cache, file_store, disk_dir):
    info = file_store.register("m", weights(70), tenant="alice")
    use(make_cache(), "m", "alice")
    legacy = disk_dir / f"{info.sha256}.safetensors"  # the layout before tenants: whose is it?
    legacy.write_bytes(b"x" * 10)
    (disk_dir / "Bad Tenant").mkdir()
    (disk_dir / "Bad Tenant" / f"{info.sha256}.safetensors").write_bytes(b"x")
    restarted = make_cache()
    assert set(restarted.disk.sizes) == {cache_key(info)}
    assert not legacy.exists() and not (disk_dir / "Bad Tenant" / f"{info.sha256}.safetensors").exists()
    assert use(restarted, "m", "alice") == "disk"  # a new host tier, the old disk copy


# -- scrub -----------------------------------------------------------------------------------


def corrupt(grant: Grant) -> None:
    """Flips the last byte of the blob in the published copy (tensor data, not the header)."""
    at = grant.offset + grant.manifest.nbytes - 1
    grant.handle[at] ^= 0xFF


def test_scrub_drops_a_corrupt_copy_and_reloads_it(make_cache, file_store, memory):
    info = file_store.register("m", weights(80), tenant="alice")
    other = file_store.register("n", weights(81), tenant="bob")
    cache = make_cache()
    use(cache, "n", "bob")
    grant = cache.acquire("m", "alice", ME)
    cache.release(grant.lease_id)
    cache.drain()
    corrupt(grant)
    assert served(grant) != blob(file_store, info.sha256)
    del grant

    assert cache.scrub() == {"scrubbed": 2, "corrupt": 1, "reloaded": 1}
    again = cache.acquire("m", "alice", ME)
    assert again.tier == "host"  # the reloaded copy: a hit
    assert served(again) == blob(file_store, info.sha256)
    cache.release(again.lease_id)
    host = cache.stats()["host"]
    assert (host.scrubbed, host.corrupt, host.models, host.loads) == (2, 1, 2, 3)
    assert host.bytes_used == cost(info) + cost(other)
    assert memory.live() == 2  # the corrupt copy is gone
    assert cache.scrub() == {"scrubbed": 2, "corrupt": 0, "reloaded": 0}


def test_a_leased_corrupt_copy_is_never_granted_again_and_freed_on_release(make_cache, file_store, memory):
    info = file_store.register("m", weights(90), tenant="alice")
    cache = make_cache()
    held = cache.acquire("m", "alice", ME)
    corrupt(held)

    assert cache.scrub() == {"scrubbed": 1, "corrupt": 1, "reloaded": 1}
    fresh = cache.acquire("m", "alice", ME)
    assert fresh.handle is not held.handle
    assert served(fresh) == blob(file_store, info.sha256)
    # The leased bad copy still takes its bytes until its holder is done with it.
    assert cache.stats()["host"].bytes_used == 2 * cost(info)
    assert cache.report()["residency"] == {cache_key(info): "host"}
    cache.release(held.lease_id)
    cache.release(fresh.lease_id)
    del held, fresh
    assert cache.stats()["host"].bytes_used == cost(info)
    assert memory.live() == 1


def test_scrub_leaves_the_reload_to_the_next_miss_when_it_cannot_fit(make_cache, file_store, memory):
    info = file_store.register("m", weights(95), tenant="alice")
    cache = make_cache(host_budget=cost(info))  # no room for a second copy while one is leased
    held = cache.acquire("m", "alice", ME)
    corrupt(held)
    assert cache.scrub() == {"scrubbed": 1, "corrupt": 1, "reloaded": 0}
    # No room for a good copy while the bad one is leased: a request is served from its own
    # copy (a bypass), never from the dropped one.
    bypass = cache.acquire("m", "alice", ME)
    assert bypass.tier == BYPASS and bypass.handle is None
    cache.release(held.lease_id)
    grant = cache.acquire("m", "alice", ME)
    assert grant.tier in ("disk", "store") and served(grant) == blob(file_store, info.sha256)


# -- config ----------------------------------------------------------------------------------


def test_config_takes_tenant_limits_and_scrub_period(monkeypatch):
    quotas = {"alice": {"host": 1 << 20}}
    config = CacheConfig(tenant_share=0.25, tenant_quotas=quotas, scrub_s=30)
    quotas["alice"]["host"] = 0  # the config keeps its own copy
    assert (config.tenant_share, config.tenant_quotas, config.scrub_s) == (0.25, {"alice": {"host": 1 << 20}}, 30)
    assert (CacheConfig().tenant_share, CacheConfig().tenant_quotas, CacheConfig().scrub_s) == (1.0, {}, 0.0)
    monkeypatch.setenv("TRIMS_RAY_TENANT_SHARE", "0.5")
    monkeypatch.setenv("TRIMS_RAY_SCRUB_S", "60")
    assert (CacheConfig.from_env().tenant_share, CacheConfig.from_env().scrub_s) == (0.5, 60.0)


@pytest.mark.parametrize(
    ("fields", "error", "fragment"),
    [
        ({"tenant_share": 0}, ValueError, "tenant_share"),
        ({"tenant_share": 1.5}, ValueError, "tenant_share"),
        ({"tenant_share": True}, ValueError, "tenant_share"),
        ({"tenant_quotas": [("alice", 1)]}, TypeError, "tenant_quotas"),
        ({"tenant_quotas": {"Alice!": {"host": 1}}}, ValueError, "invalid tenant"),
        ({"tenant_quotas": {"alice": 5}}, TypeError, "tenant_quotas['alice']"),
        ({"tenant_quotas": {"alice": {"gpu": 1}}}, ValueError, "'host' or 'disk'"),
        ({"tenant_quotas": {"alice": {"host": -1}}}, ValueError, "non-negative int"),
        ({"tenant_quotas": {"alice": {"host": 1.5}}}, ValueError, "non-negative int"),
        ({"scrub_s": -1}, ValueError, "scrub_s"),
        ({"scrub_s": float("inf")}, ValueError, "scrub_s"),
        ({"scrub_s": "10"}, ValueError, "scrub_s"),
    ],
)
def test_config_rejects_bad_tenant_limits(fields, error, fragment):
    with pytest.raises(error, match=None) as caught:
        CacheConfig(**fields)
    assert fragment in str(caught.value)
