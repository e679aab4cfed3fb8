"""A zoo of real architectures from torchvision, transformers and timm, at their published sizes.

Weights are random and seeded, and every model is built from a config written here, so nothing
is ever downloaded. Each entry may also have a small variant (same class, tiny config) for tests.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from trims_ray._torchvision_ops import ensure_torchvision_importable

__all__ = [
    "ZooModel",
    "Inputs",
    "ZOO",
    "zoo_model",
    "build",
    "forward",
    "to_device",
    "save_checkpoint",
    "alexnet",
    "vgg16",
    "resnet50",
    "resnet50_small",
    "convnext_tiny",
    "convnext_tiny_small",
    "bert_base",
    "bert_base_small",
    "gpt2",
    "gpt2_medium",
    "gpt2_small",
    "llama",
    "llama_small",
    "t5_small",
    "t5_small_small",
    "vit_base",
    "vit_base_small",
    "whisper_tiny",
    "whisper_tiny_small",
]

_IMAGE_SIZE = 224
_BERT_VOCAB = 30522
_GPT2_VOCAB = 50257
_LLAMA_VOCAB = 49152
_T5_VOCAB = 32128
_WHISPER_VOCAB = 51865
_WHISPER_MEL_BINS = 80
_WHISPER_SOURCE_POSITIONS = 1500

# Small variants: a few MB, so that tests can build and run every architecture for real.
# Positions are 128 (not fewer) so that the default example_input(seq_len=128) fits them.
_SMALL_VOCAB = 128
_SMALL_LLAMA_VOCAB = 256
_SMALL_POSITIONS = 128
_SMALL_CNN_IMAGE = 64
_SMALL_VIT_IMAGE = 32
_SMALL_MEL_BINS = 16
_SMALL_SOURCE_POSITIONS = 32
_SMALL_CLASSES = 10


# --------------------------------------------------------------------------------------------
# Library imports (lazy: `import workloads.zoo` must not pull in torchvision, timm or
# transformers, which take seconds to import)
# --------------------------------------------------------------------------------------------

def _torchvision() -> ModuleType:
    """Imports torchvision (timm and transformers import it too), first declaring the two
    operators its import needs where its C++ extension cannot load: PyPI's wheel is built
    against CUDA torch, and beside a CPU torch it would not import at all (see
    ``trims_ray._torchvision_ops``). The zoo uses no detection operator, the only ones that
    then raise."""
    ensure_torchvision_importable()
    import torchvision

    return torchvision


def _transformers() -> ModuleType:
    """Imports transformers (whose model code imports torchvision when it is installed)."""
    _torchvision()
    import transformers

    return transformers


def _timm() -> ModuleType:
    """Imports timm (which imports torchvision)."""
    _torchvision()
    import timm

    return timm


# --------------------------------------------------------------------------------------------
# Factories: module-level and zero-argument, so that a "workloads.zoo:<name>" reference is
# enough to rebuild a model on any worker. `<name>_small` is a test-size config of <name>'s class.
# --------------------------------------------------------------------------------------------


def alexnet() -> nn.Module:
    """Returns torchvision's AlexNet (61.1M parameters), input images (N, 3, 224, 224)."""
    return _torchvision().models.alexnet()


def vgg16() -> nn.Module:
    """Returns torchvision's VGG-16 without batch norm (138.4M parameters)."""
    return _torchvision().models.vgg16()


def resnet50() -> nn.Module:
    """Returns torchvision's ResNet-50 (25.6M parameters), input images (N, 3, 224, 224)."""
    return _torchvision().models.resnet50()


def resnet50_small() -> nn.Module:
    """Returns torchvision's ResNet class with one bottleneck per stage and narrow blocks.

    The stage output widths (256 to 2048) are fixed by torchvision's class; the 1x1 downsample
    convolutions between them dominate, so this is ~13 MB in float32. Input (N, 3, 64, 64).
    """
    _torchvision()
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=_SMALL_CLASSES, width_per_group=16)


