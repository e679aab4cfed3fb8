"""Tests of the model zoo: published sizes, meta builds, seeded weights, forward shapes."""

from __future__ import annotations

import importlib

import pytest
import torch

from workloads import zoo
from workloads.zoo import ZOO, build, zoo_model

# The published parameter counts (torchvision, Hugging Face), written out so that a wrong
# registry number fails rather than agreeing with itself.
PUBLISHED_PARAMS = {
    "alexnet": 61_100_840,
    "vgg16": 138_357_544,
    "resnet50": 25_557_032,
    "bert_base": 109_482_240,
    "gpt2": 124_439_808,
    "gpt2_medium": 354_823_168,
}

SEQ_LEN = 16


def factory_of(name: str):
    module_name, _, attr = ZOO[name].factory.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def example(name: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return ZOO[name].example_input(1, seq_len=SEQ_LEN, generator=generator)


def test_registry_lists_exactly_the_published_models():
    assert set(ZOO) == set(PUBLISHED_PARAMS)
    for name, entry in ZOO.items():
        assert entry.name == name
        assert entry.params == PUBLISHED_PARAMS[name]
        vision = name in ("alexnet", "vgg16", "resnet50")
        assert entry.family == ("vision" if vision else "language")
        assert entry.factory == f"workloads.zoo:{name}"


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_meta_build_has_published_parameter_count(name):
    factory = factory_of(name)
    assert factory is getattr(zoo, name)
    with torch.device("meta"):
        model = factory()
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == PUBLISHED_PARAMS[name]
    assert all(p.is_meta for p in params)
    assert all(b.is_meta for b in model.buffers())
    # Everything meta must come back through load_state_dict: nothing outside the state dict.
    assert len(model.state_dict()) == len(params) + len(list(model.buffers()))


def test_gpt2_head_is_tied_to_token_embedding():
    with torch.device("meta"):
        model = zoo.gpt2()
    assert not any("head" in key for key in model.state_dict())
    vocab_rows = [p for p in model.parameters() if p.shape[0] == 50257]
    assert len(vocab_rows) == 1


def test_build_is_deterministic_per_seed_and_spares_global_rng():
    rng_before = torch.random.get_rng_state()
    first = build("resnet50", seed=7).state_dict()
    second = build("resnet50", seed=7).state_dict()
    other = build("resnet50", seed=8).state_dict()
    assert torch.equal(torch.random.get_rng_state(), rng_before)

    assert first.keys() == second.keys() == other.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    weights = [k for k in first if k.endswith("weight") and first[k].dim() > 1]
    assert weights
    assert all(not torch.equal(first[k], other[k]) for k in weights)


def test_build_fills_weights_as_documented():
    model = build("resnet50", seed=0)
    assert not model.training
    sd = model.state_dict()
    assert sd["fc.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(sd["fc.bias"], torch.zeros(1000))
    assert torch.equal(sd["bn1.weight"], torch.ones(64))
    assert torch.equal(sd["bn1.running_var"], torch.ones(64))
    assert torch.equal(sd["bn1.running_mean"], torch.zeros(64))
    assert sd["bn1.num_batches_tracked"].item() == 0
    # He init for convolutions: std sqrt(2 / fan_in), fan_in = 3 * 7 * 7 for the stem.
    assert sd["conv1.weight"].std().item() == pytest.approx((2 / 147) ** 0.5, rel=0.05)


def test_build_honours_dtype():
    model = build("resnet50", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.state_dict()["bn1.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("name", ["resnet50", "gpt2"])
def test_state_dict_round_trips_through_meta_and_assign(name):
    original = build(name, seed=3)
    with torch.device("meta"):
        model = factory_of(name)()
    model.load_state_dict(original.state_dict(), assign=True)
    model.eval()
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])

    x = example(name)
    with torch.inference_mode():
        expected = original(x)
        actual = model(x)
    assert torch.isfinite(expected).all()
    assert torch.equal(actual, expected)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("alexnet", (1, 1000)),
        ("vgg16", (1, 1000)),
        ("resnet50", (1, 1000)),
        ("gpt2", (1, SEQ_LEN, 50257)),
        ("gpt2_medium", (1, SEQ_LEN, 50257)),
    ],
)
def test_forward_output_shape(name, shape):
    model = build(name)
    with torch.inference_mode():
        out = model(example(name))
    assert out.shape == shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_bert_returns_sequence_and_pooled_output():
    model = build("bert_base")
    with torch.inference_mode():
        sequence, pooled = model(example("bert_base"))
    assert sequence.shape == (1, SEQ_LEN, 768)
    assert pooled.shape == (1, 768)
    assert torch.isfinite(sequence).all()
    # The pooler ends in tanh.
    assert pooled.abs().max() <= 1


def test_gpt2_is_causal():
    model = build("gpt2")
    x = example("gpt2")
    changed = x.clone()
    changed[0, -1] = (x[0, -1] + 1) % 50257
    with torch.inference_mode():
        a, b = model(x), model(changed)
    assert torch.equal(a[:, :-1], b[:, :-1])
    assert not torch.equal(a[:, -1], b[:, -1])


def test_example_input_shapes_and_determinism():
    image = ZOO["resnet50"].example_input(2, generator=torch.Generator().manual_seed(1))
    assert image.shape == (2, 3, 224, 224) and image.dtype == torch.float32
    bert = ZOO["bert_base"]
    tokens = bert.example_input(3, seq_len=5, generator=torch.Generator().manual_seed(1))
    assert tokens.shape == (3, 5) and tokens.dtype == torch.int64
    assert 0 <= tokens.min() and tokens.max() < 30522
    again = bert.example_input(3, seq_len=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tokens, again)


def test_unknown_model_raises_key_error_naming_known_ones():
    assert zoo_model("gpt2") is ZOO["gpt2"]
    with pytest.raises(KeyError) as excinfo:
        zoo_model("nope")
    message = str(excinfo.value)
    assert "nope" in message
    assert all(name in message for name in PUBLISHED_PARAMS)
    with pytest.raises(KeyError):
        build("nope")
