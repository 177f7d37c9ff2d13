"""What a cluster job needs from the data and extraction paths, tested without Slurm: loader
workers leave the job signals to the main process, validation never has more readers than
blocks, the demo data is generated once under a lock, no `\\r` progress bars in log files."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_datamodule_stream import make_dm
from train_helpers import id_store

from traitsae.errors import TraitsaeError


def _record_pid(path: Path):
    def handler(signum, frame) -> None:  # what submitit's requeue handler stands for
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")

    return handler


def _signal_workers(batches: Iterator, signum: int) -> None:
    """Send `signum` to every live child (the loader workers), keep reading batches."""
    next(batches)
    children = mp.active_children()
    assert children, "the loader started no worker processes"
    for child in children:
        os.kill(child.pid, signum)
    time.sleep(0.5)
    for _ in range(3):
        next(batches)


@pytest.fixture
def job_handlers(tmp_path: Path) -> Iterator[Path]:
    """Python handlers on the job signals in this process, as submitit and Lightning set them."""
    record = tmp_path / "handled_by.txt"
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    for signum in saved:
        signal.signal(signum, _record_pid(record))
    try:
        yield record
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_training_loader_workers_leave_job_signals_to_the_main_process(
    tmp_path: Path, job_handlers: Path
) -> None:
    dm = make_dm(id_store(tmp_path / "s.h5"), num_workers=2)
    loader = dm.loader(dm.train_dataset())
    _signal_workers(iter(loader), signal.SIGUSR2)  # a worker killed by it would stop the loader
    assert not job_handlers.exists(), "a loader worker ran the main process's signal handler"


def test_extraction_loader_workers_leave_job_signals_to_the_main_process(
    tmp_path: Path, job_handlers: Path
) -> None:
    import torch
    from extract_helpers import compose_extract, small_synthetic

    from traitsae.data.images import ImageDataset, load_image_list
    from traitsae.extraction.run import make_loader

    root = small_synthetic(tmp_path / "synthetic")
    cfg = compose_extract(tmp_path, [f"dataset.root={root}", "extract.num_workers=2"])
    cfg.extract.batch_size = 1
    images = load_image_list(cfg.dataset, cfg.split)
    dataset = ImageDataset(images.paths, lambda image: torch.zeros(1), 64)
    batches = iter(make_loader(cfg, dataset, 0, torch.device("cpu")))
    _signal_workers(batches, signal.SIGUSR2)
    assert not job_handlers.exists(), "a loader worker ran the main process's signal handler"


def test_validation_reads_with_at_most_one_worker_per_block(tmp_path: Path) -> None:
    """Two validation blocks, three workers (a single process with data.num_workers=3 on the
    demo store): the third reader had no vectors and validation crashed."""
    dm = make_dm(id_store(tmp_path / "s.h5"), num_workers=3, val_fraction=0.05)
    assert len(dm.val_plan.blocks) == 2
    read = sum(len(batch) for batch in dm.val_dataloader())
    assert read == dm.n_val_vectors


def test_fewer_validation_blocks_than_ranks_is_a_clear_error_at_setup(tmp_path: Path) -> None:
    from types import SimpleNamespace

    dm = make_dm(id_store(tmp_path / "s.h5"), num_workers=0, val_fraction=0.05)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=4)
    with pytest.raises(TraitsaeError, match="2 validation blocks.*4 DDP ranks.*data.val_fraction"):
        dm.setup("fit")


def _ensure_small_synthetic(root: Path) -> None:
    from traitsae.data.synthetic import ensure_synthetic

    ensure_synthetic(root, n_species=2, images_per_species=2)


def test_jobs_starting_together_generate_the_demo_data_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two shard jobs start at once: one generates, the other waits and reads (before, both
    generated and the second replaced the folder under the first one's reader)."""
    from traitsae.data import synthetic

    calls = tmp_path / "generate_calls.txt"
    real_generate = synthetic.generate

    def slow_generate(root, **kwargs):
        with open(calls, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # long enough for the other job to arrive meanwhile
        return real_generate(root, **kwargs)

    monkeypatch.setattr(synthetic, "generate", slow_generate)
    root = tmp_path / "synthetic"
    jobs = [mp.get_context("fork").Process(target=_ensure_small_synthetic, args=(root,))]
    jobs.append(mp.get_context("fork").Process(target=_ensure_small_synthetic, args=(root,)))
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(60)
    assert [job.exitcode for job in jobs] == [0, 0]
    assert len(calls.read_text().split()) == 1
    assert synthetic.is_generated(root)


def test_extraction_progress_in_a_log_file_is_lines_not_a_redrawn_bar(
    tmp_path: Path, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from extract_helpers import compose_extract, small_synthetic

    from traitsae.extraction import extract

    root = small_synthetic(tmp_path / "synthetic")
    cfg = compose_extract(tmp_path, [f"dataset.root={root}", "extract.progress=true"])
    with caplog.at_level(logging.INFO, logger="traitsae.extraction.run"):
        extract(cfg)  # stderr is captured here: not a terminal, as in a Slurm job
    assert "\r" not in capfd.readouterr().err
    assert "extracted 16 of 16 images" in caplog.text


def test_a_resumed_csv_log_continues_its_file_without_the_steps_logged_again(
    tmp_path: Path,
) -> None:
    import csv

    from traitsae.training.csv_logger import ResumableCSVLogger

    first = ResumableCSVLogger(str(tmp_path))
    for step in range(10):  # the interrupted part: checkpointed at step 5, logged up to 9
        first.log_metrics({"train/loss": float(step)}, step)
    first.save()
    second = ResumableCSVLogger(str(tmp_path))  # the requeued job, resuming from step 5
    for step in range(5, 12):
        second.log_metrics({"train/loss": float(step), "val/fvu": 0.5}, step)
    second.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["step"]) for row in rows] == list(range(12))
    assert rows[0]["val/fvu"] == "" and rows[-1]["val/fvu"] == "0.5"


