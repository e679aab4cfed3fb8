"""ManifestCache: a name's manifest is trusted for its ttl, refreshed in the background while in
use, and a re-registered, removed or damaged name is seen within the ttl (a real file store; the
clock is a test clock)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from trims_ray import ModelFormatError, ModelNotFoundError, ModelStore
from trims_ray._manifest_cache import ManifestCache
from trims_ray._protocol import Resolved, cache_key

TENANT = "t1"
TTL = 4.0


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def weights(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(16, 16, generator=torch.Generator().manual_seed(seed))}


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(str(tmp_path / "store"))


@pytest.fixture
def reads(store) -> list[tuple[str, str]]:
    return []


@pytest.fixture
def clock() -> Clock:
    return Clock()


def counting_reader(store: ModelStore, reads: list):
    """The store's resolution, each call noted in ``reads``."""

    def read(name: str, tenant: str):
        reads.append((tenant, name))
        return store.manifest(name, tenant=tenant)

    return read


@pytest.fixture
def cache(store, reads, clock) -> ManifestCache:
    return ManifestCache(counting_reader(store, reads), TTL, clock=clock)


def test_a_manifest_is_read_once_per_ttl(cache, store, reads, clock):
    info = store.register("m", weights(1), tenant=TENANT)
    assert cache.get("m", TENANT).sha256 == info.sha256
    clock.now += TTL - 0.1
    assert cache.get("m", TENANT).sha256 == info.sha256
    assert len(reads) == 1
    clock.now += 0.2
    cache.get("m", TENANT)
    assert len(reads) == 2


def test_refresh_reads_again_only_what_was_used_and_is_past_half_its_ttl(cache, store, reads, clock):
    store.register("used", weights(1), tenant=TENANT)
    store.register("idle", weights(2), tenant=TENANT)
    cache.get("used", TENANT)
    cache.get("idle", TENANT)
    clock.now += 1.0
    cache.get("used", TENANT)  # a use, but too young to refresh
    assert cache.refresh() == 0
    clock.now += TTL / 2
    assert cache.refresh() == 1
    assert reads[-1] == (TENANT, "used")
    # Refreshed: still trusted past the first read's ttl, with no read on the way.
    clock.now += TTL / 2
    before = len(reads)
    cache.get("used", TENANT)
    assert len(reads) == before
    # The idle one expired and was forgotten by the refresh after its ttl.
    cache.refresh()
    assert len(cache) == 1


def test_a_name_in_steady_use_never_waits_for_the_store(cache, store, reads, clock):
    store.register("m", weights(1), tenant=TENANT)
    cache.get("m", TENANT)
    first = len(reads)
    for _ in range(40):  # ten ttls of uses, with the refresher's rhythm (four per ttl)
        clock.now += TTL / 4
        cache.get("m", TENANT)
        cache.refresh()
    uses_that_read = len(reads) - first - 20  # refreshes read every other round
    assert uses_that_read == 0, reads


def test_a_reregistered_name_is_seen_within_the_ttl_while_refreshed(cache, store, clock):
    old = store.register("m", weights(1), tenant=TENANT)
    assert cache.get("m", TENANT).sha256 == old.sha256
    new = store.register("m", weights(2), tenant=TENANT)
    seen = []
    for _ in range(8):
        clock.now += TTL / 4
        seen.append(cache.get("m", TENANT).sha256)
        cache.refresh()
    assert seen[-1] == new.sha256
    assert seen.index(new.sha256) <= 4  # within one ttl of the registration


def test_a_removed_name_is_forgotten_by_the_refresh(cache, store, clock):
    store.register("m", weights(1), tenant=TENANT)
    cache.get("m", TENANT)
    os.remove(store.manifest_path(TENANT, "m"))
    clock.now += TTL / 2
    cache.get("m", TENANT)  # still trusted
    cache.refresh()
    with pytest.raises(ModelNotFoundError):
        cache.get("m", TENANT)


def test_a_failed_refresh_keeps_the_old_manifest_only_until_its_ttl(cache, store, clock):
    info = store.register("m", weights(1), tenant=TENANT)
    cache.get("m", TENANT)
    with open(store.manifest_path(TENANT, "m"), "w") as f:
        f.write("{not json")
    clock.now += TTL / 2
    cache.get("m", TENANT)
    assert cache.refresh() == 1  # tried, failed, kept
    assert cache.get("m", TENANT).sha256 == info.sha256
    clock.now += TTL / 2
    with pytest.raises(ModelFormatError):
        cache.get("m", TENANT)


def test_errors_are_not_cached(cache, store, reads):
    with pytest.raises(ModelNotFoundError):
        cache.get("later", TENANT)
    store.register("later", weights(1), tenant=TENANT)
    assert cache.get("later", TENANT).name == "later"
    assert len(reads) == 2


def test_ttl_zero_reads_every_time(store, reads, clock):
    store.register("m", weights(1), tenant=TENANT)
    cache = ManifestCache(counting_reader(store, reads), 0.0, clock=clock)
    cache.get("m", TENANT)
    cache.get("m", TENANT)
    assert len(reads) == 2 and len(cache) == 0
    cache.refresh_until(threading.Event())  # returns at once: nothing to refresh


def test_a_negative_ttl_is_refused(store):
    with pytest.raises(ValueError, match="ttl_s"):
        ManifestCache(lambda n, t: store.manifest(n, tenant=t), -1.0)


