"""CacheConfig: every field validated at construction, the environment read in one place, and
only policies a node cache can run (not the offline Belady) accepted."""

from __future__ import annotations

import pytest

from trims_ray import CacheConfig
from trims_ray.policy import available_policies, online_policies


def test_defaults_are_valid_and_frozen():
    config = CacheConfig()
    assert config.policy == "gdsf" and config.peer_fetch is True and config.host_bytes is None
    assert config.gpu_tier_config().policy == "gdsf"
    with pytest.raises(AttributeError):
        config.policy = "lru"  # type: ignore[misc]


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("host_bytes", -1, ValueError),
        ("host_bytes", 1.5, ValueError),
        ("host_fraction", 0.0, ValueError),
        ("host_fraction", 1.5, ValueError),
        ("disk_bytes", -5, ValueError),
        ("disk_dir", 3, TypeError),
        ("policy", 3, TypeError),
        ("policy", "nope", ValueError),
        ("manifest_ttl_s", -1.0, ValueError),
        ("lease_check_s", 0.0, ValueError),
        ("peer_fetch", "yes", TypeError),
        ("report_s", 0.0, ValueError),
        ("report_s", 61.0, ValueError),
        ("caller_timeout_s", 2.0, ValueError),
    ],
)
def test_nonsense_is_refused_at_construction(field, value, error):
    with pytest.raises(error, match=field.split("_")[0]):
        CacheConfig(**{field: value})


def test_every_online_policy_is_accepted_and_belady_is_not():
    assert set(online_policies()) == set(available_policies()) - {"belady"}
    for name in online_policies():
        assert CacheConfig(policy=name).policy == name
    with pytest.raises(ValueError, match="offline"):
        CacheConfig(policy="belady")


def test_environment_then_overrides(monkeypatch):
    monkeypatch.setenv("TRIMS_RAY_HOST_BYTES", "1048576")
    monkeypatch.setenv("TRIMS_RAY_POLICY", "gdsf")
    config = CacheConfig.from_env(disk_bytes=4096)
    assert (config.host_bytes, config.policy, config.disk_bytes) == (1048576, "gdsf", 4096)
    assert CacheConfig.from_env(policy="lru").policy == "lru"
    monkeypatch.setenv("TRIMS_RAY_HOST_BYTES", "lots")
    with pytest.raises(ValueError, match="TRIMS_RAY_HOST_BYTES"):
        CacheConfig.from_env()