def _group_checkpoint(step: int) -> dict:
    import torch

    return {
        "global_step": step,
        "state_dict": {f"members.{i}.w": torch.full((2,), float(step)) for i in range(2)},
        "optimizer_states": [
            {"state": {}, "param_groups": [{"params": [0], "lr": 0.1}, {"params": [1], "lr": 0.1}]}
        ],
        "lr_schedulers": [],
    }


@pytest.mark.parametrize(("killed_at_write", "resumed_step"), [(2, 5), (3, 5), (4, 10)])
def test_a_group_checkpoint_killed_between_member_writes_resumes_at_one_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, killed_at_write: int, resumed_step: int
) -> None:
    """Writes: 1, 2 the members' files, 3 the commit marker, 4, 5 the renames. Killed at any
    of them, the group resumes with both members at one step (before: member 0 at step 10,
    member 1 at step 5, and the group refused to resume)."""
    import os as os_module

    from traitsae.training import group_checkpoints
    from traitsae.training.checkpoint_io import AtomicCheckpointIO
    from traitsae.training.group_checkpoints import GroupCheckpointIO, recover

    job_dirs = [tmp_path / "0", tmp_path / "1"]
    io = GroupCheckpointIO(job_dirs)
    last = job_dirs[0] / "checkpoints" / "last.ckpt"
    io.save_checkpoint(_group_checkpoint(5), last)

    writes = []

    class Killed(Exception):
        pass

    def counted(real, counts=lambda *args: True):
        def write(*args, **kwargs):
            if counts(*args):
                writes.append(args)
                if len(writes) == killed_at_write:
                    raise Killed
            return real(*args, **kwargs)

        return write

    def renames_a_part(src, *args) -> bool:  # (the file writes rename temporaries too)
        return str(src).endswith(".partial")

    monkeypatch.setattr(
        AtomicCheckpointIO, "save_checkpoint", counted(AtomicCheckpointIO.save_checkpoint)
    )
    monkeypatch.setattr(group_checkpoints, "atomic_write", counted(group_checkpoints.atomic_write))
    monkeypatch.setattr(os_module, "replace", counted(os_module.replace, renames_a_part))
    with pytest.raises(Killed):
        io.save_checkpoint(_group_checkpoint(10), last)
    monkeypatch.undo()
    recover(job_dirs)
    joined = GroupCheckpointIO(job_dirs).load_checkpoint(last)
    assert joined["global_step"] == resumed_step
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob("*.commit"))


