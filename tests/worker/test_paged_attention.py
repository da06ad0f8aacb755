"""The paged decode kernel (worker/paged_attention.py) on a CPU, through Triton's interpreter: skipped where
triton is not installed (CI's CPU torch has none); tests/gpu/test_runner_cuda.py runs it compiled on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_kernel_and_in_place_runner_match_plain_attention_under_the_interpreter(builtin_model):
    script = Path(__file__).with_name("paged_interpret.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(script), str(builtin_model)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-4000:]
