"""A zoo of real DNN architectures at their published sizes, with random, seeded weights.

Benchmarks and the demo need models whose shapes and byte sizes match what people deploy, not
their trained values, so everything here is plain torch with no downloads.
"""

from __future__ import annotations

import importlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ZooModel",
    "ZOO",
    "zoo_model",
    "build",
    "alexnet",
    "vgg16",
    "resnet50",
    "bert_base",
    "gpt2",
    "gpt2_medium",
]

_IMAGE_SHAPE = (3, 224, 224)
_IMAGENET_CLASSES = 1000
_BERT_VOCAB = 30522
_GPT2_VOCAB = 50257
_GPT2_POSITIONS = 1024


# --------------------------------------------------------------------------------------------
# Vision
# --------------------------------------------------------------------------------------------


class AlexNet(nn.Module):
    """AlexNet in torchvision's layout (no local response norm, 6x6 adaptive pooling)."""

    def __init__(self, num_classes: int = _IMAGENET_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images (N, 3, 224, 224) to class logits (N, num_classes)."""
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# "M" is a 2x2 max pool; numbers are the output channels of 3x3 convolutions (VGG config "D").
_VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class VGG(nn.Module):
    """VGG without batch norm, in torchvision's layout."""

    def __init__(self, config: tuple[int | str, ...], num_classes: int = _IMAGENET_CLASSES):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, int(item), 3, padding=1), nn.ReLU(inplace=True)]
                in_channels = int(item)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images (N, 3, 224, 224) to class logits (N, num_classes)."""
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 convolution, as in torchvision."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the block to feature maps (N, C, H, W)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with bottleneck blocks, in torchvision's layout."""

    def __init__(self, blocks: tuple[int, ...], num_classes: int = _IMAGENET_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = 64
        stages = []
        for i, count in enumerate(blocks):
            width = 64 * 2**i
            stage = []
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(Bottleneck(in_channels, width, stride))
                in_channels = width * Bottleneck.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images (N, 3, 224, 224) to class logits (N, num_classes)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------------------------
# Language
# --------------------------------------------------------------------------------------------


class _Embedding(nn.Embedding):
    """``nn.Embedding`` that skips its (data-free) init on the meta device.

    PyTorch's meta ``normal_`` imports ``torch._dynamo`` on first use, ~2-3 s once per process,
    which would make the first meta build of a language model anything but cheap.
    """

    def reset_parameters(self) -> None:
        """Initialises the weight as ``nn.Embedding`` does, except on the meta device."""
        if not self.weight.is_meta:
            super().reset_parameters()


class TransformerBlock(nn.Module):
    """One transformer encoder/decoder layer, shared by BERT and GPT-2.

    The two differ only in where LayerNorm sits (BERT normalises after each residual sum,
    GPT-2 before each sublayer), in the GELU flavour, and in causal masking. The causal mask
    comes from ``scaled_dot_product_attention(is_causal=True)`` rather than a registered
    buffer, so a meta-built block holds nothing that ``load_state_dict(assign=True)`` misses.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        ffn_dim: int,
        *,
        pre_norm: bool,
        causal: bool,
        gelu_approximate: str,
        eps: float,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.pre_norm = pre_norm
        self.causal = causal
        self.attn_dropout = dropout
        # q, k and v share one matmul; the parameter count equals three separate projections.
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.ffn_in = nn.Linear(dim, ffn_dim)
        self.ffn_out = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.gelu = nn.GELU(approximate=gelu_approximate)
        self.dropout = nn.Dropout(dropout)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        n, s, d = x.shape
        q, k, v = self.qkv(x).view(n, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=self.causal,
        )
        return self.dropout(self.attn_out(out.transpose(1, 2).reshape(n, s, d)))

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.ffn_out(self.gelu(self.ffn_in(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the layer to hidden states (N, seq, dim)."""
        if self.pre_norm:
            x = x + self._attention(self.norm1(x))
            return x + self._ffn(self.norm2(x))
        x = self.norm1(x + self._attention(x))
        return self.norm2(x + self._ffn(x))


class Bert(nn.Module):
    """BERT encoder with pooler, laid out like Hugging Face's ``BertModel``."""

    def __init__(
        self,
        vocab_size: int = _BERT_VOCAB,
        dim: int = 768,
        layers: int = 12,
        heads: int = 12,
        ffn_dim: int = 3072,
        max_positions: int = 512,
        type_vocab_size: int = 2,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.word_embeddings = _Embedding(vocab_size, dim)
        self.position_embeddings = _Embedding(max_positions, dim)
        self.token_type_embeddings = _Embedding(type_vocab_size, dim)
        self.embed_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(0.1)
        self.layers = nn.ModuleList(
            TransformerBlock(
                dim, heads, ffn_dim, pre_norm=False, causal=False, gelu_approximate="none", eps=eps
            )
            for _ in range(layers)
        )
        self.pooler = nn.Linear(dim, dim)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encodes token ids (N, seq), all of segment 0 and none padded.

        Returns:
            ``(sequence_output, pooled_output)``: the last hidden states (N, seq, dim) and the
            tanh-pooled first-token state (N, dim), as ``BertModel`` returns them.
        """
        # Built per call rather than registered, so meta construction leaves no stray buffer.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(torch.zeros_like(input_ids))
        )
        x = self.dropout(self.embed_norm(x))
        for layer in self.layers:
            x = layer(x)
        return x, torch.tanh(self.pooler(x[:, 0]))


class GPT2(nn.Module):
    """GPT-2 language model whose output head is tied to the token embedding."""

    def __init__(
        self,
        dim: int,
        layers: int,
        heads: int,
        vocab_size: int = _GPT2_VOCAB,
        max_positions: int = _GPT2_POSITIONS,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.wte = _Embedding(vocab_size, dim)
        self.wpe = _Embedding(max_positions, dim)
        self.dropout = nn.Dropout(0.1)
        self.layers = nn.ModuleList(
            TransformerBlock(
                dim, heads, 4 * dim, pre_norm=True, causal=True, gelu_approximate="tanh", eps=eps
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Maps token ids (N, seq) to next-token logits (N, seq, vocab_size)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.dropout(self.wte(input_ids) + self.wpe(positions))
        for layer in self.layers:
            x = layer(x)
        # Tying in forward, not by sharing a Parameter with a head module, keeps one tensor in
        # the state dict and nothing for load_state_dict(assign=True) to untie.
        return F.linear(self.norm(x), self.wte.weight)


# --------------------------------------------------------------------------------------------
# Factories: zero-argument so a "module:attr" reference is enough to rebuild a model anywhere.
# --------------------------------------------------------------------------------------------


def alexnet() -> nn.Module:
    """Returns AlexNet (61.1M parameters), input (N, 3, 224, 224)."""
    return AlexNet()


def vgg16() -> nn.Module:
    """Returns VGG-16 without batch norm (138.4M parameters), input (N, 3, 224, 224)."""
    return VGG(_VGG16_CONFIG)


def resnet50() -> nn.Module:
    """Returns ResNet-50 (25.6M parameters), input (N, 3, 224, 224)."""
    return ResNet((3, 4, 6, 3))


def bert_base() -> nn.Module:
    """Returns BERT-base uncased with pooler (109.5M parameters), input token ids (N, seq)."""
    return Bert()


def gpt2() -> nn.Module:
    """Returns GPT-2 small (124.4M parameters), input token ids (N, seq)."""
    return GPT2(dim=768, layers=12, heads=12)


def gpt2_medium() -> nn.Module:
    """Returns GPT-2 medium (354.8M parameters), input token ids (N, seq)."""
    return GPT2(dim=1024, layers=24, heads=16)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooModel:
    """A zoo entry: how to rebuild the model and what it looks like.

    Attributes:
        name: The zoo name, also the key in ``ZOO``.
        factory: ``"module:attr"`` reference to the zero-argument factory.
        params: Exact parameter count (tied weights counted once).
        family: ``"vision"`` (image input) or ``"language"`` (token-id input).
        vocab_size: Token vocabulary of a language model; ``None`` for vision.
    """

    name: str
    factory: str
    params: int
    family: str
    vocab_size: int | None = None

    def example_input(
        self,
        batch: int = 1,
        *,
        seq_len: int = 128,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Returns a random input batch of the shape and dtype the model expects.

        Args:
            batch: Batch size N.
            seq_len: Sequence length for language models; ignored for vision.
            generator: Source of randomness; the global RNG when ``None``.

        Returns:
            float32 images (N, 3, 224, 224), or int64 token ids (N, seq_len) over the vocab.
        """
        if self.family == "vision":
            return torch.randn(batch, *_IMAGE_SHAPE, generator=generator)
        assert self.vocab_size is not None
        return torch.randint(
            self.vocab_size, (batch, seq_len), generator=generator, dtype=torch.int64
        )


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("alexnet", "workloads.zoo:alexnet", 61_100_840, "vision"),
        ZooModel("vgg16", "workloads.zoo:vgg16", 138_357_544, "vision"),
        ZooModel("resnet50", "workloads.zoo:resnet50", 25_557_032, "vision"),
        ZooModel("bert_base", "workloads.zoo:bert_base", 109_482_240, "language", _BERT_VOCAB),
        ZooModel("gpt2", "workloads.zoo:gpt2", 124_439_808, "language", _GPT2_VOCAB),
        ZooModel("gpt2_medium", "workloads.zoo:gpt2_medium", 354_823_168, "language", _GPT2_VOCAB),
    )
}

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
# Materialisation
# --------------------------------------------------------------------------------------------

