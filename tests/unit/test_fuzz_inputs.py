"""Fuzz suites for the strings trims_ray takes from callers, operators and the environment: model
and tenant names, store URIs and paths, factory references ("module:attr"), and the TRIMS_RAY_*
variables.

The rule: any input gives a value or a documented error (ValueError / TypeError for a bad
argument, ImportError for a missing fsspec backend), never another exception type; and a name
that is accepted never leads outside the store root. test_names_errors.py checks the name rules
on their own; here the paths are the ones the store really uses. Example counts follow
$TRIMS_RAY_FUZZ_EXAMPLES as in test_fuzz_formats.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import posixpath
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch
from fsspec.registry import known_implementations
from hypothesis import assume, given
from hypothesis import strategies as st

from trims_ray import (
    CacheConfig,
    ModelFormatError,
    ModelStore,
    ReadOptions,
    StoreUnavailableError,
)
from trims_ray._api import caller_tenant
from trims_ray._factory import check_factory_ref, factory_ref, resolve_factory
from trims_ray._fsio import is_local, open_fs
from trims_ray._names import check_name, check_tenant
from trims_ray._store import _is_name
from trims_ray.policy import online_policies
from workloads.s3server import create_bucket

from ..conftest import s3_options
from .test_fuzz_formats import ODD_TEXT, fuzz

# --- names and tenants, as the store turns them into paths ---------------------------------------

# Text that is dangerous in paths, in several spellings: dot segments (plain, percent-encoded,
# full-width, one-dot leader), separators, NUL and newlines, home and drive prefixes, Unicode
# that normalizes to ASCII, and lengths around the limits.
PATH_PIECES = [
    "..",
    ".",
    "/",
    "\\",
    "%2e%2e",
    "%2f",
    "%00",
    "\x00",
    "\n",
    "~",
    "C:",
    "．．",
    "\u2024\u2024",
    "ｍ",
    "é",
    "e\u0301",
    "\udcff",
    " ",
    "a",
    "Z",
    "0",
    "_",
    "-",
    ".json",
    "*",
    ":",
    "?",
    "#",
]
pathy_text = st.lists(st.sampled_from(PATH_PIECES), max_size=6).map("".join)
any_text = (
    st.text()
    | pathy_text
    | ODD_TEXT
    | st.integers(120, 140).map(lambda n: "a" * n)
    | st.integers(60, 70).map(lambda n: "a" * n)
)
non_strings = (
    st.none() | st.integers() | st.binary(max_size=4) | st.lists(st.text(max_size=2), max_size=2)
)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A local and a memory store (both empty: only their paths are used)."""
    local = ModelStore((tmp_path_factory.mktemp("fuzz-store") / "root").as_uri())
    memory = ModelStore(f"memory://trims-fuzz-{uuid.uuid4().hex}")
    return [local, memory]


def resolved(store: ModelStore, path: str) -> str:
    """The path the backend will really touch: symlinks and dot segments resolved."""
    return os.path.realpath(path) if is_local(store.fs) else posixpath.normpath(path)


@fuzz(400)
@given(any_text | non_strings, any_text | non_strings)
def test_fuzz_accepted_names_stay_under_the_store_root(stores, tenant, name):
    try:
        check_name(name)
        check_tenant(tenant)
    except (ValueError, TypeError):
        for store in stores:
            with pytest.raises((ValueError, TypeError)):
                store.manifest_path(tenant, name)
        return
    for store in stores:
        path = store.manifest_path(tenant, name)
        root = resolved(store, store.root).rstrip("/")
        where = resolved(store, path)
        # Exactly manifests/<tenant>/<name>.json under the root: no escape, and no aliasing of
        # two different (tenant, name) pairs onto one file.
        assert where == f"{root}/manifests/{tenant}/{name}.json"


