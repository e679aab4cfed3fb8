"""The safetensors format as trims_ray uses it: parse a header, lay out a blob, view tensors.

Every blob in the store is a standard safetensors file in a canonical layout: header padded to 64
bytes, then the tensors whose size is a multiple of 64 bytes, then the others, each part ordered by
element size (largest first) then name. That puts every tensor at a multiple of its element size,
and most at a multiple of 64 as freshly allocated tensors are, so a task can view each tensor
straight out of a shared buffer without copying and compute exactly what the original computed.
The layout also makes the bytes (hence the sha256) depend only on the tensors, not on where they
came from. The parser is the gate for outside input: anything it accepts is well-formed,
anything else raises ModelFormatError naming the source.
"""

from __future__ import annotations

import functools
import json
import reprlib
import struct
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ._errors import ModelFormatError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPES",
    "ELEMENT_BYTES",
    "TensorSpec",
    "BlobLayout",
    "header_length",
    "parse_header",
    "plan_layout",
    "iter_blob_chunks",
    "tensors_from_buffer",
    "dtype_code",
    "torch_dtypes",
    "brief_repr",
]

# safetensors dtype code -> (torch's name for the dtype, bytes per element). The parser needs
# only the sizes (ELEMENT_BYTES), so that the processes that parse manifests and never build a
# module (the node cache, placement, the CLI) do not import torch (about 2 s and 250 MB each);
# tests/unit/test_safetensors.py checks the sizes against torch's own.
_DTYPE_TABLE: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
ELEMENT_BYTES: dict[str, int] = {code: size for code, (_, size) in _DTYPE_TABLE.items()}


@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype code -> torch dtype (imports torch on first use)."""
    import torch

    return {code: getattr(torch, name) for code, (name, _) in _DTYPE_TABLE.items()}


@functools.cache
def _codes() -> dict[torch.dtype, str]:
    return {dtype: code for code, dtype in torch_dtypes().items()}


def __getattr__(name: str):
    # DTYPES stays a module attribute for the callers that build tensors, made on first use.
    if name == "DTYPES":
        return torch_dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Where tensors start, relative to the blob's first byte (so absolutely, in every buffer the cache
# puts a blob in: Ray's object store, the GPU allocator and page-aligned reads align it as much).
ALIGN = 64
# The same ceiling the safetensors library applies: a header is metadata, never weights.
MAX_HEADER_BYTES = 100 * 1024 * 1024
_LEN = struct.Struct("<Q")
# torch sizes and strides are int64. The product of a shape's dimensions (zeros counted as 1, as
# torch's strides count them) must stay below this: next to a 0 dimension a tensor holds no bytes,
# so absurd dimensions would otherwise pass every size check and then fail in torch.
_MAX_EXTENT = 2**63 - 1
_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxdict, _BRIEF.maxstring, _BRIEF.maxother = 3, 8, 4, 60, 60


def brief_repr(value: object) -> str:
    """``repr`` bounded in depth and length, for quoting untrusted values in error messages
    (a hostile document must not make the message itself huge)."""
    return _BRIEF.repr(value)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a blob; ``start``/``end`` are absolute byte offsets in the blob."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class BlobLayout:
    """Where every tensor lies in a safetensors blob of ``nbytes`` bytes."""

    tensors: tuple[TensorSpec, ...]
    data_start: int
    nbytes: int
    metadata: Mapping[str, str] | None = None

    def to_index(self) -> dict[str, dict]:
        """The tensor index as the manifest stores it: name -> dtype, shape, offsets."""
        return {
            t.name: {"dtype": t.dtype, "shape": list(t.shape), "offsets": [t.start, t.end]}
            for t in self.tensors
        }


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype; TypeError if safetensors cannot hold it."""
    try:
        return _codes()[dtype]
    except KeyError:
        raise TypeError(
            f"dtype {dtype} cannot be stored as safetensors; supported: "
            + ", ".join(str(d).removeprefix("torch.") for d in torch_dtypes().values())
        ) from None