_NORMS = (nn.LayerNorm, nn.BatchNorm2d)

# Random fills run in chunks of this many elements, each from its own generator. A torch CPU
# generator yields ~100M values/s on one core, which alone would take ~4 s for gpt2_medium;
# independent chunks fill in parallel, and fixing their size (not the thread count) keeps the
# values the same on every machine.
_CHUNK = 1 << 22


def _random_fills(module: nn.Module) -> list[tuple[torch.Tensor, float]]:
    """Sets the constant-valued tensors owned by ``module``; returns the rest with their std."""
    fills = []
    owned = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    for name, tensor in owned:
        if name in ("bias", "running_mean", "num_batches_tracked"):
            tensor.zero_()
        elif name == "running_var" or isinstance(module, _NORMS):
            tensor.fill_(1.0)
        elif isinstance(module, nn.Conv2d):
            # He init, as torchvision uses: at a fixed std the deep ReLU conv stacks shrink or
            # blow up activations until outputs are degenerate.
            fills.append((tensor, math.sqrt(2.0 / tensor[0].numel())))
        else:
            # Linear and embedding weights: the 0.02 std BERT and GPT-2 are initialised with.
            fills.append((tensor, 0.02))
    return fills


def _normal_chunk(chunk: torch.Tensor, std: float, seed: int) -> None:
    chunk.normal_(0.0, std, generator=torch.Generator(device="cpu").manual_seed(seed))