@fuzz(200)
@given(any_text | non_strings, any_text | non_strings)
def test_fuzz_lookups_raise_only_documented_errors(stores, tenant, name):
    store = stores[1]  # memory: a lookup must not create directories for odd names
    try:
        store.manifest(name, tenant=tenant)
    except KeyError as exc:  # ModelNotFoundError is a KeyError: the store is empty
        assert type(exc).__name__ == "ModelNotFoundError"
    except (ValueError, TypeError):
        with pytest.raises((ValueError, TypeError)):
            check_name(name)
            check_tenant(tenant)
    else:
        pytest.fail("an empty store returned a manifest")


@fuzz(60)
@given(st.lists(any_text, min_size=1, max_size=4), st.binary(max_size=8))
def test_fuzz_stray_files_in_a_tenant_directory_do_not_break_listing(file_names, content):
    store = ModelStore(f"memory://trims-fuzz-{uuid.uuid4().hex}")
    try:
        store.register("real", {"w": torch.ones(2)}, tenant="t")
        for stem in file_names:
            if "/" in stem or not stem.strip(".") or stem == "real":
                continue
            store.fs.pipe_file(f"{store.root}/manifests/t/{stem}.json", content)
        try:
            names = [info.name for info in store.list_models(tenant="t")]
        except ModelFormatError:  # a validly named file that is no manifest: loud, by design
            assert any(_is_name(stem) for stem in file_names)
            return
        assert names == ["real"]
    finally:
        store.fs.rm(store.root, recursive=True)


def test_regression_stray_files_and_directories_in_a_tenant_directory(tmp_path):
    # A file with an invalid name made list_models raise ValueError; a directory named like a
    # manifest made it (and manifest()) raise IsADirectoryError on a local store.
    store = ModelStore((tmp_path / "store").as_uri())
    store.register("real", {"w": torch.ones(2)}, tenant="t")
    (tmp_path / "store" / "manifests" / "t" / "bad name.json").write_bytes(b"{}")
    (tmp_path / "store" / "manifests" / "t" / "d.json").mkdir()
    assert [info.name for info in store.list_models(tenant="t")] == ["real"]
    with pytest.raises(KeyError, match="no model named 'd'"):
        store.manifest("d", tenant="t")


# --- store URIs ----------------------------------------------------------------------------------

# Only backends that neither reach the network nor litter the disk when constructed: ftp://,
# github://, gist://, http:// and friends connect (or may) in their constructors, and the caching
# wrappers make temporary directories.
SAFE_PROTOCOLS = [
    "file",
    "local",
    "memory",
    "s3",
    "s3a",
    "data",
    "zip",
    "tar",
    "reference",
    "dir",
    "generic",
]
UNSAFE_PROTOCOLS = set(known_implementations) - set(SAFE_PROTOCOLS)
protocols = (
    st.sampled_from(SAFE_PROTOCOLS)
    | st.text("abcz3+-.", min_size=1, max_size=6)
    | st.sampled_from(["", "S3", "FILE", "s3 "])
)


@st.composite
def store_uris(draw) -> str:
    path = draw(
        pathy_text
        | st.text(max_size=12)
        | st.sampled_from(["bucket/prefix", "/tmp/x", "", "a" * 5000])
    )
    form = draw(st.sampled_from(["uri", "uri", "chain", "plain", "home"]))
    if form == "plain":
        return path
    if form == "home":
        return draw(st.sampled_from(["~", "~root", "~nosuchuser-trims", "~/"])) + path
    uri = draw(protocols) + draw(st.sampled_from(["://", ":///", ":/", "::"])) + path
    if form == "chain":
        uri = draw(protocols) + "::" + uri
    return uri


def protocols_in(uri: str) -> set[str]:
    return {part.rsplit("::", 1)[-1].strip() for part in uri.replace("://", "::").split("::")[:-1]}


@fuzz(400)
@given(store_uris())
def test_fuzz_store_uris_open_or_raise_documented_errors(uri):
    assume(not protocols_in(uri) & UNSAFE_PROTOCOLS)
    try:
        store = ModelStore(uri)
    except (ValueError, TypeError, ImportError):
        return
    # Constructing touches nothing; the paths it will use all lie under its root.
    assert store.uri and isinstance(store.root, str)
    assert store.blob_path("0" * 64).startswith(f"{store.root}/blobs/sha256/")
    assert store.manifest_path("t", "m").startswith(f"{store.root}/manifests/t/")


