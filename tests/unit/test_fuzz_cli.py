"""Fuzzing the ``trims-ray`` command line's arguments (hypothesis): whatever the argument list,
``main`` returns an exit code (0, 1 or 2) and prints at most one error line, never a traceback,
and never raises. $RAY_ADDRESS names a port where nothing listens, so cluster commands that parse
end in the one-line "no cluster" error; ``bench`` and ``demo`` are left out (they hand over to long
benchmarks), and so are zoo model names (``push resnet50`` would build a 100 MB model).

$TRIMS_RAY_FUZZ_EXAMPLES raises the example count, as in test_fuzz_formats.py.
"""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trims_ray.cli import main
from workloads.s3server import free_port

from .test_fuzz_formats import fuzz

COMMANDS = ["push", "start", "ls", "status", "prefetch", "evict", "scrub", "nosuch", "--version", "--debug", "-h"]
# Options and values the parser knows, mixed with arbitrary text, so that examples get past the
# parser as well as fail in it.
WORDS = [
    "--tier", "host", "disk", "gpu", "--node", "--json", "--store", "--tenant", "public", "default",
    "--name", "../x", "m", "--factory", "a:b", "nope", "--progress", "--no-progress", "--", "-",
    "memory://fuzz", "s3://", "file:///nonexistent/x", "\x00", "é", "--format", "json", "table", "--start",
]


@pytest.fixture(scope="module", autouse=True)
def _isolated(tmp_path_factory):
    # Nothing the fuzzer writes may land in the user's store, and no cluster may be found: with
    # $RAY_ADDRESS unset, "auto" would join any Ray running on this machine (another test's, a
    # benchmark's) from inside this process, so it names a port where nothing listens.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRIMS_RAY_STORE", str(tmp_path_factory.mktemp("fuzz-cli") / "store"))
        patch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
        yield


@fuzz(150)
@given(
    st.sampled_from(COMMANDS),
    st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=10)), max_size=6),
)
def test_fuzz_cli_arguments_end_in_an_exit_code_and_one_line(command, args):
    out_buffer, err_buffer = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out_buffer), contextlib.redirect_stderr(err_buffer):
        code = main([command, *args])
    out, err = out_buffer.getvalue(), err_buffer.getvalue()
    assert code in (0, 1, 2), (code, err)
    assert "Traceback" not in err and "Traceback" not in out
    if code != 0:
        errors = [line for line in err.splitlines() if line.startswith("trims-ray")]
        assert len(errors) == 1, err  # argparse adds its usage line above it; nothing else
