"""Tests of trims_ray's safetensors code: interop with the real safetensors library, the canonical
layout, zero-copy views, and the parser as the gate for outside input (faults, truncation, fuzz).
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trims_ray._errors import ModelFormatError
from trims_ray._safetensors import (
    DTYPES,
    ELEMENT_BYTES,
    MAX_HEADER_BYTES,
    BlobLayout,
    dtype_code,
    header_length,
    iter_blob_chunks,
    parse_header,
    plan_layout,
    tensors_from_buffer,
)

FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
INTEROP_DTYPES = FLOAT_DTYPES + [
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint64,
    torch.uint32,
    torch.uint16,
    torch.uint8,
    torch.bool,
]
SOURCE = "s3://bucket/weights/model.safetensors"

# Enough examples to find parser holes, few enough to stay fast; no deadline, so a slow CI
# machine does not turn into a flaky failure.
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- helpers -------------------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes, so that NaN payloads and -0.0 compare exactly."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        assert tuple(g.shape) == tuple(w.shape), name
        assert torch.equal(bits(g), bits(w)), name


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (every float bit pattern, NaN payloads included)."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def special_floats(dtype: torch.dtype) -> torch.Tensor:
    """NaN, +-inf, -0.0 and friends in ``dtype`` (float8_e4m3fn has no inf: it becomes NaN)."""
    values = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1.0, -1.5, 3.0e-3, 448.0]
    return torch.tensor(values, dtype=torch.float32).to(dtype)


def sample_tensors(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of one dtype in several shapes: 0-d, 1-d, 2-d, 3-d, with a 0-sized dimension."""
    out = {
        "scalar": random_tensor(dtype, (), seed),
        "vector": random_tensor(dtype, (17,), seed + 1),
        "matrix": random_tensor(dtype, (5, 7), seed + 2),
        "cube": random_tensor(dtype, (2, 3, 4), seed + 3),
        "empty": torch.empty((0, 3), dtype=dtype),
    }
    if dtype.is_floating_point:
        out["special"] = special_floats(dtype)
    return out


def mixed_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """One tensor of every dtype, sizes chosen so a naive layout would misalign most of them."""
    return {
        f"t_{str(dtype).removeprefix('torch.')}": random_tensor(dtype, (3, i + 1), seed + i)
        for i, dtype in enumerate(INTEROP_DTYPES)
    }


def to_blob(tensors: dict[str, torch.Tensor]) -> tuple[BlobLayout, bytes]:
    layout, header = plan_layout(tensors)
    return layout, b"".join(bytes(chunk) for chunk in iter_blob_chunks(layout, header, tensors))


def as_buffer(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.uint8).copy()


