"""Tenants and integrity under every interleaving (the issue of that name), without Ray:

- 21: a public model has an owner; only its owner (or an operator) may replace it.
- 23: a failed registration never deletes a blob that another registration relies on.
- 24: a manifest's tensor index is checked against its verified blob on every read: swapped or
  renamed tensor names are an error, never weights served under another name.
- 22: the GPU holder builds a layer plan without running a tenant's factory code.
- 20 (the part without Ray): ``acting_as`` is the tenant a decorated task runs as.

Real stores (local files, memory), KB-sized models, no mocks of the store.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
from torch import nn

import trims_ray
from trims_ray import AccessDeniedError, IntegrityError, ModelFormatError, ModelStore
from trims_ray import _api
from trims_ray import _store as store_module
from trims_ray._gpu_ipc import DeviceIdentity, materialize_views, module_order, plan_layers
from trims_ray._manifest import Manifest
from trims_ray._protocol import Holder
from trims_ray.cache.gpu_testing import ArraySource, FakeDevice
from trims_ray.cache.gpu_tier import GpuTier, GpuTierConfig

pytestmark = pytest.mark.timeout(120)


def w(value: float, n: int = 32) -> dict[str, torch.Tensor]:
    return {"w": torch.full((n,), value)}


def store_files(store: ModelStore) -> dict[str, bytes]:
    return {p: store.fs.cat_file(p) for p in store.fs.find(store.root)}


# -- 21: owners of public models --------------------------------------------------------------


def test_another_tenant_cannot_replace_a_public_model(file_store, monkeypatch):
    monkeypatch.setenv("TRIMS_RAY_STORE", file_store.uri)
    monkeypatch.setenv("TRIMS_RAY_TENANT", "alice")
    info = trims_ray.register("shared", w(1.0), tenant="public")
    assert file_store.manifest("shared", tenant="public").owner == "alice"
    before = store_files(file_store)

    monkeypatch.setenv("TRIMS_RAY_TENANT", "bob")
    with pytest.raises(AccessDeniedError, match="shared"):
        trims_ray.register("shared", w(666.0), tenant="public")
    # The CLI's push (and any direct use of the store) publishes as the environment's tenant.
    with pytest.raises(AccessDeniedError, match="shared"):
        file_store.register("shared", w(666.0), tenant="public")
    assert store_files(file_store) == before  # nothing written, not even bob's blob
    assert file_store.manifest("shared", tenant="bob").sha256 == info.sha256
    assert torch.equal(file_store.load("shared", tenant="bob")["w"], w(1.0)["w"])

    # Bob can still publish his own names, and register a private model of that name (his
    # own tenant's name shadows the public one for him only).
    trims_ray.register("bobs", w(2.0), tenant="public")
    trims_ray.register("shared", w(3.0))
    assert torch.equal(file_store.load("shared", tenant="bob")["w"], w(3.0)["w"])
    assert torch.equal(file_store.load("shared", tenant="carol")["w"], w(1.0)["w"])


def test_the_owner_replaces_its_public_model_and_an_operator_may_replace_any(file_store, monkeypatch):
    monkeypatch.setenv("TRIMS_RAY_STORE", file_store.uri)
    monkeypatch.setenv("TRIMS_RAY_TENANT", "alice")
    trims_ray.register("shared", w(1.0), tenant="public")
    trims_ray.register("shared", w(2.0), tenant="public")  # the owner: allowed
    assert torch.equal(file_store.load("shared", tenant="x")["w"], w(2.0)["w"])
    monkeypatch.setenv("TRIMS_RAY_TENANT", "bob")
    # An operator: a store-level call that says so. The owner stays, unless it is given.
    file_store.register("shared", w(4.0), tenant="public", operator=True)
    m = file_store.manifest("shared", tenant="x")
    assert m.owner == "alice" and torch.equal(file_store.load("shared", tenant="x")["w"], w(4.0)["w"])
    file_store.register("shared", w(5.0), tenant="public", operator=True, owner="carol")
    assert file_store.manifest("shared", tenant="x").owner == "carol"
    with pytest.raises(AccessDeniedError):
        file_store.register("shared", w(6.0), tenant="public", owner="alice")


def test_a_public_model_without_a_recorded_owner_is_replaced_only_by_an_operator(file_store):
    # As a store written before owners were recorded holds it: the manifest without "owner".
    file_store.register("old", w(1.0), tenant="public", owner="alice")
    path = file_store.manifest_path("public", "old")
    doc = json.loads(file_store.fs.cat_file(path))
    del doc["owner"]
    file_store.fs.pipe_file(path, json.dumps(doc, indent=1, sort_keys=True).encode())
    assert file_store.manifest("old", tenant="public").owner is None
    with pytest.raises(AccessDeniedError, match="operator"):
        file_store.register("old", w(2.0), tenant="public", owner="alice")
    file_store.register("old", w(2.0), tenant="public", operator=True, owner="alice")
    assert file_store.manifest("old", tenant="public").owner == "alice"


def test_an_owner_field_where_it_does_not_belong_is_a_format_error(file_store):
    file_store.register("mine", w(1.0), tenant="alice")
    path = file_store.manifest_path("alice", "mine")
    doc = json.loads(file_store.fs.cat_file(path))
    assert "owner" not in doc  # a private model's owner is its tenant
    for bad in ({**doc, "owner": "bob"}, {**doc, "ownes": "alice"}):
        file_store.fs.pipe_file(path, json.dumps(bad).encode())
        with pytest.raises(ModelFormatError):
            file_store.manifest("mine", tenant="alice")


def test_a_refused_public_registration_is_counted_as_denied(file_store, monkeypatch, caplog):
    monkeypatch.setenv("TRIMS_RAY_STORE", file_store.uri)
    monkeypatch.setenv("TRIMS_RAY_TENANT", "alice")
    trims_ray.register("shared", w(1.0), tenant="public")
    monkeypatch.setenv("TRIMS_RAY_TENANT", "bob")
    with caplog.at_level("INFO", logger="trims_ray"), pytest.raises(AccessDeniedError):
        trims_ray.register("shared", w(2.0), tenant="public")
    assert "refused (denied) for tenant bob" in caplog.text


# -- 23: a failed registration and a blob another tenant relies on ----------------------------


def fail_own_manifest_after(store: ModelStore, monkeypatch, name: str, meanwhile) -> None:
    """Makes the manifest write of ``name`` fail, after running ``meanwhile()`` (another
    tenant's registration interleaved between this one's blob write and its manifest write)."""
    real = store_module.write_atomically

    def write(fs, path, chunks):
        if path == store.manifest_path("alice", name):
            meanwhile()
            raise OSError("manifest write failed")
        return real(fs, path, chunks)

    monkeypatch.setattr(store_module, "write_atomically", write)


@pytest.mark.parametrize("kind", ["file", "memory", "s3"])
def test_a_failed_registration_keeps_a_blob_another_tenant_registered_meanwhile(kind, tmp_path, request, monkeypatch):
    from ..conftest import make_store

    store = make_store(kind, tmp_path, request)
    fail_own_manifest_after(store, monkeypatch, "a", lambda: store.register("b", w(9.0), tenant="bob"))
    with pytest.raises(OSError, match="manifest write failed"):
        store.register("a", w(9.0), tenant="alice")  # the very same bytes as bob's
    monkeypatch.undo()
    assert torch.equal(store.load("b", tenant="bob")["w"], w(9.0)["w"])


def test_a_failed_registration_that_deletes_restores_a_blob_referenced_meanwhile(file_store, monkeypatch):
    """The other order: the failed registration found no reference and deletes; bob's
    registration of the same bytes completes between that look and the deletion."""
    real_rm = file_store.fs.rm
    done = []

    def rm(path, *args, **kwargs):
        if path.endswith(".safetensors") and not done:
            done.append(True)
            file_store.register("b", w(9.0), tenant="bob")  # completes just before the delete
        return real_rm(path, *args, **kwargs)

    fail_own_manifest_after(file_store, monkeypatch, "a", lambda: None)
    monkeypatch.setattr(file_store.fs, "rm", rm)
    with pytest.raises(OSError, match="manifest write failed"):
        file_store.register("a", w(9.0), tenant="alice")
    monkeypatch.undo()
    assert done
    assert torch.equal(file_store.load("b", tenant="bob")["w"], w(9.0)["w"])


def test_a_failed_registration_alone_still_leaves_the_store_as_it_was(file_store, monkeypatch):
    file_store.register("keep", w(1.0), tenant="bob")
    before = store_files(file_store)
    fail_own_manifest_after(file_store, monkeypatch, "a", lambda: None)
    with pytest.raises(OSError):
        file_store.register("a", w(2.0), tenant="alice")
    assert store_files(file_store) == before


def test_concurrent_registrations_of_one_blob_with_failures_never_lose_it(file_store, monkeypatch):
    """Threads register the same bytes; every other manifest write fails. Every registration
    that succeeded must load."""
    real = store_module.write_atomically
    counter = {"n": 0}
    lock = threading.Lock()

    def write(fs, path, chunks):
        if path.endswith(".json"):
            with lock:
                counter["n"] += 1
                fail = counter["n"] % 2 == 0
            if fail:
                raise OSError("manifest write failed")
        return real(fs, path, chunks)

    monkeypatch.setattr(store_module, "write_atomically", write)
    ok: list[str] = []

    def run(i: int) -> None:
        try:
            file_store.register(f"m{i}", w(5.0, 4096), tenant=f"t{i}")
            ok.append(f"t{i}")
        except OSError:
            pass

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    assert ok
    for tenant in ok:
        assert torch.equal(file_store.load(f"m{tenant[1:]}", tenant=tenant)["w"], w(5.0, 4096)["w"])


# -- 24: the tensor index against the verified blob ---------------------------------------------


def two_same_shaped() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {"a": torch.randn(4, 4, generator=gen), "b": torch.randn(4, 4, generator=gen)}


def swap_names(raw: bytes) -> bytes:
    doc = json.loads(raw)
    doc["tensors"]["a"], doc["tensors"]["b"] = doc["tensors"]["b"], doc["tensors"]["a"]
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def test_swapped_tensor_names_in_a_stored_manifest_are_never_served(store):
    store.register("m", two_same_shaped(), tenant="t")
    path = store.manifest_path("t", "m")
    raw = store.fs.cat_file(path)
    store.fs.pipe_file(path, swap_names(raw))
    swapped = store.manifest("m", tenant="t")  # a valid document on its own
    assert {t.name: t.start for t in swapped.tensors} != {
        t.name: t.start for t in Manifest.from_json(raw, source="<raw>").tensors
    }
    with pytest.raises(IntegrityError, match="tensor index"):
        store.load("m", tenant="t")
    buffer, _ = store.read(swapped)  # the blob itself is fine: it verifies
    with pytest.raises(IntegrityError, match="tensor index"):
        store_module.materialize(swapped, buffer)
    # The GPU tier's views (here of a CPU buffer) check the same.
    with pytest.raises(IntegrityError, match="tensor index"):
        materialize_views(swapped, torch.from_numpy(buffer.copy()))
    store.fs.pipe_file(path, raw)
    got = store.load("m", tenant="t")
    assert all(torch.equal(got[k], v) for k, v in two_same_shaped().items())


def test_a_manifest_whose_data_start_or_dtype_disagrees_with_the_blob_is_refused(file_store):
    file_store.register("m", {"x": torch.arange(16, dtype=torch.int32)}, tenant="t")
    manifest = file_store.manifest("m", tenant="t")
    buffer, _ = file_store.read(manifest)
    raw = file_store.fs.cat_file(file_store.manifest_path("t", "m"))
    doc = json.loads(raw)
    doc["tensors"]["x"]["dtype"] = "F32"  # same size, other dtype: the bits would be misread
    bad = Manifest.from_json(json.dumps(doc).encode(), source="<bad>")
    with pytest.raises(IntegrityError, match="tensor index"):
        store_module.materialize(bad, buffer)


# -- 22: no tenant code in the GPU holder ------------------------------------------------------

FACTORY_CALLS: list[str] = []


class Layered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        FACTORY_CALLS.append("built")  # tenant code: must never run in the shared holder
        self.zeta = nn.Linear(4, 4)  # state_dict order: zeta first, then alpha
        self.alpha = nn.Linear(4, 2)

    def forward(self, x):
        return self.alpha(self.zeta(x))


def layered() -> Layered:
    return Layered()


def test_the_gpu_holder_plans_layers_without_running_the_factory(file_store):
    torch.manual_seed(0)
    module = layered()
    file_store.register("lay", module, tenant="t", factory="tests.unit.test_invariants_tenants:layered")
    manifest = file_store.manifest("lay", tenant="t")
    FACTORY_CALLS.clear()
    order = module_order(manifest)
    assert order == list(module.state_dict())  # the module's order, from the manifest alone
    source = ArraySource()
    source.blobs[manifest.sha256], _ = file_store.read(manifest)
    tier = GpuTier(
        device=FakeDevice(8 << 20),
        identity=DeviceIdentity("GPU-8932f937-d72c-4106-c12f-20bd9faed9f6", 0, "0", "node-a"),
        host=source,
        config=GpuTierConfig(budget_bytes=1 << 20, min_layer_bytes=0),
    )
    grant = tier.acquire(manifest, Holder.this_process())
    tier.release(grant.lease_id)
    assert FACTORY_CALLS == []  # the holder's swap-in planned its layers: no tenant code ran
    groups = plan_layers(manifest, order, min_bytes=0)
    assert [m for g in groups for m in g.modules] == ["zeta", "alpha"]  # not the names' order


def test_a_pickled_factory_is_not_unpickled_by_the_holder(file_store):
    torch.manual_seed(0)
    module = layered()
    file_store.register("lay", module, tenant="t", factory=layered)  # a pickled callable
    manifest = file_store.manifest("lay", tenant="t")
    FACTORY_CALLS.clear()
    assert module_order(manifest) == list(module.state_dict())
    assert FACTORY_CALLS == []


# -- 20: the tenant a task runs as --------------------------------------------------------------


def test_acting_as_sets_the_callers_tenant_for_the_block_only(monkeypatch):
    monkeypatch.setenv("TRIMS_RAY_TENANT", "default")
    assert _api.caller_tenant() == "default"
    with _api.acting_as("alice"):
        assert _api.caller_tenant() == "alice"
        assert _api.acting_tenant(None, "open models") == "alice"
        with pytest.raises(AccessDeniedError):
            _api.acting_tenant("default", "open models")
    assert _api.caller_tenant() == "default"
    with pytest.raises(ValueError):
        with _api.acting_as("../x"):
            pass
