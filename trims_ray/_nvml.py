"""What GPUs a node has, from NVML (``nvidia-ml-py``, imported as ``pynvml``): per GPU its NVML
index, UUID, name, total and free bytes. The GPU tier sizes its budget from it and names GPUs by
UUID, the one identity that survives every process's own ``CUDA_VISIBLE_DEVICES`` numbering.

Nothing here raises for a missing GPU: ``inventory()`` answers "no GPU" with the reason (NVML
library missing, driver not loaded, no devices, a driver error), so the tier is off and says so.
Parsing is kept in pure functions (NVML results, UUID strings, ``CUDA_VISIBLE_DEVICES`` values)
that tests feed fake data.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GpuInfo",
    "GpuInventory",
    "inventory",
    "gpu_info",
    "nvml_reason",
    "normalize_uuid",
    "uuid_matches",
    "parse_visible_devices",
    "visible_gpus",
]

log = logging.getLogger("trims_ray")

# A GPU's UUID as NVML and nvidia-smi print it ("GPU-" and 8-4-4-4-12 hex digits); MIG
# instances use "MIG-". CUDA_VISIBLE_DEVICES also accepts any unique prefix of one.
_UUID_RE = re.compile(r"(GPU|MIG)-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}")
_BARE_UUID_RE = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}")
_INT_RE = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML sees it.

    Attributes:
        index: NVML's index (PCI bus order, over all the node's GPUs whatever a process's
            ``CUDA_VISIBLE_DEVICES`` says).
        uuid: "GPU-xxxxxxxx-..." in lower case.
        name: the product name, e.g. "NVIDIA H100 80GB HBM3".
        total: device memory in bytes.
        free: device memory free now, in bytes (all processes counted).
    """

    index: int
    uuid: str
    name: str
    total: int
    free: int


@dataclass(frozen=True)
class GpuInventory:
    """The answer of ``inventory()``: the GPUs, or none and why.

    Attributes:
        gpus: the node's GPUs in NVML index order; empty when there are none or NVML failed.
        reason: why there are no GPUs ("" when there are some).
        driver: the driver version, when NVML answered.
    """

    gpus: tuple[GpuInfo, ...] = ()
    reason: str = ""
    driver: str = ""

    @property
    def available(self) -> bool:
        return bool(self.gpus)

    def by_uuid(self, uuid: str) -> GpuInfo | None:
        """The GPU with this UUID (or unique UUID prefix, as CUDA accepts), else None."""
        found = [g for g in self.gpus if uuid_matches(uuid, g.uuid)]
        return found[0] if len(found) == 1 else None


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes, newer ones str.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def normalize_uuid(raw: str | bytes) -> str:
    """A GPU UUID in the canonical form "GPU-<8-4-4-4-12 hex>" (lower case).

    Accepts what NVML returns (str or bytes, "GPU-..." or "MIG-..."), and the bare form torch's
    ``get_device_properties(i).uuid`` prints (no prefix: taken as "GPU-").

    Raises:
        ValueError: not a UUID.
    """
    text = _text(raw).strip()
    prefix, sep, rest = text.partition("-")
    if sep and prefix.upper() in ("GPU", "MIG"):
        text = f"{prefix.upper()}-{rest.lower()}"
    else:
        text = text.lower()
        if _BARE_UUID_RE.fullmatch(text):
            text = f"GPU-{text}"
    if not _UUID_RE.fullmatch(text):
        raise ValueError(f"not a GPU UUID: {_text(raw)!r} (expected GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")
    return text


def uuid_matches(entry: str, uuid: str) -> bool:
    """Whether a ``CUDA_VISIBLE_DEVICES``-style UUID entry (full, or a prefix as CUDA accepts:
    "GPU-8932f937") names the GPU ``uuid``. Case-insensitive in the hex digits."""
    prefix, sep, rest = entry.strip().partition("-")
    if not sep or prefix.upper() not in ("GPU", "MIG"):
        return False
    want = f"{prefix.upper()}-{rest.lower()}"
    try:
        full = normalize_uuid(uuid)
    except ValueError:
        return False
    return len(want) > 4 and full.startswith(want)


