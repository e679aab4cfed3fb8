"""The contract every eviction policy keeps, run against each registered policy.

PolicyContract holds the checks; a policy gets them all with one line,
``class TestX(PolicyContract): policy_name = "x"``. The checks never assume a particular order,
only the contract: leased keys are never yielded, removed keys are gone, choose_victims takes a
minimal prefix or refuses without evicting, admit only decides (it never reorders), and a
byte-budget cache driven by the policy (choose_victims, then admit, as the node cache does)
never exceeds its budget. Across policies: with equal sizes no online policy beats Belady, and
the policies with an admission rule keep a hot set through a huge one-off request.
"""

from __future__ import annotations

import bisect
import functools
import math
import random
import zlib
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
    online_policies,
    policy_class,
)
from workloads.simulate import Requests
from workloads.simulate import simulate as simulate_trace


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
    not_admitted: int = 0  # the policy's admit said no: served once, not kept
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
            order = list(policy.victims(everything))
            admitted = policy.admit(req.key, need, trace.costs[req.key], victims)
            assert isinstance(admitted, bool)
            assert list(policy.victims(everything)) == order  # admit decides, never reorders
            if not victims:
                assert admitted, "a key that fits in free room must be admitted"
            if not admitted:
                result.not_admitted += 1
                continue
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

    def test_on_cost_takes_only_tracked_keys_and_good_costs_and_keeps_every_key(self):
        policy, sizes = self.populated()
        with pytest.raises(KeyError):
            policy.on_cost("nope", 1.0)
        for bad, error in ((-0.5, ValueError), (math.nan, ValueError), (math.inf, ValueError), ("1", TypeError)):
            with pytest.raises(error):
                policy.on_cost("k01", bad)
        for key in sizes:
            policy.on_cost(key, 0.25)
        assert sorted(policy.victims(everything)) == sorted(sizes)
        policy.on_remove("k01")
        with pytest.raises(KeyError):
            policy.on_cost("k01", 1.0)

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
        assert result.hits + result.loads + result.refusals + result.not_admitted == len(
            trace.requests
        )

    def test_simulation_exercises_hits_evictions_and_lease_refusals(self):
        # Fixed traces proving the property test above reaches every branch it checks. A few
        # seeds, summed: a policy that refuses admissions keeps fewer keys, so one trace may
        # not corner it between leased keys.
        totals = SimResult()
        for seed in (1, 2, 3):
            trace = make_trace(seed=seed, budget=1000)
            clock = FakeClock()
            result = simulate(self.make_for_trace(trace, clock), trace, clock)
            totals.hits += result.hits
            totals.loads += result.loads
            totals.evictions += result.evictions
            totals.refusals += result.refusals
            totals.refusals_that_would_fit_empty += result.refusals_that_would_fit_empty
        assert totals.hits > 0
        assert totals.loads > 0
        assert len(totals.evictions) > 0
        assert totals.refusals > totals.refusals_that_would_fit_empty > 0

    def test_same_trace_gives_the_same_evictions(self):
        trace = make_trace(seed=42, budget=800)
        runs = []
        for _ in range(2):
            clock = FakeClock()
            runs.append(simulate(self.make_for_trace(trace, clock), trace, clock))
        assert len(runs[0].evictions) > 0
        assert runs[0] == runs[1]

    def test_fills_the_byte_budget_exactly_then_evicts_just_enough(self):
        # Three keys of 20 bytes fill a 60-byte budget to the byte with no eviction; a fourth
        # needs exactly one victim (or is not admitted), and the budget is never passed.
        trace = Trace(
            budget=60,
            sizes={k: 20 for k in "abcd"},
            costs={k: 1.0 for k in "abcd"},
            requests=[Request(k, 1.0, 0) for k in "abcd"],
        )
        clock = FakeClock()
        result = simulate(self.make_for_trace(trace, clock), trace, clock)
        assert result.loads + result.not_admitted == 4
        assert result.loads >= 3  # the first three had room: admitted whatever the policy
        assert len(result.evictions) == result.loads - 3
        assert set(result.evictions) <= set("abc")

    # -- admit ---------------------------------------------------------------------------------

    def test_admit_with_free_room_says_yes_and_changes_nothing(self):
        policy, sizes = self.populated()
        order = list(policy.victims(everything))
        assert policy.admit("new", 10**9, 100.0, []) is True
        assert list(policy.victims(everything)) == order
        assert "new" not in policy
        assert len(policy) == len(sizes)

    def test_admit_only_decides_and_tracks_nothing(self):
        policy, sizes = self.populated()
        order = list(policy.victims(everything))
        for nbytes, cost in ((1, 0.0), (50, 2.0), (10**6, 0.0), (10**6, 50.0)):
            answer = policy.admit("new", nbytes, cost, order[:3])
            assert isinstance(answer, bool)
            assert list(policy.victims(everything)) == order
            assert "new" not in policy
        assert set(policy.keys()) == set(sizes)

    def test_admit_rejects_a_tracked_key_an_untracked_victim_and_bad_sizes(self):
        policy, _ = self.populated()
        with pytest.raises(ValueError, match="already tracked"):
            policy.admit("k01", 5, 1.0, ["k02"])
        with pytest.raises(KeyError):
            policy.admit("new", 5, 1.0, ["k02", "nope"])
        with pytest.raises(ValueError):
            policy.admit("new", -1, 1.0, ["k02"])
        with pytest.raises(ValueError):
            policy.admit("new", 5, math.nan, ["k02"])
        with pytest.raises(TypeError):
            policy.admit("new", 5.5, 1.0, ["k02"])


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


