"""trims_ray._gc: the environment a Ray of ours starts with (the user's own settings win, and
the block leaves nothing behind), and the once-per-process freeze with its switch. The freeze runs
in a fresh interpreter: frozen objects would stay frozen in pytest's."""

from __future__ import annotations

import os
import subprocess
import sys

from trims_ray._gc import QUICK_FREES, quick_frees, ray_env

NAME = "RAY_free_objects_period_milliseconds"


def test_quick_frees_sets_the_period_inside_the_block_only(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    with quick_frees():
        assert os.environ[NAME] == QUICK_FREES[NAME] == "100"
    assert NAME not in os.environ


def test_a_setting_the_user_made_wins_and_is_kept(monkeypatch):
    monkeypatch.setenv(NAME, "1000")
    with ray_env({NAME: "100", "RAY_TRIMS_TEST_OTHER": "x"}):
        assert os.environ[NAME] == "1000" and os.environ["RAY_TRIMS_TEST_OTHER"] == "x"
    assert os.environ[NAME] == "1000" and "RAY_TRIMS_TEST_OTHER" not in os.environ


FREEZE_TWICE = """
import gc, torch
from trims_ray._gc import freeze_startup_objects
freeze_startup_objects()
first = gc.get_freeze_count()
objects = [[i] for i in range(1000)]  # made after: a second call must not freeze them
freeze_startup_objects()
print(first, gc.get_freeze_count())
"""


def _freeze_counts(env_value: str | None) -> tuple[int, int]:
    env = {k: v for k, v in os.environ.items() if k != "TRIMS_RAY_GC_FREEZE"}
    if env_value is not None:
        env["TRIMS_RAY_GC_FREEZE"] = env_value
    out = subprocess.run([sys.executable, "-c", FREEZE_TWICE], env=env, capture_output=True, text=True, check=True, timeout=120)
    first, second = out.stdout.split()
    return int(first), int(second)


def test_the_freeze_takes_what_exists_once_per_process():
    first, second = _freeze_counts(None)
    assert first > 10_000  # torch's import alone makes some 200,000 objects
    assert second == first


def test_the_freeze_can_be_turned_off():
    assert _freeze_counts("off") == (0, 0)
