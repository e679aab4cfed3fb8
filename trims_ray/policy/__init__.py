"""Eviction policies: pure Python, no Ray, weighted by bytes and told each entry's miss cost.

Each node cache tier asks its policy which keys to evict and whether a miss is worth keeping,
through the one admission sequence (``decide_admission``, in admission.py); the policy is
chosen by name in config through the registry below, which imports a policy's module only when
it is first asked for. "belady" is offline (simulation only).
"""

from __future__ import annotations

import importlib
from typing import Any

from trims_ray.policy.admission import Admission, Outcome, Quota, decide_admission
from trims_ray.policy.base import EvictionPolicy, choose_victims, shrink_victims

__all__ = [
    "POLICIES",
    "Admission",
    "EvictionPolicy",
    "Outcome",
    "Quota",
    "available_policies",
    "choose_victims",
    "decide_admission",
    "make_policy",
    "online_policies",
    "policy_class",
    "shrink_victims",
]

# name -> "module:Class". Adding a policy is one line here (plus its module and its
# `class TestX(PolicyContract)` in tests/unit/test_policy_contract.py).
POLICIES: dict[str, str] = {
    "lru": "trims_ray.policy.lru:LRU",
    "fifo": "trims_ray.policy.fifo:FIFO",
    "lfu": "trims_ray.policy.lfu:LFU",
    "gdsf": "trims_ray.policy.gdsf:GDSF",
    "cost": "trims_ray.policy.cost:CostAware",
    "belady": "trims_ray.policy.belady:Belady",
}


def available_policies() -> list[str]:
    """Returns the registered policy names, sorted (offline ones included)."""
    return sorted(POLICIES)


def online_policies() -> list[str]:
    """Returns the names of the policies a node cache can use (not told the future), sorted."""
    return [name for name in available_policies() if not policy_class(name).offline]


def policy_class(name: str) -> type[EvictionPolicy]:
    """Returns the class registered under name, importing its module.

    Raises:
        TypeError: If name is not a str.
        ValueError: If no policy is registered under name.
    """
    if not isinstance(name, str):
        raise TypeError(f"policy name must be a str, got {type(name).__name__} {name!r}")
    try:
        target = POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; choose one of: {', '.join(available_policies())}"
        ) from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_policy(name: str, **kwargs: Any) -> EvictionPolicy:
    """Builds the policy registered under name.

    Args:
        name: A key of POLICIES, e.g. "lru".
        **kwargs: Passed to the policy's constructor (e.g. clock=...).

    Returns:
        A new, empty policy.

    Raises:
        TypeError: If name is not a str, or the policy rejects kwargs (Belady without its
            next_use oracle).
        ValueError: If no policy is registered under name.
    """
    return policy_class(name)(**kwargs)
