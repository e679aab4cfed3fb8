"""workloads.local_ray.retry_slow_start: a start that Ray says timed out is run once more, after the
processes it left are stopped; anything else passes through. The "start" here spawns a real
process and raises Ray's message, as Node.__init__ does when its raylet does not register.
"""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from workloads.local_ray import retry_slow_start

RAY_TIMEOUT = "The current node timed out during startup. This could happen because ..."


class Starts:
    """Each call spawns a long sleeper (as Ray's start leaves a GCS and a raylet) and then fails
    with the next of ``errors``, or returns ``"started"`` when they run out."""

    def __init__(self, *errors: Exception):
        self.errors = list(errors)
        self.spawned: list[subprocess.Popen] = []

    def __call__(self) -> str:
        self.spawned.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]))
        if self.errors:
            raise self.errors.pop(0)
        return "started"

    def stop_all(self) -> None:
        for proc in self.spawned:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def starts():
    made: list[Starts] = []

    def make(*errors: Exception) -> Starts:
        made.append(Starts(*errors))
        return made[-1]

    yield make
    for s in made:
        s.stop_all()


def test_a_start_that_timed_out_is_stopped_and_run_again(starts):
    start = starts(Exception(RAY_TIMEOUT))
    assert retry_slow_start(start) == "started"
    first, second = start.spawned
    assert first.wait(timeout=15) is not None  # what the failed start left is gone
    assert second.poll() is None and psutil.pid_exists(second.pid)  # what the good one started is not


def test_other_errors_pass_through_at_once_and_stop_nothing(starts):
    start = starts(RuntimeError("port 6379 is taken"))
    with pytest.raises(RuntimeError, match="6379"):
        retry_slow_start(start)
    assert len(start.spawned) == 1 and start.spawned[0].poll() is None


def test_it_gives_up_after_the_attempts(starts):
    start = starts(Exception(RAY_TIMEOUT), Exception(RAY_TIMEOUT), Exception(RAY_TIMEOUT))
    with pytest.raises(Exception, match="timed out during startup"):
        retry_slow_start(start, attempts=2)
    assert len(start.spawned) == 2