@fuzz(300)
@given(
    st.text(max_size=12)
    | pathy_text
    | st.sampled_from(["my models", "Jos\u00e9", "100%", "a#b?c", "a%20b"])
)
def test_fuzz_local_paths_name_exactly_their_directory(tmp_path_factory, name):
    # The store's URI travels to workers, which open it again: both must be the directory named.
    path = f"{tmp_path_factory.getbasetemp()}/{name}"
    try:
        store = ModelStore(path)
    except ValueError:
        assert "\x00" in path or "::" in path or "://" in path  # "://" makes it a URI
        return
    assert store.root == str(Path(path).resolve())
    assert ModelStore(store.uri).root == store.root


def test_regression_local_path_with_a_space_is_that_directory(tmp_path):
    # Paths became URIs through Path.as_uri(), which percent-encodes, and fsspec reads file://
    # paths literally: the store went to ".../my%20models".
    store = ModelStore(tmp_path / "my models é")
    store.register("m", {"w": torch.ones(2)}, tenant="t")
    assert (tmp_path / "my models é" / "manifests" / "t" / "m.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my models é"]


@pytest.mark.parametrize(
    "uri, error",
    [
        ("~nosuchuser-trims/x", "not a usable local path"),  # was RuntimeError from expanduser
        ("zip://", "cannot open"),  # was IsADirectoryError
        ("reference://", "cannot open"),  # was TypeError from the backend's constructor
        ("dir://x", "cannot open"),  # was AttributeError
        ("file:///tmp/a\x00b", "NUL"),  # was accepted: every later os call failed obscurely
        ("/tmp/a::b", "'::'"),  # was the store at /tmp/a%3A%3Ab; as a file:// URI it is /tmp/a
        ("file:///tmp/a::b", "'::'"),  # was the store at /tmp/a
        ("s3://bucket/a::b", "'::'"),  # was TypeError from aiobotocore at the first request
        ("s3://", "not an S3 bucket"),  # was botocore ParamValidationError at the first request
        ("s3://bad bucket/x", "not an S3 bucket"),
        ("s3:///x", "not an S3 bucket"),
        ("s3://bucket/x\udcff", "surrogate"),  # was UnicodeEncodeError at the first request
    ],
)
def test_regression_unusable_store_uris_are_value_errors(uri, error):
    with pytest.raises(ValueError, match=error):
        open_fs(uri)


@pytest.fixture(scope="module")
def fuzz_bucket(s3_endpoint):
    """An empty bucket on the moto server for this module."""
    bucket = f"trims-fuzz-{uuid.uuid4().hex[:12]}"
    create_bucket(s3_endpoint, bucket)
    return bucket


@fuzz(40)
@given(
    st.from_regex(r"[A-Za-z0-9._-]{1,70}", fullmatch=True) | st.just("<ours>"),
    pathy_text | st.text(max_size=6),
)
def test_fuzz_s3_store_uris_against_a_real_server(s3_endpoint, fuzz_bucket, bucket, prefix):
    bucket = fuzz_bucket if bucket == "<ours>" else bucket
    try:
        store = ModelStore(f"s3://{bucket}/{prefix}", storage_options=s3_options(s3_endpoint))
    except ValueError:
        return
    try:
        assert store.list_models(tenant="t") == []
        with pytest.raises(KeyError, match="no model named"):
            store.manifest("m", tenant="t")
    except StoreUnavailableError as exc:  # any name botocore takes but no bucket of ours
        assert exc.reason == "bucket" and bucket != fuzz_bucket


def test_usual_store_uris_still_open(tmp_path):
    assert open_fs("s3://bucket.name-1_x/prefix")[1] == "bucket.name-1_x/prefix"
    assert open_fs("memory://x/y")[1] == "/x/y"
    assert open_fs(tmp_path)[1] == str(tmp_path)
    assert open_fs("simplecache::memory://x")[1] == "/x"