def test_the_background_thread_refreshes_and_stops(store):
    store.register("m", weights(1), tenant=TENANT)
    readers = []

    def read(name, tenant):
        readers.append(threading.current_thread().name)
        return store.manifest(name, tenant=tenant)

    cache = ManifestCache(read, 0.2)  # the real clock
    stop = threading.Event()
    cache.start_refreshing(stop, name="test-refresher")
    try:
        for _ in range(40):  # uses over two seconds or more: the refresher reads in between
            cache.get("m", TENANT)
            stop.wait(0.05)
            if "test-refresher" in readers:
                break
    finally:
        stop.set()
    assert "test-refresher" in readers
    assert readers[0] == threading.current_thread().name  # the first use read it itself
    for _ in range(100):  # the thread ends once stop is set
        if not any(t.name == "test-refresher" for t in threading.enumerate()):
            break
        time.sleep(0.05)
    assert not any(t.name == "test-refresher" for t in threading.enumerate())


# -- a caller's hint: the name resolved once per invocation ------------------------------------


class OneMatrix(torch.nn.Module):
    """An architecture for ``weights``: registering it as a factory changes the manifest, not
    the blob."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(16, 16))


class Held(dict):
    """``held`` for ManifestCache.get: the manifests of the copies a process holds, by key."""

    def add(self, manifest) -> None:
        self[cache_key(manifest)] = manifest

    def __call__(self, key: str):
        return self.get(key)


def test_a_hint_for_a_held_copy_is_served_without_a_read(cache, store, reads):
    store.register("m", weights(1), tenant=TENANT)
    resolved = store.manifest("m", tenant=TENANT)  # the caller's resolution
    held = Held()
    held.add(store.manifest("m", tenant=TENANT))  # this process's own, when it took the copy
    served = cache.get("m", TENANT, hint=Resolved.of(resolved), held=held)
    assert served == resolved and served is held[cache_key(resolved)]
    assert reads == []
    # The copy's manifest was not made this cache's own: a use by name still reads.
    cache.get("m", TENANT)
    assert reads == [(TENANT, "m")]


def test_a_hint_is_resolved_as_a_name_when_nothing_here_vouches_for_it(cache, store, reads):
    old = store.register("m", weights(1), tenant=TENANT)
    stale = store.manifest("m", tenant=TENANT)
    held = Held()
    held.add(stale)
    # The same blob registered again with a factory: same key, another manifest.
    store.register("m", weights(1), tenant=TENANT, factory=OneMatrix)
    current = store.manifest("m", tenant=TENANT)
    assert cache_key(current) == cache_key(stale) == f"{TENANT}/{old.sha256}"
    assert current.fingerprint != stale.fingerprint
    assert cache.get("m", TENANT, hint=Resolved.of(current), held=held) == current
    assert reads == [(TENANT, "m")]
    # No copy held, a made-up fingerprint, another name: each one read, as without a hint.
    for hint, name, copies in [
        (Resolved.of(current), "m", Held()),
        (Resolved(cache_key(current), "0" * 64), "m", held),
    ]:
        reads.clear()
        fresh = ManifestCache(counting_reader(store, reads), TTL)
        assert fresh.get(name, TENANT, hint=hint, held=copies) == current
        assert reads == [(TENANT, name)]
    store.register("other", weights(1), tenant=TENANT)
    reads.clear()
    fresh = ManifestCache(counting_reader(store, reads), TTL)
    assert fresh.get("other", TENANT, hint=Resolved.of(stale), held=held).name == "other"
    assert reads == [(TENANT, "other")]


def test_a_hint_for_another_tenants_private_copy_is_not_found_like_a_missing_name(cache, store, reads):
    store.register("secret", weights(1), tenant="alice")
    alices = store.manifest("secret", tenant="alice")
    held = Held()
    held.add(alices)  # alice's copy is here
    with pytest.raises(ModelNotFoundError) as refused:
        cache.get("secret", "bob", hint=Resolved.of(alices), held=held)
    with pytest.raises(ModelNotFoundError) as missing:
        store.manifest("secret", tenant="bob")
    assert str(refused.value) == str(missing.value)
    assert reads == [("bob", "secret")]


def test_a_hint_for_a_public_copy_is_served_to_any_tenant(cache, store, reads):
    store.register("shared", weights(1), tenant="public")
    public = store.manifest("shared", tenant="public")
    held = Held()
    held.add(public)
    for tenant in ("alice", "bob", "public"):
        assert cache.get("shared", tenant, hint=Resolved.of(public), held=held) is public
    assert reads == []


def test_this_caches_own_manifest_outranks_a_hint_and_hinted_uses_do_not_keep_it(cache, store, reads, clock):
    store.register("m", weights(1), tenant=TENANT)
    own = cache.get("m", TENANT)
    new = store.register("m", weights(2), tenant=TENANT)
    hinted = store.manifest("m", tenant=TENANT)
    assert hinted.sha256 == new.sha256 != own.sha256
    held = Held()
    held.add(hinted)
    # Trusted for its ttl: what this process resolved is served, whatever a caller says.
    assert cache.get("m", TENANT, hint=Resolved.of(hinted), held=held) == own
    clock.now += TTL / 2
    assert cache.refresh() == 0  # a hinted use does not keep it refreshed; a use by name would
    clock.now += TTL / 2
    assert cache.get("m", TENANT, hint=Resolved.of(hinted), held=held) is hinted
    assert reads == [(TENANT, "m")]
