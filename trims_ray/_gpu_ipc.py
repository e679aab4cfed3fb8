"""The GPU tier's handle protocol, without CUDA: which GPU a grant lives on and how a task finds
it under its own device numbering, how a model's blob is split into layers for pipelined
swap-in, and how tensors are viewed out of one device allocation.

A grant names its GPU by UUID and physical index; the receiving process maps that to its own
``cuda:i`` from its ``CUDA_VISIBLE_DEVICES`` (Ray sets it per task and actor), as Ray's CUDA IPC
transport (``ray/experimental/rdt/cuda_ipc_transport.py``) maps its ``ray_gpu_idx`` through
``ray.get_gpu_ids()``. The GPU holder is an actor with ``num_gpus=0``, so that it takes no GPU
from the tasks it serves; Ray 2.60 leaves such an actor's ``CUDA_VISIBLE_DEVICES`` untouched
(unless ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1``, which sets it to ""), so the holder is started
with its GPU's UUID in ``CUDA_VISIBLE_DEVICES`` and with ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1``
(see ``holder_env``): it sees exactly its GPU, as ``cuda:0``, under either setting.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._manifest import Manifest
from ._nvml import GpuInfo, GpuInventory, normalize_uuid, parse_visible_devices, uuid_matches, visible_gpus
from ._safetensors import torch_dtypes

# torch is imported by the functions that make tensors: the node cache imports this module for
# its GPU bookkeeping and, on a node without GPUs, never needs torch.
if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "DeviceIdentity",
    "local_index",
    "holder_env",
    "node_gpus",
    "LayerGroup",
    "plan_layers",
    "module_order",
    "module_waits",
    "device_tensors",
    "materialize_views",
]

NOSET_ENV = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
MiB = 1024 * 1024


@dataclass(frozen=True)
class DeviceIdentity:
    """Which GPU a grant's memory is on, in terms every process on the node can map.

    Attributes:
        uuid: the GPU's UUID ("GPU-..."): the identity checked on the receiving side.
        index: its physical index (NVML's, which is the integer a ``CUDA_VISIBLE_DEVICES``
            entry uses for it when CUDA numbers GPUs in PCI order, as it does for a node of one
            GPU model).
        label: Ray's id of the GPU on its node, i.e. the entry Ray writes into a task's
            ``CUDA_VISIBLE_DEVICES`` for it ("0", or a UUID when the raylet itself was started
            with UUIDs); the holder actor's name uses it.
        node_id: the Ray node (hex), "" when unknown.
    """

    uuid: str
    index: int
    label: str = ""
    node_id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "uuid", normalize_uuid(self.uuid))
        if type(self.index) is not int or self.index < 0:
            raise ValueError(f"index must be an int >= 0, got {self.index!r}")
        if not self.label:
            object.__setattr__(self, "label", str(self.index))


def local_index(device: DeviceIdentity, visible: str | None) -> int | None:
    """The ``cuda:i`` index under which a process with ``CUDA_VISIBLE_DEVICES=visible`` sees
    ``device``, or None when it does not see it.

    Unset: every GPU is visible in physical order, so the index is ``device.index``. Otherwise
    the position of the entry that names it: an integer entry equal to its physical index, or a
    UUID entry (or unique prefix) of its UUID. "" and "NoDevFiles" hide every GPU.
    """
    entries = parse_visible_devices(visible)
    if entries is None:
        return device.index
    for position, entry in enumerate(entries):
        if entry == device.index if isinstance(entry, int) else uuid_matches(entry, device.uuid):
            return position
    return None


def holder_env(uuid: str) -> dict[str, str]:
    """The environment of the GPU holder actor of the GPU ``uuid``: it sees exactly that GPU, as
    ``cuda:0``, and Ray does not overwrite that (the holder reserves no GPU resource)."""
    return {"CUDA_VISIBLE_DEVICES": normalize_uuid(uuid), NOSET_ENV: "1"}


def node_gpus(
    visible: str | None, inv: GpuInventory, ray_gpus: int | None = None
) -> tuple[list[tuple[str, GpuInfo]], str]:
    """The GPUs Ray manages on a node, each with Ray's id for it, or none and why.

    Args:
        visible: ``CUDA_VISIBLE_DEVICES`` as the node's raylet has it (a ``num_gpus=0`` actor such
            as the node cache inherits it in Ray 2.60).
        inv: the node's NVML inventory.
        ray_gpus: the node's "GPU" resource; Ray numbers only that many of the visible GPUs
            (``ray start --num-gpus``), in order. None: all visible ones.

    Returns:
        ([(label, gpu), ...], "") or ([], the reason the GPU tier is off on this node).
    """
    if not inv.available:
        return [], inv.reason
    gpus = visible_gpus(visible, inv)
    if not gpus:
        return [], f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU of this node from Ray: the GPU tier is off"
    if ray_gpus is not None:
        if ray_gpus <= 0:
            return [], "Ray reports no GPU resource on this node (ray start --num-gpus=0?): the GPU tier is off"
        gpus = gpus[: int(ray_gpus)]
    return gpus, ""


# -- layers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerGroup:
    """Tensors copied together during a swap-in, followed by one event.

    Attributes:
        modules: the module paths ("" for the root) whose own tensors are in this group.
        ranges: sorted, disjoint ``[start, end)`` byte ranges of the blob.
    """

    modules: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(end - start for start, end in self.ranges)


def _natural_key(name: str) -> list:
    # "h.10" after "h.2": module indices compare as numbers.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _module_of(tensor_name: str) -> str:
    return tensor_name.rpartition(".")[0]


def _coalesce(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(end, out[-1][1]))
        elif end > start:
            out.append((start, end))
    return tuple(out)


def plan_layers(
    manifest: Manifest, order: Sequence[str] | None = None, *, min_bytes: int = 4 * MiB
) -> tuple[LayerGroup, ...]:
    """Splits a blob into groups copied in module order, for a swap-in the task can start
    computing on before it ends.

    Tensors are grouped by the module that owns them; modules follow ``order`` (tensor names in
    the module's ``state_dict`` order, which is registration order and, for most models, the
    order a forward pass uses them; aliases in it stand for their targets), else the natural
    order of their names. Consecutive modules are merged until a group holds ``min_bytes`` (fewer
    copies and events for models of many small layers). The first group also holds the
    safetensors header, so the groups cover the whole blob exactly once.

    Raises:
        ValueError: min_bytes < 0.
    """
    if min_bytes < 0:
        raise ValueError(f"min_bytes must be >= 0, got {min_bytes}")
    specs = {t.name: t for t in manifest.tensors}
    rank: dict[str, int] = {}
    for position, name in enumerate(order or ()):
        stored = manifest.aliases.get(name, name)
        if stored in specs:
            rank.setdefault(stored, position)
    unranked = sorted((n for n in specs if n not in rank), key=_natural_key)
    ordered = sorted(rank, key=rank.__getitem__) + unranked
    modules: dict[str, list[tuple[int, int]]] = {}
    for name in ordered:
        modules.setdefault(_module_of(name), []).append((specs[name].start, specs[name].end))
    groups: list[LayerGroup] = []
    pending_modules: list[str] = []
    pending_ranges: list[tuple[int, int]] = [(0, manifest.data_start)]
    for module, ranges in modules.items():
        pending_modules.append(module)
        pending_ranges += ranges
        if sum(e - s for s, e in pending_ranges) >= min_bytes:
            groups.append(LayerGroup(tuple(pending_modules), _coalesce(pending_ranges)))
            pending_modules, pending_ranges = [], []
    if pending_modules or not groups:
        groups.append(LayerGroup(tuple(pending_modules), _coalesce(pending_ranges)))
    return tuple(groups)


def module_order(manifest: Manifest) -> list[str] | None:
    """The model's tensor names in its module's ``state_dict`` order, then its non-persistent
    buffers, as registration recorded them in the manifest (``Manifest.order``); None without
    one (no factory, or registered before orders were recorded: then ``plan_layers`` uses the
    names' natural order).

    Read from the manifest alone: the GPU holder is shared by every tenant, and building the
    module would run a tenant's factory (an import, or an unpickled callable) inside it."""
    return list(manifest.order) if manifest.order is not None else None


def module_waits(manifest: Manifest, groups: Sequence[LayerGroup]) -> dict[str, int]:
    """For each module path owning tensors, the group whose event must complete before that
    module runs: the last group holding one of its own tensors (an alias counts as its target).
    Events complete in group order, so waiting for group i also covers every earlier group."""
    group_of = {module: i for i, group in enumerate(groups) for module in group.modules}
    tensor_group = {t.name: group_of[_module_of(t.name)] for t in manifest.tensors}
    for alias, target in manifest.aliases.items():
        tensor_group[alias] = tensor_group[target]
    waits: dict[str, int] = {}
    for name, group in tensor_group.items():
        module = _module_of(name)
        waits[module] = max(waits.get(module, 0), group)
    return waits


# -- views of one allocation -------------------------------------------------------------------


def device_tensors(buffer: torch.Tensor, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Every tensor of the blob (aliases included) as a view into ``buffer``, a 1-D uint8
    tensor holding the blob from its first byte (on any device).

    No byte is copied: each tensor is a slice viewed as its dtype and shape, which the canonical
    layout keeps aligned for any allocation aligned to 8 bytes. A misaligned tensor (only
    possible in a foreign layout) is copied on its device instead.

    Raises:
        TypeError: buffer is not a 1-D uint8 tensor.
        ValueError: buffer is shorter than the blob.
    """
    import torch

    dtypes = torch_dtypes()
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise TypeError(f"buffer must be a 1-D uint8 tensor, got {buffer.dtype} of shape {tuple(buffer.shape)}")
    if buffer.numel() < manifest.nbytes:
        raise ValueError(f"buffer has {buffer.numel()} bytes, the blob of {manifest.name} needs {manifest.nbytes}")
    base = buffer.data_ptr()
    out: dict[str, torch.Tensor] = {}
    for spec in manifest.tensors:
        dtype = dtypes[spec.dtype]
        raw = buffer[spec.start : spec.end]
        if (base + spec.start) % dtype.itemsize:
            raw = raw.clone()
        out[spec.name] = raw.view(dtype).view(spec.shape)
    for alias, target in manifest.aliases.items():
        out[alias] = out[target]
    return out


def materialize_views(manifest: Manifest, buffer: torch.Tensor) -> nn.Module | dict[str, torch.Tensor]:
    """The model as views of ``buffer`` (see ``device_tensors``): its module built on meta with
    the views assigned as its parameters and buffers, or the state dict without a factory.

    A buffer in host memory is checked against the manifest's tensor index first
    (``Manifest.check_blob``). One on a GPU is not read here: its first layer may still be in
    flight (a pipelined swap-in) and reading it would wait for it."""
    from ._factory import assemble_module, resolve_factory

    tensors = device_tensors(buffer, manifest)  # checks the buffer's type and size first
    if buffer.device.type == "cpu":
        manifest.check_blob(buffer.numpy())
    if manifest.factory is None:
        return tensors
    stored = {spec.name: tensors[spec.name] for spec in manifest.tensors}
    source = f"{manifest.tenant}/{manifest.name}"
    return assemble_module(resolve_factory(manifest.factory), stored, manifest.aliases, source=source)


def attach_layer_waits(
    module: nn.Module, waits: Mapping[str, int], wait: Callable[[int], None]
) -> list[torch.utils.hooks.RemovableHandle]:
    """Makes each module of ``waits`` call ``wait(group)`` before it runs (a forward pre-hook),
    so that a pipelined swap-in's compute waits for exactly the layers it needs. Returns the
    hooks, to remove once every layer has arrived."""
    hooks = []
    for path, group in waits.items():
        try:
            target = module.get_submodule(path)
        except AttributeError:
            continue  # a tensor stored on a path that is not a module: covered by later waits
        hooks.append(target.register_forward_pre_hook(lambda _m, _a, g=group: wait(g)))
    return hooks


def quiet_from_numpy(array) -> torch.Tensor:
    """``torch.from_numpy`` of a possibly read-only array, without torch's warning: a swap-in
    only reads it."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)
