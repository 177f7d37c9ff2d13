"""train(cfg): store -> ActivationsDataModule -> SAEModule -> Lightning fit -> sae.json export.

Set-up, train, clean-up:
- the config is checked up front (clear errors before anything is built);
- the data module opens the store once (layer, validation split, normaliser scale);
- the SAE module is built from `cfg.sae` / `cfg.sparsity` / `cfg.optim`; b_dec starts at the
  data's mean or geometric median unless the run resumes;
- Lightning runs to `trainer.max_steps` on an endless shuffled stream, checkpointing into
  `<run dir>/checkpoints`. Re-running the same command in the same run dir resumes from
  `last.ckpt` *exactly*: the stream restarts at the checkpoint's batch and `ResumeState`
  restores every RNG, so the result equals an uninterrupted run. A checkpoint written with a
  different configuration is refused (the changed keys are listed) unless `train.overwrite`;
- the last step is always validated, a one-line summary is logged, and rank 0 writes the
  portable `sae.safetensors` + `sae.json` into the run dir.
"""

from __future__ import annotations

import logging
import math
import pickle
import random
import shutil
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from traitsae.config_checks import integer, number
from traitsae.config_diff import changed_keys
from traitsae.errors import TraitsaeError
from traitsae.paths import hydra_output_dir
from traitsae.sae.model import VARIANTS

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
# Config keys that do not change what a run computes: a resumed run may change them freely.
RESUME_FREE_KEYS = (
    "train.", "callbacks.", "logger.", "paths.", "hydra.", "checkpoint.", "torch_threads",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "trainer.default_root_dir", "data.activations_dir",
)  # fmt: skip


# ----------------------------------------------------------------------------- config checks


