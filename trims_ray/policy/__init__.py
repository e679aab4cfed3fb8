"""Eviction policies: pure Python, no Ray, weighted by bytes and told each entry's miss cost.

Each node cache tier asks its policy which keys to evict; the policy is chosen by name in config
through the registry below, which imports a policy's module only when it is first asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

from trims_ray.policy.base import EvictionPolicy, choose_victims

__all__ = ["POLICIES", "EvictionPolicy", "available_policies", "choose_victims", "make_policy"]

# name -> "module:Class". Adding a policy is one line here (plus its module and its
# `class TestX(PolicyContract)` in tests/unit/test_policy_contract.py).
POLICIES: dict[str, str] = {
    "lru": "trims_ray.policy.lru:LRU",
}


def available_policies() -> list[str]:
    """Returns the registered policy names, sorted."""
    return sorted(POLICIES)


def make_policy(name: str, **kwargs: Any) -> EvictionPolicy:
    """Builds the policy registered under name.

    Args:
        name: A key of POLICIES, e.g. "lru".
        **kwargs: Passed to the policy's constructor (e.g. clock=...).

    Returns:
        A new, empty policy.

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
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**kwargs)