def raw_file(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors-like file: 8-byte length, JSON header (or raw bytes), then ``data``."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def assert_well_formed(layout: BlobLayout, size: int) -> None:
    """What every accepted layout promises: the tensors tile the data section exactly."""
    assert isinstance(layout, BlobLayout)
    assert layout.nbytes == size
    assert 8 <= layout.data_start <= size
    cursor = layout.data_start
    for spec in layout.tensors:
        assert spec.start == cursor
        assert spec.nbytes == math.prod(spec.shape) * DTYPES[spec.dtype].itemsize
        cursor = spec.end
    assert cursor == size


# --- interop with the safetensors library --------------------------------------------------------


@pytest.mark.parametrize("dtype", INTEROP_DTYPES, ids=str)
def test_our_blob_loads_in_safetensors_bit_identical(dtype):
    tensors = sample_tensors(dtype)
    _, blob = to_blob(tensors)
    assert_bit_identical(safetensors.torch.load(blob), tensors)


@pytest.mark.parametrize("dtype", INTEROP_DTYPES, ids=str)
def test_safetensors_file_parses_with_our_reader_bit_identical(dtype):
    tensors = sample_tensors(dtype, seed=10)
    blob = safetensors.torch.save(tensors)
    layout = parse_header(blob, source=SOURCE)
    assert_well_formed(layout, len(blob))
    assert_bit_identical(tensors_from_buffer(as_buffer(blob), layout), tensors)


def test_mixed_dtypes_round_trip_both_ways():
    tensors = mixed_tensors()
    _, ours = to_blob(tensors)
    assert_bit_identical(safetensors.torch.load(ours), tensors)

    theirs = safetensors.torch.save(tensors, metadata={"origin": "hf", "step": "12"})
    layout = parse_header(theirs)
    assert layout.metadata == {"origin": "hf", "step": "12"}
    assert_bit_identical(tensors_from_buffer(as_buffer(theirs), layout), tensors)


def test_special_float_values_survive_exactly():
    # Compare a few well-known bit patterns explicitly: a NaN-tolerant equality would hide a
    # conversion through float that canonicalises NaN or drops the sign of zero.
    t = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf")], dtype=torch.float32)
    _, blob = to_blob({"x": t})
    layout = parse_header(blob)
    got = tensors_from_buffer(as_buffer(blob), layout)["x"]
    assert got.view(torch.int32).tolist() == [0x7FC00000, -(2**31), 0x7F800000, -8388608]
    assert torch.equal(bits(safetensors.torch.load(blob)["x"]), bits(t))


# --- canonical layout ----------------------------------------------------------------------------


def test_the_parsers_element_sizes_are_torchs():
    # The parser reads element sizes from ELEMENT_BYTES so that it needs no torch: they must be
    # torch's, code for code.
    assert set(ELEMENT_BYTES) == set(DTYPES)
    assert {code: DTYPES[code].itemsize for code in DTYPES} == ELEMENT_BYTES


def test_layout_aligns_every_tensor_to_its_element_size():
    tensors = {"odd_u8": torch.zeros(3, dtype=torch.uint8), **mixed_tensors(), "b": torch.ones(5, dtype=torch.bool)}
    layout, blob = to_blob(tensors)
    assert layout.data_start % 64 == 0
    assert layout.nbytes == len(blob)
    assert_well_formed(layout, len(blob))
    for spec in layout.tensors:
        itemsize = DTYPES[spec.dtype].itemsize
        assert spec.start % itemsize == 0, spec
        assert (spec.start - layout.data_start) % itemsize == 0, spec
    # Sizes that are multiples of 64 bytes first, each part by largest element size: that is
    # what makes the alignment hold with no padding.
    parts = [[s for s in layout.tensors if (s.nbytes % 64 != 0) == odd] for odd in (False, True)]
    assert [s.name for s in layout.tensors] == [s.name for part in parts for s in part]
    for part in parts:
        sizes = [DTYPES[s.dtype].itemsize for s in part]
        assert sizes == sorted(sizes, reverse=True)
    assert layout.metadata == {"format": "pt"}
    assert layout.to_index()["t_float32"]["dtype"] == "F32"


def test_layout_starts_every_tensor_of_a_multiple_of_64_bytes_at_a_multiple_of_64():
    # A bias-like odd size in every element size, and weights of 64-byte multiples after them in
    # name order: without the ordering, the odd ones would shift every later weight.
    tensors = {
        "a_bias": torch.zeros(10, dtype=torch.float32),
        "a_steps": torch.zeros((), dtype=torch.int64),
        "b_half": torch.zeros(3, dtype=torch.float16),
        "w_conv": torch.zeros(16, 1, 7, 7),
        "w_linear": torch.zeros(32, 16),
        "w_half": torch.zeros(64, 8, dtype=torch.bfloat16),
        "w_ids": torch.zeros(1, 64, dtype=torch.int64),
    }
    layout, _ = to_blob(tensors)
    starts = {s.name: s.start for s in layout.tensors}
    for name in ("w_conv", "w_linear", "w_half", "w_ids"):
        assert starts[name] % 64 == 0, (name, starts[name])


def test_layout_is_independent_of_insertion_order():
    tensors = mixed_tensors(seed=3)
    reordered = dict(reversed(list(tensors.items())))
    assert list(reordered) != list(tensors)
    layout_a, blob_a = to_blob(tensors)
    layout_b, blob_b = to_blob(reordered)
    assert plan_layout(tensors)[1] == plan_layout(reordered)[1]
    assert layout_a == layout_b
    assert blob_a == blob_b  # hence the same sha256


def test_non_contiguous_tensor_is_written_in_row_major_order():
    t = torch.arange(12, dtype=torch.int32).reshape(3, 4).t()  # a transposed view
    assert not t.is_contiguous()
    _, blob = to_blob({"t": t})
    assert torch.equal(safetensors.torch.load(blob)["t"], t)


def test_unaligned_buffer_still_gives_correct_tensors():
    # A buffer at an odd address cannot be viewed as int64 etc.: tensors_from_buffer must copy
    # those tensors rather than produce garbage or crash.
    tensors = mixed_tensors(seed=5)
    layout, blob = to_blob(tensors)
    backing = np.zeros(len(blob) + 1, dtype=np.uint8)
    buffer = backing[1:]
    buffer[:] = np.frombuffer(blob, dtype=np.uint8)
    assert buffer.ctypes.data % 2 == 1
    assert_bit_identical(tensors_from_buffer(buffer, layout), tensors)


def test_tensors_from_buffer_rejects_wrong_buffers():
    layout, blob = to_blob({"x": torch.ones(4)})
    with pytest.raises(TypeError):
        tensors_from_buffer(np.frombuffer(blob, dtype=np.int8).copy(), layout)
    with pytest.raises(TypeError):
        tensors_from_buffer(as_buffer(blob).reshape(1, -1), layout)
    with pytest.raises(ValueError, match="bytes"):
        tensors_from_buffer(as_buffer(blob + b"\0"), layout)


@st.composite
def tensor_dicts(draw) -> dict[str, torch.Tensor]:
    names = draw(
        st.lists(
            st.text("abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=6),
            max_size=6,
            unique=True,
        )
    )
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(INTEROP_DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        nbytes = math.prod(shape) * dtype.itemsize
        data = bytearray(draw(st.binary(min_size=nbytes, max_size=nbytes)))
        if dtype == torch.bool:
            data = bytearray(b & 1 for b in data)
        if nbytes:
            t = torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)
        else:
            t = torch.empty(shape, dtype=dtype)
        out[name] = t
    return out


@FUZZ
@given(tensor_dicts())
def test_property_round_trip_is_bit_exact_and_zero_copy(tensors):
    layout, blob = to_blob(tensors)
    buffer = as_buffer(blob)
    assert buffer.ctypes.data % 8 == 0  # numpy allocations are aligned; the property relies on it
    parsed = parse_header(buffer, source="<property>")
    assert parsed == layout
    assert parsed.data_start % 8 == 0
    got = tensors_from_buffer(buffer, parsed)
    assert_bit_identical(got, tensors)

    lo, hi = buffer.ctypes.data, buffer.ctypes.data + len(buffer)
    for name, t in got.items():
        if t.numel() == 0:
            continue  # an empty tensor has no storage to share (torch reports address 0)
        assert lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= hi, name
    # Sharing, not just addresses: a write to the buffer shows in the tensors.
    for spec in parsed.tensors:
        if spec.nbytes:
            before = bits(got[spec.name]).clone()
            buffer[spec.start] ^= 0xFF
            assert not torch.equal(bits(got[spec.name]), before), spec.name


# --- the parser as a gate: fuzz ------------------------------------------------------------------


def parses_or_format_error(data: bytes, **kwargs) -> None:
    try:
        layout = parse_header(data, **kwargs)
    except ModelFormatError:
        return
    assert_well_formed(layout, kwargs.get("file_size", len(data)))


@FUZZ
@given(st.binary(max_size=256))
def test_fuzz_arbitrary_bytes(data):
    parses_or_format_error(data)


json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
dtype_codes = st.sampled_from([*DTYPES, "F128", "f32", "", "C64"]) | json_leaves
counts = st.integers(min_value=-2, max_value=40) | st.booleans() | st.floats(0, 40)
tensor_like = st.fixed_dictionaries(
    {
        "dtype": dtype_codes,
        "shape": st.lists(counts, max_size=3) | json_values,
        "data_offsets": st.lists(counts, max_size=3) | json_values,
    },
    optional={"extra": json_values},
)
headers = st.dictionaries(
    st.text(max_size=6) | st.just("__metadata__"),
    tensor_like | json_values,
    max_size=5,
) | json_values
metadata_values = st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4)) | json_values


