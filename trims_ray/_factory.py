"""Factories: how a model's architecture is named in a manifest and rebuilt around its weights.

A factory is a zero-argument callable returning an ``nn.Module``. Importable ones are stored as
"module:attr" references; others (defined in ``__main__``, a notebook, or a closure) cannot be
imported on a worker, so they are pickled by value with Ray's cloudpickle; a Hugging Face
architecture registered from its ``config.json`` is stored as that config (``_hf``). Modules are
built on the meta device with no initialiser run, which allocates and computes nothing, and then
take the cached tensors as they are: parameters and persistent buffers by
``load_state_dict(..., assign=True)``, non-persistent buffers (rotary ``inv_freq``,
``position_ids``) in place, and tied parameters as one shared ``Parameter``.
"""

from __future__ import annotations

import base64
import importlib
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._errors import ModelFormatError
# Checked where manifests are parsed (which import no torch); re-exported for the builders here.
from ._manifest import check_factory_ref

__all__ = [
    "factory_ref",
    "check_factory_ref",
    "resolve_factory",
    "build_on_meta",
    "module_tensors",
    "non_persistent_buffers",
    "assemble_module",
    "check_factory_fits",
    "check_reproduces",
    "same_bits",
]

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
    if "transformers" in entry:
        from ._hf import config_factory  # transformers is imported only for such models

        return config_factory(entry["transformers"])
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
    """Calls ``factory`` with the meta device as default and initialisers skipped: allocates no
    weight memory and runs no ``reset_parameters`` (on meta they would only cost time: through
    torch's decompositions, most of a small model's build).
    """
    with torch.device("meta"), _SkipMetaInitialisers():
        module = factory()
    if not isinstance(module, nn.Module):
        raise TypeError(f"factory returned {type(module).__name__}, not an nn.Module")
    return module


# In-place operations that only write values. On a meta tensor there are no values to write, so
# skipping them changes nothing; operations that change a tensor's shape or flags (resize_,
# unsqueeze_, requires_grad_) are not in the set and run as usual.
_VALUE_WRITES = frozenset(
    """uniform_ normal_ fill_ zero_ copy_ erfinv_ mul_ add_ sub_ div_ clamp_ clamp_min_
    clamp_max_ exponential_ random_ bernoulli_ cauchy_ log_normal_ geometric_ sqrt_ exp_ log_
    neg_ abs_ masked_fill_ fill_diagonal_ addcmul_ addcdiv_ lerp_ pow_ sign_ floor_ ceil_
    round_ trunc_ tanh_ sigmoid_ index_fill_ scatter_ index_copy_ copysign_""".split()
)
_INIT_FUNCTIONS = frozenset(
    getattr(nn.init, name)
    for name in dir(nn.init)
    if name.endswith("_") and not name.startswith("_") and callable(getattr(nn.init, name))
)


