"""Factories: how a model's architecture is named in a manifest and rebuilt around its weights.

A factory is a zero-argument callable returning an ``nn.Module``. Importable ones are stored as
"module:attr" references; others (defined in ``__main__``, a notebook, or a closure) cannot be
imported on a worker, so they are pickled by value with Ray's cloudpickle. Modules are built on
the meta device, which allocates nothing, and then take the cached tensors with
``load_state_dict(..., assign=True)``.
"""

from __future__ import annotations

import base64
import importlib
import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ._errors import ModelFormatError
from ._safetensors import brief_repr

__all__ = [
    "factory_ref",
    "check_factory_ref",
    "resolve_factory",
    "build_on_meta",
    "assemble_module",
    "check_factory_fits",
]

_REF_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def factory_ref(factory: str | Callable[[], nn.Module] | None) -> dict[str, str] | None:
    """The manifest entry for ``factory``: ``{"import": "mod:attr"}`` or ``{"pickle": b64}``.

    Raises:
        TypeError: ``factory`` is neither a "module:attr" string nor a callable.
        ValueError: a string that is not of the form "module:attr" or does not import.
    """
    if factory is None:
        return None
    if isinstance(factory, str):
        resolve_factory({"import": check_factory_ref(factory)})  # fail now, not on every worker
        return {"import": factory}
    if not callable(factory):
        raise TypeError(f"factory must be a callable or 'module:attr', got {type(factory).__name__}")
    ref = _import_ref(factory)
    if ref is not None:
        return {"import": ref}
    from ray import cloudpickle  # imported late: only by-value factories need Ray at register

    return {"pickle": base64.b64encode(cloudpickle.dumps(factory)).decode("ascii")}


def check_factory_ref(ref: object) -> str:
    """Returns ``ref`` if it is a "package.module:attribute" reference (nothing is imported).

    Raises:
        TypeError: ``ref`` is not a str.
        ValueError: it does not have that form (relative, empty or non-identifier parts).
    """
    if not isinstance(ref, str):
        raise TypeError(f"factory reference must be a str, got {type(ref).__name__}")
    if not _REF_RE.fullmatch(ref):
        raise ValueError(f"factory {brief_repr(ref)} must look like 'package.module:attribute'")
    return ref


def _import_ref(factory: Callable) -> str | None:
    """'module:qualname' if importing that gives back this very object, else None."""
    module, qualname = getattr(factory, "__module__", None), getattr(factory, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    try:
        if _resolve_import(f"{module}:{qualname}") is factory:
            return f"{module}:{qualname}"
    except (ImportError, AttributeError):
        pass
    return None


def _resolve_import(ref: str) -> object:
    module_name, attr_path = ref.split(":", 1)
    obj: object = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_factory(entry: Mapping[str, str]) -> Callable[[], nn.Module]:
    """The callable a manifest's factory entry names.

    Raises:
        ValueError: the reference is malformed or does not import, or the pickle cannot be loaded.
        TypeError: what it names is not callable.
    """
    if "import" in entry:
        # Entries come from manifests in the store: a malformed one ("..pkg:f", "noattr") would
        # otherwise reach importlib and fail with its own TypeError or an unpacking message.
        check_factory_ref(entry["import"])
        try:
            obj = _resolve_import(entry["import"])
        except (ImportError, AttributeError) as exc:
            raise ValueError(
                f"factory {entry['import']!r} cannot be imported here ({exc}); install the "
                "package that defines it on every node, or register the callable itself"
            ) from None
    else:
        from ray import cloudpickle

        try:
            obj = cloudpickle.loads(base64.b64decode(entry["pickle"]))
        except Exception as exc:  # unpickling runs arbitrary code; any failure is a bad factory
            raise ValueError(f"pickled factory cannot be loaded here: {exc!r}") from None
    if not callable(obj):
        raise TypeError(f"factory {entry.get('import', '<pickled>')} is not callable")
    return obj


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """Calls ``factory`` with the meta device as default: allocates no weight memory."""
    with torch.device("meta"):
        module = factory()
    if not isinstance(module, nn.Module):
        raise TypeError(f"factory returned {type(module).__name__}, not an nn.Module")
    return module


def check_factory_fits(module: nn.Module, shapes: Mapping[str, tuple[int, ...]], *, source: str) -> None:
    """Raises ModelFormatError unless ``module``'s state dict has exactly these names and shapes."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & shapes.keys() if expected[k] != tuple(shapes[k]))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with wrong shapes (e.g. {k}: {shapes[k]} vs {expected[k]})")
        raise ModelFormatError(
            f"{source}: the weights do not fit the factory's architecture: " + "; ".join(parts)
        )


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"{len(names)} tensors ({shown}{', ...' if len(names) > limit else ''})"


def assemble_module(factory: Callable[[], nn.Module], tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Builds the architecture on meta and makes ``tensors`` its parameters and buffers, as is.

    The tensors are assigned, not copied: the module's storage is the caller's memory.
    """
    module = build_on_meta(factory)
    module.load_state_dict(tensors, strict=True, assign=True)
    return module.eval()
