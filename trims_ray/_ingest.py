"""Turning what a user passes to ``register`` into one flat dict of CPU tensors, and proving
that a task will rebuild the model from them exactly.

Accepted: an ``nn.Module`` (its state dict, and its non-persistent buffers when it has a
factory), a state dict, the path or URI of a ``.safetensors`` file, or a directory of safetensors
shards (with or without ``model.safetensors.index.json``). A Hugging Face directory (one with a
``config.json``) is read by transformers' own ``from_pretrained`` (see ``_hf``). Tied weights
(two names, one tensor) are stored once and recorded as aliases. Files are parsed by the same
validating parser as every other outside input.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ._errors import ModelFormatError
from ._factory import (
    assemble_module,
    build_on_meta,
    check_factory_fits,
    check_reproduces,
    module_tensors,
    non_persistent_buffers,
    resolve_factory,
    same_bits,
)
from ._fsio import open_fs
from ._hf import CONFIG_FILE, config_entry, is_pretrained_model, load_pretrained
from ._reader import read_blob
from ._safetensors import brief_repr, parse_header, tensors_from_buffer

__all__ = ["Weights", "collect_weights", "prove_rebuild"]

HF_INDEX = "model.safetensors.index.json"


@dataclass
class Weights:
    """Flat tensors to store, names that alias a stored tensor, a description of the source,
    the factory entry (given, or derived from a Hugging Face config), the source module
    when there is one to check a rebuild against, and (set by ``prove_rebuild``) the stored
    names in the module's own order, which the GPU tier copies in without running the factory."""

    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str]
    source: str
    factory: dict[str, str] | None = None
    module: nn.Module | None = None
    order: list[str] | None = None


def collect_weights(
    weights: object,
    *,
    storage_options: dict | None = None,
    factory: dict[str, str] | None = None,
) -> Weights:
    """Normalises ``weights`` (module, state dict, file or shard directory) to flat tensors.

    Args:
        factory: the manifest's factory entry, when one was given. A transformers module or a
            Hugging Face directory without one gets its config as factory.

    Raises:
        TypeError: ``weights`` is none of the accepted kinds, or holds non-tensors.
        ValueError: a tensor has no data (meta device).
        FileNotFoundError: the path or URI does not exist.
        ModelFormatError: a file is not valid safetensors, shards disagree with their index, or
            two shards hold the same tensor name; a Hugging Face checkpoint whose keys do not
            map onto its architecture.
    """
    if isinstance(weights, nn.Module):
        return _from_module(weights, factory)
    if isinstance(weights, Mapping):
        return _with_factory(_from_state_dict(weights, "<state dict>"), factory)
    if isinstance(weights, (str, os.PathLike)):
        fs, path = open_fs(weights, storage_options)
        # Only a Hugging Face directory asks what the factory builds (a meta build): with no
        # factory transformers reads it; with one, only if it builds a transformers model.
        if fs.isfile(f"{path}/{CONFIG_FILE}"):
            architecture = _pretrained_architecture(factory)
            if architecture is not None or (factory is None and _have_transformers()):
                module = load_pretrained(fs, path, fs.unstrip_protocol(path), architecture)
                weights_in = _from_module(module, factory)
                weights_in.source = fs.unstrip_protocol(path)
                return weights_in
        return _with_factory(_from_files(weights, storage_options), factory)
    raise TypeError(
        "weights must be an nn.Module, a state dict, or the path/URI of a .safetensors file or "
        f"a directory of shards; got {type(weights).__name__}"
    )


def _from_module(module: nn.Module, factory: dict[str, str] | None) -> Weights:
    source = f"<{type(module).__name__} module>"
    if factory is None and is_pretrained_model(module):
        factory = {"transformers": config_entry(module)}
    if factory is None:  # tasks get the state dict: exactly what state_dict() holds
        return _from_state_dict(module.state_dict(), source)
    weights_in = _from_state_dict(module_tensors(module), source)
    weights_in.factory, weights_in.module = factory, module
    return weights_in


def _with_factory(weights_in: Weights, factory: dict[str, str] | None) -> Weights:
    weights_in.factory = factory
    return weights_in


