"""The lease table that the host tier (NodeCache) and the GPU tier (GpuTier) share, without Ray:
ids that stay unique across incarnations of the owning actor, caller ids released before their
grant, and the reaper's choice of leases to end.
"""

from __future__ import annotations

import pytest

from trims_ray._protocol import Caller, Holder
from trims_ray.cache.leases import LeaseTable

ME = Holder.this_process()


@pytest.fixture
def now() -> list[float]:
    return [0.0]


def table(now: list[float], alive=lambda holder: True, **kwargs) -> LeaseTable[str]:
    return LeaseTable(clock=lambda: now[0], holder_alive=alive, unclaimed_ttl_s=30.0, **kwargs)


def test_a_release_with_an_id_of_an_earlier_incarnation_ends_nothing(now):
    # The actor that owns a table restarts; a task that leased from the old incarnation
    # releases afterwards. Its id must not be the id of a lease the new table granted since.
    before = table(now)
    stale, _ = before.add("old entry", ME)
    after = table(now)
    fresh, over = after.add("new entry", ME)
    assert not over and fresh != stale
    assert after.claim(stale, ME) is False
    assert after.pop(stale) is None
    assert len(after) == 1
    assert after.pop(fresh) == "new entry" and len(after) == 0


def test_the_ids_a_table_chooses_carry_its_incarnation(now):
    leases = table(now, incarnation="feed")
    assert [leases.add(entry, ME)[0] for entry in "ab"] == ["feed:1", "feed:2"]
    assert table(now).incarnation != table(now).incarnation  # a fresh random one each time


def test_an_id_of_ours_released_twice_leaves_nothing_to_remember(now):
    leases = table(now)
    lease_id, _ = leases.add("entry", ME)
    assert leases.pop(lease_id) == "entry"
    assert leases.pop(lease_id) is None
    assert leases.released_early() == {}


def test_a_callers_id_released_before_its_grant_ends_the_grant(now):
    leases = table(now)
    assert leases.pop("caller:1") is None
    assert leases.add("entry", Caller("caller"), "caller:1") == ("caller:1", True)
    assert len(leases) == 0 and leases.released_early() == {}
    leases.pop("caller:2")  # its grant never comes: forgotten after the ttl
    now[0] = 31.0
    assert leases.expired() == [] and leases.released_early() == {}


def test_a_callers_id_must_be_a_new_str(now):
    leases = table(now)
    leases.add("entry", ME, "caller:1")
    with pytest.raises(ValueError, match="in use"):
        leases.check_new("caller:1")
    with pytest.raises(TypeError):
        leases.check_new(3)  # type: ignore[arg-type]
    leases.check_new(None)
    leases.check_new("caller:2")


def test_expired_ends_dead_holders_and_unclaimed_leases(now):
    dead: set[Holder] = set()
    leases = table(now, alive=lambda holder: holder not in dead)
    worker = Holder(4242, 7)
    claimed_id, _ = leases.add("claimed", None)
    assert leases.claim(claimed_id, worker)
    leases.add("unclaimed", None)
    now[0] = 29.0
    assert leases.expired() == []
    now[0] = 31.0
    assert leases.expired() == ["unclaimed"]
    assert leases.holders(older_than_s=5.0) == [worker]
    dead.add(worker)
    assert leases.expired() == ["claimed"] and len(leases) == 0
