"""The model store on every backend (local disk, memory, S3 on a moto server): register in every
accepted form, bit-exact round trips, factories, tenants, integrity, and that failures leave the
store exactly as it was.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import trims_ray
from trims_ray import (
    AccessDeniedError,
    IntegrityError,
    ModelFormatError,
    ModelNotFoundError,
    ModelStore,
)
from trims_ray import _store as store_module

from ..conftest import s3_options


class TinyNet(nn.Module):
    """A small model with parameters and a persistent buffer (BatchNorm's running stats)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def tiny_net() -> nn.Module:
    return TinyNet()


class TiedLM(nn.Module):
    """An embedding and an output head that share one weight, as GPT-2 and BERT do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.embed(ids))


def trained(module: nn.Module, seed: int = 0) -> nn.Module:
    """``module`` with seeded non-default weights and buffers, in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.parameters():
            t.copy_(torch.randn(t.shape, generator=gen))
        for t in module.buffers():  # running stats: a variance must stay positive
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
    return module.eval()


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes, so that comparisons are bit-exact (NaN payloads, -0.0)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def store_files(store: ModelStore) -> dict[str, bytes]:
    """Every file under the store root with its contents: a snapshot to compare against."""
    store.fs.invalidate_cache()
    if not store.fs.exists(store.root):
        return {}
    return {p: store.fs.cat_file(p) for p in store.fs.find(store.root)}


def mixed_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1000, generator=gen)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-45])
    return {
        "f32": torch.cat([base[:94], specials]).reshape(10, 10),
        "f16": base[:7].to(torch.float16),  # odd byte count: later tensors must stay aligned
        "bf16": base[:33].to(torch.bfloat16).reshape(3, 11),
        "i8": torch.randint(-128, 128, (5, 3), generator=gen, dtype=torch.int8),
        "f64": base[:3].to(torch.float64),
        "i64": torch.arange(5, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "mask": torch.tensor([True, False, True]),
    }


# -- round trips ------------------------------------------------------------------------------


def test_state_dict_round_trips_bit_exact_with_aligned_zero_copy_views(store):
    sd = mixed_state_dict()
    info = store.register("mixed", sd, tenant="default")
    manifest = store.manifest("mixed", tenant="default")
    buffer, stats = store.read(manifest)
    assert stats.nbytes == info.nbytes == len(buffer)
    loaded = store_module.materialize(manifest, buffer)
    assert loaded.keys() == sd.keys()
    lo, hi = buffer.ctypes.data, buffer.ctypes.data + len(buffer)
    for name, tensor in sd.items():
        got = loaded[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(bits(got), bits(tensor)), name
        if got.numel():
            # A view into the read buffer, at an address aligned for its dtype: no copy was made.
            assert lo <= got.data_ptr() < hi, name
            assert got.data_ptr() % got.element_size() == 0, name


def test_model_info_and_manifest_describe_the_blob(store):
    sd = mixed_state_dict()
    info = store.register("mixed", sd, tenant="default")
    blob = store.fs.cat_file(store.blob_path(info.sha256))
    import hashlib

    assert info.sha256 == hashlib.sha256(blob).hexdigest()
    assert info.nbytes == len(blob)
    assert (info.name, info.tenant, info.factory) == ("mixed", "default", None)
    assert info.num_tensors == len(sd)
    assert info.num_elements == sum(t.numel() for t in sd.values())
    doc = json.loads(store.fs.cat_file(store.manifest_path("default", "mixed")))
    assert doc["format_version"] == 1 and doc["sha256"] == info.sha256
    assert doc["tensors"]["f16"]["dtype"] == "F16" and doc["tensors"]["bf16"]["shape"] == [3, 11]
    # The blob is itself a valid safetensors file that the reference library reads.
    reference = safetensors.torch.load(blob)
    assert all(torch.equal(bits(reference[k]), bits(sd[k])) for k in sd)


def test_module_with_factory_loads_as_a_working_module(store):
    model = trained(TinyNet())
    info = store.register("tiny", model, tenant="default", factory=tiny_net)
    assert info.factory == f"{__name__}:tiny_net"
    loaded = store.load("tiny", tenant="default")
    assert isinstance(loaded, TinyNet) and not loaded.training
    x = torch.randn(3, 16)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))


def test_factory_given_as_import_string(file_store):
    file_store.register("tiny", trained(TinyNet()), tenant="default", factory=f"{__name__}:TinyNet")
    assert isinstance(file_store.load("tiny", tenant="default"), TinyNet)