class TestFIFO(PolicyContract):
    policy_name = "fifo"

    def test_evicts_in_insertion_order_whatever_the_hits(self):
        policy = self.make()
        for key in "abcd":
            policy.on_insert(key, 1, 1.0)
        for key in "ddab":
            policy.on_access(key)
        assert list(policy.victims(everything)) == list("abcd")

    def test_reinserted_key_goes_to_the_back_and_size_is_ignored(self):
        policy = self.make()
        policy.on_insert("huge", 10**9, 100.0)
        for key in "bc":
            policy.on_insert(key, 1, 0.0)
        assert next(policy.victims(everything)) == "huge"
        policy.on_remove("b")
        policy.on_insert("b", 1, 0.0)
        assert list(policy.victims(everything)) == ["huge", "c", "b"]


class TestLFU(PolicyContract):
    policy_name = "lfu"

    def test_evicts_fewest_requests_first_ties_least_recently_requested(self):
        policy = self.make()
        for key in "abcd":
            policy.on_insert(key, 1, 1.0)
        for key in "bbac":  # counts: a 2, b 3, c 2, d 1; c's last request is the newer
            policy.on_access(key)
        assert list(policy.victims(everything)) == ["d", "a", "c", "b"]

    def test_count_starts_again_when_a_key_returns(self):
        policy = self.make()
        policy.on_insert("a", 1, 1.0)
        policy.on_insert("b", 1, 1.0)
        for _ in range(5):
            policy.on_access("a")
        assert next(policy.victims(everything)) == "b"
        policy.on_remove("a")
        policy.on_insert("a", 1, 1.0)
        policy.on_access("b")
        assert list(policy.victims(everything)) == ["a", "b"]

    @settings(max_examples=100, deadline=None)
    @given(ops=st.lists(st.tuples(st.sampled_from("iar"), st.integers(0, 7)), max_size=60))
    def test_matches_a_counting_model(self, ops):
        policy = self.make()
        model: dict[int, tuple[int, int]] = {}  # key -> (requests since insert, last request)
        for step, (op, key) in enumerate(ops):
            if op == "i" and key not in model:
                policy.on_insert(key, key, 0.5)
                model[key] = (1, step)
            elif op == "a" and key in model:
                policy.on_access(key)
                model[key] = (model[key][0] + 1, step)
            elif op == "r" and key in model:
                policy.on_remove(key)
                del model[key]
            assert list(policy.victims(everything)) == sorted(model, key=model.__getitem__)