def _have_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def _pretrained_architecture(factory: dict[str, str] | None) -> type | None:
    """The transformers class the factory builds, if it builds one (on meta: no memory)."""
    if factory is None:
        return None
    module = build_on_meta(resolve_factory(factory))
    return type(module) if is_pretrained_model(module) else None


def prove_rebuild(weights_in: Weights, example_input: object = None) -> None:
    """Builds the module as a task will, from the tensors to store, and compares it with the
    source, every parameter and buffer bit for bit (and the forward on ``example_input``).

    Non-persistent buffers that the source has and the tensors lack (a checkpoint never holds
    them) are added to ``weights_in.tensors``: from the source module, or, for a checkpoint,
    as the factory's own ``__init__`` computes them on the CPU.

    Raises:
        ModelFormatError: names or shapes that do not fit the architecture, or a rebuilt module
            that differs from the source, naming the tensors.
    """
    assert weights_in.factory is not None
    factory = resolve_factory(weights_in.factory)
    where = weights_in.source
    shapes = {name: tuple(t.shape) for name, t in weights_in.tensors.items()}
    shapes.update({alias: shapes[target] for alias, target in weights_in.aliases.items()})
    meta = build_on_meta(factory)
    check_factory_fits(meta, shapes, source=where)
    reference = weights_in.module
    if reference is None:
        reference = _reference_from_checkpoint(factory, weights_in)
    stored = set(weights_in.tensors) | set(weights_in.aliases)
    for name, buffer in non_persistent_buffers(reference).items():
        if name not in stored:
            weights_in.tensors[name] = buffer.detach()
    built = assemble_module(factory, weights_in.tensors, weights_in.aliases, source=where)
    check_reproduces(built, reference, where=where)
    # Recorded here, in the registering tenant's process, so that the shared GPU holder plans
    # its layer copies from the manifest alone and never runs (or unpickles) tenant code.
    stored = set(weights_in.tensors) | set(weights_in.aliases)
    weights_in.order = [n for n in module_tensors(meta) if n in stored]
    if example_input is not None:
        _check_forward(built, reference, example_input, where)


def _reference_from_checkpoint(factory, weights_in: Weights) -> nn.Module:
    """The module a checkpoint stands for: its tensors in the factory's architecture, and the
    non-persistent buffers the architecture's ``__init__`` computes (built on the CPU, once,
    only when it has any)."""
    meta = build_on_meta(factory)
    buffers = non_persistent_buffers(meta)
    tensors = dict(weights_in.tensors)
    if buffers:
        with torch.no_grad():
            real = factory()
        tensors.update({k: v.detach() for k, v in non_persistent_buffers(real).items()})
    return assemble_module(factory, tensors, weights_in.aliases, source=weights_in.source)


def _check_forward(built: nn.Module, reference: nn.Module, example_input: object, where: str) -> None:
    modes = {sub: sub.training for sub in reference.modules()}
    reference.eval()  # dropout would make two forwards differ; the user's modes come back after
    try:
        with torch.inference_mode():
            expected = _call(reference, example_input)
            got = _call(built, example_input)
    finally:
        for sub, training in modes.items():
            sub.training = training
    differ = [path for path, a, b in _leaves(got, expected) if a is None or b is None or not same_bits(a, b)]
    if differ:
        raise ModelFormatError(
            f"{where}: the rebuilt module's forward on the example input differs from the "
            f"source's at {', '.join(differ[:5])}"
        )


def _call(module: nn.Module, example_input: object) -> object:
    if isinstance(example_input, Mapping):
        return module(**example_input)
    if isinstance(example_input, tuple):
        return module(*example_input)
    return module(example_input)


