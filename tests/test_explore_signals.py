"""SIGTERM or Ctrl-C (SIGINT) sent to `explore.py` alone stops its Streamlit server child too: the
port is free again and no process of the launch is left."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from discovery_helpers import planted_sae, planted_store

from traitsae.explore.session import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def explore_command(root: Path, port: int) -> list[str]:
    return [
        sys.executable,
        str(REPO / "explore.py"),
        f"run={root / 'run'}",
        f"paths.activations_dir={root / 'activations'}",
        f"explore.image_root={root / 'images'}",
        "explore.resize_mode=stretch",
        f"explore.port={port}",
        "explore.browser=false",
        f"hydra.run.dir={root / 'explore'}",
    ]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "_stcore/health", timeout=1):
            return True
    except OSError:
        return False


def launch(root: Path) -> tuple[subprocess.Popen, str]:
    """explore.py in its own process group (so the test can clean up whatever is left), served."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *sys.path])}
    proc = subprocess.Popen(
        explore_command(root, port),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while not answers(url):
        assert proc.poll() is None and time.monotonic() < deadline, "explorer never served"
        time.sleep(0.3)
    return proc, url


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    planted_sae(root / "run", planted_store(root, n_per_group=4))
    return root


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_explore_py_stops_the_server(planted_run, signum):
    proc, url = launch(planted_run)
    try:
        os.kill(proc.pid, signum)  # the launcher alone, as `kill <pid>` or a job manager does
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while answers(url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not answers(url), f"the server still answers at {url} after {signum.name}"
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the launch
            os.killpg(proc.pid, signal.SIGKILL)
