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
