"""Tests of name and tenant validation (nothing may escape the store root) and of the error
classes (their hierarchy, and that they survive pickling across Ray processes).
"""

from __future__ import annotations

import pickle

import pytest
import ray.cloudpickle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trims_ray
from trims_ray import _errors
from trims_ray._names import DEFAULT_TENANT, PUBLIC_TENANT, check_name, check_tenant

# --- names and tenants ---------------------------------------------------------------------------

GOOD_NAMES = ["resnet50", "bert-base", "gpt2.medium", "Llama_3-8B", "a", "0", "a.", "x" * 128]
BAD_NAMES = [
    "", ".", "..", "a/b", "a\\b", "../x", "a..b", "x..", ".hidden", "-x", "_x", "x y", "x\x00",
    "x\n", "\nx", "x" * 129, "modèle", "ｍodel", "a:b", "a*", "~x", "/abs",
]
GOOD_TENANTS = ["public", "default", "team-a", "t_1", "0", "a" * 64]
BAD_TENANTS = ["", "Team", "a.b", "a/b", "..", ".", "-a", "_a", "a b", "a" * 65, "é", "a\n", "a\\b"]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_check_name_accepts(name):
    assert check_name(name) is name


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_check_name_rejects(name):
    with pytest.raises(ValueError, match="invalid model name"):
        check_name(name)


@pytest.mark.parametrize("value", [None, 3, b"x", ["x"]], ids=repr)
def test_check_name_and_tenant_reject_non_str(value):
    with pytest.raises(TypeError):
        check_name(value)
    with pytest.raises(TypeError):
        check_tenant(value)


@pytest.mark.parametrize("tenant", GOOD_TENANTS)
def test_check_tenant_accepts(tenant):
    assert check_tenant(tenant) is tenant


@pytest.mark.parametrize("tenant", BAD_TENANTS, ids=repr)
def test_check_tenant_rejects(tenant):
    with pytest.raises(ValueError, match="invalid tenant"):
        check_tenant(tenant)


def test_builtin_tenants_are_valid():
    assert check_tenant(PUBLIC_TENANT) == "public"
    assert check_tenant(DEFAULT_TENANT) == "default"


# Arbitrary text, plus text built from the characters that matter for paths, so that accepted
# and dangerous inputs are both common.
PATHY = st.text(alphabet="aZ09._-/\\ \x00\n~:é", max_size=10)
ANY_TEXT = st.text() | PATHY
PROPERTY = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY
@given(ANY_TEXT)
def test_property_accepted_names_stay_under_the_root(tmp_path, name):
    try:
        checked = check_name(name)
    except ValueError:
        return
    assert checked is name
    root = (tmp_path / "manifests" / "t").resolve()
    target = (root / f"{name}.json").resolve()
    # Exactly one component below the root, and the one we named: no escape, no aliasing.
    assert target.parent == root
    assert target.name == f"{name}.json"


@PROPERTY
@given(ANY_TEXT)
def test_property_accepted_tenants_stay_under_the_root(tmp_path, tenant):
    try:
        checked = check_tenant(tenant)
    except ValueError:
        return
    assert checked is tenant
    root = (tmp_path / "manifests").resolve()
    target = (root / tenant / "model.json").resolve()
    assert target.parent.parent == root
    assert target.parent.name == tenant


# --- errors --------------------------------------------------------------------------------------

ERROR_CLASSES = [
    _errors.TrimsError,
    _errors.ModelNotFoundError,
    _errors.ModelFormatError,
    _errors.IntegrityError,
    _errors.CapacityError,
    _errors.AccessDeniedError,
    _errors.StoreUnavailableError,
]
PICKLERS = {"pickle": pickle, "ray.cloudpickle": ray.cloudpickle}


def test_error_classes_are_the_whole_module():
    assert {c.__name__ for c in ERROR_CLASSES} == set(_errors.__all__)


@pytest.mark.parametrize("pickler", PICKLERS.values(), ids=PICKLERS.keys())
@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_error_survives_pickling(cls, pickler):
    message = f"model 'bert' in tenant t: {cls.__name__} happened"
    copy = pickler.loads(pickler.dumps(cls(message)))
    assert type(copy) is cls
    assert str(copy) == message
    assert copy.args == (message,)
    assert isinstance(copy, _errors.TrimsError)


@pytest.mark.parametrize("pickler", PICKLERS.values(), ids=PICKLERS.keys())
def test_store_unavailable_keeps_reason_through_pickling(pickler):
    err = _errors.StoreUnavailableError("store s3://b: no credentials", reason="credentials")
    copy = pickler.loads(pickler.dumps(err))
    assert type(copy) is _errors.StoreUnavailableError
    assert copy.reason == "credentials"
    assert str(copy) == "store s3://b: no credentials"
    assert _errors.StoreUnavailableError("x").reason == "io"


def test_raised_error_with_traceback_and_cause_pickles():
    # What crosses a Ray process boundary is a raised error, with a cause attached.
    try:
        try:
            raise OSError("disk")
        except OSError as cause:
            raise _errors.IntegrityError("blob: sha256 mismatch") from cause
    except _errors.IntegrityError as err:
        copy = ray.cloudpickle.loads(ray.cloudpickle.dumps(err))
    assert type(copy) is _errors.IntegrityError and str(copy) == "blob: sha256 mismatch"


def test_model_not_found_is_a_key_error_without_quotes():
    err = _errors.ModelNotFoundError("no model 'bert' visible to tenant t")
    assert isinstance(err, KeyError)
    assert str(err) == "no model 'bert' visible to tenant t"  # KeyError would add quotes
    assert str(_errors.ModelNotFoundError()) == ""
    with pytest.raises(KeyError):
        raise err
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_hierarchy():
    assert issubclass(_errors.AccessDeniedError, PermissionError)
    assert issubclass(_errors.StoreUnavailableError, ConnectionError)
    for cls in ERROR_CLASSES:
        assert issubclass(cls, _errors.TrimsError)
        assert issubclass(cls, Exception)
    # The three file-content errors are not OS errors: callers must not retry them as I/O.
    for cls in (_errors.ModelFormatError, _errors.IntegrityError, _errors.CapacityError):
        assert not issubclass(cls, OSError)


def test_public_names_exist():
    assert len(trims_ray.__all__) == len(set(trims_ray.__all__))
    for name in trims_ray.__all__:
        assert hasattr(trims_ray, name), name
    for cls in ERROR_CLASSES:
        assert getattr(trims_ray, cls.__name__) is cls
        assert cls.__name__ in trims_ray.__all__


@pytest.mark.parametrize("check", [check_name, check_tenant])
def test_an_absurdly_long_invalid_name_gives_a_short_message(check):
    with pytest.raises(ValueError) as raised:
        check("x/" * 5000)
    assert len(str(raised.value)) < 300
    assert "'x/x/" in str(raised.value)
