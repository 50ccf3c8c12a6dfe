"""Process settings for runs: the allocator tuning (glibc) and the thread cap shared by torch and numba."""

from __future__ import annotations

import subprocess
import sys

import numba
import torch

from extractor.core import runtime


def run_python(code: str, **env: str) -> str:
    import os

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, **env})
    return result.stdout.strip()


def test_allocator_tuning_applies_on_glibc_and_can_be_turned_off() -> None:
    code = "from extractor.core.runtime import tune_allocator; print(tune_allocator())"
    assert run_python(code) == "True"  # this project's machines run glibc
    assert run_python(code, EXTRACTOR_SYSTEM_MALLOC="1") == "False"


def test_threads_cap_torch_and_the_compiled_kernels() -> None:
    before = torch.get_num_threads(), numba.get_num_threads()
    try:
        runtime.configure(threads=1)
        assert (torch.get_num_threads(), numba.get_num_threads()) == (1, 1)
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])
