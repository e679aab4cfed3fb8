"""Filesystem plumbing under the model store: opening an fsspec URI, atomic writes, and turning
backend errors (botocore, aiohttp, OS) into trims_ray's errors that say what to do.

Atomic publishing is the reason this module exists: a reader must never see a half-written file
under its final name, and a failed write must leave nothing behind. Each backend gets the
mechanism that is atomic for it (rename on a local disk, multipart commit on S3).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import traceback
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from ._errors import StoreUnavailableError, TrimsError

__all__ = [
    "open_fs",
    "without_credentials",
    "has_credentials",
    "is_local",
    "write_atomically",
    "translate_store_errors",
    "describe_s3",
    "is_transient",
    "store_gave_up",
]

# The bucket names botocore accepts (it checks them client-side, before any request).
_BUCKET_RE = re.compile(r"[A-Za-z0-9.\-_]{1,255}")
# A URI's scheme (RFC 3986, or fsspec's chain "simplecache::s3") and its "://"; anything else
# is a local path.
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*(::[A-Za-z][A-Za-z0-9+.\-]*)*://")


# Words in an fsspec option's name that make it a credential (s3fs' key/secret/token, botocore's
# aws_*_key*, gcsfs' token, adlfs' account_key/sas_token/connection_string, passwords).
_CREDENTIAL_WORDS = ("key", "secret", "token", "password", "credential", "connection_string", "sas")


def without_credentials(storage_options: dict | None) -> dict | None:
    """``storage_options`` without its credentials, at every level (``client_kwargs`` too): what
    may leave trims_ray's actors. A process given these reads the store with the credentials of
    its own environment (instance profile, ``AWS_*`` variables), or not at all."""
    if storage_options is None:
        return None
    kept = {}
    for name, value in storage_options.items():
        if any(word in str(name).lower() for word in _CREDENTIAL_WORDS):
            continue
        kept[name] = without_credentials(value) if isinstance(value, dict) else value
    return kept


def has_credentials(storage_options: dict | None) -> bool:
    """Whether ``without_credentials`` would leave anything of ``storage_options`` out."""
    return without_credentials(storage_options) != storage_options


def open_fs(uri: str | os.PathLike, storage_options: dict | None = None):
    """Returns ``(fs, root)`` for a store URI or a local path.

    S3 picks up its endpoint from ``storage_options`` (``endpoint_url`` or
    ``client_kwargs.endpoint_url``), else ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``, and its
    credentials the usual boto way (storage options ``key``/``secret``, environment, profile).

    Raises:
        TypeError: ``uri`` is not a str or path.
        ValueError: the URI is empty, has a NUL byte, names a protocol fsspec does not know, or
            fsspec cannot build a filesystem from it (the message gives fsspec's reason).
        ImportError: the protocol's package is missing (fsspec's message names it).
    """
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str):
        raise TypeError(f"store must be a URI string or a path, got {type(uri).__name__}")
    if not uri.strip():
        raise ValueError("store URI is empty")
    if "\x00" in uri:  # no backend can name such a file; os calls would fail later, obscurely
        raise ValueError(f"store {uri!r}: contains a NUL byte")
    options = dict(storage_options or {})
    if not _SCHEME_RE.match(uri):  # "/data/a://b" is a local path, not a protocol "/data/a:"
        try:
            path = str(Path(uri).expanduser().resolve())
        except RuntimeError as exc:  # "~nobody/x"
            raise ValueError(f"store {uri!r}: not a usable local path ({exc})") from None
        # Not Path.as_uri(): it percent-encodes, and fsspec takes file:// paths literally, so
        # "/data/my models" would have become a directory named "my%20models".
        uri = f"file://{path}"
    protocol, rest = uri.split("://", 1)
    if protocol in ("file", "local", "memory", "s3", "s3a") and "::" in rest:
        # fsspec reads "a::b" as filesystem b inside a; these hold no inner filesystem, so it
        # would silently cut the path at "::" (file:///a::b is the directory /a).
        raise ValueError(f"store {uri!r}: a path with '::' cannot be a store; rename it")
    if protocol in ("s3", "s3a"):
        options = _s3_options(options)
    try:
        fs, root = fsspec.core.url_to_fs(uri, **options)
    except ImportError:
        raise
    except Exception as exc:
        # Filesystem constructors fail in their own ways on URIs they cannot use (a zip:// of a
        # directory raises IsADirectoryError, reference:// a TypeError, dir:// an AttributeError).
        raise ValueError(
            f"store {uri!r}: fsspec cannot open it ({type(exc).__name__}: {exc}); use "
            "file:///path, memory://name or s3://bucket/prefix, with storage_options for "
            "backends that need them"
        ) from exc
    if protocol in ("s3", "s3a"):
        _check_s3_root(uri, root)
        # s3fs's own retry loop (a class attribute, not a constructor argument): one try, so
        # that the reader's bounded backoff is the only one stacked on botocore's (_s3_options).
        fs.retries = 1
    return fs, root.rstrip("/") or root


def _check_s3_root(uri: str, root: str) -> None:
    """Rejects what botocore would refuse only at the first request, with its own error types."""
    bucket = root.split("/", 1)[0]
    if not _BUCKET_RE.fullmatch(bucket):
        raise ValueError(
            f"store {uri!r}: {bucket!r} is not an S3 bucket name; use "
            "s3://bucket/prefix with a bucket of letters, digits, '.', '-' and '_'"
        )
    try:
        root.encode("utf-8")  # S3 keys are UTF-8 text
    except UnicodeEncodeError:
        raise ValueError(f"store {uri!r}: the prefix has a lone surrogate, not valid text") from None


def _s3_options(options: dict) -> dict:
    """Makes the endpoint explicit, so errors can name it and every process uses the same one."""
    endpoint = options.pop("endpoint_url", None)
    client_kwargs = dict(options.get("client_kwargs") or {})
    endpoint = endpoint or client_kwargs.get("endpoint_url")
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
        options["client_kwargs"] = client_kwargs
    # trims_ray's reader retries failed ranged reads itself, with a bounded backoff
    # (ReadOptions.retries): left at their defaults, s3fs (5 tries, see open_fs) and botocore
    # (5 attempts) would each retry under it, and a dead endpoint took ~10 s per request to be
    # noticed. botocore keeps one quick retry for a dropped connection (every call, manifests
    # included); the connect timeout bounds a try against an endpoint that does not answer at
    # all. What the caller set in config_kwargs wins.
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", {"total_max_attempts": 2, "mode": "standard"})
    config.setdefault("connect_timeout", 5)
    config.setdefault("read_timeout", 30)
    options["config_kwargs"] = config
    return options


def describe_s3(fs) -> str:
    """The S3 endpoint a filesystem talks to, for messages."""
    endpoint = (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
    return endpoint or "the AWS default endpoint"


def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def write_atomically(fs, path: str, chunks: Iterable[memoryview | bytes]) -> int:
    """Writes ``chunks`` to ``path`` so that readers see the old file or the whole new one.

    On any error nothing is left at ``path`` that was not there before, and no temporary file
    remains. Returns the number of bytes written.
    """
    if is_local(fs):
        return _write_local(path, chunks)
    if isinstance(fs, MemoryFileSystem):
        # Memory files appear on open and grow as written; build the bytes first, then publish.
        data = b"".join(chunks)
        fs.pipe_file(path, data)
        return len(data)
    # Object stores: with autocommit off, the object appears only on commit (S3 completes the
    # multipart upload or puts the single part then) and discard aborts the upload.
    f = fs.open(path, "wb", autocommit=False)
    written = 0
    try:
        for chunk in chunks:
            written += f.write(chunk)
        f.close()
        f.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            f.discard()
        with contextlib.suppress(Exception):
            f.closed = True  # a discarded S3 file must not try to flush again when collected
        raise
    return written


def _write_local(path: str, chunks: Iterable[memoryview | bytes]) -> int:
    # The temporary file lives beside the target, on the same filesystem, so that os.replace is
    # an atomic rename (a temp file in /tmp could be a cross-device copy).
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    written = 0
    try:
        with open(temp, "wb") as f:
            for chunk in chunks:
                written += f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return written


def forget_frames(exc: BaseException | None) -> None:
    """Clears the locals of the finished frames in the tracebacks of ``exc`` and of the errors
    it was raised from; the tracebacks still show where each came from.

    fsspec's ``sync`` (behind every call of an async filesystem, such as s3fs) re-raises a failed
    call's error from a local of its own frame: error -> traceback -> frame -> error, a reference
    cycle. It keeps that frame alive, and every frame that called it once they return (a
    returning frame keeps its caller's), each with its last locals, until Python's cyclic
    collector runs, which in a quiet process may be never. A handled miss (a public model's
    name is looked up among the tenant's own first) so kept what its callers went on to return:
    the grant a node cache had just handed out, which kept the model in the node's object store
    after its eviction (issue 8). Call it where such an error is handled.
    """
    for _ in range(8):  # a chain of causes, not a cycle
        if exc is None:
            return
        traceback.clear_frames(exc.__traceback__)  # skips the frames still running
        exc = exc.__cause__ or exc.__context__


@contextlib.contextmanager
def translate_store_errors(fs, uri: str) -> Iterator[None]:
    """Turns an unreachable endpoint or missing credentials into StoreUnavailableError.

    Everything else (FileNotFoundError, our own errors) passes through unchanged. Whatever
    passes keeps nothing alive once handled (``forget_frames``).
    """
    try:
        yield
        return
    except Exception as exc:
        forget_frames(exc)
        translated = None if isinstance(exc, StoreUnavailableError) else _translate(exc, fs, uri)
        if translated is None:
            raise
        translated.__cause__ = exc  # as "raise translated from exc"
    try:
        raise translated  # out of the handler, and no local left holding it: no cycle
    finally:
        del translated


# Failures of one request that the same request may not meet again: the endpoint refused or
# dropped the connection, the body was cut short, a timeout (botocore, aiohttp and s3fs names;
# matched by name so that none of them has to be imported here).
_TRANSIENT_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "IncompleteRead",
        "ClientConnectorError",
        "ClientOSError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "FSTimeoutError",
    }
)
# What s3fs makes of S3's "try again" answers: SlowDown and 503 (EBUSY), InternalError and 500
# (EREMOTEIO).
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO)})


def is_transient(exc: BaseException) -> bool:
    """Whether a failed object-store request may succeed if it is sent again.

    True for refused, dropped or cut connections, timeouts, throttling and 5xx answers (also
    when one of them is the cause of what was raised); False for everything else: a missing
    object, denied access, a bad request, and trims_ray's own errors.
    """
    seen = 0
    while exc is not None and seen < 8:  # a cause chain, not a cycle
        if isinstance(exc, TrimsError):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True  # builtin: refused, reset, broken pipe; socket and asyncio timeouts
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__):
            return True
        if isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, PermissionError)):
            if exc.errno in _TRANSIENT_ERRNOS:
                return True
        exc = exc.__cause__
        seen += 1
    return False


def store_gave_up(fs, source: str, exc: BaseException, tries: int, seconds: float) -> StoreUnavailableError:
    """The error of a store read that failed every try: which file, how it failed, what to do."""
    where = f"the S3 endpoint {describe_s3(fs)}" if "s3" in _protocols(fs) else "the store"
    return StoreUnavailableError(
        f"{source}: {tries} tries in {seconds:.1f} s failed, the last with "
        f"{type(exc).__name__}: {exc}; nothing of it was kept. Check that {where} is up and "
        "reachable from this node, then ask again (more tries: TRIMS_RAY_READ_RETRIES, "
        "ReadOptions.retries)",
        reason="endpoint",
    )


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _translate(exc: Exception, fs, uri: str) -> StoreUnavailableError | None:
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return StoreUnavailableError(
            f"store {uri}: no usable S3 credentials ({exc}); set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or a profile), or pass storage_options={'key': ..., "
            "'secret': ...}",
            reason="credentials",
        )
    if name in (
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ConnectionClosedError",
        "ClientConnectorError",
        "ServerDisconnectedError",
    ):
        return StoreUnavailableError(
            f"store {uri}: cannot reach the S3 endpoint {describe_s3(fs)} ({exc}); check that it "
            "is up, or set AWS_ENDPOINT_URL / storage_options={'endpoint_url': ...}",
            reason="endpoint",
        )
    if isinstance(exc, PermissionError) and not is_local(fs):
        return StoreUnavailableError(
            f"store {uri}: access denied by {describe_s3(fs)} ({exc}); the credentials in use "
            "are not allowed to use this bucket",
            reason="credentials",
        )
    return None