def test_factory_that_cannot_be_imported_is_pickled_by_value(file_store):
    width = 6

    def local_factory():  # a closure: no "module:attr" can name it on a worker
        return nn.Linear(width, 2)

    model = trained(nn.Linear(6, 2))
    info = file_store.register("closure", model, tenant="default", factory=local_factory)
    assert info.factory == "<pickled callable>"
    loaded = file_store.load("closure", tenant="default")
    assert isinstance(loaded, nn.Linear) and torch.equal(loaded.weight, model.weight)


def test_tied_weights_are_stored_once_and_stay_tied(store):
    model = trained(TiedLM())
    info = store.register("tied", model, tenant="default", factory=f"{__name__}:TiedLM")
    assert info.num_tensors == 1  # embed.weight and head.weight are one tensor
    manifest = store.manifest("tied", tenant="default")
    assert manifest.aliases == {"head.weight": "embed.weight"}
    loaded = store.load("tied", tenant="default")
    assert loaded.head.weight.data_ptr() == loaded.embed.weight.data_ptr()
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        assert torch.equal(loaded(ids), model(ids))


def test_same_weights_from_module_file_and_shards_share_one_blob(store, tmp_path):
    sd = trained(TinyNet()).state_dict()
    file = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(sd, str(file))
    shards = tmp_path / "shards"
    shards.mkdir()
    names = sorted(sd)
    safetensors.torch.save_file({k: sd[k] for k in names[:3]}, str(shards / "model-00001-of-00002.safetensors"))
    safetensors.torch.save_file({k: sd[k] for k in names[3:]}, str(shards / "model-00002-of-00002.safetensors"))

    module = TinyNet()
    module.load_state_dict(sd)
    from_module = store.register("a", module, tenant="default")
    from_path = store.register("b", str(file), tenant="default")
    from_uri = store.register("c", file.as_uri(), tenant="default")
    from_shards = store.register("d", shards, tenant="default")
    assert from_module.sha256 == from_path.sha256 == from_uri.sha256 == from_shards.sha256
    assert len([p for p in store_files(store) if "/blobs/" in p]) == 1
    loaded = store.load("d", tenant="default")
    assert all(torch.equal(bits(loaded[k]), bits(sd[k])) for k in sd)


def test_register_reads_weights_from_an_s3_uri(s3_endpoint, s3_bucket, file_store, tmp_path):
    sd = mixed_state_dict(seed=3)
    import s3fs

    options = s3_options(s3_endpoint)
    fs = s3fs.S3FileSystem(key=options["key"], secret=options["secret"], client_kwargs={"endpoint_url": s3_endpoint})
    fs.pipe_file(f"{s3_bucket}/in/w.safetensors", safetensors.torch.save(sd))
    info = file_store.register(
        "from-s3", f"s3://{s3_bucket}/in/w.safetensors", tenant="default", storage_options=options
    )
    loaded = file_store.load("from-s3", tenant="default")
    assert info.num_tensors == len(sd) and all(torch.equal(bits(loaded[k]), bits(sd[k])) for k in sd)


def test_hugging_face_shard_index_is_honoured_and_checked(file_store, tmp_path):
    sd = trained(TinyNet()).state_dict()
    names = sorted(sd)
    shards = tmp_path / "hf"
    shards.mkdir()
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    safetensors.torch.save_file({k: sd[k] for k in names[:2]}, str(shards / first))
    safetensors.torch.save_file({k: sd[k] for k in names[2:]}, str(shards / second))
    weight_map = {k: first for k in names[:2]} | {k: second for k in names[2:]}
    index = shards / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # A stray file the index does not list is ignored.
    safetensors.torch.save_file({"stray": torch.zeros(2)}, str(shards / "optimizer.safetensors"))
    assert file_store.register("hf", shards, tenant="default").num_tensors == len(sd)

    for broken, fault in [
        ({**weight_map, names[0]: second}, "another shard"),
        ({**weight_map, "ghost": first}, "missing"),
        ({**weight_map, names[0]: "../escape.safetensors"}, "plain file name"),
        ({**weight_map, names[0]: "model-00003-of-00002.safetensors"}, "missing"),
    ]:
        index.write_text(json.dumps({"weight_map": broken}))
        with pytest.raises(ModelFormatError, match=fault):
            file_store.register("hf-broken", shards, tenant="default")
    index.write_text("{not json")
    with pytest.raises(ModelFormatError, match="index"):
        file_store.register("hf-broken", shards, tenant="default")


