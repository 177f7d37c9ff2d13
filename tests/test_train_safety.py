"""Nothing lost, nothing silently wrong when training: one run per run dir, atomic checkpoints
and exports, a finished run re-run keeps its metrics, bad stores and settings refused."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import compose_train, id_store, train_overrides

from traitsae.errors import TraitsaeError
from traitsae.training import train


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store") / "ids.h5"
    return id_store(path, n_images=64, n_patches=4, d_model=16, layers=(3,))


def test_a_second_training_run_into_one_run_dir_refuses(store: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lock = run_dir / "train.lock"
    try:
        lock.write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname()}))
        with pytest.raises(
            TraitsaeError,
            match=rf"run dir \S+run is in use by another training run \(pid {owner.pid} on host "
            r".*delete the lock file",
        ):
            train(compose_train(train_overrides(store, run_dir, steps=5)))
        assert not (run_dir / "sae.json").exists() and not (run_dir / "checkpoints").exists()
    finally:
        owner.kill()
        owner.wait()
    train(compose_train(train_overrides(store, run_dir, steps=5)))  # the owner is gone: taken over
    assert (run_dir / "sae.json").is_file() and not lock.exists()


def test_a_lock_of_an_earlier_incarnation_of_this_slurm_job_is_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A requeued job restarts (maybe on another node) while its killed incarnation's lock stays."""
    from traitsae.locks import run_dir_lock

    lock = tmp_path / "train.lock"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    owner = {"pid": 1, "host": "node-a", "slurm_job": "4242", "slurm_restart": "0"}
    lock.write_text(json.dumps(owner))
    with run_dir_lock(tmp_path):
        assert json.loads(lock.read_text())["slurm_restart"] == "1"
    lock.write_text(json.dumps({**owner, "slurm_job": "999"}))  # another job on another node
    busy = r"in use by another training run \(pid 1 on host node-a"
    with pytest.raises(TraitsaeError, match=busy), run_dir_lock(tmp_path):
        pass
