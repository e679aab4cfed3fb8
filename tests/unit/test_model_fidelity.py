"""A model comes back from the store exactly as it was registered (no Ray): non-persistent
buffers, tied weights, Hugging Face directories with their key mappings and dtypes, and a build
that runs no initialiser. Registration refuses, naming the tensors, what it cannot reproduce.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from trims_ray import ModelFormatError, ModelStore
from trims_ray._factory import build_on_meta, non_persistent_buffers, resolve_factory, same_bits
from trims_ray._manifest import Manifest
from workloads import zoo
from workloads.s3server import s3_storage_options as s3_options

TENANT = "t"
# Every zoo architecture that has a small configuration (one per class).
ARCHITECTURES = [n for n, e in zoo.ZOO.items() if e.small_factory is not None and n != "gpt2_medium"]


@pytest.fixture
def store(tmp_path):
    return ModelStore(str(tmp_path / "store"))


def one_thread_forward(model, example):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return zoo.forward(model, example)
    finally:
        torch.set_num_threads(threads)


def assert_same_module(got: nn.Module, want: nn.Module) -> None:
    """Every parameter and buffer (non-persistent ones included), bit for bit, and the ties."""
    mine = dict(got.named_parameters(remove_duplicate=False)) | dict(got.named_buffers(remove_duplicate=False))
    theirs = dict(want.named_parameters(remove_duplicate=False)) | dict(want.named_buffers(remove_duplicate=False))
    assert mine.keys() == theirs.keys()
    differ = [k for k in theirs if not same_bits(mine[k], theirs[k])]
    assert not differ, differ
    on_meta = [k for k, t in mine.items() if t.is_meta]
    assert not on_meta, on_meta


# -- every zoo architecture, both registration forms ------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_zoo_architecture_comes_back_exact_from_the_module_and_from_a_sharded_directory(
    store, tmp_path, arch
):
    entry = zoo.zoo_model(arch)
    model = zoo.build(arch, seed=3, small=True)
    example = entry.example_input(1, seq_len=10, generator=torch.Generator().manual_seed(4), small=True)
    expected = one_thread_forward(model, example)
    directory = tmp_path / "checkpoint"
    zoo.save_checkpoint(model, directory, max_shard_size="40KB")
    assert len(list(directory.glob("*.safetensors"))) >= 2

    store.register("from-module", model, factory=entry.small_factory, example_input=example, tenant=TENANT)
    dir_factory = None if entry.library == "transformers" else entry.small_factory
    store.register("from-directory", str(directory), factory=dir_factory, tenant=TENANT)
    for name in ("from-module", "from-directory"):
        loaded = store.load(name, tenant=TENANT)
        assert type(loaded) is type(model), name
        assert_same_module(loaded, model)
        assert torch.equal(one_thread_forward(loaded, example), expected), name


# -- what real models carry besides their state dict ------------------------------------------


class WithBuffers(nn.Module):
    """A non-persistent buffer from __init__, and one only the source module knows."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("positions", torch.arange(4.0), persistent=False)
        self.register_buffer("learned_mask", torch.ones(4), persistent=False)

    def forward(self, x):
        return self.fc(x + self.positions) * self.learned_mask


def test_non_persistent_buffers_travel_with_the_weights_and_stay_non_persistent(store):
    model = WithBuffers()
    model.learned_mask.copy_(torch.tensor([1.0, 0.0, 2.0, 0.5]))  # not what __init__ computes
    store.register("m", model, factory=f"{__name__}:WithBuffers", tenant=TENANT)
    loaded = store.load("m", tenant=TENANT)
    assert same_bits(loaded.learned_mask, model.learned_mask)
    assert same_bits(loaded.positions, model.positions)
    assert set(non_persistent_buffers(loaded)) == {"positions", "learned_mask"}
    assert set(loaded.state_dict()) == {"fc.weight", "fc.bias"}
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), model(x))


def test_a_checkpoint_gets_the_non_persistent_buffers_its_architecture_computes(store):
    model = WithBuffers()
    store.register("m", dict(model.state_dict()), factory=f"{__name__}:WithBuffers", tenant=TENANT)
    loaded = store.load("m", tenant=TENANT)
    assert same_bits(loaded.positions, torch.arange(4.0))
    assert same_bits(loaded.learned_mask, torch.ones(4))


class KeepsAPlainTensor(nn.Module):
    """Keeps a tensor as a plain attribute: built on meta, nothing can give it data."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.table = torch.arange(4.0)

    def forward(self, x):
        return self.fc(x) + self.table


def test_a_tensor_left_on_meta_is_refused_at_registration_by_name(store):
    with pytest.raises(ModelFormatError, match=r"table.*no data \(on meta\)"):
        store.register("m", KeepsAPlainTensor(), factory=f"{__name__}:KeepsAPlainTensor", tenant=TENANT)


class RandomScale(nn.Module):
    """Draws a Python-level constant in __init__: every build computes differently."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = random.random()

    def forward(self, x):
        return self.fc(x) * self.scale