def test_duplicate_tensor_across_shards_is_rejected(file_store, tmp_path):
    shards = tmp_path / "dups"
    shards.mkdir()
    safetensors.torch.save_file({"w": torch.ones(2)}, str(shards / "a.safetensors"))
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(shards / "b.safetensors"))
    with pytest.raises(ModelFormatError, match="appears in both"):
        file_store.register("dups", shards, tenant="default")


def test_reregistering_a_name_replaces_the_model(store):
    first = store.register("m", {"w": torch.zeros(3)}, tenant="default")
    second = store.register("m", {"w": torch.ones(3)}, tenant="default")
    assert first.sha256 != second.sha256
    assert store.manifest("m", tenant="default").sha256 == second.sha256
    assert torch.equal(store.load("m", tenant="default")["w"], torch.ones(3))


def test_list_models_shows_own_and_public_only(store):
    store.register("mine", {"w": torch.zeros(1)}, tenant="alice")
    store.register("shared", {"w": torch.ones(1)}, tenant="public")
    store.register("theirs", {"w": torch.full((1,), 2.0)}, tenant="bob")
    seen = [(i.tenant, i.name) for i in store.list_models(tenant="alice")]
    assert seen == [("alice", "mine"), ("public", "shared")]


# -- bad input: clear errors, nothing lost ------------------------------------------------------


def test_unknown_model_is_model_not_found_and_a_key_error(store):
    with pytest.raises(ModelNotFoundError, match="'nope'") as exc:
        store.manifest("nope", tenant="default")
    assert isinstance(exc.value, KeyError)
    assert "register it first" in str(exc.value)


def test_another_tenants_model_is_indistinguishable_from_a_missing_one(store):
    store.register("secret", {"w": torch.zeros(1)}, tenant="bob")
    with pytest.raises(ModelNotFoundError) as hidden:
        store.manifest("secret", tenant="alice")
    with pytest.raises(ModelNotFoundError) as missing:
        store.manifest("nothing", tenant="alice")
    assert str(hidden.value).replace("secret", "X") == str(missing.value).replace("nothing", "X")


def test_own_model_shadows_a_public_one_of_the_same_name(store):
    store.register("m", {"w": torch.zeros(1)}, tenant="public")
    store.register("m", {"w": torch.ones(1)}, tenant="alice")
    assert store.manifest("m", tenant="alice").tenant == "alice"
    assert store.manifest("m", tenant="bob").tenant == "public"


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "a\\b", "", "x" * 129, "a\x00b"])
def test_names_that_could_escape_the_root_are_rejected(store, name):
    with pytest.raises(ValueError, match="invalid model name"):
        store.register(name, {"w": torch.zeros(1)}, tenant="default")
    with pytest.raises(ValueError):
        store.manifest(name, tenant="default")
    assert store_files(store) == {}


@pytest.mark.parametrize("tenant", ["../t", "a/b", "Upper", "", ".t"])
def test_tenants_that_could_escape_the_root_are_rejected(store, tenant):
    with pytest.raises(ValueError, match="invalid tenant"):
        store.register("m", {"w": torch.zeros(1)}, tenant=tenant)
    assert store_files(store) == {}


@pytest.mark.parametrize(
    "weights, error",
    [
        (42, TypeError),
        ({"w": [1.0, 2.0]}, TypeError),
        ({"w": torch.empty(3, device="meta")}, ValueError),
        ({}, ModelFormatError),
        ({"w": torch.zeros(2, dtype=torch.complex64)}, TypeError),
        ({"__metadata__": torch.zeros(2)}, ValueError),
    ],
)
def test_unusable_weights_raise_clear_errors_and_write_nothing(file_store, weights, error):
    with pytest.raises(error):
        file_store.register("bad", weights, tenant="default")
    assert store_files(file_store) == {}