def test_a_run_writing_to_a_log_file_has_no_bar_and_says_the_srun_hint_once(
    tmp_path: Path,
) -> None:
    """stdout a file, as in a Slurm job's .out: no `\\r` redraws but progress lines; with an
    `srun` on the PATH (a login node), Lightning's hint to use it once, not twice."""
    import subprocess
    import sys

    from train_helpers import ROOT, subprocess_env, train_overrides

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    store = id_store(tmp_path / "s.h5")
    overrides = train_overrides(store, tmp_path / "run", steps=20)
    overrides = [o for o in overrides if not o.startswith("trainer.enable_progress_bar")]
    proc = subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "\r" not in said
    assert "step 10 of 20" in (tmp_path / "run" / "train.log").read_text()
    assert said.count("The `srun` command is available") == 1


def test_ranks_above_zero_log_to_their_own_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from traitsae.training.trainer import rank_log_files

    root = logging.getLogger()
    handler = logging.FileHandler(tmp_path / "train.log")  # Hydra's job log, in every rank
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    rank_log_files()
    logging.getLogger("traitsae.test").warning("from rank 1")
    for h in root.handlers:
        h.close()
    assert "from rank 1" in (tmp_path / "train.rank1.log").read_text()
    assert (tmp_path / "train.log").read_text() == ""


def test_group_resume_messages_name_the_real_key(tmp_path: Path) -> None:
    """`resume=false` is not a key (Hydra rejects it); `train.resume=false` is."""
    from traitsae.training.group_checkpoints import GroupCheckpointIO

    job_dirs = [tmp_path / "0", tmp_path / "1"]
    io = GroupCheckpointIO(job_dirs)
    last = job_dirs[0] / "checkpoints" / "last.ckpt"
    io.save_checkpoint(_group_checkpoint(5), last)
    (job_dirs[1] / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(TraitsaeError, match=r"pass train\.resume=false to start"):
        io.load_checkpoint(last)


def test_the_loader_maps_a_store_larger_than_memory(tmp_path: Path) -> None:
    """A store of 1.2 x (RAM + swap), sparse on disk (only its first 64 images written): the
    loader mapped the file copy-on-write, which the kernel refuses beyond what it may commit
    (`OSError: [Errno 12] Cannot allocate memory`) -- users' stores are that large."""
    import math

    import numpy as np

    from traitsae.data.store import StoreWriter

    swap = int(Path("/proc/meminfo").read_text().split("SwapTotal:")[1].split()[0]) * 1024
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") + swap
    n_patches, d_model = 256, 1024
    n_images = math.ceil(1.2 * memory / (n_patches * d_model * 2))
    attrs = {
        "backbone": "tiny", "dataset": "synthetic", "split": "train", "d_model": d_model,
        "n_patches": n_patches, "n_prefix_tokens": 1, "layers": [3], "n_images": n_images,
        "grid": [16, 16], "depth": 4, "image_size": 0, "config": "",
    }  # fmt: skip
    paths = np.array([f"{i}.jpg" for i in range(n_images)], dtype=object)
    path = tmp_path / "huge.h5"
    writer = StoreWriter.open(path, attrs=attrs, images={"path": paths}, fingerprint="")
    x_NPD = np.random.default_rng(0).standard_normal((64, n_patches, d_model)).astype(np.float16)
    writer.write(0, {3: x_NPD}, {3: x_NPD[:, 0]}, np.ones(64, bool))
    writer.finish(complete=False)
    assert path.stat().st_size > memory
    dm = make_dm(path, allow_incomplete=True, num_workers=0, block_images=None, batch_size=256)
    assert next(iter(dm.train_dataloader())).shape == (256, d_model)
