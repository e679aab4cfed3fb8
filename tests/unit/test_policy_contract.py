"""The contract every eviction policy keeps, run against each registered policy.

PolicyContract holds the checks; a policy gets them all with one line,
``class TestX(PolicyContract): policy_name = "x"``. The checks never assume a particular order,
only the contract: leased keys are never yielded, removed keys are gone, choose_victims takes a
minimal prefix or refuses without evicting, and a byte-budget cache driven by the policy never
exceeds its budget.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from itertools import islice

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trims_ray.policy import (
    POLICIES,
    EvictionPolicy,
    available_policies,
    choose_victims,
    make_policy,
)


class FakeClock:
    """A clock the test advances by hand, so time-aware policies are deterministic."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Request:
    key: str
    gap: float  # seconds since the previous request
    lease_steps: int  # >0: a task keeps the key leased for this many further requests


@dataclass(frozen=True)
class Trace:
    budget: int
    sizes: dict[str, int]
    costs: dict[str, float]
    requests: list[Request]


def make_trace(seed: int, budget: int, *, n_keys: int = 50, n_requests: int = 2000) -> Trace:
    """A seeded Zipf-like request trace over n_keys keys whose working set exceeds the budget."""
    rng = random.Random(seed)
    keys = [f"blob{i:02d}" for i in range(n_keys)]
    sizes = {k: rng.randint(1, max(1, budget // 4)) for k in keys}
    # Two keys can never fit: their loads must be refused however empty the cache is.
    for k in rng.sample(keys, 2):
        sizes[k] = budget + rng.randint(1, 10)
    # Miss cost loosely follows size (load time), with jitter so cost-aware policies differ.
    costs = {k: sizes[k] * rng.uniform(1e-4, 1e-3) for k in keys}
    weights = [1.0 / (rank + 1) ** 0.9 for rank in range(n_keys)]
    requests = [
        Request(
            key=key,
            gap=rng.expovariate(10.0),
            lease_steps=rng.randint(1, 40) if rng.random() < 0.2 else 0,
        )
        for key in rng.choices(keys, weights=weights, k=n_requests)
    ]
    return Trace(budget, sizes, costs, requests)


@dataclass
class SimResult:
    hits: int = 0
    loads: int = 0
    refusals: int = 0
    refusals_that_would_fit_empty: int = 0  # refused only because leased keys held the room
    evictions: list[str] = field(default_factory=list)


def simulate(policy: EvictionPolicy, trace: Trace, clock: FakeClock) -> SimResult:
    """Drives a tiny reference byte-budget cache with policy and checks it after every step."""
    result = SimResult()
    resident: dict[str, int] = {}
    leased_until: dict[str, int] = {}
    used = 0
    for step, req in enumerate(trace.requests):
        clock.advance(req.gap)
        leased_until = {k: until for k, until in leased_until.items() if until > step}

        def evictable(k: str) -> bool:
            return k not in leased_until

        if req.key in resident:
            policy.on_access(req.key)
            result.hits += 1
        else:
            need = trace.sizes[req.key]
            free = trace.budget - used
            before = set(policy.keys())
            victims = choose_victims(policy, need, free, resident, evictable)
            if victims is None:
                # The refusal must be right: all evictable bytes together really are too few.
                evictable_bytes = sum(n for k, n in resident.items() if evictable(k))
                assert free + evictable_bytes < need, (step, req.key, need, free)
                assert set(policy.keys()) == before  # nothing evicted for a refused load
                result.refusals += 1
                result.refusals_that_would_fit_empty += need <= trace.budget
                continue
            assert len(set(victims)) == len(victims), victims
            assert not set(victims) & leased_until.keys(), (victims, leased_until)
            assert set(victims) <= resident.keys()
            freed = sum(resident[v] for v in victims)
            assert free + freed >= need
            if victims:  # minimal: the last victim was needed
                assert free + freed - resident[victims[-1]] < need
            for v in victims:
                policy.on_remove(v)
                used -= resident.pop(v)
                result.evictions.append(v)
            policy.on_insert(req.key, need, trace.costs[req.key])
            resident[req.key] = need
            used += need
            result.loads += 1
        if req.lease_steps:
            leased_until[req.key] = max(leased_until.get(req.key, 0), step + 1 + req.lease_steps)
        assert 0 <= used <= trace.budget
        assert used == sum(resident.values())
        assert policy.keys() == resident.keys()
        assert len(policy) == len(resident)
    return result


def populate(policy: EvictionPolicy, clock: FakeClock, n: int = 12, seed: int = 7) -> dict:
    """Inserts n keys with varied sizes and costs and a few hits; returns key -> nbytes."""
    rng = random.Random(seed)
    sizes = {}
    for i in range(n):
        key = f"k{i:02d}"
        sizes[key] = rng.randint(1, 100)
        clock.advance(1.0)
        policy.on_insert(key, sizes[key], rng.uniform(0.0, 3.0))
    for key in rng.choices(list(sizes), k=2 * n):
        clock.advance(0.5)
        policy.on_access(key)
    return sizes


def everything(_key) -> bool:
    return True


class PolicyContract:
    """Checks every policy must pass; subclasses set policy_name (not collected on its own)."""

    policy_name: str

    def make(self, **kw) -> EvictionPolicy:
        return make_policy(self.policy_name, **kw)

    def make_for_trace(self, trace: Trace, clock: FakeClock) -> EvictionPolicy:
        """The policy the simulation drives; an offline policy overrides this to see the trace."""
        return self.make(clock=clock)

    def populated(self, n: int = 12) -> tuple[EvictionPolicy, dict]:
        clock = FakeClock()
        policy = self.make(clock=clock)
        return policy, populate(policy, clock, n)

    # -- registry ------------------------------------------------------------------------------

    def test_registry_builds_an_empty_policy_of_this_name(self):
        policy = self.make()
        assert isinstance(policy, EvictionPolicy)
        assert policy.name == self.policy_name
        assert len(policy) == 0
        assert list(policy.victims(everything)) == []
        assert "k" not in policy

    # -- victims -------------------------------------------------------------------------------

    def test_victims_yield_every_evictable_key_once_and_never_a_leased_one(self):
        policy, sizes = self.populated(20)
        leased = {"k03", "k07", "k19"}
        got = list(policy.victims(lambda k: k not in leased))
        assert len(got) == len(set(got))
        assert set(got) == set(sizes) - leased
        assert sorted(policy.victims(everything)) == sorted(sizes)

    def test_victims_with_everything_leased_yields_nothing(self):
        policy, _ = self.populated()
        assert list(policy.victims(lambda k: False)) == []

    def test_victims_only_reads(self):
        policy, sizes = self.populated()
        first = list(policy.victims(everything))
        list(islice(policy.victims(everything), 3))  # an abandoned, partly consumed iterator
        assert list(policy.victims(everything)) == first
        assert len(policy) == len(sizes)

    def test_removed_key_is_never_yielded_and_len_contains_track(self):
        policy, sizes = self.populated()
        assert len(policy) == len(sizes)
        assert all(k in policy for k in sizes)
        assert set(policy.keys()) == set(sizes)
        for i, key in enumerate(["k00", "k05", "k11"], start=1):
            policy.on_remove(key)
            assert key not in policy
            assert len(policy) == len(sizes) - i
            assert key not in list(policy.victims(everything))
        assert set(policy.keys()) == set(sizes) - {"k00", "k05", "k11"}

    def test_a_removed_key_can_be_inserted_again(self):
        policy, _ = self.populated()
        policy.on_remove("k04")
        policy.on_insert("k04", 10, 1.0)
        assert "k04" in policy
        assert list(policy.victims(everything)).count("k04") == 1

    # -- misuse --------------------------------------------------------------------------------

    def test_insert_twice_raises_value_error_and_keeps_one_entry(self):
        policy = self.make()
        policy.on_insert("a", 5, 1.0)
        with pytest.raises(ValueError, match="already tracked"):
            policy.on_insert("a", 7, 2.0)
        assert len(policy) == 1
        assert list(policy.victims(everything)) == ["a"]

    def test_unknown_key_raises_key_error(self):
        policy, _ = self.populated()
        with pytest.raises(KeyError):
            policy.on_access("nope")
        with pytest.raises(KeyError):
            policy.on_remove("nope")
        policy.on_remove("k01")
        with pytest.raises(KeyError):
            policy.on_access("k01")
        with pytest.raises(KeyError):
            policy.on_remove("k01")

    @pytest.mark.parametrize(
        ("nbytes", "cost", "error"),
        [
            (-1, 1.0, ValueError),
            (1, -0.5, ValueError),
            (1, math.nan, ValueError),
            (1, math.inf, ValueError),
            (1.5, 1.0, TypeError),
            (True, 1.0, TypeError),
            (1, "1", TypeError),
            (None, 1.0, TypeError),
        ],
    )
    def test_bad_size_or_cost_is_rejected_and_nothing_tracked(self, nbytes, cost, error):
        policy = self.make()
        with pytest.raises(error):
            policy.on_insert("a", nbytes, cost)
        assert "a" not in policy
        assert len(policy) == 0
        policy.on_insert("a", 1, 1.0)  # the failed insert left no trace behind
        assert list(policy.victims(everything)) == ["a"]

    def test_zero_bytes_and_zero_cost_are_accepted(self):
        policy = self.make()
        policy.on_insert("a", 0, 0.0)
        policy.on_insert("b", 3, 0)
        policy.on_access("a")
        assert sorted(policy.victims(everything)) == ["a", "b"]

    # -- choose_victims ------------------------------------------------------------------------

    def test_choose_victims_is_empty_when_free_bytes_suffice(self):
        policy, sizes = self.populated()
        assert choose_victims(policy, 50, 50, sizes, everything) == []
        assert choose_victims(policy, 0, 0, sizes, everything) == []
        assert choose_victims(policy, 10, 60, sizes, everything) == []

    def test_choose_victims_refuses_without_touching_the_policy(self):
        policy, sizes = self.populated()
        leased = {"k02", "k09"}

        def evictable(k):
            return k not in leased

        order = list(policy.victims(everything))
        evictable_bytes = sum(n for k, n in sizes.items() if k not in leased)
        assert choose_victims(policy, 7 + evictable_bytes + 1, 7, sizes, evictable) is None
        assert list(policy.victims(everything)) == order
        assert set(policy.keys()) == set(sizes)
        # Exactly enough is enough: every evictable key goes, no leased one.
        everyone = choose_victims(policy, 7 + evictable_bytes, 7, sizes, evictable)
        assert sorted(everyone) == sorted(set(sizes) - leased)
        assert len(policy) == len(sizes)  # choosing removed nothing

    def test_choose_victims_takes_the_minimal_prefix_of_the_eviction_order(self):
        policy, sizes = self.populated()
        leased = {"k00", "k06"}

        def evictable(k):
            return k not in leased

        order = list(policy.victims(evictable))
        free = 5
        total = free + sum(sizes[k] for k in order)
        for need in range(free + 1, total + 1):
            chosen = choose_victims(policy, need, free, sizes, evictable)
            assert chosen == order[: len(chosen)], need
            freed = sum(sizes[k] for k in chosen)
            assert free + freed >= need
            assert free + freed - sizes[chosen[-1]] < need
            assert not set(chosen) & leased
        assert len(policy) == len(sizes)

    def test_choose_victims_rejects_negative_byte_counts(self):
        policy, sizes = self.populated()
        with pytest.raises(ValueError):
            choose_victims(policy, -1, 0, sizes, everything)
        with pytest.raises(ValueError):
            choose_victims(policy, 10, -1, sizes, everything)

    # -- a cache driven by the policy ----------------------------------------------------------

    @settings(
        max_examples=50,
        deadline=None,
        # The same test runs once per policy class; that is the point, not a mistake.
        suppress_health_check=[HealthCheck.differing_executors],
    )
    @given(seed=st.integers(0, 2**32 - 1), budget=st.integers(20, 5000))
    def test_byte_budget_cache_never_overflows_or_evicts_a_leased_key(self, seed, budget):
        trace = make_trace(seed, budget)
        clock = FakeClock()
        result = simulate(self.make_for_trace(trace, clock), trace, clock)
        assert result.hits + result.loads + result.refusals == len(trace.requests)

    def test_simulation_exercises_hits_evictions_and_lease_refusals(self):
        # A fixed trace proving the property test above reaches every branch it checks.
        trace = make_trace(seed=1, budget=1000)
        clock = FakeClock()
        result = simulate(self.make_for_trace(trace, clock), trace, clock)
        assert result.hits > 0
        assert result.loads > 0
        assert len(result.evictions) > 0
        assert result.refusals > result.refusals_that_would_fit_empty > 0

    def test_same_trace_gives_the_same_evictions(self):
        trace = make_trace(seed=42, budget=800)
        runs = []
        for _ in range(2):
            clock = FakeClock()
            runs.append(simulate(self.make_for_trace(trace, clock), trace, clock))
        assert len(runs[0].evictions) > 0
        assert runs[0] == runs[1]

    # No online policy may beat Belady's hit ratio on equal sizes: add here when "belady" exists.


class TestLRU(PolicyContract):
    policy_name = "lru"

    def test_evicts_least_recently_used_first(self):
        policy = self.make()
        for key in "abcd":
            policy.on_insert(key, 1, 1.0)
        policy.on_access("b")
        policy.on_access("a")
        assert list(policy.victims(everything)) == ["c", "d", "b", "a"]
        policy.on_access("c")
        assert list(policy.victims(everything)) == ["d", "b", "a", "c"]

    def test_ignores_size_and_cost(self):
        policy = self.make()
        policy.on_insert("huge-and-costly", 10**9, 100.0)
        policy.on_insert("tiny-and-cheap", 1, 0.0)
        assert next(policy.victims(everything)) == "huge-and-costly"

    def test_leased_key_is_skipped_but_keeps_its_place(self):
        policy = self.make()
        for key in "abc":
            policy.on_insert(key, 1, 1.0)
        assert list(policy.victims(lambda k: k != "a")) == ["b", "c"]
        assert list(policy.victims(everything)) == ["a", "b", "c"]

    def test_reinserted_key_is_most_recent(self):
        policy = self.make()
        for key in "abc":
            policy.on_insert(key, 1, 1.0)
        policy.on_remove("a")
        policy.on_insert("a", 1, 1.0)
        assert list(policy.victims(everything)) == ["b", "c", "a"]

    def test_choose_victims_follows_recency(self):
        policy = self.make()
        sizes = {"a": 10, "b": 20, "c": 30}
        for key, n in sizes.items():
            policy.on_insert(key, n, 1.0)
        assert choose_victims(policy, 25, 5, sizes, everything) == ["a", "b"]
        policy.on_access("a")
        assert choose_victims(policy, 25, 5, sizes, everything) == ["b"]
        assert choose_victims(policy, 25, 5, sizes, lambda k: k != "b") == ["c"]

    @settings(max_examples=100, deadline=None)
    @given(ops=st.lists(st.tuples(st.sampled_from("iar"), st.integers(0, 7)), max_size=60))
    def test_matches_a_list_model(self, ops):
        policy = self.make()
        model: list[int] = []  # front = least recently used
        for op, key in ops:
            if op == "i" and key not in model:
                policy.on_insert(key, key, 0.5)
                model.append(key)
            elif op == "a" and key in model:
                policy.on_access(key)
                model.remove(key)
                model.append(key)
            elif op == "r" and key in model:
                policy.on_remove(key)
                model.remove(key)
            assert list(policy.victims(everything)) == model


def test_unknown_policy_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="lru"):
        make_policy("nope")


def test_policy_name_must_be_a_string():
    with pytest.raises(TypeError):
        make_policy(3)


def test_available_policies_are_the_registry_sorted():
    names = available_policies()
    assert "lru" in names
    assert names == sorted(POLICIES)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_registered_policy_has_a_contract_test_class(name):
    tested = {cls.policy_name for cls in PolicyContract.__subclasses__()}
    assert name in tested, f"add `class Test...(PolicyContract): policy_name = {name!r}`"


def test_make_policy_passes_keyword_arguments_to_the_policy():
    with pytest.raises(TypeError, match="clock"):
        make_policy("lru", clock=42)
