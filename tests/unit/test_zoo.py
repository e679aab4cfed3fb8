"""Tests of the model zoo (no Ray): published sizes, small variants, seeded builds, checkpoints.

Only small variants are built for real; full models are built on the meta device.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workloads import zoo
from workloads.zoo import ZOO, build, forward, save_checkpoint, zoo_model

# The published parameter counts (torchvision, Hugging Face model cards, timm), written out so
# that a wrong registry number fails rather than agreeing with itself.
PUBLISHED_PARAMS = {
    "alexnet": 61_100_840,
    "vgg16": 138_357_544,
    "resnet50": 25_557_032,
    "bert_base": 109_482_240,
    "gpt2": 124_439_808,
    "gpt2_medium": 354_823_168,
    "llama": 134_515_008,
    "t5_small": 60_506_624,
    "vit_base": 86_389_248,
    "whisper_tiny": 37_760_640,
    "convnext_tiny": 28_589_128,
}
LIBRARY = {"alexnet": "torchvision", "vgg16": "torchvision", "resnet50": "torchvision",
           "convnext_tiny": "timm"}  # fmt: skip
FAMILY = {"t5_small": "seq2seq", "whisper_tiny": "audio", "bert_base": "language",
          "gpt2": "language", "gpt2_medium": "language", "llama": "language"}  # fmt: skip
SMALL = [name for name, entry in ZOO.items() if entry.small_factory is not None]
SEQ_LEN = 10
MAX_SMALL_BYTES = 16 * 2**20


def resolve(reference: str):
    module_name, _, attr = reference.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def example(name: str, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return ZOO[name].example_input(batch, seq_len=SEQ_LEN, generator=generator, small=True)


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, non-persistent buffers and tied aliases included."""
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    return {name: t.detach() for name, t in named}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_registry_entries_are_consistent():
    assert set(ZOO) == set(PUBLISHED_PARAMS)
    for name, entry in ZOO.items():
        assert entry.name == name
        assert entry.params == PUBLISHED_PARAMS[name]
        assert entry.factory == f"workloads.zoo:{name}"
        assert resolve(entry.factory) is getattr(zoo, name)
        assert entry.library == LIBRARY.get(name, "transformers")
        assert entry.family == FAMILY.get(name, "vision")
        assert (entry.vocab_size is None) == (entry.family == "vision")
        assert (entry.small_factory is None) == (entry.small_inputs is None)
    assert {n for n, e in ZOO.items() if e.small_factory is None} == {"alexnet", "vgg16"}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_meta_build_has_the_registered_parameter_count(name):
    entry = ZOO[name]
    with torch.device("meta"):
        model = resolve(entry.factory)()
    assert sum(p.numel() for p in model.parameters()) == entry.params
    config = getattr(model, "config", None)
    if entry.vocab_size is not None:
        assert config.vocab_size == entry.vocab_size
    if entry.family == "audio":
        assert entry.inputs.mel_bins == config.num_mel_bins
        assert entry.inputs.frames == 2 * config.max_source_positions


@pytest.mark.parametrize("name", SMALL)
def test_small_variant_is_small_and_runs(name):
    entry = ZOO[name]
    model = build(name, small=True)
    assert not model.training
    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert nbytes < MAX_SMALL_BYTES, nbytes
    out = forward(model, example(name))
    assert out.dtype == torch.float32
    assert out.shape[0] == 2
    if entry.family in ("language", "seq2seq", "audio"):
        assert out.shape[1] == SEQ_LEN
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", SMALL)
def test_small_variant_has_the_full_models_class(name):
    entry = ZOO[name]
    with torch.device("meta"):
        full = resolve(entry.factory)()
        small = resolve(entry.small_factory)()
    assert type(small) is type(full)