class AdmissionChecks:
    """What GDSF and the cost-aware policy's admission must do (mixed into their classes)."""

    def hot_set(self, **kw) -> tuple[EvictionPolicy, FakeClock]:
        # Four keys of 10 bytes at 1 s each, requested 6 times each, fill a 40-byte tier.
        clock = FakeClock()
        policy = self.make(clock=clock, **kw)
        for key in "abcd":
            clock.advance(1.0)
            policy.on_insert(key, 10, 1.0)
        for _ in range(5):
            for key in "abcd":
                clock.advance(1.0)
                policy.on_access(key)
        return policy, clock

    def test_admission_keeps_a_hot_set_from_a_huge_one_off(self):
        policy, clock = self.hot_set()
        clock.advance(1.0)
        # The same cost per byte as the hot keys, requested once: not worth four hot keys.
        assert policy.admit("huge", 40, 4.0, list("abcd")) is False
        plain, clock = self.hot_set(admission=False)
        assert plain.admit("huge", 40, 4.0, list("abcd")) is True

    def test_admission_lets_in_a_key_that_turns_hot(self):
        policy, clock = self.hot_set()
        answers = []
        for _ in range(12):
            clock.advance(1.0)
            answers.append(policy.admit("huge", 40, 4.0, list("abcd")))
        assert answers[0] is False
        assert True in answers, answers  # refused requests count: it gets in
        assert answers[answers.index(True) :] == [True] * (12 - answers.index(True))

    def test_admission_weighs_value_per_byte(self):
        # Victims a, b and c (6 requests, 1 s per 10 bytes each) free 30 bytes. A 10-byte
        # newcomer requested once at 15 s saves more per byte (1.5 against 0.6, past GDSF's
        # margin of 2 too), though less in total (15 against 18): admitted. At 1 s it saves
        # less per byte: refused.
        policy, clock = self.hot_set()
        clock.advance(1.0)
        assert policy.admit("dense", 10, 15.0, ["a", "b", "c"]) is True
        assert policy.admit("plain", 10, 1.0, ["a", "b", "c"]) is False


