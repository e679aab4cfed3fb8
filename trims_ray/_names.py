"""Validation of model names and tenants, the two strings that become paths in the store.

Both end up as path components under the store root (``manifests/<tenant>/<name>.json``), so
anything that could escape that root or alias another entry is rejected here, once.
"""

from __future__ import annotations

import re
import reprlib

__all__ = ["PUBLIC_TENANT", "DEFAULT_TENANT", "check_name", "check_tenant"]

PUBLIC_TENANT = "public"
DEFAULT_TENANT = "default"

# A leading letter or digit rules out ".", "..", hidden files and option-like names; the body
# allows the characters model names use in practice (bert-base, gpt2.medium, llama_3-8b).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# Names come from outside (a manifest in the store, a command line): quoted in a message they are
# cut short, so that a hostile one cannot make the message itself huge.
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = 80


def check_name(name: object) -> str:
    """Returns ``name`` if it is a valid model name.

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: it is empty, too long, or has characters outside ``[A-Za-z0-9._-]``,
            a leading punctuation mark, or ``..`` (anything that could leave the store root).
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid model name {_SHOWN.repr(name)}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit, without '..'"
        )
    return name


def check_tenant(tenant: object) -> str:
    """Returns ``tenant`` if it is a valid tenant id.

    Raises:
        TypeError: ``tenant`` is not a str.
        ValueError: it is not 1-64 characters from ``[a-z0-9_-]`` starting with a letter or digit.
    """
    if not isinstance(tenant, str):
        raise TypeError(f"tenant must be a str, got {type(tenant).__name__}")
    if not _TENANT_RE.fullmatch(tenant):
        raise ValueError(
            f"invalid tenant {_SHOWN.repr(tenant)}: use 1-64 characters from a-z 0-9 _ -, "
            "starting with a letter or digit"
        )
    return tenant