@pytest.mark.parametrize("name", SMALL)
def test_build_is_bit_identical_per_seed_and_spares_the_global_rng(name):
    rng_before = torch.random.get_rng_state()
    first = tensors(build(name, seed=7, small=True))
    second = tensors(build(name, seed=7, small=True))
    other = tensors(build(name, seed=8, small=True))
    assert torch.equal(torch.random.get_rng_state(), rng_before)

    assert first.keys() == second.keys() == other.keys()
    differ = [k for k in first if not same_bits(first[k], second[k])]
    assert not differ, differ
    weights = [k for k, t in first.items() if t.dim() > 1 and t.is_floating_point()]
    assert weights
    assert any(not torch.equal(first[k], other[k]) for k in weights)


@pytest.mark.parametrize("name", ["llama", "bert_base", "gpt2", "t5_small", "whisper_tiny"])
def test_non_persistent_buffers_hold_what_the_factory_computes(name):
    model = build(name, seed=5, small=True)
    persistent = set(model.state_dict())
    non_persistent = {k: t for k, t in tensors(model).items() if k not in persistent}
    if name in ("llama", "bert_base"):
        assert non_persistent  # rotary inv_freq, position_ids / token_type_ids
    fresh = tensors(resolve(ZOO[name].small_factory)())
    differ = [k for k, t in non_persistent.items() if not same_bits(t, fresh[k])]
    assert not differ, differ


def test_build_honours_dtype():
    model = build("resnet50", small=True, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.state_dict()["bn1.num_batches_tracked"].dtype == torch.int64


def test_gpt2_head_is_tied_to_the_token_embedding():
    model = build("gpt2", small=True)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_forward_is_causal_for_decoders():
    model = build("llama", small=True)
    ids = example("llama", batch=1)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % ZOO["llama"].small_inputs.vocab_size
    a, b = forward(model, ids), forward(model, changed)
    assert torch.allclose(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


@pytest.mark.parametrize("name", ["bert_base", "resnet50"])
def test_save_checkpoint_writes_several_shards_and_an_index(name, tmp_path):
    model = build(name, small=True)
    save_checkpoint(model, tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) >= 2
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert set(index["weight_map"]) == set(model.state_dict())
    assert (tmp_path / "config.json").exists() == (ZOO[name].library == "transformers")


def test_example_inputs():
    image = ZOO["resnet50"].example_input(2, generator=torch.Generator().manual_seed(1))
    assert image.shape == (2, 3, 224, 224) and image.dtype == torch.float32
    assert ZOO["vit_base"].example_input(small=True).shape == (1, 3, 32, 32)
    assert ZOO["convnext_tiny"].example_input(small=True).shape == (1, 3, 64, 64)
    bert = ZOO["bert_base"]
    tokens = bert.example_input(3, seq_len=5, generator=torch.Generator().manual_seed(1))
    assert tokens.shape == (3, 5) and tokens.dtype == torch.int64
    assert 0 <= tokens.min() and tokens.max() < 30522
    again = bert.example_input(3, seq_len=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tokens, again)
    t5 = ZOO["t5_small"].example_input(2, seq_len=7)
    assert set(t5) == {"input_ids", "decoder_input_ids"}
    assert t5["input_ids"].shape == t5["decoder_input_ids"].shape == (2, 7)
    audio = ZOO["whisper_tiny"].example_input(1, seq_len=4)
    assert audio["input_features"].shape == (1, 80, 3000)
    assert audio["decoder_input_ids"].shape == (1, 4)
    with pytest.raises(ValueError, match="no small variant"):
        ZOO["alexnet"].example_input(small=True)
    with pytest.raises(ValueError, match="no small variant"):
        build("vgg16", small=True)


def test_unknown_model_raises_key_error_naming_known_ones():
    assert zoo_model("gpt2") is ZOO["gpt2"]
    with pytest.raises(KeyError) as excinfo:
        zoo_model("nope")
    message = str(excinfo.value)
    assert "nope" in message
    assert all(name in message for name in PUBLISHED_PARAMS)
    with pytest.raises(KeyError):
        build("nope")


def test_importing_the_zoo_imports_no_model_library():
    # They take seconds to import; only building a model should pay for that.
    code = "import sys, workloads.zoo; print(' '.join(sys.modules))"
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True
    )
    imported = {name.split(".")[0] for name in out.stdout.split()}
    assert "workloads" in imported
    assert not imported & {"torchvision", "timm", "transformers"}