class TestGDSF(AdmissionChecks, PolicyContract):
    policy_name = "gdsf"

    def test_priority_is_requests_times_cost_per_byte(self):
        policy = self.make()
        policy.on_insert("big-cheap", 100, 1.0)  # 0.01
        policy.on_insert("small-dear", 10, 1.0)  # 0.1
        policy.on_insert("mid", 50, 1.0)  # 0.02
        assert list(policy.victims(everything)) == ["big-cheap", "mid", "small-dear"]
        policy.on_access("big-cheap")
        policy.on_access("big-cheap")  # 3 * 0.01 = 0.03
        assert list(policy.victims(everything)) == ["mid", "big-cheap", "small-dear"]

    def test_a_resident_whose_reload_got_cheaper_goes_first_as_if_it_came_in_at_that_cost(self):
        policy = self.make()
        policy.on_insert("a", 10, 4.0)  # 0.4, then 2 * 0.4 = 0.8 after a hit
        policy.on_insert("b", 10, 5.0)  # 0.5
        policy.on_access("a")
        assert list(policy.victims(everything)) == ["b", "a"]
        policy.on_cost("a", 2.0)  # a disk copy landed: 2 * 0.2 = 0.4
        assert list(policy.victims(everything)) == ["a", "b"]
        # Admission weighs the new cost too: a's 2 requests at 2 s per 10 bytes, twice over, is
        # 0.8 per byte against c's 1.0 (at a's old 4 s it was 1.6, and c was refused).
        assert policy.admit("c", 10, 10.0, ["a"]) is True
        policy.on_cost("a", 3.0)  # 2 * 0.3 = 0.6, above b's 0.5 again
        assert list(policy.victims(everything)) == ["b", "a"]

    def test_an_eviction_lifts_newcomers_above_the_evicted(self):
        policy = self.make()
        policy.on_insert("a", 10, 1.0)  # 0.1, then 0.4 after three hits
        policy.on_insert("b", 10, 5.0)  # 0.5
        for _ in range(3):
            policy.on_access("a")
        assert next(policy.victims(everything)) == "a"
        policy.on_remove("a")  # L = 0.4
        policy.on_insert("c", 10, 2.0)  # 0.4 + 0.2 = 0.6; without L it would be 0.2 < b
        assert list(policy.victims(everything)) == ["b", "c"]

    def test_a_newcomer_must_promise_twice_what_its_victims_save(self):
        # Victims a and b (6 requests, 1 s per 10 bytes each): 0.6 per byte. A 10-byte newcomer
        # at 10 s, requested once, promises 1.0: more, not twice (1.2); at 13 s, 1.3: admitted.
        policy, clock = self.hot_set()
        clock.advance(1.0)
        assert policy.admit("better", 10, 10.0, ["a", "b"]) is False
        assert policy.admit("twice", 10, 13.0, ["a", "b"]) is True
        even, clock = self.hot_set(admit_margin=1.0)
        clock.advance(1.0)
        assert even.admit("better", 10, 10.0, ["a", "b"]) is True

    @pytest.mark.parametrize("margin", [0.5, 0.0, float("nan")])
    def test_a_margin_below_one_is_rejected(self, margin):
        with pytest.raises(ValueError, match="admit_margin"):
            self.make(admit_margin=margin)

    def test_request_counts_halve_with_time_so_an_idle_hot_set_lets_newcomers_in(self):
        # The hot set took 24 s, so with a half-life of 10 s its counts halved twice on the way
        # (a and b: 2 each, 0.2 per byte); a newcomer at 1 s for 10 bytes promises 0.1 (0.2 with
        # its refused request). Three half-lives later every count is 0: it is kept.
        policy, clock = self.hot_set(half_life=10.0)
        clock.advance(1.0)
        assert policy.admit("new", 10, 1.0, ["a", "b"]) is False
        clock.advance(30.0)
        assert policy.admit("new", 10, 1.0, ["a", "b"]) is True
        # Without the time, only requests age the counts: still refused.
        patient, clock = self.hot_set(half_life=1e9)
        clock.advance(31.0)
        assert patient.admit("new", 10, 1.0, ["a", "b"]) is False

    @pytest.mark.parametrize("half_life", [0.0, -1.0, float("nan"), float("inf")])
    def test_a_half_life_not_above_zero_is_rejected(self, half_life):
        with pytest.raises(ValueError, match="half_life"):
            self.make(half_life=half_life)

    def test_removing_a_hot_key_lifts_l_only_to_the_lowest_priority(self):
        policy = self.make()
        policy.on_insert("a", 10, 1.0)  # 0.1
        policy.on_insert("e", 10, 5.0)  # 0.5
        policy.on_insert("hot", 10, 1.0)
        for _ in range(9):
            policy.on_access("hot")  # 1.0
        policy.on_remove("hot")  # explicit: L = 0.1 (the lowest), not 1.0
        policy.on_insert("c", 10, 1.0)  # 0.1 + 0.1 = 0.2 < e's 0.5
        assert list(policy.victims(everything)) == ["a", "c", "e"]


