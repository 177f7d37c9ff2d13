"""Exact resume: what a checkpoint carries besides weights, and which checkpoint a run resumes.

Re-running the same command in the same run dir resumes from `last.ckpt` *exactly*: the stream
restarts at the checkpoint's batch and `ResumeState` restores every RNG, so the result equals an
uninterrupted run. A checkpoint written with a different configuration is refused (the changed
keys are listed) unless `train.overwrite`. Without a readable `last.ckpt` (deleted), the newest
periodic checkpoint is resumed; a run whose export is finished has nothing to do.
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

from traitsae.config_diff import Change, changed_keys
from traitsae.errors import TraitsaeError
from traitsae.sae.export import JSON_FILE, load_sae
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


def read_checkpoint(path: Path, older: Path | None = None) -> dict[str, Any]:
    """A Lightning checkpoint loaded without unpickling code (weights_only); any other file is
    a clear error (naming `older`, the checkpoint a run resumes from once `path` is deleted)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise TraitsaeError(
            f"checkpoint {path} holds pickled Python objects that traitsae will not load "
            f"(weights_only refused: {_first_line(err)}). Only checkpoints written by "
            "train.py resume; delete the file or pass train.overwrite=true to start afresh."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        fallback = (
            f"Delete it to resume from the older checkpoint {older.name} in the same folder"
            if older is not None
            else "No older checkpoint is left in its folder"
        )
        raise TraitsaeError(
            f"checkpoint {path} is unreadable ({_first_line(err)}): truncated or not a "
            f"checkpoint. {fallback}, or pass train.overwrite=true to start afresh."
        ) from None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def resumable_checkpoints(checkpoints: Path) -> list[Path]:
    """The checkpoints a run may resume from, newest first: `last.ckpt`, then the periodic
    `step<N>.ckpt` files by step (what is left once an unreadable `last.ckpt` is deleted)."""
    steps = sorted(
        checkpoints.glob("step*.ckpt"),
        key=lambda p: int(p.stem[4:]) if p.stem[4:].isdigit() else -1,
        reverse=True,
    )
    last = checkpoints / "last.ckpt"
    return [last, *steps] if last.is_file() else steps


def remove_leftovers(checkpoints: Path) -> None:
    """Temporary files of checkpoint writes that a kill cut short (`traitsae.files`); the
    run-dir lock is held, so no writer is using them."""
    for leftover in checkpoints.glob(".*.tmp-*"):
        leftover.unlink(missing_ok=True)


def saved_config(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith(ResumeState.__qualname__) and "config" in state:
            return state["config"]
    return None


def _resume_free(key: str) -> bool:
    return any(key == free.rstrip(".") or key.startswith(free) for free in RESUME_FREE_KEYS)


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint this run dir resumes from (`last.ckpt`, else the newest periodic one),
    checked; None for a fresh start."""
    checkpoints = run_dir / CHECKPOINT_DIR
    remove_leftovers(checkpoints)
    candidates = resumable_checkpoints(checkpoints)
    if not cfg.train.resume or not candidates:
        return None
    if cfg.train.overwrite:
        log.warning("train.overwrite=true: discarding the checkpoints in %s", checkpoints)
        shutil.rmtree(checkpoints)
        return None
    path = candidates[0]
    older = next((p for p in candidates[1:] if p.name != path.name), None)
    old = saved_config(read_checkpoint(path, older))
    if old is None:
        raise TraitsaeError(
            f"checkpoint {path} does not record the configuration it was trained with, so "
            "resuming it cannot be checked. Pass train.overwrite=true to start afresh."
        )
    changes = config_changes(old, cfg)
    if changes:
        listed = "; ".join(str(c) for c in changes)
        raise TraitsaeError(
            f"run dir {run_dir} holds a checkpoint trained with a different configuration "
            f"({listed}). Resuming would train part of the run one way and record the other. "
            "Re-run with the checkpoint's settings to resume, pass train.overwrite=true to "
            "start afresh in this run dir, or choose another hydra.run.dir."
        )
    log.info("resuming from %s", path)
    return str(path)


def config_changes(old: dict[str, Any], cfg: DictConfig) -> list[Change]:
    """How `cfg` differs from a recorded run config, in the keys that change what it computes."""
    return [c for c in changed_keys(old, run_config(cfg)) if not _resume_free(c.key)]


def finished_export(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The sae.json of this very run when it already finished (same configuration, every step
    done, an intact export with its metrics): a re-run then has nothing to do and keeps it."""
    if not cfg.train.resume or cfg.train.overwrite or not (run_dir / JSON_FILE).is_file():
        return None
    try:
        meta = load_sae(run_dir).meta
    except TraitsaeError as err:
        log.warning("not keeping the export in %s: %s", run_dir, err)
        return None
    done = meta.get("steps") == int(cfg.trainer.max_steps) and meta.get("metrics")
    if not done or not isinstance(meta.get("config"), dict) or config_changes(meta["config"], cfg):
        return None
    return meta


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
