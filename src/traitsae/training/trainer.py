"""The Lightning side of a run: the trainer's node, callbacks, loggers, console, CPU settings, fit."""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from traitsae.errors import TraitsaeError
from traitsae.sae.sparse_ops import keep_freed_memory
from traitsae.training.config import instantiate_checked, run_config
from traitsae.training.resume import CHECKPOINT_DIR, ResumeState

log = logging.getLogger(__name__)


def trainer_node(cfg: DictConfig, has_val: bool) -> dict[str, Any]:
    """`cfg.trainer` (its `_target_` included) with what the stream needs."""
    node = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(node, dict)
    _reject_local_multirun_ddp(node)
    max_steps = int(node["max_steps"])
    # At least one validation per run, even for short runs (the last step is validated anyway).
    if node.get("val_check_interval"):
        node["val_check_interval"] = min(int(node["val_check_interval"]), max_steps)
    if not has_val:
        node["limit_val_batches"] = 0
    if progress_in_a_file(node):
        node["enable_progress_bar"] = False  # ProgressLines (run_callbacks) logs lines instead
    return node


def progress_in_a_file(trainer_kwargs: Any) -> bool:
    """A progress bar is asked for but stdout is no terminal (a Slurm job's .out file): its
    `\r` redraws would fill the file, so log a line per tenth of the run instead."""
    return bool(trainer_kwargs.get("enable_progress_bar", True)) and not sys.stdout.isatty()