class TestCostAware(AdmissionChecks, PolicyContract):
    policy_name = "cost"

    def test_keeps_the_most_load_time_saved_per_byte(self):
        policy = self.make(clock=FakeClock())
        policy.on_insert("cheap", 100, 1.0)  # 0.01 s per byte
        policy.on_insert("dear", 100, 20.0)  # 0.2
        policy.on_insert("small", 10, 1.0)  # 0.1
        assert list(policy.victims(everything)) == ["cheap", "small", "dear"]

    def test_request_rate_counts_and_fades_with_its_half_life(self):
        clock = FakeClock()
        policy = self.make(clock=clock, half_life=10.0)
        policy.on_insert("a", 10, 1.0)
        policy.on_insert("b", 10, 1.0)
        for _ in range(3):
            policy.on_access("a")  # a: 4 requests just now, b: 1
        assert list(policy.victims(everything)) == ["b", "a"]
        clock.advance(100.0)  # ten half-lives: a's 4 are worth 0.004 now
        policy.on_access("b")  # b: about 1.001
        assert list(policy.victims(everything)) == ["a", "b"]

    def test_a_resident_whose_reload_got_cheaper_goes_first(self):
        policy = self.make(clock=FakeClock())
        policy.on_insert("a", 100, 20.0)  # 0.2 s per byte
        policy.on_insert("b", 100, 10.0)  # 0.1
        assert list(policy.victims(everything)) == ["b", "a"]
        policy.on_cost("a", 5.0)  # a disk copy landed: 0.05
        assert list(policy.victims(everything)) == ["a", "b"]
        policy.on_cost("a", 0.0)  # unknown: bytes over the bandwidth measured (2 loads: 0.15)
        assert list(policy.victims(everything)) == ["b", "a"]

    def test_unknown_cost_is_bytes_over_the_measured_bandwidth(self):
        policy = self.make(clock=FakeClock(), bandwidth=100.0)
        policy.on_insert("u1", 1000, 0.0)  # nothing measured yet: 1000 / 100 = 10 s
        policy.on_insert("k", 1000, 5.0)  # measures 200 bytes/s
        policy.on_insert("u2", 1000, 0.0)  # 1000 / 200 = 5 s, as k (ties: older first)
        assert list(policy.victims(everything)) == ["k", "u2", "u1"]

    @pytest.mark.parametrize(
        ("kw", "error"),
        [
            ({"bandwidth": 0}, ValueError),
            ({"bandwidth": -1.0}, ValueError),
            ({"half_life": math.inf}, ValueError),
            ({"half_life": "1"}, TypeError),
        ],
    )
    def test_rejects_a_bad_bandwidth_or_half_life(self, kw, error):
        with pytest.raises(error):
            self.make(**kw)


class TestBelady(PolicyContract):
    policy_name = "belady"

    def make(self, **kw) -> EvictionPolicy:
        # The contract's direct calls need some future: a fixed pseudo-random one per key.
        kw.setdefault("next_use", lambda key: zlib.crc32(repr(key).encode()) % 1000)
        return make_policy(self.policy_name, **kw)

    def make_for_trace(self, trace: Trace, clock: FakeClock) -> EvictionPolicy:
        # The trace's real future: when each key is requested next after the clock's now
        # (the times add up exactly as FakeClock adds them).
        when: dict[str, list[float]] = {}
        now = 0.0
        for req in trace.requests:
            now += req.gap
            when.setdefault(req.key, []).append(now)

        def next_use(key):
            times = when.get(key, [])
            i = bisect.bisect_right(times, clock())
            return times[i] if i < len(times) else math.inf

        return self.make(clock=clock, next_use=next_use)

    def test_evicts_the_key_needed_furthest_in_the_future(self):
        future = {"a": 5.0, "b": math.inf, "c": 2.0, "d": 7.0}
        policy = self.make(next_use=future.__getitem__)
        for key in "abcd":
            policy.on_insert(key, 1, 1.0)
        assert list(policy.victims(everything)) == ["b", "d", "a", "c"]
        future["c"] = 9.0  # c was requested again; its next use is now later
        policy.on_access("c")
        assert list(policy.victims(everything)) == ["b", "c", "d", "a"]

    def test_admits_a_key_only_if_needed_before_its_victims(self):
        future = {"a": 5.0, "b": math.inf, "x": 6.0}
        policy = self.make(next_use=future.__getitem__)
        policy.on_insert("a", 1, 1.0)
        policy.on_insert("b", 1, 1.0)
        assert policy.admit("x", 1, 1.0, ["b"]) is True
        assert policy.admit("x", 1, 1.0, ["a"]) is False
        assert policy.admit("x", 2, 1.0, ["b", "a"]) is False
        assert policy.admit("x", 1, 1.0, []) is True

    def test_needs_its_oracle_and_is_offline(self):
        with pytest.raises(TypeError, match="offline"):
            make_policy("belady")
        with pytest.raises(ValueError, match="NaN"):
            self.make(next_use=lambda key: math.nan).on_insert("a", 1, 1.0)
        assert policy_class("belady").offline
        assert "belady" not in online_policies()


# -- across policies ---------------------------------------------------------------------------