class _SkipMetaInitialisers(TorchFunctionMode):
    """Skips ``torch.nn.init`` functions and value-writing in-place ops on meta tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if (
            isinstance(target, torch.Tensor)
            and target.is_meta
            and (func in _INIT_FUNCTIONS or getattr(func, "__name__", None) in _VALUE_WRITES)
        ):
            return target
        return func(*args, **kwargs)


def non_persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's buffers that ``state_dict()`` leaves out (registered ``persistent=False``),
    by their dotted names: a module needs them to run, and a checkpoint does not hold them."""
    out: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for leaf in sub._non_persistent_buffers_set:
            tensor = sub._buffers.get(leaf)
            if tensor is not None:
                out.setdefault(f"{prefix}.{leaf}" if prefix else leaf, tensor)
    return out


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Everything of ``module`` that a rebuilt copy needs: its state dict (parameters and
    persistent buffers, tied names included) and its non-persistent buffers."""
    tensors = dict(module.state_dict(keep_vars=True))
    tensors.update(non_persistent_buffers(module))
    return {name: t.detach() for name, t in tensors.items()}


def _tensor_names(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module_tensors(module).items()}


def check_factory_fits(module: nn.Module, shapes: Mapping[str, tuple[int, ...]], *, source: str) -> None:
    """Raises ModelFormatError unless ``module``'s tensors (state dict and non-persistent
    buffers) have exactly these names and shapes. Non-persistent buffers may be absent from
    ``shapes``: a checkpoint never holds them, and ``check_reproduces`` catches one left out."""
    expected = _tensor_names(module)
    optional = non_persistent_buffers(module).keys()
    missing = sorted(expected.keys() - shapes.keys() - optional)
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


def assemble_module(
    factory: Callable[[], nn.Module],
    tensors: Mapping[str, torch.Tensor],
    aliases: Mapping[str, str] | None = None,
    *,
    source: str = "<model>",
) -> nn.Module:
    """Builds the architecture on meta and makes ``tensors`` its parameters and buffers, as is.

    ``tensors`` holds stored tensors by name (aliases need not be in it: ``aliases`` maps each
    tied name to the stored name it shares). The tensors are assigned, not copied: the module's
    storage is the caller's memory. Tied parameters come back as one ``Parameter``.

    Raises:
        ModelFormatError: a name the module does not have, or a tensor of the module left
            without data (on meta), named.
    """
    aliases = aliases or {}
    module = build_on_meta(factory)
    extra = non_persistent_buffers(module)
    named = dict(tensors)
    for alias, target in aliases.items():
        named[alias] = tensors[target]
    persistent = {k: v for k, v in named.items() if k not in extra}
    try:
        module.load_state_dict(persistent, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelFormatError(f"{source}: the weights do not fit the architecture: {exc}") from None
    for name, tensor in named.items():
        if name in extra:
            owner, _, leaf = name.rpartition(".")
            module.get_submodule(owner)._buffers[leaf] = tensor
    for alias, target in aliases.items():
        stored = _owner_slot(module, target)
        if stored is not None:
            owner, _, leaf = alias.rpartition(".")
            _set_slot(module.get_submodule(owner), leaf, stored)
    left = _left_on_meta(module)
    if left:
        raise ModelFormatError(
            f"{source}: after assembly {_few(left)} of the module have no data (on meta): they "
            "are neither stored nor rebuilt; register the model again from the module itself"
        )
    return module.eval()


def _owner_slot(module: nn.Module, name: str) -> torch.Tensor | None:
    owner, _, leaf = name.rpartition(".")
    sub = module.get_submodule(owner)
    return sub._parameters.get(leaf, sub._buffers.get(leaf))


def _set_slot(sub: nn.Module, leaf: str, value: torch.Tensor) -> None:
    if leaf in sub._parameters:
        sub._parameters[leaf] = value
    else:
        sub._buffers[leaf] = value


def _left_on_meta(module: nn.Module) -> list[str]:
    """Dotted names of the module's tensors on meta: parameters, buffers, and plain tensor
    attributes (a module that keeps a tensor outside its buffers would carry it off meta only
    through its own __init__)."""
    left = []
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for kind in (sub._parameters, sub._buffers):
            left += [dot + k for k, v in kind.items() if v is not None and v.is_meta]
        left += [
            dot + k
            for k, v in vars(sub).items()
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and v.is_meta
        ]
    return sorted(set(left))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors have the same dtype, shape and bytes (NaNs and signed zeros
    included, which ``torch.equal`` does not tell apart)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    flat_a = a.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    flat_b = b.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(flat_a, flat_b)


def check_reproduces(built: nn.Module, source: nn.Module, *, where: str) -> None:
    """Raises ModelFormatError naming every parameter and buffer of ``source`` that ``built``
    lacks or holds with other bits, and every parameter tie of ``source`` that ``built`` lost."""
    mine = _all_tensors(built)
    theirs = _all_tensors(source)
    missing = sorted(theirs.keys() - mine.keys())
    differ = sorted(k for k in theirs.keys() & mine.keys() if not same_bits(mine[k], theirs[k]))
    untied = sorted(
        f"{a}={b}" for a, b in _ties(source) if mine.get(a) is not mine.get(b)
    )
    if missing or differ or untied:
        parts = []
        if missing:
            parts.append(f"not reproduced: {_few(missing)}")
        if differ:
            parts.append(f"different values or dtype: {_few(differ)}")
        if untied:
            parts.append(f"ties lost: {_few(untied)}")
        raise ModelFormatError(
            f"{where}: the module a task would build differs from the source: " + "; ".join(parts)
        )


def _all_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


def _ties(module: nn.Module) -> list[tuple[str, str]]:
    """Pairs of parameter names that are one ``Parameter`` object in ``module``."""
    first: dict[int, str] = {}
    pairs = []
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            pairs.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    return pairs