def _leaves(a: object, b: object, path: str = "output") -> list[tuple[str, torch.Tensor | None, torch.Tensor | None]]:
    """Pairs of tensors at the same place in two outputs (tensors, tuples, lists, mappings)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return [(path, a if isinstance(a, torch.Tensor) else None, b if isinstance(b, torch.Tensor) else None)]
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for key in dict.fromkeys([*a.keys(), *b.keys()]):
            out += _leaves(a.get(key), b.get(key), f"{path}[{key!r}]")
        return out
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        if len(a) != len(b):
            return [(path, None, None)]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += _leaves(x, y, f"{path}[{i}]")
        return out
    return []


def _from_state_dict(state: Mapping, source: str) -> Weights:
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name in sorted(state):  # sorted: which of two tied names is stored does not vary
        t = state[name]
        if not isinstance(name, str) or not name:
            raise TypeError(f"{source}: state dict keys must be non-empty strings, got {name!r}")
        if name == "__metadata__":
            raise ValueError(f"{source}: the tensor name '__metadata__' is reserved by safetensors")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{source}: {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.is_meta:
            raise ValueError(f"{source}: tensor {name!r} is on the meta device: it has no data to store")
        if t.layout != torch.strided or t.is_quantized:
            raise TypeError(f"{source}: tensor {name!r} is {t.layout}/quantized; store dense tensors")
        # Two names for the very same view (tied embeddings) are stored once.
        identity = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
        if t.numel() and identity in seen:
            aliases[name] = seen[identity]
            continue
        seen[identity] = name
        tensors[name] = t.detach()
    return Weights(tensors, aliases, source)


def _from_files(location: str | os.PathLike, storage_options: dict | None) -> Weights:
    fs, path = open_fs(location, storage_options)
    shown = fs.unstrip_protocol(path)
    if not fs.exists(path):
        raise FileNotFoundError(f"no weights at {shown}")
    files, weight_map = _shard_files(fs, path, shown) if fs.isdir(path) else ([path], None)
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for file in files:
        file_shown = fs.unstrip_protocol(file)
        buffer, _ = read_blob(fs, file, source=file_shown)
        layout = parse_header(buffer, source=file_shown)
        for name, tensor in tensors_from_buffer(buffer, layout).items():
            if name in tensors:
                raise ModelFormatError(
                    f"{shown}: tensor {name!r} appears in both {origin[name]} and {file_shown}"
                )
            tensors[name] = tensor
            origin[name] = file_shown
    if weight_map is not None:
        _check_index(weight_map, shown, origin)
    return Weights(tensors, {}, shown)


def _shard_files(fs, directory: str, shown: str) -> tuple[list[str], dict[str, str] | None]:
    """The shard files of a directory, and its index's weight map when it has one."""
    index_path = f"{directory}/{HF_INDEX}"
    if fs.isfile(index_path):
        weight_map = _read_index(fs, index_path, shown)
        names = sorted(set(weight_map.values()))
        for name in names:
            if "/" in name or "\\" in name or name in ("", ".", ".."):
                raise ModelFormatError(
                    f"{shown}/{HF_INDEX}: shard name {brief_repr(name)} is not a plain file name"
                )
        files = [f"{directory}/{name}" for name in names]
        missing = [name for name, f in zip(names, files) if not fs.isfile(f)]
        if missing:
            raise ModelFormatError(
                f"{shown}/{HF_INDEX}: lists shards that are missing: {brief_repr(missing)}"
            )
        return files, weight_map
    # Only files: a subdirectory named "x.safetensors" is not a shard (reading it would raise
    # IsADirectoryError).
    files = sorted(
        e["name"]
        for e in fs.ls(directory, detail=True)
        if e["name"].endswith(".safetensors") and e["type"] == "file"
    )
    if not files:
        raise ModelFormatError(f"{shown}: directory holds no .safetensors files")
    return files, None


def _read_index(fs, index_path: str, shown: str) -> dict[str, str]:
    try:
        doc = json.loads(fs.cat_file(index_path))
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TypeError("weight_map must map tensor names to shard file names")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ModelFormatError(f"{shown}/{HF_INDEX}: not a valid shard index: {exc!r}") from None
    if not weight_map:
        raise ModelFormatError(f"{shown}/{HF_INDEX}: weight_map is empty")
    return weight_map


def _check_index(weight_map: dict[str, str], shown: str, origin: dict[str, str]) -> None:
    """Every tensor must be in the shard the index names, and the index must name only those."""
    placed = {name: file.rsplit("/", 1)[-1] for name, file in origin.items()}
    if placed != weight_map:
        missing = sorted(weight_map.keys() - placed.keys())[:5]
        extra = sorted(placed.keys() - weight_map.keys())[:5]
        moved = sorted(k for k in weight_map.keys() & placed.keys() if weight_map[k] != placed[k])[:5]
        raise ModelFormatError(
            f"{shown}: shards disagree with {HF_INDEX}: missing {missing}, not in the index "
            f"{extra}, in another shard than listed {moved}"
        )