def instantiate_checked(node: Any, **kwargs: Any) -> Any:
    """hydra's instantiate, but a TraitsaeError raised by the target reaches the user as is
    (Hydra wraps it in an InstantiationException with its own traceback text)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, TraitsaeError):
            raise cause from None
        raise


def check_train_cfg(cfg: DictConfig) -> None:
    """Reject bad optimiser and trainer settings before anything is built."""
    optim = cfg.optim
    number("optim.lr", optim.lr, positive=True)
    number("optim.eps", optim.eps, positive=True)
    number("optim.min_lr_ratio", optim.min_lr_ratio)
    betas = list(optim.betas) if OmegaConf.is_list(optim.betas) else []
    if len(betas) != 2 or not all(0 <= number("optim.betas", b) < 1 for b in betas):
        raise TraitsaeError(f"optim.betas must be two numbers in [0, 1), got {optim.betas!r}.")
    integer("optim.warmup_steps", optim.warmup_steps, minimum=0)
    integer("trainer.max_steps", cfg.trainer.max_steps, minimum=1)
    if cfg.trainer.get("val_check_interval") is not None:  # steps: the stream has no length
        integer("trainer.val_check_interval", cfg.trainer.val_check_interval, minimum=1)


def sae_kwargs(cfg: DictConfig, d_model: int) -> dict[str, Any]:
    """`cfg.sae` as plain kwargs with d_sae resolved (`sae.d_sae`, else expansion x d_model)."""
    sae = OmegaConf.to_container(cfg.sae, resolve=True)
    assert isinstance(sae, dict)
    variant = sae.get("variant")
    if variant not in VARIANTS:
        raise TraitsaeError(
            f"unknown SAE variant sae={variant!r}; available: {', '.join(VARIANTS)} "
            "(choose with sae=<name>; each is a yaml file in conf/sae/)."
        )
    if sae.get("d_sae") is None:
        if not sae.get("expansion"):
            raise TraitsaeError("set sae.d_sae=<latents> or sae.expansion=<latents per d_model>.")
        sae["d_sae"] = int(sae["expansion"]) * d_model
    sae["d_model"] = d_model
    return sae


def _trainer_node(cfg: DictConfig, has_val: bool) -> dict[str, Any]:
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
    return node


def _reject_local_multirun_ddp(trainer_kwargs: dict[str, Any]) -> None:
    """Lightning's DDP launcher re-runs sys.argv (with -m) in its children: a local sweep of
    multi-device jobs would fork sweeps (Lightning #11300, Hydra #2070)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    devices = trainer_kwargs.get("devices", 1)
    many = devices in (-1, "auto") or (isinstance(devices, int) and devices > 1)
    many = many or (isinstance(devices, list) and len(devices) > 1)
    launcher = str(hydra_cfg.launcher.get("_target_", ""))
    if hydra_cfg.mode == RunMode.MULTIRUN and many and "submitit" not in launcher:
        raise TraitsaeError(
            f"a local sweep (-m) cannot run multi-device DDP jobs (trainer.devices={devices}): "
            "Lightning re-launches the whole sweep in each child process. Sweep with "
            "trainer.devices=1, run one multi-device job without -m, or sweep on Slurm with "
            "hydra/launcher=slurm (one task per device)."
        )


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The job's config as plain containers (compose() in tests also carries `hydra`: skip)."""
    return {
        key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        for key, value in cfg.items()
        if key != "hydra"
    }


# ----------------------------------------------------------------------------- resume


def _lightning_callback() -> type:
    import lightning as L

    return L.Callback


class ResumeState(_lightning_callback()):
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


# ----------------------------------------------------------------------------- the run


def run_callbacks(cfg: DictConfig, run_dir: Path) -> list[Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

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
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is not None and "_target_" in node:
            log.info("callback %s: %s", name, node._target_)
            callbacks.append(instantiate_checked(node))
    return callbacks


def run_loggers(cfg: DictConfig) -> list[Any]:
    return [instantiate_checked(n) for n in (cfg.get("logger") or {}).values() if n is not None]


def export_meta(cfg: DictConfig, dm: Any, trainer: Any) -> dict[str, Any]:
    """sae.json fields besides the architecture: provenance, normaliser, final metrics."""
    info = dm.describe()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    return {
        "backbone": info["backbone"],
        "dataset": info["dataset"],
        "split": cfg.split,
        "layer": info["layer"],
        "tokens": info["tokens"],
        "scale": info["scale"],
        "store": info["store"],
        "n_train_vectors": info["n_train_vectors"],
        "steps": int(trainer.global_step),
        "metrics": metrics,
        "config": run_config(cfg),
    }


def summary(trainer: Any) -> str:
    """One line: the final step's validation metrics."""
    metrics = trainer.callback_metrics

    def value(key: str) -> str:
        return f"{float(metrics[key]):.4g}" if key in metrics else "n/a"

    return (
        f"step {trainer.global_step}: val FVU {value('val/fvu')}, L0 {value('val/l0')}, "
        f"dead {value('val/dead_frac')}, dense {value('val/dense_frac')}"
    )


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


def _drop_lightning_adverts(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return "litlogger" not in message and not message.startswith(("TPU available", "HPU available"))


@contextmanager
def process_settings(cfg: DictConfig) -> Iterator[None]:
    """CPU settings for the run, restored afterwards (train() may run inside a notebook)."""
    from traitsae.sae.sparse_ops import keep_freed_memory

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


def build_module(cfg: DictConfig, dm: Any, max_steps: int, run_dir: Path) -> Any:
    """The SAE LightningModule for this config and store (normaliser from the data module)."""
    from traitsae.sae.module import SAEModule

    return SAEModule(
        sae=sae_kwargs(cfg, dm.d_model),
        sparsity=OmegaConf.to_container(cfg.sparsity, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        scale=dm.scale,
        max_steps=max_steps,
        figures_dir=str(run_dir / "figures"),
    )


def prepare_data(cfg: DictConfig) -> tuple[Any, dict[str, Any]]:
    """Seed everything, build and prepare the data module; the trainer's node to go with it."""
    import lightning as L

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    dm = instantiate_checked(cfg.data)
    dm.prepare()
    return dm, _trainer_node(cfg, has_val=dm.n_val_vectors > 0)


def fit(trainer: Any, module: Any, dm: Any, ckpt_path: str | None) -> None:
    """Fit (resuming from `ckpt_path`), then validate at the last step when fit's own
    validations stopped short of it, so the reported metrics are the final weights'."""
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    if dm.n_val_vectors and _last_validation_step(trainer) != trainer.global_step:
        trainer.validate(module, datamodule=dm, verbose=False)


def train(cfg: DictConfig) -> Path:
    """Train one SAE as configured; returns the run dir (holding sae.json)."""

    from traitsae.sae.export import save_sae

    check_train_cfg(cfg)
    quiet_lightning_console()
    run_dir = hydra_output_dir()
    if run_dir.exists() and not run_dir.is_dir():
        raise TraitsaeError(f"hydra.run.dir={run_dir} is a file; the run dir must be a folder.")
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = resume_checkpoint(cfg, run_dir)
    with process_settings(cfg):
        dm, trainer_node = prepare_data(cfg)
        module = build_module(cfg, dm, int(trainer_node["max_steps"]), run_dir)
        if ckpt_path is None:  # a resumed run takes b_dec from its checkpoint
            module.init_from_sample(torch.from_numpy(dm.sample), str(cfg.sae.b_dec_init))
        log.info(
            "training sae=%s d_sae=%d on %s (layer %d, %s; %d train / %d val vectors, scale %.4g)",
            module.sae.variant, module.sae.d_sae, dm.store_path, dm.layer, dm.tokens,
            dm.n_train_vectors, dm.n_val_vectors, dm.scale,
        )  # fmt: skip
        trainer = instantiate_checked(
            trainer_node, callbacks=run_callbacks(cfg, run_dir), logger=run_loggers(cfg) or False
        )
        fit(trainer, module, dm, ckpt_path)
    if trainer.is_global_zero:
        log.info("done, %s", summary(trainer))
        if cfg.train.export:
            path = save_sae(module.sae.cpu(), run_dir, export_meta(cfg, dm, trainer))
            log.info("exported %s", path)
    return run_dir


def _last_validation_step(trainer: Any) -> int:
    """The step of the last validation in fit (val_check_interval divides it)."""
    interval = trainer.val_check_batch
    if not isinstance(interval, int) or interval <= 0 or interval == math.inf:
        return -1
    return trainer.global_step // interval * interval