def convnext_tiny() -> nn.Module:
    """Returns timm's ConvNeXt-T (28.6M parameters), input images (N, 3, 224, 224)."""
    return _timm().create_model("convnext_tiny", pretrained=False)


def convnext_tiny_small() -> nn.Module:
    """Returns timm's ConvNeXt class with one block per stage, input images (N, 3, 64, 64)."""
    _timm()
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_classes=_SMALL_CLASSES)


def bert_base() -> nn.Module:
    """Returns BertModel as bert-base-uncased, with pooler (109.5M parameters)."""
    t = _transformers()
    return t.BertModel(t.BertConfig())


def bert_base_small() -> nn.Module:
    """Returns a 2-layer, 32-wide BertModel over a 128-token vocabulary."""
    t = _transformers()
    config = t.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=_SMALL_VOCAB,
        max_position_embeddings=_SMALL_POSITIONS,
    )
    return t.BertModel(config)


def gpt2() -> nn.Module:
    """Returns GPT2LMHeadModel as OpenAI's GPT-2 (124.4M parameters, head tied to wte)."""
    t = _transformers()
    return t.GPT2LMHeadModel(t.GPT2Config())


def gpt2_medium() -> nn.Module:
    """Returns GPT2LMHeadModel as GPT-2 medium (354.8M parameters, head tied to wte)."""
    t = _transformers()
    return t.GPT2LMHeadModel(t.GPT2Config(n_embd=1024, n_layer=24, n_head=16))


def gpt2_small() -> nn.Module:
    """Returns a 2-layer, 32-wide GPT2LMHeadModel (a test size, not OpenAI's "GPT-2 small")."""
    t = _transformers()
    config = t.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=_SMALL_VOCAB,
        n_positions=_SMALL_POSITIONS,
        # GPT-2's <|endoftext|> (50256) as the last id of the small vocabulary.
        bos_token_id=_SMALL_VOCAB - 1,
        eos_token_id=_SMALL_VOCAB - 1,
    )
    return t.GPT2LMHeadModel(config)


def llama() -> nn.Module:
    """Returns LlamaForCausalLM in SmolLM-135M's config: GQA (9 query, 3 KV heads), RoPE."""
    t = _transformers()
    config = t.LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=_LLAMA_VOCAB,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    return t.LlamaForCausalLM(config)


def llama_small() -> nn.Module:
    """Returns a 2-layer, 64-wide LlamaForCausalLM with GQA (4 query, 2 KV heads)."""
    t = _transformers()
    config = t.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=_SMALL_LLAMA_VOCAB,
        max_position_embeddings=_SMALL_POSITIONS,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    return t.LlamaForCausalLM(config)


