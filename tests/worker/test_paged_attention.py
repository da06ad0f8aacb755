"""The paged attention kernels (worker/paged_attention.py) on a CPU, through Triton's interpreter, against plain
attention; tests/gpu/test_runner_cuda.py runs them compiled on a GPU.

The CPU build of torch names no triton, so scripts/setup installs the one torch 2.13 names (3.7.1; the `test`
extra asks for triton on linux x86_64). Without triton the test is skipped, and in CI (CI=true) it fails: CI must
run it. It takes ~11 s on an idle two-core box, ~17 s beside other work (the interpreter runs every program of
every launch in Python): 2 s of imports, 1.3 s for the decode and prefill kernels against plain attention, 9 s
for the in-place runner against the slot cache (a model load, then 3 prefills and 10 decode steps).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import skip_or_fail


def test_kernel_and_in_place_runner_match_plain_attention_under_the_interpreter(builtin_model):
    if importlib.util.find_spec("triton") is None:
        skip_or_fail("triton is not installed (scripts/setup installs it on linux x86_64)")
    script = Path(__file__).with_name("paged_interpret.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(script), str(builtin_model)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-4000:]