# --- factory references --------------------------------------------------------------------------

identifier = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
# Modules that are safe to import (ours and small standard ones) or names that do not exist:
# importing an arbitrary existing module can run code (antigravity opens a browser).
SAFE_MODULES = [
    "trims_ray",
    "trims_ray._factory",
    "collections",
    "math",
    "json",
    "torch.nn",
    __name__,
]


def absent_top_level(name: str) -> bool:
    return importlib.util.find_spec(name.split(".")[0]) is None  # looks, imports nothing


module_parts = st.sampled_from(SAFE_MODULES) | st.lists(identifier, min_size=1, max_size=3).map(
    ".".join
).filter(absent_top_level)
attr_parts = st.sampled_from(
    [
        "Linear",
        "nn.Linear",
        "OrderedDict",
        "loads",
        "pi",
        "__class__",
        "factory_ref",
        "tiny_factory",
        "Identity",
    ]
) | st.lists(identifier, min_size=1, max_size=3).map(".".join)


def tiny_factory() -> torch.nn.Module:
    return torch.nn.Linear(2, 2)


@fuzz(300)
@given(any_text | non_strings)
def test_fuzz_factory_reference_syntax(ref):
    try:
        checked = check_factory_ref(ref)
    except (ValueError, TypeError):
        return
    module, attr = checked.split(":")
    assert module and attr and not module.startswith(".")


@fuzz(300)
@given(module_parts, attr_parts, st.sampled_from([":", "::", ".", ":."]))
def test_fuzz_factory_references_resolve_or_raise_documented_errors(module, attr, sep):
    ref = f"{module}{sep}{attr}"
    try:
        entry = factory_ref(ref)
    except (ValueError, TypeError):
        with pytest.raises((ValueError, TypeError)):
            resolve_factory({"import": ref})
        return
    assert entry == {"import": ref}
    assert callable(resolve_factory(entry))


@pytest.mark.parametrize("ref", ["..x:y", "x", "", ":", ".trims_ray:f", "trims_ray:"])
def test_regression_malformed_factory_entry_is_a_value_error(ref):
    # "..x:y" reached importlib, which raised TypeError (relative import without a package);
    # "x" raised ValueError("not enough values to unpack").
    with pytest.raises(ValueError, match="must look like"):
        resolve_factory({"import": ref})


# --- TRIMS_RAY_* environment variables -----------------------------------------------------------

env_values = (
    st.sampled_from(
        [
            "0",
            "1",
            "4096",
            "-1",
            " 12 ",
            "1_000",
            "0x10",
            "1e3",
            "inf",
            "nan",
            "٣",
            "9" * 5000,
            "",
            " ",
            "~nosuchuser-trims/x",
            "~/x",
        ]
    )
    | st.integers(-(2**70), 2**70).map(str)
    | st.text(max_size=8)
    | st.sampled_from(online_policies())
).filter(lambda v: "\x00" not in v and _encodable(v))


@contextlib.contextmanager
def _environment(values: dict[str, str], unset: Iterable[str] = ()) -> Iterator[None]:
    """``os.environ`` with ``values`` set and ``unset`` gone, for what reads it (``os.getenv``
    too), without writing the process's C environment. Ray 2.60 leaves threads of each session
    running after ``ray.shutdown`` that read the environment, and ``setenv`` races with them:
    ``python -m workloads.ray_env_race`` died of a segmentation fault after 3, 6 and 12 sessions
    (within 5-50 s of writes) and ran its 60 s after 0 or 1. CI's one-process suite died so in
    this module twice, after the integration tests' clusters."""
    environ = dict(os.environ)
    environ.update(values)
    for name in unset:
        environ.pop(name, None)
    with mock.patch.object(os, "environ", environ):
        yield


def _encodable(value: str) -> bool:
    try:
        os.fsencode(value)
    except UnicodeError:
        return False
    return True


def _home_of(path: str) -> bool:
    """Whether "~" or "~user" at the start of ``path`` names a home directory here."""
    return os.path.expanduser(path.split("/", 1)[0]) != path.split("/", 1)[0]


