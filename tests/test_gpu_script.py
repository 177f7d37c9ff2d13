"""benchmarks/gpu.sh on a machine without CUDA: says so and exits 0 (the GPU path needs a GPU)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_without_cuda_says_so_and_exits_cleanly() -> None:
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")  # hide any GPU
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
