"""Exact resume: what a checkpoint carries besides weights, and which checkpoint a run resumes.

Re-running the same command in the same run dir resumes from `last.ckpt` *exactly*: the stream
restarts at the checkpoint's batch and `ResumeState` restores every RNG, so the result equals an
uninterrupted run. A checkpoint written with a different configuration is refused (the changed
keys are listed) unless `train.overwrite`.
"""

from __future__ import annotations

import logging
import pickle
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig

from traitsae.config_diff import changed_keys
from traitsae.errors import TraitsaeError
from traitsae.training.config import run_config
from traitsae.training.grouping import Job

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
# Config keys that do not change what a run computes: a resumed run may change them freely.
RESUME_FREE_KEYS = (
    "train.", "callbacks.", "logger.", "paths.", "hydra.", "checkpoint.", "torch_threads",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "trainer.default_root_dir", "data.activations_dir",
)  # fmt: skip


class ResumeState(L.Callback):
    """Saves in each checkpoint what an exact resume needs besides weights, optimiser and step:
    the run's config (a resumed run must not silently change it) and every RNG state."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        state = {
            "config": self.config,
            "torch": torch.get_rng_state(),
            # Plain lists and tensors only: checkpoints load with weights_only=True.
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": _plain(random.getstate()),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        random.setstate(_tuples(state["python"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint loaded without unpickling code (weights_only); any other file is
    a clear error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise TraitsaeError(
            f"checkpoint {path} holds pickled Python objects that traitsae will not load "
            f"(weights_only refused: {str(err).splitlines()[0]}). Only checkpoints written by "
            "train.py resume; delete the file or pass train.overwrite=true to start afresh."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise TraitsaeError(
            f"checkpoint {path} is unreadable ({str(err).splitlines()[0]}): truncated or not a "
            "checkpoint. Delete it to resume from an older checkpoint in the same folder, or "
            "pass train.overwrite=true to start afresh."
        ) from None


def saved_config(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith(ResumeState.__qualname__) and "config" in state:
            return state["config"]
    return None


def _resume_free(key: str) -> bool:
    return any(key == free.rstrip(".") or key.startswith(free) for free in RESUME_FREE_KEYS)


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """`last.ckpt` of this run dir when the run resumes, checked; None for a fresh start."""
    checkpoints = run_dir / CHECKPOINT_DIR
    last = checkpoints / "last.ckpt"
    if not cfg.train.resume or not last.is_file():
        return None
    if cfg.train.overwrite:
        log.warning("train.overwrite=true: discarding the checkpoints in %s", checkpoints)
        shutil.rmtree(checkpoints)
        return None
    old = saved_config(read_checkpoint(last))
    if old is None:
        raise TraitsaeError(
            f"checkpoint {last} does not record the configuration it was trained with, so "
            "resuming it cannot be checked. Pass train.overwrite=true to start afresh."
        )
    changes = [c for c in changed_keys(old, run_config(cfg)) if not _resume_free(c.key)]
    if changes:
        listed = "; ".join(str(c) for c in changes)
        raise TraitsaeError(
            f"run dir {run_dir} holds a checkpoint trained with a different configuration "
            f"({listed}). Resuming would train part of the run one way and record the other. "
            "Re-run with the checkpoint's settings to resume, pass train.overwrite=true to "
            "start afresh in this run dir, or choose another hydra.run.dir."
        )
    log.info("resuming from %s", last)
    return str(last)


def resume_group(jobs: list[Job]) -> str | None:
    """The first job's last.ckpt when the whole group resumes (every job's checkpoint checked
    against its own config, as a solo run's is); None for a fresh start."""
    paths = [resume_checkpoint(cfg, Path(job_dir)) for cfg, job_dir in jobs]
    if all(path is None for path in paths):
        return None
    fresh = [str(job_dir) for (_, job_dir), path in zip(jobs, paths, strict=True) if path is None]
    if fresh:
        raise TraitsaeError(
            f"cannot resume the grouped sweep: jobs {', '.join(fresh)} have no checkpoint while "
            "the others of their group do. Re-run in a new hydra.sweep.dir, or pass "
            "train.overwrite=true to start every job of the group afresh."
        )
    if len(jobs) > 1:
        log.info("resuming the group from its jobs' checkpoints (%s, ...)", paths[0])
    return paths[0]