def test_malformed_and_truncated_files_name_the_file_and_write_nothing(store, tmp_path):
    good = safetensors.torch.save({"w": torch.arange(100, dtype=torch.float32)})
    store.register("existing", {"x": torch.ones(2)}, tenant="default")
    before = store_files(store)
    for label, data, fault in [
        ("truncated", good[:-10], "truncated"),
        ("garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!", "JSON"),
        ("tiny", b"\x01\x02", "shorter"),
    ]:
        path = tmp_path / f"{label}.safetensors"
        path.write_bytes(data)
        with pytest.raises(ModelFormatError, match=fault) as exc:
            store.register("broken", path, tenant="default")
        assert f"{label}.safetensors" in str(exc.value)
    assert store_files(store) == before


def test_missing_weights_path_is_file_not_found(file_store, tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights"):
        file_store.register("m", tmp_path / "absent.safetensors", tenant="default")


def test_factory_that_does_not_fit_the_weights_is_rejected_before_writing(file_store):
    with pytest.raises(ModelFormatError, match="do not fit") as exc:
        file_store.register("m", {"fc1.weight": torch.zeros(32, 16)}, tenant="default", factory=tiny_net)
    assert "missing" in str(exc.value)
    wrong = TinyNet().state_dict() | {"fc2.weight": torch.zeros(5, 32)}
    with pytest.raises(ModelFormatError, match="1 with wrong shapes"):
        file_store.register("m", wrong, tenant="default", factory=tiny_net)
    assert store_files(file_store) == {}


@pytest.mark.parametrize(
    "factory, error", [("not a ref", ValueError), ("no_such_module_xyz:f", ValueError), (3, TypeError)]
)
def test_bad_factories_are_rejected(file_store, factory, error):
    with pytest.raises(error):
        file_store.register("m", {"w": torch.zeros(1)}, tenant="default", factory=factory)
    assert store_files(file_store) == {}


# -- integrity --------------------------------------------------------------------------------


def test_corrupted_blob_raises_integrity_error(store):
    info = store.register("m", mixed_state_dict(), tenant="default")
    manifest = store.manifest("m", tenant="default")
    blob = bytearray(store.fs.cat_file(store.blob_path(info.sha256)))
    blob[len(blob) // 2] ^= 0x01
    store.fs.pipe_file(store.blob_path(info.sha256), bytes(blob))
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        store.read(manifest)
    with pytest.raises(IntegrityError):
        store.load("m", tenant="default")


def test_truncated_or_missing_blob_raises_integrity_error(store):
    info = store.register("m", mixed_state_dict(), tenant="default")
    manifest = store.manifest("m", tenant="default")
    path = store.blob_path(info.sha256)
    store.fs.pipe_file(path, store.fs.cat_file(path)[:-1])
    with pytest.raises(IntegrityError, match="manifest says"):
        store.read(manifest)
    store.fs.rm(path)
    with pytest.raises(IntegrityError, match="missing"):
        store.read(manifest)


def test_reregistering_repairs_a_corrupted_blob(file_store):
    sd = mixed_state_dict()
    info = file_store.register("m", sd, tenant="default")
    path = file_store.blob_path(info.sha256)
    file_store.fs.pipe_file(path, b"\x00" * info.nbytes)
    file_store.register("m", sd, tenant="default")
    buffer, _ = file_store.read(file_store.manifest("m", tenant="default"))
    assert len(buffer) == info.nbytes


def test_malformed_or_misplaced_manifest_is_a_format_error(store):
    store.register("m", {"w": torch.zeros(1)}, tenant="alice")
    path = store.manifest_path("alice", "m")
    good = store.fs.cat_file(path)
    doc = json.loads(good)
    for broken in [b"{", b"[]", json.dumps({**doc, "format_version": 99}).encode(),
                   json.dumps({**doc, "sha256": "x"}).encode(),
                   json.dumps({**doc, "nbytes": doc["nbytes"] + 1}).encode()]:
        store.fs.pipe_file(path, broken)
        with pytest.raises(ModelFormatError):
            store.manifest("m", tenant="alice")
    # A manifest copied into another tenant's directory must not be served as that tenant's.
    store.fs.makedirs(f"{store.root}/manifests/bob", exist_ok=True)
    store.fs.pipe_file(store.manifest_path("bob", "m"), good)
    with pytest.raises(ModelFormatError, match="edited by hand"):
        store.manifest("m", tenant="bob")


# -- atomic publishing ------------------------------------------------------------------------


def test_failed_blob_write_leaves_the_store_as_it_was(store, monkeypatch):
    store.register("keep", {"w": torch.ones(4)}, tenant="default")
    before = store_files(store)
    real = store_module.iter_blob_chunks
    calls = {"n": 0}

    def failing_on_write(*args):
        calls["n"] += 1
        for i, chunk in enumerate(real(*args)):
            if calls["n"] == 2 and i == 2:  # the first pass hashes, the second writes
                raise OSError("disk went away")
            yield chunk

    monkeypatch.setattr(store_module, "iter_blob_chunks", failing_on_write)
    with pytest.raises(OSError, match="disk went away"):
        store.register("new", mixed_state_dict(), tenant="default")
    assert store_files(store) == before


def test_failed_manifest_write_removes_the_new_blob(store, monkeypatch):
    before = store_files(store)
    real = store_module.write_atomically

    def failing_for_manifests(fs, path, chunks):
        if path.endswith(".json"):
            raise OSError("manifest write failed")
        return real(fs, path, chunks)

    monkeypatch.setattr(store_module, "write_atomically", failing_for_manifests)
    with pytest.raises(OSError, match="manifest write failed"):
        store.register("new", mixed_state_dict(), tenant="default")
    assert store_files(store) == before


def test_reader_never_sees_a_manifest_without_its_whole_blob(file_store):
    """Registers new weights under one name again and again while readers load it."""
    stop = threading.Event()
    failures: list[BaseException] = []
    reads = {"n": 0}

    def reader():
        while not stop.is_set():
            try:
                buffer, _ = file_store.read(file_store.manifest("hot", tenant="default"))
                reads["n"] += 1
            except ModelNotFoundError:
                continue
            except BaseException as exc:  # any other error is a torn publish
                failures.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for seed in range(12):
            gen = torch.Generator().manual_seed(seed)
            file_store.register("hot", {"w": torch.randn(512 * 1024, generator=gen)}, tenant="default")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[0]
    assert reads["n"] > 0


# -- the public API ---------------------------------------------------------------------------


def test_register_uses_the_default_store_and_callers_tenant(monkeypatch, tmp_path):
    monkeypatch.setenv("TRIMS_RAY_TENANT", "alice")
    info = trims_ray.register("m", {"w": torch.ones(2)})
    assert info.tenant == "alice"
    default = ModelStore((tmp_path / "default-store").as_uri())
    assert default.manifest("m", tenant="alice").sha256 == info.sha256
    assert trims_ray.register("p", {"w": torch.ones(2)}, tenant="public").tenant == "public"
    with pytest.raises(AccessDeniedError, match="'bob'"):
        trims_ray.register("m", {"w": torch.ones(2)}, tenant="bob")
    with pytest.raises(ValueError):
        trims_ray.register("m", {"w": torch.ones(2)}, tenant="../bob")
    assert [i.name for i in default.list_models(tenant="bob")] == ["p"]


def test_store_uri_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ModelStore("relative/dir").uri == (tmp_path / "relative" / "dir").as_uri()
    assert ModelStore(tmp_path / "p").uri == (tmp_path / "p").as_uri()
    assert ModelStore("memory://x/y").uri == "memory:///x/y"
    with pytest.raises(ValueError):
        ModelStore("   ")
    with pytest.raises(ValueError, match="no-such-protocol"):
        ModelStore("no-such-protocol://x")
    with pytest.raises(TypeError):
        ModelStore(3)


def test_read_into_a_preallocated_buffer(file_store):
    info = file_store.register("m", mixed_state_dict(), tenant="default")
    out = np.zeros(info.nbytes, dtype=np.uint8)
    buffer, _ = file_store.read(file_store.manifest("m", tenant="default"), out=out)
    assert buffer is out and out.any()


def test_storage_options_without_credentials_keep_everything_else():
    from trims_ray._fsio import without_credentials

    options = {
        "key": "AKIA",
        "secret": "s3cr3t",
        "token": "t",
        "endpoint_url": "http://127.0.0.1:9000",
        "anon": False,
        "client_kwargs": {"region_name": "us-west-2", "aws_secret_access_key": "x", "aws_session_token": "y"},
        "account_key": "azure",
        "connection_string": "DefaultEndpointsProtocol=...",
    }
    assert without_credentials(options) == {
        "endpoint_url": "http://127.0.0.1:9000",
        "anon": False,
        "client_kwargs": {"region_name": "us-west-2"},
    }
    assert options["key"] == "AKIA"  # the caller's dict is left alone
    assert without_credentials(None) is None
    assert without_credentials({"endpoint_url": "e"}) == {"endpoint_url": "e"}