@FUZZ
@given(headers, st.binary(max_size=64), st.sampled_from([0, 0, 0, -2, -1, 1, 2]))
def test_fuzz_json_headers(header, trailing, length_skew):
    # A correct length prefix (give or take a few bytes) gets the parser past the first check,
    # so the JSON validation itself is what is exercised.
    body = json.dumps(header).encode()
    data = struct.pack("<Q", max(len(body) + length_skew, 0)) + body + trailing
    parses_or_format_error(data)


@st.composite
def near_valid_files(draw) -> bytes:
    """Well-formed files with at most one small mutation, so both outcomes are frequent."""
    header: dict[str, object] = {}
    cursor = 0
    names = st.text(min_size=1, max_size=4) | st.just("")  # "" is invalid: rarely drawn
    for name in draw(st.lists(names, max_size=4, unique=True)):
        code = draw(st.sampled_from(list(DTYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        n = math.prod(shape) * DTYPES[code].itemsize
        header[name] = entry(code, shape, cursor, cursor + n)
        cursor += n
    if draw(st.booleans()):
        header["__metadata__"] = draw(metadata_values)
    skew = draw(st.sampled_from([0, 0, 0, -1, 1, 3]))
    if header and draw(st.booleans()):
        victim = draw(st.sampled_from(sorted(header)))
        header[victim] = draw(tensor_like | json_values)
    data = draw(st.binary(min_size=max(cursor + skew, 0), max_size=max(cursor + skew, 0)))
    return raw_file(header, data)


@FUZZ
@given(near_valid_files())
def test_fuzz_near_valid_files(data):
    try:
        layout = parse_header(data)
    except ModelFormatError:
        return
    assert_well_formed(layout, len(data))
    # What we accept, the reference implementation reads to the same tensors.
    assert_bit_identical(
        tensors_from_buffer(as_buffer(data), layout), safetensors.torch.load(data)
    )


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 100_000, b'{"t":' + b"[" * 100_000])
def test_absurd_nesting_is_a_format_error_not_recursion_error(body):
    with pytest.raises(ModelFormatError, match="JSON"):
        parse_header(raw_file(body))


# --- truncation ----------------------------------------------------------------------------------


def test_every_strict_prefix_is_rejected():
    tensors = {"w": random_tensor(torch.float32, (3,), 1), "b": torch.tensor([1, 2], dtype=torch.int8)}
    _, blob = to_blob(tensors)
    assert_well_formed(parse_header(blob), len(blob))
    for k in range(len(blob)):
        with pytest.raises(ModelFormatError):
            parse_header(blob[:k], source=SOURCE)


def test_header_alone_parses_with_file_size():
    # The store reads just the header of a large file and passes the size it knows.
    _, blob = to_blob(mixed_tensors())
    n = header_length(blob[:8], source=SOURCE)
    layout = parse_header(blob[: 8 + n], file_size=len(blob), source=SOURCE)
    assert_well_formed(layout, len(blob))
    with pytest.raises(ModelFormatError, match="truncated"):
        parse_header(blob[: 8 + n], file_size=len(blob) - 1, source=SOURCE)
    with pytest.raises(ModelFormatError, match="trailing"):
        parse_header(blob[: 8 + n], file_size=len(blob) + 1, source=SOURCE)


# --- specific faults -----------------------------------------------------------------------------


FAULTS = {
    "overlap": (raw_file({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, bytes(12)), "overlaps"),
    "gap": (raw_file({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, bytes(12)), "gap"),
    "leading gap": (raw_file({"a": entry("F32", [1], 4, 8)}, bytes(8)), "gap"),
    "unknown dtype": (raw_file({"a": entry("F128", [1], 0, 16)}, bytes(16)), "unknown dtype"),
    "non-string dtype": (raw_file({"a": entry(4, [1], 0, 4)}, bytes(4)), "unknown dtype"),
    "size mismatch": (raw_file({"a": entry("F32", [3], 0, 8)}, bytes(8)), "needs 12"),
    "trailing bytes": (raw_file({"a": entry("I8", [2], 0, 2)}, bytes(5)), "3 trailing bytes"),
    "data truncated": (raw_file({"a": entry("I8", [4], 0, 4)}, bytes(2)), "truncated"),
    "header truncated": (raw_file({"a": entry("I8", [4], 0, 4)}, length=500), "truncated"),
    "short prefix": (b"\x10\x00\x00", "8-byte"),
    "header too large": (raw_file(b"{}", length=MAX_HEADER_BYTES + 1), "limit"),
    "header is a list": (raw_file([]), "JSON object"),
    "header is null": (raw_file(None), "JSON object"),
    "header is a string": (raw_file("x"), "JSON object"),
    "not JSON": (raw_file(b"{nope"), "JSON"),
    "not UTF-8": (raw_file(b'{"\xff":1}'), "UTF-8"),
    "metadata not strings": (raw_file({"__metadata__": {"k": 1}}), "__metadata__"),
    "metadata a list": (raw_file({"__metadata__": ["k"]}), "__metadata__"),
    "empty tensor name": (raw_file({"": entry("I8", [1], 0, 1)}, b"\0"), "empty name"),
    "extra key": (raw_file({"a": {**entry("I8", [1], 0, 1), "x": 1}}, b"\0"), "exactly"),
    "entry not an object": (raw_file({"a": [1, 2]}), "exactly"),
    "negative shape": (raw_file({"a": entry("I8", [-1], 0, 0)}), "shape"),
    "bool in shape": (raw_file({"a": entry("I8", [True], 0, 1)}, b"\0"), "shape"),
    "float in shape": (raw_file({"a": entry("I8", [1.0], 0, 1)}, b"\0"), "shape"),
    "three offsets": (raw_file({"a": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1, 2]}}, b"\0"), "data_offsets"),
    "negative offset": (raw_file({"a": entry("I8", [1], -1, 0)}), "data_offsets"),
    "reversed offsets": (raw_file({"a": entry("I8", [0], 4, 0)}, bytes(4)), "spans"),
}


@pytest.mark.parametrize("data, word", FAULTS.values(), ids=FAULTS.keys())
def test_fault_is_a_format_error_naming_source_and_fault(data, word):
    with pytest.raises(ModelFormatError) as info:
        parse_header(data, source=SOURCE)
    message = str(info.value)
    assert SOURCE in message
    assert word in message


def test_header_length_limit_is_inclusive():
    assert header_length(struct.pack("<Q", MAX_HEADER_BYTES), source=SOURCE) == MAX_HEADER_BYTES
    with pytest.raises(ModelFormatError, match="limit"):
        header_length(struct.pack("<Q", MAX_HEADER_BYTES + 1), source=SOURCE)
    with pytest.raises(ModelFormatError, match=SOURCE):
        header_length(struct.pack("<Q", 2**64 - 1), source=SOURCE)


def test_empty_header_object_is_a_valid_empty_file():
    layout = parse_header(raw_file({}))
    assert layout.tensors == () and layout.metadata is None
    layout, blob = to_blob({})
    assert layout.tensors == () and parse_header(blob) == layout


# --- dtype codes ---------------------------------------------------------------------------------


def test_dtype_code_round_trips_every_supported_dtype():
    for code, dtype in DTYPES.items():
        assert dtype_code(dtype) == code


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.qint8], ids=str)
def test_dtype_code_rejects_unsupported(dtype):
    with pytest.raises(TypeError, match="cannot be stored"):
        dtype_code(dtype)


def test_plan_layout_rejects_complex_tensor():
    with pytest.raises(TypeError, match="complex64"):
        plan_layout({"z": torch.zeros(2, dtype=torch.complex64)})
