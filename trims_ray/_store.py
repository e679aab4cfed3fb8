"""The model store: the cloud tier of DESIGN.md, over any fsspec URI (file://, memory://, s3://).

Layout under the store root::

    blobs/sha256/<hex>.safetensors     immutable weights, named by their sha256
    manifests/<tenant>/<name>.json     one small JSON document per model

Registering writes the blob first and the manifest last, each atomically, so a reader that finds
a manifest always finds its whole blob. Every read is verified against the manifest's sha256, and
every model built from a blob is checked against its header (``Manifest.check_blob``).

Blobs are shared: one blob serves every manifest of the same bytes, whatever its tenant. So a
registration that fails deletes the blob only if it created it and no manifest refers to it, and
a registration that succeeds makes sure its blob is still there (see ``_discard_blob``).

A public name has an owner, the tenant that first published it: only that tenant, or an
operator (a store-level call with ``operator=True``), may replace it (docs/threat-model.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np

from ._config import ReadOptions, caller_tenant_from_env, default_store_uri
from ._errors import (
    AccessDeniedError,
    IntegrityError,
    ModelFormatError,
    ModelNotFoundError,
    StoreUnavailableError,
)
from ._hashing import CHUNK_BYTES, chunk_bytes_for, digest_blob
from ._fsio import (
    _protocols,
    describe_s3,
    forget_frames,
    is_local,
    open_fs,
    translate_store_errors,
    write_atomically,
)
from ._manifest import Manifest, ModelInfo
from ._names import DEFAULT_TENANT, PUBLIC_TENANT, check_name, check_tenant
from ._reader import ReadStats, read_blob
from ._safetensors import iter_blob_chunks, plan_layout, tensors_from_buffer

if TYPE_CHECKING:
    import torch
    from torch import nn

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
        owner: str | None = None,
        operator: bool = False,
    ) -> ModelInfo:
        """Stores ``weights`` under ``tenant``/``name``; replaces an earlier model of that name
        (a public one only for its owner or an operator).

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
            owner: the tenant that publishes a public model (``trims_ray.register`` passes the
                caller's); default ``$TRIMS_RAY_TENANT`` or "default", as the CLI's push acts.
                For a private model it can only be ``tenant`` itself.
            operator: the store's operator replaces a public model whoever owns it, keeping its
                owner unless ``owner`` is given. Whoever holds the store's write credentials can
                rewrite any file anyway; this flag makes that explicit, never implicit.

        Returns:
            The registered model's ModelInfo.

        Raises:
            ValueError / TypeError: bad name, tenant, owner, factory or weights.
            AccessDeniedError: ``tenant`` is "public" and ``name`` is published by another
                tenant (or by none recorded), and this is no operator call. Nothing is written.
            ModelFormatError: malformed safetensors, weights that do not fit the factory, or a
                module that a task would not rebuild exactly (the tensors are named).
            StoreUnavailableError: the store cannot be reached or written.
        """
        # Registering builds and checks modules: torch is imported here, not with the store
        # (the node cache and placement read blobs and manifests only).
        from ._factory import factory_ref
        from ._ingest import collect_weights, prove_rebuild

        check_name(name)
        check_tenant(tenant)
        publisher = _publisher(tenant, owner)
        # Refused before any weights are read or built; checked again just before publishing.
        self._owner_to_record(name, tenant, publisher, owner, operator)
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

        sha256, chunks = digest_blob(
            iter_blob_chunks(layout, header, weights_in.tensors), chunk_bytes=chunk_bytes_for(layout.nbytes)
        )
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
            order=tuple(weights_in.order) if weights_in.order is not None else None,
        )
        blob = self.blob_path(manifest.sha256)

        def write_blob() -> None:
            write_atomically(self.fs, blob, iter_blob_chunks(layout, header, weights_in.tensors))

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
                recorded = self._owner_to_record(name, tenant, publisher, owner, operator)
                if recorded != manifest.owner:
                    manifest = dataclasses.replace(manifest, owner=recorded)
                write_atomically(self.fs, self.manifest_path(tenant, name), [manifest.to_json()])
            except BaseException as exc:
                if not blob_existed:
                    self._discard_blob(manifest.sha256, write_blob, exc)
                raise
            # A failing registration of the same bytes may have deleted the blob between our
            # write and our manifest's (it found no manifest then): put it back.
            self.fs.invalidate_cache(blob)
            if not self.fs.exists(blob):
                log.warning("store %s: blob %s vanished while registering %s/%s: rewritten", self.uri, manifest.sha256, tenant, name)
                write_blob()
        return manifest.info

    def _owner_to_record(
        self, name: str, tenant: str, publisher: str, owner: str | None, operator: bool
    ) -> str | None:
        """The owner the manifest of ``tenant``/``name`` records (None for a private model),
        or AccessDeniedError when ``publisher`` may not replace the public model of that name.

        Check-then-write: two tenants publishing a new name at the same moment both pass, and
        the later write wins (fsspec offers no create-if-absent on every backend)."""
        if tenant != PUBLIC_TENANT:
            return None
        with translate_store_errors(self.fs, self.uri):
            self._check_reachable()
            try:
                existing = self._read_manifest(PUBLIC_TENANT, name)
                damaged = None
            except ModelFormatError as exc:
                existing, damaged = None, exc
        if operator:
            if owner is not None:
                return owner
            return existing.owner if existing is not None and existing.owner else publisher
        if existing is None and damaged is None:
            return publisher  # a new public name: its first publisher owns it
        if existing is not None and existing.owner == publisher:
            return publisher
        why = (
            "its manifest cannot be read" if damaged is not None
            else "it has no recorded owner (published before owners were recorded)"
            if existing.owner is None
            else "another tenant published it"
        )
        raise AccessDeniedError(
            f"tenant {publisher!r} cannot replace the public model {name!r}: {why}; only its "
            "owner or the store's operator may replace it. Publish under another name, or "
            "register it for your own tenant"
        )

    def _discard_blob(self, sha256: str, write_blob: Callable[[], None], cause: BaseException) -> None:
        """The cleanup of a registration that wrote the blob ``sha256`` (it was not there
        before) and then failed: deletes it unless a manifest refers to it, and looks again
        after deleting, putting it back when some registration of the same bytes published
        its manifest in between (that one also checks for its blob after publishing).

        Never raises: the registration's own error is what the caller must see."""
        path = self.blob_path(sha256)
        try:
            if self._blob_referenced(sha256):
                return
            self.fs.rm(path)
            if self._blob_referenced(sha256):
                write_blob()
        except Exception as exc:  # the store may be what failed the registration
            log.warning(
                "store %s: cleaning up blob %s after a failed registration (%s) failed: %s",
                self.uri, sha256, cause, exc,
            )

    def _blob_referenced(self, sha256: str) -> bool:
        """Whether any manifest of any tenant names the blob ``sha256`` (reads every manifest:
        only a failed registration asks)."""
        directory = f"{self.root}/manifests"
        self.fs.invalidate_cache(directory)
        try:
            paths = self.fs.find(directory)
        except FileNotFoundError:
            return False
        for path in paths:
            leaf = path.rsplit("/", 1)[-1]
            if not leaf.endswith(".json") or leaf.startswith("."):
                continue
            try:
                doc = json.loads(self.fs.cat_file(path))
            except (FileNotFoundError, ValueError):
                continue  # removed meanwhile, or no manifest: names no blob
            if isinstance(doc, dict) and doc.get("sha256") == sha256:
                return True
        return False

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
                manifest = self._read_manifest(owner, name)
                if manifest is not None:
                    return manifest
        raise ModelNotFoundError(
            f"no model named {name!r} for tenant {tenant!r} in {self.uri}: register it first "
            "(trims_ray.register) or check the name"
        )

    def _read_manifest(self, tenant: str, name: str) -> Manifest | None:
        """The manifest at ``tenant``/``name`` exactly, or None when there is none.

        Raises:
            ModelFormatError: the document is malformed or lies at another tenant's or name's path.
        """
        path = self.manifest_path(tenant, name)
        try:
            data = self.fs.cat_file(path)
        except (FileNotFoundError, IsADirectoryError) as exc:  # a directory is no manifest
            forget_frames(exc)  # handled here: see there
            return None
        source = self.fs.unstrip_protocol(path)
        manifest = Manifest.from_json(data, source=source)
        if (manifest.tenant, manifest.name) != (tenant, name):
            raise ModelFormatError(
                f"{source}: manifest says {manifest.tenant}/{manifest.name}, but lies at "
                f"{tenant}/{name}: the store was edited by hand"
            )
        return manifest

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
    """Tensors viewed out of a verified blob buffer, assembled into the model when it has a factory.

    Raises:
        IntegrityError: the manifest's tensor index does not match the blob's header
            (``Manifest.check_blob``): no tensor is served under another's name.
    """
    tensors = tensors_from_buffer(buffer, manifest.layout)  # checks the buffer's type and size
    manifest.check_blob(buffer)
    if manifest.factory is None:
        for alias, target in manifest.aliases.items():
            tensors[alias] = tensors[target]
        return tensors
    from ._factory import assemble_module, resolve_factory  # torch, in the processes that build

    source = f"{manifest.tenant}/{manifest.name}"
    return assemble_module(resolve_factory(manifest.factory), tensors, manifest.aliases, source=source)


def _publisher(tenant: str, owner: str | None) -> str:
    """The tenant a registration publishes as: ``owner``, else the environment's tenant (the
    CLI's push runs without a session), else "default"."""
    if owner is not None:
        check_tenant(owner)
    if tenant != PUBLIC_TENANT:
        if owner not in (None, tenant):
            raise ValueError(f"a model of tenant {tenant!r} is owned by that tenant, not {owner!r}")
        return tenant
    if owner is None:
        return check_tenant(caller_tenant_from_env() or DEFAULT_TENANT)
    if owner == PUBLIC_TENANT:
        raise ValueError("owner must be a tenant, not 'public'")
    return owner


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

