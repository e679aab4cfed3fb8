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
