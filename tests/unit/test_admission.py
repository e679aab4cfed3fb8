"""The one admission sequence (trims_ray.policy.admission.decide_admission): the byte budget,
the tenant's quota, the policy's admission rule, and what is evicted for a load (never anything
for one that is not kept). Pure Python; the tiers' own tests check what they do with it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from trims_ray.policy import Admission, Outcome, Quota, decide_admission, make_policy
from trims_ray.policy.lru import LRU

ROOT = Path(__file__).resolve().parents[2]


class Asked(LRU):
    """LRU whose admission rule says ``answer`` and remembers every time it was consulted."""

    name = "asked"

    def __init__(self, answer: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.answer = answer
        self.asked: list[tuple] = []

    def _admit(self, key, nbytes, cost, victims):
        self.asked.append((key, nbytes, cost, list(victims)))
        return self.answer


def filled(policy, sizes: dict[str, int]):
    """Inserts sizes' keys in order (the first is LRU's first victim); returns sizes."""
    for key, nbytes in sizes.items():
        policy.on_insert(key, nbytes, 1.0)
    return sizes


def decide(policy, sizes, nbytes, *, budget, **kw) -> Admission:
    kw.setdefault("used", sum(sizes.values()))
    return decide_admission(policy, "new", nbytes, 1.0, budget=budget, sizes=sizes, **kw)


# -- the byte budget -----------------------------------------------------------------------------


def test_a_key_that_fits_in_free_room_is_kept_without_asking_the_policy():
    policy = Asked(answer=False)
    sizes = filled(policy, {"a": 10, "b": 10})
    decision = decide(policy, sizes, 30, budget=50)  # 30 free: exactly enough
    assert decision == Admission(Outcome.KEEP, ()) and decision.kept
    assert policy.asked == []  # nothing is traded, so there is nothing to decide


def test_victims_are_the_fewest_idle_keys_in_eviction_order():
    policy = Asked()
    sizes = filled(policy, {"a": 10, "b": 10, "c": 10, "d": 10})
    # 10 free of 50; 25 needed: two victims. b is leased, so a and c.
    decision = decide(policy, sizes, 25, budget=50, evictable=lambda k: k != "b")
    assert decision == Admission(Outcome.KEEP, ("a", "c"))
    assert policy.asked == [("new", 25, 1.0, ["a", "c"])]  # asked once, with those victims
    assert set(policy.keys()) == set(sizes)  # deciding evicted nothing: the caller does


def test_bigger_than_the_budget_is_never_kept_even_forced():
    policy = Asked()
    sizes = filled(policy, {"a": 10})
    for force in (False, True):
        assert decide(policy, sizes, 51, budget=50, force=force) == Admission(Outcome.TOO_BIG)
    assert policy.asked == [] and set(policy.keys()) == {"a"}


def test_no_room_when_what_is_idle_is_not_enough_and_nothing_is_chosen():
    policy = Asked()
    sizes = filled(policy, {"a": 10, "b": 20, "c": 10})
    # 10 free of 50; a and c idle make 30 of the 40 needed: evicting them would not do.
    decision = decide(policy, sizes, 40, budget=50, evictable=lambda k: k != "b")
    assert decision == Admission(Outcome.NO_ROOM) and not decision.kept
    assert decision.victims == ()
    assert policy.asked == [] and set(policy.keys()) == set(sizes)


def test_loads_in_flight_count_against_the_budget():
    # 30 bytes are reserved for a load in flight (in used, not in sizes: not evictable).
    policy = Asked()
    sizes = filled(policy, {"a": 10})
    assert decide(policy, sizes, 10, budget=50, used=40).victims == ()
    assert decide(policy, sizes, 20, budget=50, used=40).victims == ("a",)
    assert decide(policy, sizes, 21, budget=50, used=40).outcome is Outcome.NO_ROOM


def test_more_in_use_than_a_lowered_budget_must_be_freed_before_a_key_is_kept():
    # A budget lowered at run time under leased bytes: nothing idle to free is NO_ROOM, not an
    # error; what is idle goes, the excess with it.
    policy = Asked()
    assert decide(policy, {}, 1, budget=10, used=11).outcome is Outcome.NO_ROOM
    sizes = filled(policy, {"a": 5, "b": 5})
    assert decide(policy, sizes, 1, budget=10, used=14).victims == ("a",)
    assert decide(policy, sizes, 2, budget=10, used=14).victims == ("a", "b")


# -- the policy's admission ----------------------------------------------------------------------


def test_a_refused_load_evicts_nothing():
    policy = Asked(answer=False)
    sizes = filled(policy, {"a": 10, "b": 10, "c": 10})
    decision = decide(policy, sizes, 30, budget=30)
    assert decision == Admission(Outcome.REFUSED)  # no victims to act on
    assert policy.asked == [("new", 30, 1.0, ["a", "b", "c"])]
    assert set(policy.keys()) == set(sizes)


def test_force_keeps_the_load_without_asking_but_not_past_budget_or_leases():
    policy = Asked(answer=False)
    sizes = filled(policy, {"a": 10, "b": 10})
    assert decide(policy, sizes, 15, budget=20, force=True) == Admission(Outcome.KEEP, ("a", "b"))
    assert policy.asked == []
    leased = decide(policy, sizes, 15, budget=20, force=True, evictable=lambda k: k != "b")
    assert leased.outcome is Outcome.NO_ROOM


def test_a_huge_one_off_does_not_flush_a_hot_set():
    # GDSF's admission (and cost's): four hot keys fill the tier; a one-off model as big as all
    # of them, at the same cost per byte, is served without keeping it, so they all stay.
    for name in ("gdsf", "cost"):
        policy = make_policy(name, clock=lambda: 0.0)
        sizes = filled(policy, dict.fromkeys("abcd", 10))
        for _ in range(5):
            for key in "abcd":
                policy.on_access(key)
        one_off = decide_admission(policy, "huge", 40, 4.0, budget=40, used=40, sizes=sizes)
        assert one_off == Admission(Outcome.REFUSED), name
        assert set(policy.keys()) == set("abcd")
        # A small newcomer that saves twice what one victim does per byte (12 s for 10 bytes
        # against 6 requests of 1 s; GDSF asks for twice, cost for as much) is let in at its price.
        small = decide_admission(policy, "small", 10, 12.0, budget=40, used=40, sizes=sizes)
        assert small.kept and len(small.victims) == 1, name


# -- the tenant's quota --------------------------------------------------------------------------


def tenant(name: str, limit: int, sizes: dict[str, int]) -> Quota:
    used = sum(n for k, n in sizes.items() if k.startswith(name + "/"))
    return Quota(limit, used, lambda k: k.startswith(name + "/"))


def test_a_tenant_over_its_quota_evicts_its_own_keys_first_never_anothers():
    policy = Asked()
    # bob's key is the first in eviction order; alice holds 20 of her 25.
    sizes = filled(policy, {"bob/x": 10, "alice/a": 10, "alice/b": 10})
    decision = decide(policy, sizes, 10, budget=100, quota=tenant("alice", 25, sizes))
    assert decision == Admission(Outcome.KEEP, ("alice/a",))  # room in the budget: only hers
    assert policy.asked == [("new", 10, 1.0, ["alice/a"])]


def test_the_quotas_victims_count_towards_the_budget_and_come_first():
    policy = Asked()
    sizes = filled(policy, {"bob/x": 10, "alice/a": 10, "bob/y": 10, "alice/b": 10})
    # Budget 45, 5 free; alice holds 20. Within her quota, 15 bytes evict x, the first in
    # eviction order. With a quota of 25 they must evict 10 of hers: a, whose 10 bytes also
    # make the room (5 + 10), so x stays.
    assert decide(policy, sizes, 15, budget=45, quota=tenant("alice", 35, sizes)).victims == ("bob/x",)
    assert decide(policy, sizes, 15, budget=45, quota=tenant("alice", 25, sizes)).victims == ("alice/a",)
    # 30 bytes under a quota of 35: 15 of hers (a and b: 20), then 5 + 20 is short of 30, so
    # the budget takes x too; her own come first.
    decision = decide(policy, sizes, 30, budget=45, quota=tenant("alice", 35, sizes))
    assert decision == Admission(Outcome.KEEP, ("alice/a", "alice/b", "bob/x"))
    assert policy.asked[-1] == ("new", 30, 1.0, ["alice/a", "alice/b", "bob/x"])


def test_a_tenant_whose_own_keys_are_leased_is_over_quota_and_nothing_goes():
    policy = Asked()
    sizes = filled(policy, {"bob/x": 10, "alice/a": 10, "alice/b": 10})
    decision = decide(
        policy, sizes, 10, budget=100, quota=tenant("alice", 25, sizes), evictable=lambda k: k != "alice/a"
    )
    assert decision == Admission(Outcome.KEEP, ("alice/b",))
    decision = decide(
        policy, sizes, 10, budget=100, quota=tenant("alice", 25, sizes), evictable=lambda k: k == "bob/x"
    )
    assert decision == Admission(Outcome.OVER_QUOTA)
    assert policy.asked == [("new", 10, 1.0, ["alice/b"])]  # the refused one was never weighed


def test_a_key_bigger_than_the_quota_is_over_quota_even_forced():
    policy = Asked()
    sizes = filled(policy, {"alice/a": 10})
    quota = tenant("alice", 25, sizes)
    assert decide(policy, sizes, 26, budget=100, quota=quota, force=True) == Admission(Outcome.OVER_QUOTA)
    assert decide(policy, sizes, 15, budget=100, quota=quota).victims == ()  # 25: within it


def test_a_refused_load_over_quota_evicts_none_of_the_tenants_keys():
    policy = Asked(answer=False)
    sizes = filled(policy, {"alice/a": 10, "alice/b": 10})
    decision = decide(policy, sizes, 10, budget=100, quota=tenant("alice", 20, sizes))
    assert decision == Admission(Outcome.REFUSED)
    assert policy.asked == [("new", 10, 1.0, ["alice/a"])]


# -- written once --------------------------------------------------------------------------------


def test_no_caller_chooses_victims_or_asks_admit_itself():
    # The sequence lives in policy/admission.py; tiers and the simulator call decide_admission.
    # (choose_victims is defined in policy/base.py, policy.admit in the policy classes.)
    own = {ROOT / "trims_ray/policy/admission.py", ROOT / "trims_ray/policy/base.py"}
    found = []
    for path in [*sorted((ROOT / "trims_ray").rglob("*.py")), *sorted((ROOT / "workloads").glob("*.py"))]:
        if path in own:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id == "choose_victims":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} choose_victims")
            if isinstance(func, ast.Attribute) and func.attr == "admit" and "policy" in ast.unparse(func.value):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(func)}")
    assert found == []
