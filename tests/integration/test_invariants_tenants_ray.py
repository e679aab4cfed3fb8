"""The caller's tenant travels with its tasks on a real Ray (issue "Invariants under every
interleaving", item 20).

The module's Ray is started (``ray_node``) BEFORE ``trims_ray.init(tenant="alice")``, so the job's
runtime_env does not carry ``$TRIMS_RAY_TENANT``: the workers must still act as "alice", never as
"default", whose private model "secret" they must not see (ModelNotFoundError, as for a name that
does not exist), in ``trims_ray.open`` inside a decorated task, in a nested invocation, and in a
plain Ray task of the same job.
"""

from __future__ import annotations

import pytest
import ray
import torch

import trims_ray
from trims_ray import ModelStore

from .conftest import HOST_BUDGET

pytestmark = pytest.mark.timeout(180)


def w(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((64,), value)}


@pytest.fixture
def alice(ray_node, tmp_path):
    """A store where "default" has a private "secret" and "alice" her own "own"; this driver
    acts as alice, given to init only (Ray was initialized first)."""
    store = ModelStore(str(tmp_path / "store"))
    store.register("secret", w(7.0), tenant="default")
    store.register("own", w(1.0), tenant="alice")
    config = trims_ray.CacheConfig(
        host_bytes=HOST_BUDGET, disk_dir=str(tmp_path / "disk"), lease_check_s=0.2, caller_timeout_s=3.0
    )
    trims_ray.init(store=str(tmp_path / "store"), tenant="alice", config=config)
    try:
        yield store
    finally:
        trims_ray.shutdown()


def try_open(name: str) -> str:
    """What opening ``name`` here gives: the sum of its weights, or the error's class name."""
    try:
        with trims_ray.open(name) as model:
            return f"served {float(model['w'].sum())}"
    except trims_ray.TrimsError as exc:
        return type(exc).__name__


@trims_ray.function(model="secret", num_cpus=0)
def peek(model) -> str:
    return f"served {float(model['w'].sum())}"


@trims_ray.function(model="own", num_cpus=0)
def inside_decorated(model) -> dict[str, str]:
    from trims_ray import _api

    out = {"tenant": _api.caller_tenant(), "open": try_open("secret"), "own": try_open("own")}
    try:
        out["nested"] = ray.get(peek.remote())
    except trims_ray.TrimsError as exc:
        out["nested"] = type(exc).__name__
    return out


@ray.remote(num_cpus=0)
def inside_plain() -> dict[str, str]:
    from trims_ray import _api

    return {"tenant": _api.caller_tenant(), "open": try_open("secret")}


def test_a_decorated_task_and_its_nested_calls_act_as_the_submitters_tenant(alice):
    got = ray.get(inside_decorated.remote(), timeout=120)
    assert got == {
        "tenant": "alice",
        "open": "ModelNotFoundError",
        "own": "served 64.0",
        "nested": "ModelNotFoundError",
    }


def test_a_plain_task_of_the_job_acts_as_the_tenant_given_to_init(alice):
    got = ray.get(inside_plain.remote(), timeout=120)
    assert got == {"tenant": "alice", "open": "ModelNotFoundError"}


def test_the_driver_still_sees_its_own_tenant_only(alice):
    assert try_open("secret") == "ModelNotFoundError"
    with pytest.raises(trims_ray.ModelNotFoundError):
        peek.remote()


@ray.remote(num_cpus=0)
class _OwnTenantServer:
    """An actor a platform gave its own tenant in its runtime_env (as the soak's servers are)."""

    def open_secret(self) -> dict[str, str]:
        from trims_ray import _api

        return {"tenant": _api.caller_tenant(), "open": try_open("secret")}


def test_an_actor_given_its_own_tenant_in_its_runtime_env_keeps_it(alice):
    # The job's tenant ("alice", from the driver's init) is for workers that name none: an
    # actor started with TRIMS_RAY_TENANT="default" acts as "default" and so sees its model.
    server = _OwnTenantServer.options(runtime_env={"env_vars": {"TRIMS_RAY_TENANT": "default"}}).remote()
    try:
        assert ray.get(server.open_secret.remote(), timeout=120) == {"tenant": "default", "open": "served 448.0"}
    finally:
        ray.kill(server)
