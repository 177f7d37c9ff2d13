"""Nothing lost, nothing silently wrong when training: one run per run dir, atomic checkpoints
and exports, a finished run re-run keeps its metrics, bad stores and settings refused."""

from __future__ import annotations

import json
import re
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


def test_a_kill_during_the_last_checkpoint_rewrite_keeps_the_previous_one(
    store: Path, tmp_path: Path
) -> None:
    """Checkpoints at steps 5 and 10; the process dies while rewriting last.ckpt at step 10
    (with the temp folder on another filesystem, where a rename is a copy into the target)."""
    import torch
    from train_helpers import ROOT, subprocess_env

    run_dir = tmp_path / "run"
    overrides = train_overrides(store, run_dir, steps=12)
    killed = subprocess.run(
        [sys.executable, "train.py", *overrides,
         "+callbacks.crash._target_=train_helpers.KillWhileWritingLastCheckpoint",
         "+callbacks.crash.step=6"],  # fmt: skip
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5
    train(compose_train(overrides))  # the same command resumes from step 5 and finishes
    from traitsae import load_sae

    assert load_sae(run_dir).meta["steps"] == 12
    assert not [p.name for p in last.parent.iterdir() if ".tmp-" in p.name]


class _FullDisk:
    """A file on a disk with `room` bytes left: the write that passes it raises ENOSPC."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        import errno

        view = memoryview(data).cast("B")
        if len(view) > self.room:
            self.file.write(view[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(view)
        return self.file.write(view)

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def test_a_full_disk_leaves_the_previous_checkpoint_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint folder's disk fills up while last.ckpt is rewritten (its temp folder on
    another filesystem, as on clusters where /tmp is local)."""
    import builtins
    import errno
    import os

    import torch

    from traitsae.training.checkpoint_io import AtomicCheckpointIO

    folder = tmp_path / "checkpoints"
    last = folder / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 5, "w": torch.ones(10_000)}, last)
    good = last.read_bytes()
    real_open, real_sendfile = builtins.open, os.sendfile

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        full = str(file).startswith(str(folder)) and "w" in mode
        return _FullDisk(handle, room=1000) if full else handle

    def sendfile_on_full_disk(out_fd, in_fd, offset, count):
        real_sendfile(out_fd, in_fd, offset, min(count, 1000))
        raise OSError(errno.ENOSPC, "No space left on device")

    def cross_device(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(builtins, "open", open_on_full_disk)
    monkeypatch.setattr(os, "sendfile", sendfile_on_full_disk)
    monkeypatch.setattr(os, "rename", cross_device)
    with pytest.raises((TraitsaeError, OSError)) as caught:
        io.save_checkpoint({"global_step": 10, "w": torch.zeros(10_000)}, last)
    monkeypatch.undo()
    assert last.read_bytes() == good and sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert isinstance(caught.value, TraitsaeError)
    assert re.search(r"writing \S+last\.ckpt failed: the disk is full .*The previous last\.ckpt "
                     r"is kept\. Free space under", str(caught.value))  # fmt: skip


def test_deleting_an_unreadable_last_checkpoint_resumes_from_the_older_one(
    store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    overrides = train_overrides(store, run_dir, steps=5)
    train(compose_train(overrides))  # checkpoints at step 5: step0000005.ckpt and last.ckpt
    (run_dir / "sae.json").unlink()  # as if killed before the export
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(b"")  # what a kill during a non-atomic rewrite left
    with pytest.raises(TraitsaeError, match=r"last\.ckpt is unreadable .*Delete it to resume from "
                       r"the older checkpoint step0000005\.ckpt in the same folder"):  # fmt: skip
        train(compose_train(overrides))
    last.unlink()
    with caplog.at_level("INFO", logger="traitsae.training"):
        train(compose_train(overrides))
    assert re.search(r"resuming from \S+step0000005\.ckpt", caplog.text)
    from traitsae import load_sae

    meta = load_sae(run_dir).meta
    assert meta["steps"] == 5 and meta["metrics"]["val/fvu"] > 0


def test_re_running_a_finished_run_keeps_its_export_and_metrics(
    store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    overrides = train_overrides(store, run_dir, steps=5)
    train(compose_train(overrides))
    before = (run_dir / "sae.json").read_bytes()
    fvu = json.loads(before)["metrics"]["val/fvu"]
    with caplog.at_level("INFO", logger="traitsae.training"):
        train(compose_train(overrides))
    assert (run_dir / "sae.json").read_bytes() == before
    assert f"finished: step 5: val FVU {fvu:.4g}," in caplog.text and "nan" not in caplog.text


def test_a_finished_run_whose_export_lost_its_metrics_is_validated_again(
    store: Path, tmp_path: Path
) -> None:
    """What the bug left behind (metrics {}): the re-run validates the final weights again."""
    run_dir = tmp_path / "run"
    overrides = train_overrides(store, run_dir, steps=5)
    train(compose_train(overrides))
    record = json.loads((run_dir / "sae.json").read_text())
    fvu = record["metrics"]["val/fvu"]
    record["metrics"] = {}
    (run_dir / "sae.json").write_text(json.dumps(record))
    train(compose_train(overrides))
    again = json.loads((run_dir / "sae.json").read_text())["metrics"]
    assert again["val/fvu"] == pytest.approx(fvu, rel=1e-5)


def _default_path_overrides(tmp_path: Path) -> list[str]:
    """Train on the store at <activations_dir>/synthetic/train/tiny.h5 (no data.store)."""
    overrides = train_overrides(Path("unused"), tmp_path / "run")
    kept = [o for o in overrides if not o.startswith(("data.store=", "paths.activations_dir="))]
    return [*kept, f"paths.activations_dir={tmp_path / 'activations'}"]


@pytest.mark.parametrize(
    ("store_kwargs", "message"),
    [
        ({"d_model": 16}, r"holds vectors of width 16, but backbone=tiny has width 64"),
        ({"d_model": 64, "backbone": "dinov2"}, r"was written by backbone 'dinov2', not 'tiny'"),
    ],
)
def test_a_store_of_another_backbone_at_the_default_path_is_refused(
    tmp_path: Path, store_kwargs: dict, message: str
) -> None:
    id_store(
        tmp_path / "activations" / "synthetic" / "train" / "tiny.h5", layers=(3,), **store_kwargs
    )
    with pytest.raises(TraitsaeError, match=rf"store \S+tiny\.h5 {message}.*data\.store"):
        train(compose_train(_default_path_overrides(tmp_path)))
    assert not (tmp_path / "run" / "sae.json").exists()


def test_an_unfinished_store_trains_with_the_default_loader_workers(tmp_path: Path) -> None:
    """8 of 64 images extracted: fewer held-out blocks than the 2 default loader workers."""
    import numpy as np

    from traitsae.data.store import create_store

    acts = np.random.default_rng(0).normal(size=(64, 4, 64)).astype(np.float16) + 3
    done = np.arange(64) < 8
    acts[~done] = 0
    create_store(
        tmp_path / "activations" / "synthetic" / "train" / "tiny.h5.tmp",
        patches={3: acts}, cls={3: acts[:, 0]},
        images={"path": np.array(["x.jpg"] * 64), "done": done},
        attrs={"backbone": "tiny", "dataset": "synthetic", "split": "train", "complete": False},
    )  # fmt: skip
    overrides = [o for o in _default_path_overrides(tmp_path) if "num_workers" not in o]
    overrides.append("data.allow_incomplete=true")
    from traitsae import load_sae

    meta = load_sae(train(compose_train(overrides))).meta
    assert meta["n_train_vectors"] < 8 * 4 and meta["metrics"]["val/fvu"] > 0