def t5_small() -> nn.Module:
    """Returns T5ForConditionalGeneration as t5-small (60.5M parameters, head tied)."""
    t = _transformers()
    config = t.T5Config(
        d_model=512,
        d_ff=2048,
        d_kv=64,
        num_layers=6,
        num_decoder_layers=6,
        num_heads=8,
        vocab_size=_T5_VOCAB,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="relu",
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return t.T5ForConditionalGeneration(config)


def t5_small_small() -> nn.Module:
    """Returns a 2-layer, 32-wide T5ForConditionalGeneration (a test size of t5_small)."""
    t = _transformers()
    config = t.T5Config(
        d_model=32,
        d_ff=64,
        d_kv=16,
        num_layers=2,
        num_heads=2,
        vocab_size=_SMALL_VOCAB,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return t.T5ForConditionalGeneration(config)


def vit_base() -> nn.Module:
    """Returns ViTModel as ViT-B/16 at 224x224, with pooler (86.4M parameters)."""
    t = _transformers()
    return t.ViTModel(t.ViTConfig())


def vit_base_small() -> nn.Module:
    """Returns a 2-layer, 32-wide ViTModel over 32x32 images in 8x8 patches."""
    t = _transformers()
    config = t.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=_SMALL_VIT_IMAGE,
        patch_size=8,
    )
    return t.ViTModel(config)


def whisper_tiny() -> nn.Module:
    """Returns WhisperForConditionalGeneration as whisper-tiny (37.8M parameters, head tied)."""
    t = _transformers()
    config = t.WhisperConfig(
        d_model=384,
        encoder_layers=4,
        decoder_layers=4,
        encoder_attention_heads=6,
        decoder_attention_heads=6,
        encoder_ffn_dim=1536,
        decoder_ffn_dim=1536,
        num_mel_bins=_WHISPER_MEL_BINS,
        vocab_size=_WHISPER_VOCAB,
        max_source_positions=_WHISPER_SOURCE_POSITIONS,
        max_target_positions=448,
        pad_token_id=50257,
        bos_token_id=50257,
        eos_token_id=50257,
        decoder_start_token_id=50258,
    )
    return t.WhisperForConditionalGeneration(config)


def whisper_tiny_small() -> nn.Module:
    """Returns a 2+2-layer, 32-wide WhisperForConditionalGeneration over 16 mel bins."""
    t = _transformers()
    config = t.WhisperConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=_SMALL_MEL_BINS,
        vocab_size=_SMALL_VOCAB,
        max_source_positions=_SMALL_SOURCE_POSITIONS,
        max_target_positions=_SMALL_POSITIONS,
        # Whisper's token ids (50257...) would not fit a 128-token vocabulary, and the pad id
        # is the decoder embedding's padding_idx.
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        decoder_start_token_id=2,
        begin_suppress_tokens=None,
    )
    return t.WhisperForConditionalGeneration(config)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """What one configuration of a model takes as input.

    Attributes:
        image_size: Side of the square RGB images (vision).
        vocab_size: Token ids are below this (language, seq2seq, audio decoder).
        mel_bins: Log-mel channels of the audio features (audio).
        frames: Feature frames the audio encoder requires, 2 * max_source_positions (audio).
    """

    image_size: int | None = None
    vocab_size: int | None = None
    mel_bins: int | None = None
    frames: int | None = None