def parse_visible_devices(value: str | None) -> list[int | str] | None:
    """The devices a ``CUDA_VISIBLE_DEVICES`` value makes visible, in the order CUDA numbers
    them (entry i becomes the process's ``cuda:i``).

    Returns:
        None when the variable is unset (every GPU is visible, in CUDA's own order); ``[]`` for
        "" and for "NoDevFiles" (what Ray and some schedulers set for "no GPU"); else a list of
        ints (indices) and UUID strings ("GPU-...", "MIG-...", as given, prefixes allowed).
        As CUDA does, the list stops at the first entry that is not a valid device: a negative
        or unparsable index hides it and everything after it.
    """
    if value is None:
        return None
    value = value.strip()
    if value in ("", "NoDevFiles"):
        return []
    out: list[int | str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if _INT_RE.fullmatch(entry):
            index = int(entry)
            if index < 0:
                break
            out.append(index)
        elif entry.partition("-")[0].upper() in ("GPU", "MIG") and len(entry) > 4:
            out.append(entry)
        else:
            break
    return out


def visible_gpus(value: str | None, inv: GpuInventory) -> list[tuple[str, GpuInfo]]:
    """The node's GPUs a process with ``CUDA_VISIBLE_DEVICES=value`` sees, in its own order,
    each with the label that value gives it (what Ray calls the GPU's id: "0", "GPU-...").

    Integer entries are taken as NVML indices, which match CUDA's numbering when the GPUs
    are of one model or ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (CUDA's default puts the fastest
    first); the GPU tier checks the UUID of the device it opens, so a mismatch is caught.
    Entries naming no GPU of ``inv`` are left out.
    """
    entries = parse_visible_devices(value)
    if entries is None:
        return [(str(g.index), g) for g in inv.gpus]
    by_index = {g.index: g for g in inv.gpus}
    out = []
    for entry in entries:
        gpu = by_index.get(entry) if isinstance(entry, int) else inv.by_uuid(entry)
        if gpu is not None:
            out.append((str(entry), gpu))
    return out


def gpu_info(index: int, name: str | bytes, uuid: str | bytes, memory: Any) -> GpuInfo:
    """One GpuInfo from NVML's answers for a device (``memory``: NVML's memory info, with
    ``total`` and ``free`` in bytes).

    Raises:
        ValueError: a malformed UUID or negative sizes.
    """
    total, free = int(memory.total), int(memory.free)
    if total < 0 or free < 0 or free > total:
        raise ValueError(f"GPU {index}: NVML reports total={total}, free={free} bytes")
    return GpuInfo(index=int(index), uuid=normalize_uuid(uuid), name=_text(name).strip(), total=total, free=free)


def nvml_reason(exc: BaseException, nvml: Any = None) -> str:
    """Why NVML gave no GPUs, in words a user can act on."""
    if isinstance(exc, ImportError):
        return "nvidia-ml-py is not installed (pip install nvidia-ml-py): the GPU tier is off"
    value = getattr(exc, "value", None)
    if nvml is not None and value is not None:
        if value == getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", object()):
            return "NVML library (libnvidia-ml.so.1) not found: no NVIDIA driver on this node, so the GPU tier is off"
        if value == getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", object()):
            return "the NVIDIA driver is not loaded on this node: the GPU tier is off"
        if value == getattr(nvml, "NVML_ERROR_NO_PERMISSION", object()):
            return "NVML refused access (no permission to the GPU devices): the GPU tier is off"
    return f"NVML error ({exc}): the GPU tier is off"


def inventory(nvml: Any = None) -> GpuInventory:
    """The node's GPUs and their memory, or an empty inventory with the reason; never raises
    for NVML's or the driver's sake.

    Args:
        nvml: the ``pynvml`` module (injected for tests); default: import it.
    """
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError as exc:
            return GpuInventory(reason=nvml_reason(exc))
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError and its subclasses; a broken library may raise others
        return GpuInventory(reason=nvml_reason(exc, nvml))
    try:
        try:
            driver = _text(nvml.nvmlSystemGetDriverVersion())
        except Exception:  # the version is informative only
            driver = ""
        gpus = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            gpus.append(
                gpu_info(
                    index,
                    nvml.nvmlDeviceGetName(handle),
                    nvml.nvmlDeviceGetUUID(handle),
                    nvml.nvmlDeviceGetMemoryInfo(handle),
                )
            )
    except Exception as exc:
        log.warning("trims_ray: NVML failed while listing GPUs: %s", exc)
        return GpuInventory(reason=nvml_reason(exc, nvml))
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # shutting down is best effort
            pass
    if not gpus:
        return GpuInventory(reason="NVML found no GPU on this node: the GPU tier is off", driver=driver)
    return GpuInventory(gpus=tuple(gpus), driver=driver)