def header_length(prefix: bytes | memoryview, *, source: str) -> int:
    """The header length announced by the first 8 bytes of a safetensors file.

    Raises:
        ModelFormatError: fewer than 8 bytes, or a length above the 100 MiB header ceiling.
    """
    if len(prefix) < 8:
        raise ModelFormatError(
            f"{source}: not a safetensors file: {len(prefix)} bytes, shorter than the "
            "8-byte header length"
        )
    (n,) = _LEN.unpack_from(prefix, 0)
    if n > MAX_HEADER_BYTES:
        raise ModelFormatError(
            f"{source}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit "
            "(corrupt or not a safetensors file)"
        )
    return n


def parse_header(
    data: bytes | bytearray | memoryview, *, file_size: int | None = None, source: str = "<bytes>"
) -> BlobLayout:
    """Parses and validates a safetensors header.

    Args:
        data: the file's first bytes: at least the 8-byte length and the header (the whole
            file is fine).
        file_size: the file's total size when ``data`` is only its beginning; defaults to
            ``len(data)``. The tensors must cover the data section exactly.
        source: what to call the file in error messages.

    Returns:
        The layout, tensors in data order with absolute offsets.

    Raises:
        ModelFormatError: on anything malformed or truncated, naming ``source`` and the fault.
    """
    data = memoryview(data).cast("B")
    size = len(data) if file_size is None else file_size
    n = header_length(data, source=source)
    if 8 + n > size or 8 + n > len(data):
        raise ModelFormatError(
            f"{source}: truncated: the header announces {n} bytes but the file has "
            f"{max(size - 8, 0)} after the length"
        )
    try:
        header = json.loads(data[8 : 8 + n].tobytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, absurd nesting
        raise ModelFormatError(f"{source}: header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ModelFormatError(
            f"{source}: header must be a JSON object, got {type(header).__name__}"
        )

    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise ModelFormatError(f"{source}: __metadata__ must map strings to strings")

    data_start = 8 + n
    specs = [_parse_entry(name, entry, data_start, source) for name, entry in header.items()]
    # Names break ties (empty tensors at one offset), so the order never depends on the JSON's.
    specs.sort(key=lambda t: (t.start, t.end, t.name))
    # The data section must be covered exactly, as the safetensors spec requires: no overlap
    # (two tensors aliasing bytes) and no hole (bytes no tensor accounts for).
    cursor = data_start
    for spec in specs:
        if spec.start != cursor:
            what = "overlaps the previous tensor" if spec.start < cursor else "leaves a gap"
            raise ModelFormatError(
                f"{source}: tensor {spec.name!r} at offset {spec.start - data_start} {what} "
                f"(expected offset {cursor - data_start})"
            )
        cursor = spec.end
    if cursor != size:
        what = "truncated" if cursor > size else f"{size - cursor} trailing bytes after the tensors"
        raise ModelFormatError(
            f"{source}: {what}: tensors end at byte {cursor}, file has {size} bytes"
        )
    return BlobLayout(tuple(specs), data_start, size, metadata)


def _parse_entry(name: str, entry: object, data_start: int, source: str) -> TensorSpec:
    if not name:
        raise ModelFormatError(f"{source}: a tensor has an empty name")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ModelFormatError(
            f"{source}: tensor {name!r} must be an object with exactly dtype, shape, data_offsets"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ELEMENT_BYTES:
        raise ModelFormatError(
            f"{source}: tensor {name!r} has unknown dtype {brief_repr(dtype)}"
        )
    if not (isinstance(shape, list) and all(map(_is_count, shape))):
        raise ModelFormatError(
            f"{source}: tensor {name!r} shape must be a list of non-negative ints, got "
            f"{brief_repr(shape)}"
        )
    # Multiplied with a bound, not math.prod: the product of a hostile shape of a million
    # dimensions is a million-digit integer that takes minutes to compute.
    extent = 1
    for d in shape:
        extent *= max(d, 1)
        if extent > _MAX_EXTENT:
            raise ModelFormatError(
                f"{source}: tensor {name!r} shape {brief_repr(shape)} is too large: its "
                "dimensions multiply past 2**63 - 1, torch's limit"
            )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise ModelFormatError(
            f"{source}: tensor {name!r} data_offsets must be [begin, end], got "
            f"{brief_repr(offsets)}"
        )
    begin, end = offsets
    expected = (0 if 0 in shape else extent) * ELEMENT_BYTES[dtype]
    if end - begin != expected:
        raise ModelFormatError(
            f"{source}: tensor {name!r} spans {end - begin} bytes but {dtype} "
            f"{brief_repr(shape)} needs {expected}"
        )
    return TensorSpec(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0  # bool is an int subclass: rejected by `type is`


def plan_layout(tensors: Mapping[str, torch.Tensor]) -> tuple[BlobLayout, bytes]:
    """Lays out ``tensors`` canonically and returns the layout and the header bytes.

    The header bytes include the 8-byte length and the space padding that aligns the data
    section to ALIGN bytes; every tensor whose size is a multiple of ALIGN starts at a multiple
    of ALIGN, every other one at a multiple of its element size. The same tensors always give
    the same bytes.
    """
    # Tensors whose size is a multiple of ALIGN come first, so each starts ALIGN-aligned: CPU
    # kernels (oneDNN's) take another vector path for weights that are not, and would compute
    # other last bits than on the freshly allocated original. The rest follow by element size,
    # largest first, which keeps each aligned to its element size with no padding (safetensors
    # allows no gaps between tensors).
    def size_of(name: str) -> int:
        return tensors[name].numel() * tensors[name].element_size()

    order = sorted(tensors, key=lambda k: (size_of(k) % ALIGN != 0, -tensors[k].element_size(), k))
    index: dict[str, object] = {}
    cursor = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        index[name] = {
            "dtype": dtype_code(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [cursor, cursor + nbytes],
        }
        cursor += nbytes
    metadata = {"format": "pt"}
    index["__metadata__"] = metadata
    body = json.dumps(index, separators=(",", ":"), sort_keys=True).encode("utf-8")
    body += b" " * (-(8 + len(body)) % ALIGN)
    header = _LEN.pack(len(body)) + body
    layout = parse_header(header, file_size=len(header) + cursor, source="<new blob>")
    return layout, header


def iter_blob_chunks(
    layout: BlobLayout, header: bytes, tensors: Mapping[str, torch.Tensor]
) -> Iterator[memoryview]:
    """Yields the blob's bytes: the header, then each tensor's bytes in layout order.

    Contiguous CPU tensors are yielded as views of their own memory, without copying.
    """
    yield memoryview(header)
    for spec in layout.tensors:
        yield tensor_bytes(tensors[spec.name])


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes in row-major order (a view when the tensor is contiguous on the CPU)."""
    import torch

    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def tensors_from_buffer(buffer: np.ndarray, layout: BlobLayout) -> dict[str, torch.Tensor]:
    """Builds every tensor of ``layout`` as a view into ``buffer`` (a uint8 array of the blob).

    No bytes are copied when each tensor's address is a multiple of its element size, which
    the canonical layout guarantees for 8-byte aligned buffers; a misaligned tensor (possible in
    a foreign file) is copied instead, since torch cannot view it. A read-only buffer gives
    tensors that share its memory: callers that hand them out decide how to guard them.
    """
    if buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise TypeError(f"buffer must be a 1-D uint8 array, got {buffer.dtype} {buffer.shape}")
    if len(buffer) != layout.nbytes:
        raise ValueError(f"buffer has {len(buffer)} bytes, layout needs {layout.nbytes}")
    import torch

    dtypes = torch_dtypes()
    base = buffer.ctypes.data
    out: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        # torch warns that a read-only array gives a writable tensor; guarding is the caller's job.
        warnings.simplefilter("ignore", UserWarning)
        for spec in layout.tensors:
            dtype = dtypes[spec.dtype]
            raw = torch.from_numpy(buffer[spec.start : spec.end])
            if (base + spec.start) % dtype.itemsize:
                raw = raw.clone()
            out[spec.name] = raw.view(dtype).view(spec.shape)
    return out
