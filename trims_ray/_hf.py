"""Hugging Face directories: a model registered as ``save_pretrained`` left it.

A directory with a ``config.json`` is read the way ``transformers`` reads it, by the
architecture's own ``from_pretrained``: its checkpoint key mappings and base-model prefixes, tied
weights stored once, the ``dtype`` of ``config.json``, and non-persistent buffers rebuilt. The
result is a module like any other registered module. With no factory given, the factory is the
config itself (``{"transformers": <json>}`` in the manifest): a task builds the class named in
``architectures`` from it, on meta. ``transformers`` is imported only when such a model is used.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable

from torch import nn

from ._errors import ModelFormatError
from ._fsio import is_local
from ._safetensors import brief_repr
from ._torchvision_ops import ensure_torchvision_importable

__all__ = ["CONFIG_FILE", "config_entry", "config_factory", "load_pretrained", "is_pretrained_model"]

CONFIG_FILE = "config.json"
_INSTALL_HINT = "install transformers (pip install 'trims_ray[zoo]') on every node"


def _transformers():
    ensure_torchvision_importable()  # transformers imports torchvision when it is installed
    try:
        import transformers
    except ImportError:
        raise ModelFormatError(
            f"this model's architecture comes from a Hugging Face config.json: {_INSTALL_HINT}"
        ) from None
    return transformers


def is_pretrained_model(module: object) -> bool:
    """Whether ``module`` is a transformers model (without importing transformers)."""
    return any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
        for c in type(module).__mro__
    )


def config_entry(model: nn.Module) -> str:
    """The manifest's factory text for a transformers model: its class and its config."""
    return json.dumps(
        {"architecture": type(model).__name__, "config": model.config.to_dict()}, sort_keys=True
    )


def config_factory(text: str) -> Callable[[], nn.Module]:
    """The zero-argument factory a manifest's ``{"transformers": text}`` entry stands for.

    Raises:
        ValueError: the text is not a config this transformers can build.
        ModelFormatError: transformers is not installed.
    """
    transformers = _transformers()
    try:
        doc = json.loads(text)
        architecture, config_doc = doc["architecture"], doc["config"]
        cls = getattr(transformers, architecture)
        config_cls = transformers.CONFIG_MAPPING[config_doc["model_type"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"transformers factory {brief_repr(text)} cannot be built with transformers "
            f"{transformers.__version__}: {exc!r}"
        ) from None

    def build() -> nn.Module:
        return cls(config_cls.from_dict(dict(config_doc)))

    build.__qualname__ = f"transformers:{architecture}"
    return build


def load_pretrained(fs, path: str, shown: str, architecture: type | None = None) -> nn.Module:
    """The model of a Hugging Face directory, as ``from_pretrained`` builds it, on the CPU.

    Args:
        fs, path: the directory on its filesystem (a remote one is copied to a local temporary
            directory first: ``from_pretrained`` reads local files).
        shown: the directory's URI, for messages.
        architecture: the transformers class to build; default: the first of ``architectures``
            in ``config.json``.

    Raises:
        ModelFormatError: no usable config.json, an architecture transformers does not have, or
            checkpoint keys that do not map onto the module (named).
    """
    transformers = _transformers()
    if is_local(fs):
        return _load_local(transformers, path, shown, architecture)
    with tempfile.TemporaryDirectory(prefix="trims_ray-hf-") as local:
        for entry in fs.ls(path, detail=True):
            if entry["type"] == "file":
                fs.get_file(entry["name"], os.path.join(local, entry["name"].rsplit("/", 1)[-1]))
        return _load_local(transformers, local, shown, architecture)


def _load_local(transformers, directory: str, shown: str, architecture: type | None) -> nn.Module:
    if architecture is None:
        try:
            config = transformers.AutoConfig.from_pretrained(directory)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelFormatError(f"{shown}/{CONFIG_FILE}: not a usable config: {exc}") from None
        names = getattr(config, "architectures", None) or []
        if not names:
            raise ModelFormatError(
                f"{shown}/{CONFIG_FILE}: names no architecture ('architectures' is empty): pass "
                "factory= to register"
            )
        architecture = getattr(transformers, names[0], None)
        if architecture is None:
            raise ModelFormatError(
                f"{shown}/{CONFIG_FILE}: architecture {names[0]!r} is not in transformers "
                f"{transformers.__version__}: upgrade it or pass factory= to register"
            )
    try:
        model, info = architecture.from_pretrained(directory, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelFormatError(f"{shown}: transformers cannot load it as {architecture.__name__}: {exc}") from None
    problems = []
    for key, what in (
        ("missing_keys", "missing from the checkpoint"),
        ("unexpected_keys", "in the checkpoint but not the module"),
        ("mismatched_keys", "of another shape than the module's"),
    ):
        keys = sorted(str(k) for k in info.get(key, ()))
        if keys:
            problems.append(f"{len(keys)} {what} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})")
    errors = info.get("error_msgs") or []
    if errors:
        problems.append(f"errors: {brief_repr(list(errors))}")
    if problems:
        raise ModelFormatError(
            f"{shown}: the checkpoint does not map onto {architecture.__name__}: " + "; ".join(problems)
        )
    return model.eval()
