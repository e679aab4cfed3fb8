"""Skips every test in this directory on a machine without a CUDA GPU.

On a GPU machine without Ray, run them without the repository's top conftest (which imports
trims_ray's Ray-bound API): ``python -m pytest --confcutdir=tests/gpu tests/gpu``.
"""

from __future__ import annotations

import pytest

from trims_ray._cuda import cuda_available

_HAS_CUDA = cuda_available()


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not _HAS_CUDA:
        pytest.skip("no CUDA GPU in this process (torch.cuda.is_available() is False)")