@torch.no_grad()
def _init_weights(model: nn.Module, seed: int) -> None:
    """Fills every parameter and buffer of a freshly ``to_empty``'d model from ``seed``."""
    chunks = []
    for module in model.modules():
        for tensor, std in _random_fills(module):
            # Detached, as grad mode is per thread and the workers run outside this no_grad.
            chunks += [(chunk, std) for chunk in tensor.detach().view(-1).split(_CHUNK)]
    # Chunk seeds come from one generator in module order, so they depend on the seed alone.
    seeds = torch.randint(
        2**62, (len(chunks),), generator=torch.Generator().manual_seed(seed)
    ).tolist()
    # Threads suffice: normal_ releases the GIL, and each chunk has its own generator.
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        list(pool.map(_normal_chunk, *zip(*chunks), seeds))


def build(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Materialises a zoo model on CPU with deterministic random weights, in eval mode.

    The model is built on the meta device and then given uninitialised storage, so the cost
    is one pass of random fills rather than PyTorch's per-layer init plus a second overwrite.

    Args:
        name: A key of ``ZOO``.
        seed: Seed for the weights; the same seed gives a bit-identical state dict. The global
            RNG is left untouched.
        dtype: Floating-point dtype of parameters and float buffers.

    Returns:
        The model on CPU, in eval mode.

    Raises:
        KeyError: ``name`` is not in the zoo.
    """
    module_name, _, attr = zoo_model(name).factory.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    with torch.device("meta"):
        model = factory()
    model = model.to(dtype=dtype).to_empty(device="cpu")
    _init_weights(model, seed)
    return model.eval()