def test_a_forward_that_differs_on_the_example_input_is_refused(store):
    model = RandomScale()
    store.register("no-example", model, factory=f"{__name__}:RandomScale", tenant=TENANT)  # tensors alone agree
    with pytest.raises(ModelFormatError, match="forward on the example input differs"):
        store.register("m", model, factory=f"{__name__}:RandomScale", example_input=torch.randn(2, 4), tenant=TENANT)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_tied_parameters_come_back_as_one_parameter(store):
    model = Tied()
    store.register("m", model, factory=f"{__name__}:Tied", tenant=TENANT)
    manifest = store.manifest("m", tenant=TENANT)
    assert dict(manifest.aliases) == {"head.weight": "embed.weight"}
    assert len(manifest.tensors) == 1
    loaded = store.load("m", tenant=TENANT)
    assert loaded.head.weight is loaded.embed.weight
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(ids), model(ids))


# -- Hugging Face directories -----------------------------------------------------------------


def test_a_hugging_face_directory_needs_no_factory(store, tmp_path):
    model = zoo.build("gpt2", seed=0, small=True)
    model.save_pretrained(tmp_path / "gpt2", max_shard_size="40KB")
    info = store.register("gpt2", str(tmp_path / "gpt2"), tenant=TENANT)
    assert info.factory == "transformers:GPT2LMHeadModel"
    manifest = store.manifest("gpt2", tenant=TENANT)
    # save_pretrained writes the tied lm_head once; the manifest ties it back.
    assert [sorted(pair) for pair in manifest.aliases.items()] == [["lm_head.weight", "transformer.wte.weight"]]
    again = Manifest.from_json(manifest.to_json(), source="<test>")
    assert again.factory == manifest.factory
    loaded = store.load("gpt2", tenant=TENANT)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_come_back_in_their_dtype(store, tmp_path, dtype):
    from transformers import LlamaForCausalLM

    model = zoo.build("llama", seed=0, small=True, dtype=dtype)
    model.save_pretrained(tmp_path / "llama", max_shard_size="40KB")
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    store.register("llama", str(tmp_path / "llama"), tenant=TENANT)
    loaded = store.load("llama", tenant=TENANT)
    # The directory's meaning is what transformers loads from it (rotary buffers stay float32).
    want = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    assert loaded.model.embed_tokens.weight.dtype == dtype
    assert_same_module(loaded, want)
    ids = torch.randint(256, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(one_thread_forward(loaded, ids), one_thread_forward(want, ids))


def test_checkpoint_keys_that_do_not_map_onto_the_architecture_are_named(store, tmp_path):
    model = zoo.build("bert_base", seed=0, small=True)
    directory = tmp_path / "bert"
    model.save_pretrained(directory)  # one shard: model.safetensors
    tensors = load_file(directory / "model.safetensors")
    tensors["encoder.layer.0.not_a_weight"] = torch.zeros(2)
    missing = next(k for k in sorted(tensors) if k.startswith("pooler."))
    del tensors[missing]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFormatError) as raised:
        store.register("bert", str(directory), tenant=TENANT)
    assert "encoder.layer.0.not_a_weight" in str(raised.value)
    assert missing in str(raised.value)
    assert store.list_models(tenant=TENANT) == []


def test_a_config_naming_no_architecture_is_refused_with_what_to_do(store, tmp_path):
    model = zoo.build("bert_base", seed=0, small=True)
    model.save_pretrained(tmp_path / "bert")
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    config["architectures"] = []
    (tmp_path / "bert" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="names no architecture.*factory="):
        store.register("bert", str(tmp_path / "bert"), tenant=TENANT)


def test_a_damaged_transformers_factory_in_a_manifest_is_a_format_error(store):
    model = zoo.build("bert_base", seed=0, small=True)
    store.register("bert", model, tenant=TENANT)
    doc = json.loads(store.manifest("bert", tenant=TENANT).to_json())
    doc["factory"] = {"transformers": json.dumps({"architecture": "Bert Model", "config": {}})}
    with pytest.raises(ModelFormatError, match="transformers factory"):
        Manifest.from_json(json.dumps(doc).encode(), source="<edited>")


# -- building runs no initialiser -------------------------------------------------------------


class _AtenLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["resnet50", "bert_base", "llama"])
def test_building_on_meta_runs_no_initialiser(arch):
    factory = resolve_factory({"import": zoo.zoo_model(arch).small_factory})
    with _AtenLog() as log:
        module = build_on_meta(factory)
    writes = sorted({op for op in log.ops if op.endswith("_") and op.split(".")[-1].rstrip("_") in
                     ("uniform", "normal", "fill", "zero", "copy", "erfinv", "mul", "add", "clamp")})
    assert writes == [], writes
    assert all(p.is_meta for p in module.parameters())
    # Without the skip, the same build runs them (the test can fail).
    with _AtenLog() as log, torch.device("meta"):
        factory()
    assert any(op.endswith(("uniform_", "normal_")) for op in log.ops)


def test_a_hugging_face_directory_on_s3_registers_like_a_local_one(store, tmp_path, s3_endpoint, s3_bucket):
    import fsspec

    model = zoo.build("bert_base", seed=0, small=True)
    model.save_pretrained(tmp_path / "bert", max_shard_size="40KB")
    options = s3_options(s3_endpoint)
    fs = fsspec.filesystem("s3", **options)
    fs.put(str(tmp_path / "bert") + "/", f"{s3_bucket}/bert/", recursive=True)
    info = store.register("bert", f"s3://{s3_bucket}/bert", storage_options=options, tenant=TENANT)
    assert info.factory == "transformers:BertModel"
    assert_same_module(store.load("bert", tenant=TENANT), model)
