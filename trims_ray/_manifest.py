"""Model manifests: the small JSON document that names a model and points at its blob.

A manifest is what makes a blob a model: name, tenant, the blob's sha256 and size, the tensor
index (dtype, shape, absolute offsets), tied-weight aliases, and how to build the architecture;
a public model's manifest also names its owner (the tenant that published it), and a model with
a factory its tensors in module order (what the GPU tier copies first, known without running the
factory). Manifests are read back from a store anyone with write access can touch, so
``from_json`` validates every field and raises ModelFormatError rather than trusting the
document, and ``check_blob`` checks the tensor index against the verified blob's own header
before any tensor is viewed (a manifest has no digest of its own).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ._errors import IntegrityError, ModelFormatError
from ._hashing import ChunkDigests
from ._names import PUBLIC_TENANT, check_name, check_tenant
from ._safetensors import BlobLayout, TensorSpec, brief_repr, header_length, parse_header

__all__ = ["FORMAT_VERSION", "ModelInfo", "Manifest"]

FORMAT_VERSION = 1
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# Every field to_json writes. All are required and no other is allowed: a damaged key (a flipped
# bit in "aliases") must be an error, not a field silently dropped from the model.
_FIELDS = frozenset(
    {"format_version", "name", "tenant", "sha256", "nbytes", "data_start", "tensors",
     "chunk_bytes", "chunk_sha256", "aliases", "factory", "created"}
)
# Fields a manifest has only when they apply: "owner" (public models written since owners are
# recorded) and "order" (models with a factory). A damaged key is still an unknown field.
_OPTIONAL_FIELDS = frozenset({"owner", "order"})
_TENSOR_FIELDS = frozenset({"dtype", "shape", "offsets"})
# Fingerprints of manifests whose tensor index this process has checked against their blob
# (``check_blob``): a fingerprint covers the sha256, whose bytes never change. Bounded.
_CHECKED: dict[str, None] = {}
_CHECKED_MAX = 4096


# A factory named by import: "package.module:attribute" (checked without importing it).
_REF_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


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


def _architecture(text: str) -> str:
    """The class name of a transformers factory entry (``{"architecture", "config"}`` JSON).

    Raises:
        ValueError: the entry is not such a document.
    """
    doc = json.loads(text)
    if not (
        isinstance(doc, dict)
        and doc.keys() == {"architecture", "config"}
        and isinstance(doc["architecture"], str)
        and doc["architecture"].isidentifier()
        and isinstance(doc["config"], dict)
        and isinstance(doc["config"].get("model_type"), str)
    ):
        raise ValueError("a transformers factory must name an architecture and a config with a model_type")
    return doc["architecture"]


@dataclass(frozen=True)
class ModelInfo:
    """What ``register`` returns and what listing a store shows: a registered model's identity.

    Attributes:
        name: the model's name within its tenant.
        tenant: the tenant that owns it ("public" for shared models).
        sha256: hex digest of the weights blob (its content address).
        nbytes: size of the blob in bytes (safetensors header included).
        num_elements: total tensor elements (tied weights counted once).
        num_tensors: number of stored tensors.
        factory: how the architecture is built: "module:attr", "<pickled callable>",
            "transformers:<class>" (from a Hugging Face config), or None when tasks get a
            state dict.
    """

    name: str
    tenant: str
    sha256: str
    nbytes: int
    num_elements: int
    num_tensors: int
    factory: str | None


@dataclass(frozen=True)
class Manifest:
    """A model's manifest. ``tensors`` lists specs in blob order with absolute offsets."""

    name: str
    tenant: str
    sha256: str
    nbytes: int
    data_start: int
    tensors: tuple[TensorSpec, ...]
    chunks: ChunkDigests
    aliases: Mapping[str, str] = field(default_factory=dict)
    factory: Mapping[str, str] | None = None
    created: str = ""
    format_version: int = FORMAT_VERSION
    # The tenant that published a public model (None: a private model, whose owner is its
    # tenant, or a public one registered before owners were recorded).
    owner: str | None = None
    # Stored tensor and alias names in the module's state_dict order (None: no factory).
    order: tuple[str, ...] | None = None

    def check_blob(self, blob) -> None:
        """Checks that the safetensors header at the start of ``blob`` (the verified bytes of
        this manifest's sha256, or at least their first ``data_start`` bytes) describes exactly
        this manifest's tensor index: names, dtypes, shapes and offsets. The header is covered
        by the blob's sha256, the manifest by nothing: a renamed or swapped tensor name in a
        damaged or edited manifest would otherwise be served as another tensor's weights.

        Raises:
            IntegrityError: the index and the blob's header differ.
        """
        fingerprint = self.fingerprint
        if fingerprint in _CHECKED:
            return
        source = f"{self.tenant}/{self.name}"
        data = memoryview(blob).cast("B")[: self.data_start]
        try:
            found = parse_header(data, file_size=self.nbytes, source=f"the blob of {source}")
            ok = header_length(data, source=source) + 8 == self.data_start and found.tensors == self.tensors
        except ModelFormatError:
            ok = False
        if not ok:
            raise IntegrityError(
                f"{source}: the manifest's tensor index does not match the header of its blob "
                f"{self.sha256[:16]}... (names, dtypes, shapes or offsets differ): the manifest "
                "was damaged or edited; nothing was served: re-register the model"
            )
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED[fingerprint] = None

    @property
    def layout(self) -> BlobLayout:
        return BlobLayout(self.tensors, self.data_start, self.nbytes)

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 (hex) of this manifest's document (``to_json``, or the bytes ``from_json``
        read): what tells two registrations of one blob apart (another factory, name or
        ``created``) where the cache key (``<tenant>/<sha256>``) does not. Equal fingerprints
        mean equal manifests. Computed once per object."""
        return hashlib.sha256(self.to_json()).hexdigest()

    @property
    def info(self) -> ModelInfo:
        factory = None
        if self.factory is not None:
            factory = self.factory.get("import", "<pickled callable>")
            if "transformers" in self.factory:
                factory = f"transformers:{_architecture(self.factory['transformers'])}"
        return ModelInfo(
            name=self.name,
            tenant=self.tenant,
            sha256=self.sha256,
            nbytes=self.nbytes,
            num_elements=sum(math.prod(t.shape) for t in self.tensors),
            num_tensors=len(self.tensors),
            factory=factory,
        )

    def to_json(self) -> bytes:
        doc = {
            "format_version": self.format_version,
            "name": self.name,
            "tenant": self.tenant,
            "sha256": self.sha256,
            "nbytes": self.nbytes,
            "data_start": self.data_start,
            "tensors": BlobLayout(self.tensors, self.data_start, self.nbytes).to_index(),
            "chunk_bytes": self.chunks.chunk_bytes,
            "chunk_sha256": list(self.chunks.digests),
            "aliases": dict(self.aliases),
            "factory": dict(self.factory) if self.factory is not None else None,
            "created": self.created,
        }
        # Only when set: a manifest without them is byte for byte what earlier versions wrote.
        if self.owner is not None:
            doc["owner"] = self.owner
        if self.order is not None:
            doc["order"] = list(self.order)
        return json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, *, source: str) -> Manifest:
        """Parses and validates a manifest document.

        Raises:
            ModelFormatError: the document is not a valid manifest of a format we can read.
        """
        try:
            doc = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise ModelFormatError(f"{source}: manifest is not valid UTF-8 JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ModelFormatError(f"{source}: manifest must be a JSON object")
        version = doc.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise ModelFormatError(
                f"{source}: manifest format_version {brief_repr(version)}; this trims_ray reads "
                f"{FORMAT_VERSION}: upgrade trims_ray or re-register the model"
            )
        try:
            manifest = cls._from_doc(doc, source)
        # RecursionError: re-encoding an absurdly nested tensor index for the header check.
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            raise ModelFormatError(f"{source}: invalid manifest: {exc!s}") from None
        # The fingerprint of the document as read: what ``to_json`` gives for every document
        # ``register`` wrote, without re-encoding the tensor index (milliseconds in Python's
        # JSON encoder). A hand-formatted one differs only in costing its holders a store read.
        manifest.__dict__["fingerprint"] = hashlib.sha256(data).hexdigest()
        return manifest

    @classmethod
    def _from_doc(cls, doc: dict, source: str) -> Manifest:
        if not _FIELDS <= doc.keys() <= _FIELDS | _OPTIONAL_FIELDS:
            missing = sorted(_FIELDS - doc.keys())
            unknown = sorted(doc.keys() - _FIELDS - _OPTIONAL_FIELDS)
            raise ValueError(f"fields missing: {missing}, unknown: {brief_repr(unknown)}")
        name, tenant = check_name(doc["name"]), check_tenant(doc["tenant"])
        owner = doc.get("owner")
        if owner is not None or "owner" in doc:
            if tenant != PUBLIC_TENANT:
                raise ValueError("only a public model's manifest names an owner (a private one's is its tenant)")
            if check_tenant(owner) == PUBLIC_TENANT:
                raise ValueError("a public model's owner must be a tenant, not 'public'")
        sha256 = doc["sha256"]
        if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {brief_repr(sha256)}")
        nbytes, data_start = doc["nbytes"], doc["data_start"]
        if type(nbytes) is not int or type(data_start) is not int or not 8 <= data_start <= nbytes:
            raise ValueError(
                f"bad sizes: nbytes={brief_repr(nbytes)}, data_start={brief_repr(data_start)}"
            )
        # Re-validate the index with the safetensors parser's own rules (exact coverage, sizes
        # consistent with dtype and shape) by feeding it as a header.
        index = doc["tensors"]
        if not isinstance(index, dict):
            raise ValueError("tensors must be an object")
        for tname, spec in index.items():
            if not isinstance(spec, dict) or spec.keys() != _TENSOR_FIELDS:
                raise ValueError(f"tensor {brief_repr(tname)} must have exactly dtype, shape, offsets")
        header = {
            tname: {
                "dtype": spec["dtype"],
                "shape": spec["shape"],
                "data_offsets": [o - data_start for o in spec["offsets"]],
            }
            for tname, spec in index.items()
        }
        body = json.dumps(header).encode("utf-8")
        layout = parse_header(
            len(body).to_bytes(8, "little") + body,
            file_size=8 + len(body) + nbytes - data_start,
            source=source,
        )
        shift = data_start - layout.data_start
        tensors = tuple(
            TensorSpec(t.name, t.dtype, t.shape, t.start + shift, t.end + shift)
            for t in layout.tensors
        )
        chunk_bytes, chunk_sha256 = doc["chunk_bytes"], doc["chunk_sha256"]
        if type(chunk_bytes) is not int or chunk_bytes < 4096:
            raise ValueError(f"chunk_bytes must be an int >= 4096, got {brief_repr(chunk_bytes)}")
        if not (
            isinstance(chunk_sha256, list)
            and len(chunk_sha256) == -(-nbytes // chunk_bytes)
            and all(isinstance(d, str) and _SHA256_RE.fullmatch(d) for d in chunk_sha256)
        ):
            raise ValueError(
                "chunk_sha256 must list one sha256 hex digest per chunk_bytes of the blob"
            )
        aliases = doc["aliases"]
        if not isinstance(aliases, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v in index and k not in index
            for k, v in aliases.items()
        ):
            raise ValueError("aliases must map new tensor names to stored tensor names")
        factory = doc["factory"]
        if factory is not None and not (
            isinstance(factory, dict)
            and len(factory) == 1
            and next(iter(factory)) in ("import", "pickle", "transformers")
            and isinstance(next(iter(factory.values())), str)
        ):
            raise ValueError(
                "factory must be null, {'import': 'module:attr'}, {'pickle': ...} or "
                "{'transformers': config}"
            )
        if factory is not None and "transformers" in factory:
            _architecture(factory["transformers"])  # checked here, built only when used
        if factory is not None and "import" in factory:
            check_factory_ref(factory["import"])  # checked here, imported only when used
        created = doc["created"]
        if not isinstance(created, str):
            raise ValueError("created must be a string")
        order = doc.get("order")
        if "order" in doc and not (
            factory is not None
            and isinstance(order, list)
            and all(isinstance(n, str) and (n in index or n in aliases) for n in order)
            and len(set(order)) == len(order)
        ):
            raise ValueError("order must list distinct stored tensor or alias names, with a factory")
        return cls(
            name=name,
            tenant=tenant,
            sha256=sha256,
            nbytes=nbytes,
            data_start=data_start,
            tensors=tensors,
            chunks=ChunkDigests(chunk_bytes, tuple(chunk_sha256)),
            aliases=dict(aliases),
            factory=dict(factory) if factory is not None else None,
            created=created,
            owner=owner,
            order=tuple(order) if order is not None else None,
        )