def _equal_size_trace(seed: int, n_keys: int = 60, n_requests: int = 3000) -> Requests:
    """Zipf-like requests over equal-size keys whose favourites change halfway through."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(n_keys)]
    keys = []
    for _ in range(2):
        ranking = rng.sample(range(n_keys), n_keys)
        keys += rng.choices(ranking, weights=weights, k=n_requests // 2)
    costs = {k: rng.uniform(0.1, 2.0) for k in range(n_keys)}
    return Requests.from_keys(keys, sizes=dict.fromkeys(range(n_keys), 7), costs=costs)


ONLINE_VARIANTS = [(name, {}) for name in online_policies()] + [
    ("gdsf", {"admission": False}),
    ("cost", {"admission": False}),
]


@pytest.mark.parametrize(("name", "kw"), ONLINE_VARIANTS, ids=lambda v: str(v))
def test_with_equal_sizes_no_online_policy_beats_belady(name, kw):
    for seed in range(3):
        trace = _equal_size_trace(seed)
        for slots in (3, 10, 25):
            optimum = simulate_trace(trace, 7 * slots, "belady")
            online = simulate_trace(trace, 7 * slots, name, **kw)
            assert online.hits <= optimum.hits, (seed, slots, online, optimum)
            assert online.hits > 0  # a real contest, not 0 <= 0


def _optimal_hits(keys: list[int], slots: int) -> int:
    """The most hits any policy can get (bypass allowed), by exhaustive search."""

    @functools.cache
    def best(i: int, cache: frozenset) -> int:
        if i == len(keys):
            return 0
        key = keys[i]
        if key in cache:
            return 1 + best(i + 1, cache)
        options = [best(i + 1, cache)]  # serve it without keeping it
        if len(cache) < slots:
            options.append(best(i + 1, cache | {key}))
        else:
            options += [best(i + 1, (cache - {v}) | {key}) for v in cache]
        return max(options)

    return best(0, frozenset())


@settings(max_examples=150, deadline=None)
@given(keys=st.lists(st.integers(0, 4), max_size=14), slots=st.integers(1, 3))
def test_belady_gets_the_optimum_hit_count_with_equal_sizes(keys, slots):
    trace = Requests.from_keys(keys, sizes=dict.fromkeys(range(5), 1))
    assert simulate_trace(trace, slots, "belady").hits == _optimal_hits(keys, slots)


ADMITTING = ("belady", "cost", "gdsf")


HOT_SIZES = {"a": 10, "b": 10, "c": 10, "d": 10, "huge": 40}
HOT_COSTS = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0, "huge": 4.0}  # one cost per byte


@pytest.mark.parametrize("name", ADMITTING)
def test_a_huge_one_off_does_not_flush_a_hot_set(name):
    trace = Requests.from_keys(
        list("abcd") * 10 + ["huge"] + list("abcd") * 10, HOT_SIZES, HOT_COSTS
    )
    kept = simulate_trace(trace, 40, name)
    assert (kept.refused, kept.evictions) == (1, 0)
    assert kept.hits == len(trace) - 5  # the hot set's first four requests and the one-off
    # The same trace does flush a cache without admission: 4 evictions for the one-off, one
    # to make room again, and four more misses.
    flushed = simulate_trace(trace, 40, "lru")
    assert (flushed.refused, flushed.evictions, flushed.hits) == (0, 5, len(trace) - 9)


@pytest.mark.parametrize("name", ["cost", "gdsf"])
def test_a_big_model_that_turns_hot_gets_in(name):
    trace = Requests.from_keys(list("abcd") * 10 + ["huge"] * 30, HOT_SIZES, HOT_COSTS)
    result = simulate_trace(trace, 40, name)
    assert 0 < result.refused < 29  # refused at first, then kept
    assert result.evictions == 4  # the hot set made room for it
    assert result.hits == 36 + 29 - result.refused  # the hot set's hits, then its own


def test_online_policies_are_the_registered_ones_not_told_the_future():
    for name in available_policies():
        assert (name in online_policies()) == (not policy_class(name).offline)
    assert {"lru", "fifo", "lfu", "gdsf", "cost"} <= set(online_policies())


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
