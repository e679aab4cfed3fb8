"""Coverage-guided fuzzing (atheris / libFuzzer) of trims_ray's parsers of outside input.

The hypothesis suites in tests/unit/test_fuzz_*.py run with every test run; this target is for
long, coverage-guided runs that mutate raw bytes. One input is split by its first byte into: a
safetensors file, a manifest, a shard index directory, a model name and tenant, a factory
reference, and a store URI. A crash is any exception outside the documented ones, or a broken
property (an accepted tensor that is not its bytes, a name that leaves the store root).

Run it (atheris is not a project dependency, and pytest does not collect this file):

    pip install atheris
    python tests/fuzz/fuzz_parsers.py --write-seeds corpus/           # valid inputs to start from
    python tests/fuzz/fuzz_parsers.py -max_total_time=600 corpus/     # fuzz; the corpus grows
    python tests/fuzz/fuzz_parsers.py -atheris_runs=200000            # or without a corpus

libFuzzer options follow the script (-max_len=65536, -jobs=2, ...); a crashing input is written
to crash-<sha1> and replays with ``python tests/fuzz/fuzz_parsers.py crash-<sha1>``.
"""

from __future__ import annotations

import json
import os
import posixpath
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

with atheris.instrument_imports(include=["trims_ray"]):
    import numpy as np
    import torch

    from trims_ray._errors import ModelFormatError
    from trims_ray._factory import check_factory_ref
    from trims_ray._fsio import open_fs
    from trims_ray._ingest import HF_INDEX, collect_weights
    from trims_ray._manifest import Manifest
    from trims_ray._names import check_name, check_tenant
    from trims_ray._safetensors import parse_header, tensors_from_buffer

# A directory holding one valid shard, for index documents to point into (or out of).
_SHARDS = tempfile.mkdtemp(prefix="trims-atheris-")
_SHARD = (
    b'<\x00\x00\x00\x00\x00\x00\x00{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    + b" " * 4
    + bytes(8)
)
with open(os.path.join(_SHARDS, "model-1.safetensors"), "wb") as f:
    f.write(_SHARD)


def _safetensors(data: bytes) -> None:
    try:
        layout = parse_header(data)
    except ModelFormatError:
        return
    tensors = tensors_from_buffer(np.frombuffer(data, dtype=np.uint8).copy(), layout)
    for spec in layout.tensors:
        raw = tensors[spec.name].reshape(-1).view(torch.uint8).numpy().tobytes()
        assert raw == data[spec.start : spec.end], spec


def _manifest(data: bytes) -> None:
    try:
        m = Manifest.from_json(data, source="<atheris>")
    except ModelFormatError:
        return
    assert Manifest.from_json(m.to_json(), source="<again>") == m


def _index(data: bytes) -> None:
    with open(os.path.join(_SHARDS, HF_INDEX), "wb") as f:
        f.write(data)
    try:
        weights = collect_weights(_SHARDS)
    except (ModelFormatError, FileNotFoundError):
        return
    assert set(weights.tensors) <= {"w"}


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _names(data: bytes) -> None:
    tenant, _, name = _text(data).partition("\x01")
    try:
        check_name(name)
        check_tenant(tenant)
    except ValueError:
        return
    path = posixpath.normpath(f"/root/manifests/{tenant}/{name}.json")
    assert path == f"/root/manifests/{tenant}/{name}.json", path


def _factory(data: bytes) -> None:
    try:
        check_factory_ref(_text(data))
    except ValueError:
        return


def _uri(data: bytes) -> None:
    uri = _text(data)
    # Only backends that neither reach the network nor write when constructed.
    if "://" in uri and uri.split("://", 1)[0].rsplit("::", 1)[-1] not in ("file", "memory", "s3"):
        return
    if "::" in uri.split("://", 1)[0]:
        return
    try:
        open_fs(uri)
    except ValueError:
        return


_TARGETS = [_safetensors, _manifest, _index, _names, _factory, _uri]


def one_input(data: bytes) -> None:
    if data:
        _TARGETS[data[0] % len(_TARGETS)](data[1:])


def write_seeds(directory: str) -> None:
    """Valid inputs for each target, so that mutation starts past the first checks."""
    from trims_ray._hashing import digest_blob
    from trims_ray._safetensors import iter_blob_chunks, plan_layout

    tensors = {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(2, dtype=torch.int8),
    }
    layout, header = plan_layout(tensors)
    blob = b"".join(bytes(c) for c in iter_blob_chunks(layout, header, tensors))
    sha256, chunks = digest_blob([blob])
    manifest = Manifest(
        name="m",
        tenant="t",
        sha256=sha256,
        nbytes=layout.nbytes,
        data_start=layout.data_start,
        tensors=layout.tensors,
        chunks=chunks,
        aliases={"w2": "w"},
        factory={"import": "torch.nn:Identity"},
    )
    seeds = [
        blob,
        manifest.to_json(),
        json.dumps({"weight_map": {"w": "model-1.safetensors"}}).encode(),
        b"team-a\x01resnet50",
        b"torch.nn:Linear",
        b"s3://bucket/prefix",
    ]
    os.makedirs(directory, exist_ok=True)
    for i, seed in enumerate(seeds):
        with open(os.path.join(directory, f"seed-{i}"), "wb") as f:
            f.write(bytes([i]) + seed)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write-seeds"]:
        write_seeds(sys.argv[2])
        sys.exit(0)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