@dataclass(frozen=True)
class ZooModel:
    """A zoo entry: how to rebuild the model and what it looks like.

    Attributes:
        name: The zoo name, also the key in ``ZOO``.
        factory: ``"module:attr"`` reference to the zero-argument factory.
        params: Exact parameter count of the full model (tied weights counted once).
        family: ``"vision"`` (images), ``"language"`` (token ids), ``"seq2seq"`` (encoder and
            decoder token ids) or ``"audio"`` (log-mel features and decoder token ids).
        library: ``"torchvision"``, ``"transformers"`` or ``"timm"``.
        vocab_size: Token vocabulary of the full model; ``None`` for vision.
        small_factory: ``"module:attr"`` of the small variant, ``None`` if there is none.
        inputs: Input shapes of the full model.
        small_inputs: Input shapes of the small variant, ``None`` if there is none.
    """

    name: str
    factory: str
    params: int
    family: str
    library: str
    vocab_size: int | None = None
    small_factory: str | None = None
    inputs: Inputs = Inputs()
    small_inputs: Inputs | None = None

    def example_input(
        self,
        batch: int = 1,
        *,
        seq_len: int = 128,
        generator: torch.Generator | None = None,
        small: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Returns a random input batch of the shapes and dtypes the model expects.

        Args:
            batch: Batch size N.
            seq_len: Token sequence length (the decoder's, for seq2seq and audio); ignored for
                vision.
            generator: Source of randomness; the global RNG when ``None``.
            small: For the small variant rather than the full model.

        Returns:
            vision: float32 images (N, 3, S, S). language: int64 token ids (N, seq_len).
            seq2seq: ``{"input_ids", "decoder_input_ids"}``, both (N, seq_len). audio:
            ``{"input_features"}`` float32 (N, mel_bins, frames) and ``{"decoder_input_ids"}``
            (N, seq_len).

        Raises:
            ValueError: ``small`` for an entry without a small variant.
        """
        spec = self.small_inputs if small else self.inputs
        if spec is None:
            raise ValueError(f"zoo model {self.name!r} has no small variant")

        def tokens() -> torch.Tensor:
            assert spec.vocab_size is not None
            return torch.randint(
                spec.vocab_size, (batch, seq_len), generator=generator, dtype=torch.int64
            )

        if self.family == "vision":
            assert spec.image_size is not None
            size = spec.image_size
            return torch.randn(batch, 3, size, size, generator=generator)
        if self.family == "language":
            return tokens()
        if self.family == "seq2seq":
            return {"input_ids": tokens(), "decoder_input_ids": tokens()}
        assert self.family == "audio" and spec.mel_bins and spec.frames
        features = torch.randn(batch, spec.mel_bins, spec.frames, generator=generator)
        return {"input_features": features, "decoder_input_ids": tokens()}


def _entry(
    name: str,
    params: int,
    family: str,
    library: str,
    inputs: Inputs,
    small_inputs: Inputs | None,
    small_factory: str | None = None,
) -> ZooModel:
    # Factories follow the naming rule "<name>" and "<name>_small" unless told otherwise.
    if small_inputs is not None and small_factory is None:
        small_factory = f"{name}_small"
    return ZooModel(
        name=name,
        factory=f"workloads.zoo:{name}",
        params=params,
        family=family,
        library=library,
        vocab_size=inputs.vocab_size,
        small_factory=None if small_factory is None else f"workloads.zoo:{small_factory}",
        inputs=inputs,
        small_inputs=small_inputs,
    )


_FULL_IMAGE = Inputs(image_size=_IMAGE_SIZE)
_SMALL_CNN = Inputs(image_size=_SMALL_CNN_IMAGE)
_SMALL_TOKENS = Inputs(vocab_size=_SMALL_VOCAB)

# Parameter counts are what the libraries build (sum of numel over parameters(), tied weights
# once); tests/unit/test_zoo.py checks each against a meta-device build.
ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        # AlexNet's and VGG's classifiers are fixed at 4096 wide in torchvision's classes (57M
        # and 120M parameters even with 10 classes), so they have no small variant.
        _entry("alexnet", 61_100_840, "vision", "torchvision", _FULL_IMAGE, None),
        _entry("vgg16", 138_357_544, "vision", "torchvision", _FULL_IMAGE, None),
        _entry("resnet50", 25_557_032, "vision", "torchvision", _FULL_IMAGE, _SMALL_CNN),
        _entry("bert_base", 109_482_240, "language", "transformers",
               Inputs(vocab_size=_BERT_VOCAB), _SMALL_TOKENS),
        _entry("gpt2", 124_439_808, "language", "transformers",
               Inputs(vocab_size=_GPT2_VOCAB), _SMALL_TOKENS),
        # Same class as gpt2: the same small variant.
        _entry("gpt2_medium", 354_823_168, "language", "transformers",
               Inputs(vocab_size=_GPT2_VOCAB), _SMALL_TOKENS, small_factory="gpt2_small"),
        _entry("llama", 134_515_008, "language", "transformers",
               Inputs(vocab_size=_LLAMA_VOCAB), Inputs(vocab_size=_SMALL_LLAMA_VOCAB)),
        _entry("t5_small", 60_506_624, "seq2seq", "transformers",
               Inputs(vocab_size=_T5_VOCAB), _SMALL_TOKENS),
        _entry("vit_base", 86_389_248, "vision", "transformers",
               _FULL_IMAGE, Inputs(image_size=_SMALL_VIT_IMAGE)),
        _entry("whisper_tiny", 37_760_640, "audio", "transformers",
               Inputs(vocab_size=_WHISPER_VOCAB, mel_bins=_WHISPER_MEL_BINS,
                      frames=2 * _WHISPER_SOURCE_POSITIONS),
               Inputs(vocab_size=_SMALL_VOCAB, mel_bins=_SMALL_MEL_BINS,
                      frames=2 * _SMALL_SOURCE_POSITIONS)),
        _entry("convnext_tiny", 28_589_128, "vision", "timm", _FULL_IMAGE, _SMALL_CNN),
    )
}  # fmt: skip


def zoo_model(name: str) -> ZooModel:
    """Returns the zoo entry called ``name``.

    Raises:
        KeyError: no such model; the message lists the known names.
    """
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}") from None


# --------------------------------------------------------------------------------------------
# Building, running, saving
# --------------------------------------------------------------------------------------------


def _resolve(reference: str) -> Any:
    module_name, _, attr = reference.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def build(
    name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, small: bool = False
) -> nn.Module:
    """Builds a zoo model on CPU with deterministic random weights, in eval mode.

    The libraries' own initialisers run under a forked RNG seeded with ``seed``, so the weights
    have the distributions each library gives a fresh model, and the buffers computed in
    ``__init__`` (rotary frequencies, position ids), persistent or not, hold their real values.

    Args:
        name: A key of ``ZOO``.
        seed: Seed for the weights; the same seed gives bit-identical parameters and buffers.
            The global RNG is left untouched.
        dtype: Floating-point dtype of parameters and float buffers (``nn.Module.to``).
        small: Build the small variant (same class, tiny config) instead of the full model.

    Returns:
        The model on CPU, in eval mode.

    Raises:
        KeyError: ``name`` is not in the zoo.
        ValueError: ``small`` for an entry without a small variant.
    """
    entry = zoo_model(name)
    reference = entry.small_factory if small else entry.factory
    if reference is None:
        raise ValueError(f"zoo model {name!r} has no small variant")
    factory = _resolve(reference)
    # devices=[]: the build is on CPU, so there is no CUDA RNG to fork (forking touches every
    # visible GPU and warns when there are several).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("cpu"):
            model = factory()
    return model.to(dtype=dtype).eval()


def forward(model: nn.Module, example: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """Runs ``model`` on an ``example_input`` under inference mode.

    Args:
        model: A zoo model.
        example: What the model's ``ZooModel.example_input`` returns.

    Returns:
        The main output: logits of language-model, seq2seq and audio heads, the last hidden
        state of BertModel and ViTModel, the output tensor of a CNN.
    """
    kwargs = dict(example) if isinstance(example, dict) else {}
    args = () if isinstance(example, dict) else (example,)
    # A KV cache is of no use to a single forward pass; skip building one where there is one.
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    with torch.inference_mode():
        out = model(*args, **kwargs)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def to_device(example: torch.Tensor | dict[str, torch.Tensor], device: str | torch.device):
    """An ``example_input`` (a tensor or a dict of them) moved to ``device``."""
    if isinstance(example, dict):
        return {key: value.to(device) for key, value in example.items()}
    return example.to(device)


def save_checkpoint(
    model: nn.Module, directory: str | os.PathLike[str], *, max_shard_size: int | str
) -> None:
    """Writes ``model`` as a Hugging Face-style directory of safetensors shards.

    transformers models go through ``save_pretrained`` (shards, index and config.json);
    torchvision and timm models through ``huggingface_hub.save_torch_state_dict`` (shards and
    index, no config: their class is not described by a file).

    Args:
        model: A zoo model.
        directory: Where to write; created if missing.
        max_shard_size: Largest shard, as bytes or a string such as ``"40KB"``. A model that
            fits one shard is written as a single ``model.safetensors`` without an index.
    """
    transformers = sys.modules.get("transformers")  # loaded if the model is one of its own
    if transformers is not None and isinstance(model, transformers.PreTrainedModel):
        model.save_pretrained(directory, max_shard_size=max_shard_size)
        return
    from huggingface_hub import save_torch_state_dict

    os.makedirs(directory, exist_ok=True)
    save_torch_state_dict(model.state_dict(), directory, max_shard_size=max_shard_size)