class ProgressLines(L.Callback):
    """Logs `step N of M (x steps/s)` ten times a run: the progress bar of a log file."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps, self.every = max_steps, max(1, max_steps // 10)
        self.since: tuple[float, int] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step, now = trainer.global_step, time.monotonic()
        if self.since is None:
            self.since = (now, step)
        elif step % self.every == 0 and step > self.since[1]:
            rate = (step - self.since[1]) / max(now - self.since[0], 1e-9)
            log.info("step %d of %d (%.3g steps/s)", step, self.max_steps, rate)
            self.since = (now, step)


def _reject_local_multirun_ddp(trainer_kwargs: dict[str, Any]) -> None:
    """Lightning's DDP launcher re-runs sys.argv (with -m) in its children: a local sweep of
    multi-device jobs would fork sweeps (Lightning #11300, Hydra #2070)."""
    hydra_cfg = HydraConfig.get()
    devices = trainer_kwargs.get("devices", 1)
    many = devices in (-1, "auto") or (isinstance(devices, int) and devices > 1)
    many = many or (isinstance(devices, list) and len(devices) > 1)
    launcher = str(hydra_cfg.launcher.get("_target_", ""))
    on_slurm = "submitit" in launcher or launcher.endswith(".SlurmLauncher")
    if hydra_cfg.mode == RunMode.MULTIRUN and many and not on_slurm:
        raise TraitsaeError(
            f"a local sweep (-m) cannot run multi-device DDP jobs (trainer.devices={devices}): "
            "Lightning re-launches the whole sweep in each child process. Sweep with "
            "trainer.devices=1, run one multi-device job without -m, or sweep on Slurm with "
            "hydra/launcher=slurm (one task per device)."
        )


def run_callbacks(cfg: DictConfig, run_dir: Path) -> list[Any]:
    every = int(cfg.checkpoint.every_n_train_steps)
    callbacks: list[Any] = [
        ModelCheckpoint(
            dirpath=run_dir / CHECKPOINT_DIR,
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=every,
            save_last=True,
            save_top_k=1,
        ),
        ResumeState(run_config(cfg)),
    ]
    if progress_in_a_file(cfg.trainer):
        callbacks.append(ProgressLines(int(cfg.trainer.max_steps)))
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is not None and "_target_" in node:
            log.info("callback %s: %s", name, node._target_)
            callbacks.append(instantiate_checked(node))
    return callbacks


def run_loggers(cfg: DictConfig) -> list[Any]:
    return [instantiate_checked(n) for n in (cfg.get("logger") or {}).values() if n is not None]


def quiet_lightning_console() -> None:
    """Keep Lightning's console output to what helps. Its `lightning` logger has a console
    handler of its own *and* propagates to the root, where Hydra's handler prints the same
    record again: with root handlers present, drop Lightning's. Also drop its advert for a
    cloud logger on every run, and a deprecation warning its own code triggers on new torch."""
    lightning_logger = logging.getLogger("lightning")
    if logging.getLogger().hasHandlers():
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_logger.removeHandler(handler)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _drop_lightning_adverts not in rank_zero.filters:
        rank_zero.addFilter(_drop_lightning_adverts)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # A resumed run checkpoints into its own folder again: expected, not a warning.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Lightning checks for srun from two places of each Trainer: say it once.
    warnings.filterwarnings("once", message=r"The `srun` command is available on your system")


def rank_log_files() -> None:
    """One log file per DDP rank. Every rank runs train.py with the same run dir, and Hydra
    points each one's file handler at the same train.log: ranks > 0 write `train.rank<r>.log`
    (the rank from the launcher's environment: srun's SLURM_PROCID, torchrun's RANK, ...)."""
    rank = rank_zero_only.rank
    if not rank:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if not isinstance(handler, logging.FileHandler) or ".rank" in handler.baseFilename:
            continue
        path = Path(handler.baseFilename)
        own = logging.FileHandler(path.with_name(f"{path.stem}.rank{rank}{path.suffix}"))
        own.setFormatter(handler.formatter)
        own.setLevel(handler.level)
        root.removeHandler(handler)
        handler.close()
        root.addHandler(own)


# Hydra's default job-log format: a grouped job's train.log reads as a solo run's.
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


@contextmanager
def job_logs(job_dirs: list[Path]) -> Iterator[None]:
    """A group's jobs each get their `train.log` as a solo run writes it: the group's lines, and
    the job's own (records logged with `extra={"job_dir": ...}`) only in that job's file."""
    root = logging.getLogger()
    level = root.level
    handlers = []
    for job_dir in job_dirs:
        handler = logging.FileHandler(job_dir / "train.log")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(lambda record, own=str(job_dir): getattr(record, "job_dir", own) == own)
        handlers.append(handler)
        root.addHandler(handler)
    root.setLevel(min(level, logging.INFO))
    try:
        yield
    finally:
        root.setLevel(level)
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()


def _drop_lightning_adverts(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return "litlogger" not in message and not message.startswith(("TPU available", "HPU available"))


@contextmanager
def process_settings(cfg: DictConfig) -> Iterator[None]:
    """CPU settings for the run, restored afterwards (train() may run inside a notebook)."""
    threads = torch.get_num_threads()
    torch.set_flush_denormal(True)  # denormals made SAE steps ~6x slower on CPU
    keep_freed_memory()  # no page faults for the step's large, short-lived tensors
    if cfg.get("torch_threads"):
        # Small SAEs on a busy CPU: one thread avoids waiting at every op's thread barrier.
        torch.set_num_threads(int(cfg.torch_threads))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    L.seed_everything(seed, workers=True, verbose=False)


def fit(trainer: Any, module: Any, dm: Any, ckpt_path: str | None) -> None:
    """Fit (resuming from `ckpt_path`), then validate at the last step when fit's own
    validations stopped short of it, so the reported metrics are the final weights'."""
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    validated = any("val/" in key for key in trainer.callback_metrics)  # (a resumed, finished
    # run's fit trains and validates nothing)
    if dm.n_val_vectors and (
        _last_validation_step(trainer) != trainer.global_step or not validated
    ):
        trainer.validate(module, datamodule=dm, verbose=False)


def _last_validation_step(trainer: Any) -> int:
    """The step of the last validation in fit (val_check_interval divides it)."""
    interval = trainer.val_check_batch
    if not isinstance(interval, int) or interval <= 0 or interval == math.inf:
        return -1
    return trainer.global_step // interval * interval
