"""Fixtures for the training tests: small stores whose vectors carry their own ids."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from traitsae.data.store import create_store
from traitsae.sae.model import SAEOutput
from traitsae.sae.sparsity import SparsityPenalty

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def id_store(
    path: Path,
    n_images: int = 64,
    n_patches: int = 4,
    d_model: int = 8,
    layers: tuple[int, ...] = (1, 3),
    invalid: tuple[int, ...] = (),
    backbone: str = "tiny",
    foreground: np.ndarray | None = None,
) -> Path:
    """Store whose patch vector (i, p) is [i, p, noise...]: float16 represents ids < 2048;
    `foreground` (bool [N, P]) is stored as images/foreground."""
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(n_images, n_patches, d_model)).astype(np.float32)
    acts[:, :, 0] = np.arange(n_images)[:, None]
    acts[:, :, 1] = np.arange(n_patches)[None, :]
    valid = np.ones(n_images, dtype=bool)
    valid[list(invalid)] = False
    acts[~valid] = 0.0
    return create_store(
        path,
        patches={layer: acts for layer in layers},
        cls={layer: acts[:, 0, :] for layer in layers},
        images={
            "path": np.array([f"img{i}.jpg" for i in range(n_images)]),
            "valid": valid,
            **({} if foreground is None else {"foreground": foreground}),
        },
        attrs={"backbone": backbone, "dataset": "synthetic", "split": "train", "depth": 4},
    )


def dictionary_store(
    path: Path, n_images: int = 256, n_patches: int = 16, d_model: int = 16, seed: int = 0
) -> Path:
    """Vectors = sparse combinations of a random dictionary (what an SAE should recover)."""
    rng = np.random.default_rng(seed)
    n_feat = 4 * d_model
    dictionary = rng.normal(size=(n_feat, d_model))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    n = n_images * n_patches
    codes = rng.random((n, n_feat)) < 3 / n_feat
    acts = (codes * rng.uniform(0.5, 2.0, size=codes.shape)) @ dictionary
    acts = (3.0 * acts + 0.5).reshape(n_images, n_patches, d_model)
    return create_store(
        path,
        patches={3: acts},
        cls={3: acts[:, 0, :]},
        images={"path": np.array([f"img{i}.jpg" for i in range(n_images)])},
        attrs={"backbone": "tiny", "dataset": "synthetic", "split": "train", "depth": 4},
    )


def train_overrides(store: Path, out: Path, steps: int = 20, **extra: Any) -> list[str]:
    """Overrides for a seconds-long CPU training run on `store`, outputs under `out`."""
    base = {
        "data.store": str(store),
        "data.batch_size": 64,
        "data.num_workers": 0,
        "data.scale_sample": 512,
        "data.val_fraction": 0.1,
        "sae.d_sae": 64,
        "sae.k": 4,
        "trainer.max_steps": steps,
        "trainer.val_check_interval": 10,
        "trainer.limit_val_batches": 4,
        "trainer.enable_progress_bar": False,
        "trainer.log_every_n_steps": 1,
        "checkpoint.every_n_train_steps": 5,
        "optim.warmup_steps": 2,
        "torch_threads": 1,  # tiny SAEs on a shared 2-core machine: no thread barriers
        "hydra.run.dir": str(out),
        "paths.activations_dir": str(out.parent / "activations"),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def compose_train(overrides: list[str]) -> DictConfig:
    """The train.py config with Hydra's runtime set, as inside @hydra.main."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = cfg.hydra.run.dir
    HydraConfig.instance().set_config(cfg)
    return cfg


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


class KillAtStep(L.Callback):
    """SIGKILL the training process once `step` optimiser steps are done (crash test)."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step >= self.step:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


class KillWhileWritingLastCheckpoint(L.Callback):
    """From step `step` on, the checkpoint folder behaves as if it were on another filesystem
    than the temp folder (a rename across them fails with EXDEV) and the process is SIGKILLed
    the moment `last.ckpt` (or a temporary file for it) is opened for writing: a crash during
    the `last.ckpt` rewrite, after the target may have been truncated."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step < self.step:
            return
        import builtins
        import errno
        import signal

        real_open = builtins.open

        def open_then_die(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
            handle = real_open(file, mode, *a, **k)
            if "last.ckpt" in str(file) and "w" in mode:
                os.kill(os.getpid(), signal.SIGKILL)
            return handle

        def cross_device(*a: Any, **k: Any) -> None:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        builtins.open, os.rename = open_then_die, cross_device


class RecordRun(L.Callback):
    """Writes rank<r>.json: first step, ids (image*1000 + patch) of trained vectors, a weights
    digest and the final metrics -- what the resume and DDP tests compare."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.ids: list[int] = []
        self.start_step = -1

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.start_step = trainer.global_step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, *args: Any) -> None:
        self.ids += (batch[:, 0].long() * 1000 + batch[:, 1].long()).tolist()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        import hashlib
        import json

        weights = b"".join(p.detach().cpu().numpy().tobytes() for p in pl_module.parameters())
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "start_step": self.start_step,
            "end_step": trainer.global_step,
            "ids": self.ids,
            "weights_sha": hashlib.sha256(weights).hexdigest(),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class LogPenalty(SparsityPenalty):
    """The README's example of a new penalty: one class (plus a `_target_` in the config)."""

    def per_vector(self, out: SAEOutput, sae: Any) -> torch.Tensor:
        return torch.log1p(out.dense_codes()).sum(-1)


class SlowSteps(L.Callback):
    """Sleep after every step: gives a test time to signal a run between its checkpoints."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)

    def on_train_batch_end(self, *args: Any) -> None:
        import time

        time.sleep(self.seconds)
