"""The model store: the cloud tier of DESIGN.md, over any fsspec URI (file://, memory://, s3://).

Layout under the store root::

    blobs/sha256/<hex>.safetensors     immutable weights, named by their sha256
    manifests/<tenant>/<name>.json     one small JSON document per model

Registering writes the blob first and the manifest last, each atomically, so a reader that finds
a manifest always finds its whole blob. Every read is verified against the manifest's sha256.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone

import numpy as np
import torch
from torch import nn

from ._config import ReadOptions, default_store_uri
from ._errors import IntegrityError, ModelFormatError, ModelNotFoundError, StoreUnavailableError
from ._factory import assemble_module, factory_ref, resolve_factory
from ._hashing import CHUNK_BYTES, digest_blob
from ._fsio import (
    _protocols,
    describe_s3,
    forget_frames,
    is_local,
    open_fs,
    translate_store_errors,
    write_atomically,
)
from ._ingest import collect_weights, prove_rebuild
from ._manifest import Manifest, ModelInfo
from ._names import PUBLIC_TENANT, check_name, check_tenant
from ._reader import ReadStats, read_blob
from ._safetensors import iter_blob_chunks, plan_layout, tensors_from_buffer

__all__ = ["ModelStore"]

log = logging.getLogger("trims_ray")


class ModelStore:
    """A model store at an fsspec URI.

    Args:
        uri: ``file:///path``, a plain path, ``memory://name`` or ``s3://bucket/prefix``;
            defaults to ``$TRIMS_RAY_STORE`` or ``~/.cache/trims_ray/store``.
        storage_options: passed to fsspec (for S3: ``key``, ``secret``, ``endpoint_url``, ...).
        read_options: chunking and parallelism of blob reads.

    Tenants are not resolved here: every method takes the tenant it acts as, and the public API
    (``trims_ray.register``) decides which tenant a caller may name.
    """

    def __init__(
        self,
        uri: str | None = None,
        *,
        storage_options: dict | None = None,
        read_options: ReadOptions | None = None,
    ) -> None:
        self.fs, self.root = open_fs(uri if uri is not None else default_store_uri(), storage_options)
        self.uri = self.fs.unstrip_protocol(self.root)
        self.read_options = read_options or ReadOptions.from_env()
        self._checked = False

    def __repr__(self) -> str:
        return f"ModelStore({self.uri!r})"

    def blob_path(self, sha256: str) -> str:
        return f"{self.root}/blobs/sha256/{sha256}.safetensors"

    def manifest_path(self, tenant: str, name: str) -> str:
        return f"{self.root}/manifests/{check_tenant(tenant)}/{check_name(name)}.json"

    # -- writing -------------------------------------------------------------------------------

    def register(
        self,
        name: str,
        weights: object,
        *,
        tenant: str,
        factory: str | Callable[[], nn.Module] | None = None,
        storage_options: dict | None = None,
        progress: Callable[[int, int], None] | None = None,
        example_input: object = None,
    ) -> ModelInfo:
        """Stores ``weights`` under ``tenant``/``name``; replaces an earlier model of that name.

        Args:
            name: the model's name.
            weights: an ``nn.Module``, a state dict, or the path/URI of a ``.safetensors`` file
                or of a directory of safetensors shards.
            tenant: the tenant that will own the model.
            factory: a zero-argument callable or "module:attr" that builds the architecture.
            storage_options: fsspec options for reading ``weights`` from a URI.
            progress: called as ``progress(bytes_written, blob_bytes)`` when the blob's upload
                starts and after each piece of at most 16 MiB (the hashing pass before it is
                not reported).
            example_input: an input (a tensor, a tuple of arguments or a mapping of keyword
                arguments) on which the rebuilt module's forward must equal the source's.

        Returns:
            The registered model's ModelInfo.

        Raises:
            ValueError / TypeError: bad name, tenant, factory or weights.
            ModelFormatError: malformed safetensors, weights that do not fit the factory, or a
                module that a task would not rebuild exactly (the tensors are named).
            StoreUnavailableError: the store cannot be reached or written.
        """
        check_name(name)
        check_tenant(tenant)
        given = factory_ref(factory)  # validated before anything is read or written
        weights_in = collect_weights(weights, storage_options=storage_options, factory=given)
        if not weights_in.tensors:
            raise ModelFormatError(f"{weights_in.source}: no tensors to register")
        factory_entry = weights_in.factory
        if factory_entry is not None:
            prove_rebuild(weights_in, example_input)
        elif example_input is not None:
            raise ValueError("example_input needs a factory: without one tasks get a state dict")
        layout, header = plan_layout(weights_in.tensors)

        sha256, chunks = digest_blob(iter_blob_chunks(layout, header, weights_in.tensors))
        manifest = Manifest(
            name=name,
            tenant=tenant,
            sha256=sha256,
            nbytes=layout.nbytes,
            data_start=layout.data_start,
            tensors=layout.tensors,
            chunks=chunks,
            aliases=dict(weights_in.aliases),
            factory=factory_entry,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        blob = self.blob_path(manifest.sha256)
        with translate_store_errors(self.fs, self.uri):
            self._check_reachable()
            blob_existed = self.fs.exists(blob)
            # The blob is rewritten even when it exists: that repairs a damaged copy, and the
            # time register takes does not tell whether some tenant already stored these bytes.
            pieces = iter_blob_chunks(layout, header, weights_in.tensors)
            if progress is not None:
                pieces = _reporting(pieces, layout.nbytes, progress)
            write_atomically(self.fs, blob, pieces)
            try:
                write_atomically(self.fs, self.manifest_path(tenant, name), [manifest.to_json()])
            except BaseException:
                if not blob_existed:
                    self.fs.rm(blob)
                raise
        return manifest.info

    # -- reading -------------------------------------------------------------------------------

    def manifest(self, name: str, *, tenant: str) -> Manifest:
        """The manifest ``name`` resolves to for ``tenant``: its own model, else a public one.

        Raises:
            ModelNotFoundError: neither exists (the same message whoever else has that name).
            ModelFormatError: the manifest document is malformed.
        """
        check_name(name)
        check_tenant(tenant)
        with translate_store_errors(self.fs, self.uri):
            self._check_reachable()
            for owner in dict.fromkeys((tenant, PUBLIC_TENANT)):
                path = self.manifest_path(owner, name)
                try:
                    data = self.fs.cat_file(path)
                except (FileNotFoundError, IsADirectoryError) as exc:  # a directory is no manifest
                    forget_frames(exc)  # handled here: see there
                    continue
                source = self.fs.unstrip_protocol(path)
                manifest = Manifest.from_json(data, source=source)
                if (manifest.tenant, manifest.name) != (owner, name):
                    raise ModelFormatError(
                        f"{source}: manifest says {manifest.tenant}/{manifest.name}, but lies at "
                        f"{owner}/{name}: the store was edited by hand"
                    )
                return manifest
        raise ModelNotFoundError(
            f"no model named {name!r} for tenant {tenant!r} in {self.uri}: register it first "
            "(trims_ray.register) or check the name"
        )

    def list_models(self, *, tenant: str) -> list[ModelInfo]:
        """The models ``tenant`` can see: its own and the public ones, sorted by tenant and name."""
        check_tenant(tenant)
        infos: list[ModelInfo] = []
        with translate_store_errors(self.fs, self.uri):
            self._check_reachable()
            for owner in dict.fromkeys((tenant, PUBLIC_TENANT)):
                directory = f"{self.root}/manifests/{owner}"
                self.fs.invalidate_cache(directory)  # listings are cached by object-store backends
                try:
                    entries = self.fs.ls(directory, detail=True)
                except FileNotFoundError as exc:
                    forget_frames(exc)  # handled here: see there
                    continue
                for path in sorted(e["name"] for e in entries if e["type"] == "file"):
                    stem = path.rsplit("/", 1)[-1].removesuffix(".json")
                    if not path.endswith(".json") or stem.startswith("."):
                        continue  # not a manifest (temporary files of writes start with ".")
                    if _is_name(stem):
                        infos.append(self.manifest(stem, tenant=owner).info)
                    else:  # register never writes such a file: someone edited the store
                        log.warning("store %s: ignoring %s: not a valid model name", self.uri, path)
        return infos

    def read(
        self, manifest: Manifest, *, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, ReadStats]:
        """Reads a model's blob into one buffer, verified against the manifest's sha256.

        Raises:
            IntegrityError: the blob is missing, of the wrong size, or does not match.
            StoreUnavailableError: the store cannot be reached.
        """
        path = self.blob_path(manifest.sha256)
        source = self.fs.unstrip_protocol(path)
        with translate_store_errors(self.fs, self.uri):
            try:
                return read_blob(
                    self.fs,
                    path,
                    nbytes=manifest.nbytes,
                    sha256=manifest.sha256,
                    chunk_digests=manifest.chunks,
                    out=out,
                    options=self.read_options,
                    source=source,
                )
            except FileNotFoundError:
                raise IntegrityError(
                    f"{source}: the blob of {manifest.tenant}/{manifest.name} is missing from the "
                    "store: re-register the model"
                ) from None

    def load(self, name: str, *, tenant: str) -> nn.Module | dict[str, torch.Tensor]:
        """Reads, verifies and builds a model in this process, with no cache involved.

        Returns the module (built on meta, weights assigned from the read buffer) when the model
        has a factory, else its state dict. This is what a function does without trims_ray.
        """
        manifest = self.manifest(name, tenant=tenant)
        buffer, _ = self.read(manifest)
        return materialize(manifest, buffer)

    # -- checks --------------------------------------------------------------------------------

    def _check_reachable(self) -> None:
        """On first use: the local root exists, or the S3 bucket answers (raises otherwise)."""
        if self._checked:
            return
        if is_local(self.fs):
            self.fs.makedirs(self.root, exist_ok=True)
        elif "s3" in _protocols(self.fs):
            bucket = self.root.split("/", 1)[0]
            # Not fs.exists(bucket): s3fs answers False there when the endpoint is unreachable,
            # which would blame the bucket. head_bucket raises what actually went wrong.
            try:
                self.fs.call_s3("head_bucket", Bucket=bucket)
            except FileNotFoundError:
                raise StoreUnavailableError(
                    f"store {self.uri}: bucket {bucket!r} does not exist at "
                    f"{describe_s3(self.fs)}: create it first",
                    reason="bucket",
                ) from None
        self._checked = True


def materialize(manifest: Manifest, buffer: np.ndarray) -> nn.Module | dict[str, torch.Tensor]:
    """Tensors viewed out of a verified blob buffer, assembled into the model when it has a factory."""
    tensors = tensors_from_buffer(buffer, manifest.layout)
    if manifest.factory is None:
        for alias, target in manifest.aliases.items():
            tensors[alias] = tensors[target]
        return tensors
    source = f"{manifest.tenant}/{manifest.name}"
    return assemble_module(resolve_factory(manifest.factory), tensors, manifest.aliases, source=source)


def _reporting(
    pieces: Iterable[memoryview], total: int, progress: Callable[[int, int], None]
) -> Iterator[memoryview]:
    """Yields ``pieces`` in slices of at most CHUNK_BYTES (views, no copy), calling
    ``progress(done, total)`` first and after the consumer has taken each slice."""
    done = 0
    progress(done, total)
    for piece in pieces:
        piece = memoryview(piece).cast("B")
        # One tensor can be most of a model: slicing keeps the bar moving through it.
        for start in range(0, len(piece), CHUNK_BYTES):
            part = piece[start : start + CHUNK_BYTES]
            yield part
            done += len(part)
            progress(done, total)


def _is_name(stem: str) -> bool:
    try:
        check_name(stem)
    except ValueError:
        return False
    return True