def _as_int(raw: str) -> int | None:
    try:
        return int(raw.strip())
    except ValueError:
        return None


@fuzz(300)
@given(env_values, env_values)
def test_fuzz_read_options_from_env(chunk, concurrency):
    env = {"TRIMS_RAY_READ_CHUNK_BYTES": chunk, "TRIMS_RAY_READ_CONCURRENCY": concurrency}
    with _environment(env):
        try:
            options = ReadOptions.from_env()
        except ValueError:
            c, n = (
                _as_int(chunk) if chunk.strip() else 16 * 2**20,
                _as_int(concurrency) if concurrency.strip() else 8,
            )
            assert c is None or n is None or c < 4096 or not 1 <= n <= 256
            return
    assert options.chunk_bytes == (_as_int(chunk) if chunk.strip() else ReadOptions().chunk_bytes)
    assert options.concurrency == (
        _as_int(concurrency) if concurrency.strip() else ReadOptions().concurrency
    )


@fuzz(300)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "TRIMS_RAY_HOST_BYTES",
                "TRIMS_RAY_DISK_BYTES",
                "TRIMS_RAY_DISK_DIR",
                "TRIMS_RAY_POLICY",
            ]
        ),
        env_values,
    )
)
def test_fuzz_cache_config_from_env(env):
    unset = {"TRIMS_RAY_HOST_BYTES", "TRIMS_RAY_DISK_BYTES", "TRIMS_RAY_DISK_DIR", "TRIMS_RAY_POLICY"} - env.keys()
    with _environment(env, unset):
        try:
            config = CacheConfig.from_env()
        except (ValueError, TypeError):
            host, disk = (
                env.get("TRIMS_RAY_HOST_BYTES", "").strip(),
                env.get("TRIMS_RAY_DISK_BYTES", "").strip(),
            )
            policy, disk_dir = (
                env.get("TRIMS_RAY_POLICY", "").strip(),
                env.get("TRIMS_RAY_DISK_DIR", "").strip(),
            )
            assert (
                (host and (_as_int(host) is None or _as_int(host) < 0))
                or (disk and (_as_int(disk) is None or _as_int(disk) < 0))
                or (policy and policy not in online_policies())
                or (disk_dir.startswith("~") and not _home_of(disk_dir))
            )
            return
    if env.get("TRIMS_RAY_HOST_BYTES", "").strip():
        assert config.host_bytes == _as_int(env["TRIMS_RAY_HOST_BYTES"])
    if env.get("TRIMS_RAY_DISK_DIR", "").strip():
        assert config.disk_dir == env["TRIMS_RAY_DISK_DIR"].strip()
        assert config.disk_path("node").name == "node"
    assert config.policy in online_policies()


@fuzz(200)
@given(env_values | store_uris(), env_values)
def test_fuzz_store_and_tenant_from_env(store, tenant):
    assume(not protocols_in(store) & UNSAFE_PROTOCOLS)
    assume("\x00" not in store and _encodable(store))  # the environment cannot hold these
    with _environment({"TRIMS_RAY_STORE": store, "TRIMS_RAY_TENANT": tenant}):
        try:
            ModelStore()
        except (ValueError, TypeError, ImportError):
            pass
        try:
            assert caller_tenant() == (tenant.strip() or "default")
        except ValueError:
            with pytest.raises(ValueError):
                check_tenant(tenant.strip())


def test_regression_disk_dir_of_unknown_user_is_a_value_error(monkeypatch):
    # Accepted, then CacheConfig.disk_path raised RuntimeError from Path.expanduser.
    monkeypatch.setenv("TRIMS_RAY_DISK_DIR", "~nosuchuser-trims/x")
    with pytest.raises(ValueError, match="disk_dir"):
        CacheConfig.from_env()
    monkeypatch.setenv("TRIMS_RAY_DISK_DIR", "~/x")
    assert CacheConfig.from_env().disk_path("n").parts[-2:] == ("x", "n")
