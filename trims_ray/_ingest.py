"""Turning what a user passes to ``register`` into one flat dict of CPU tensors.

Accepted: an ``nn.Module`` (its state dict), a state dict, the path or URI of a ``.safetensors``
file, or a directory of safetensors shards as Hugging Face writes them (with or without
``model.safetensors.index.json``). Tied weights (two names, one tensor) are stored once and
recorded as aliases. Files are parsed by the same validating parser as every other outside input.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ._errors import ModelFormatError
from ._fsio import open_fs
from ._reader import read_blob
from ._safetensors import brief_repr, parse_header, tensors_from_buffer

__all__ = ["Weights", "collect_weights"]

HF_INDEX = "model.safetensors.index.json"


@dataclass
class Weights:
    """Flat tensors to store, names that alias a stored tensor, and a description of the source."""

    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str]
    source: str


def collect_weights(weights: object, *, storage_options: dict | None = None) -> Weights:
    """Normalises ``weights`` (module, state dict, file or shard directory) to flat tensors.

    Raises:
        TypeError: ``weights`` is none of the accepted kinds, or holds non-tensors.
        ValueError: a tensor has no data (meta device).
        FileNotFoundError: the path or URI does not exist.
        ModelFormatError: a file is not valid safetensors, shards disagree with their index, or
            two shards hold the same tensor name.
    """
    if isinstance(weights, nn.Module):
        return _from_state_dict(weights.state_dict(), f"<{type(weights).__name__} module>")
    if isinstance(weights, Mapping):
        return _from_state_dict(weights, "<state dict>")
    if isinstance(weights, (str, os.PathLike)):
        return _from_files(weights, storage_options)
    raise TypeError(
        "weights must be an nn.Module, a state dict, or the path/URI of a .safetensors file or "
        f"a directory of shards; got {type(weights).__name__}"
    )


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
