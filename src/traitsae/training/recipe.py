"""train(cfg): store -> ActivationsDataModule -> SAEModule -> Lightning fit -> sae.json export.

Set-up, train, clean-up:
- the config is checked up front (clear errors before anything is built);
- the data module opens the store once (layer, validation split, normaliser scale);
- the SAE module is built from `cfg.sae` / `cfg.sparsity` / `cfg.optim`; b_dec starts at the
  data's mean or geometric median unless the run resumes;
- Lightning runs to `trainer.max_steps` on an endless shuffled stream, checkpointing into
  `<run dir>/checkpoints`; re-running the same command resumes exactly (`resume`);
- the last step is always validated, a one-line summary is logged, and rank 0 writes the
  portable `sae.safetensors` + `sae.json` into the run dir.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from traitsae.errors import TraitsaeError
from traitsae.paths import hydra_output_dir
from traitsae.sae.export import save_sae
from traitsae.sae.module import SAEModule
from traitsae.training.config import check_train_cfg, run_config, sae_kwargs
from traitsae.training.resume import resume_checkpoint
from traitsae.training.trainer import (
    fit,
    instantiate_checked,
    process_settings,
    quiet_lightning_console,
    run_callbacks,
    run_loggers,
    seed_everything,
    trainer_node,
)

log = logging.getLogger(__name__)


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


def build_module(cfg: DictConfig, dm: Any, max_steps: int, run_dir: Path) -> SAEModule:
    """The SAE LightningModule for this config and store (normaliser from the data module)."""
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
    seed_everything(int(cfg.seed))
    dm = instantiate_checked(cfg.data)
    dm.prepare()
    return dm, trainer_node(cfg, has_val=dm.n_val_vectors > 0)


def train(cfg: DictConfig) -> Path:
    """Train one SAE as configured; returns the run dir (holding sae.json)."""
    check_train_cfg(cfg)
    quiet_lightning_console()
    run_dir = hydra_output_dir()
    if run_dir.exists() and not run_dir.is_dir():
        raise TraitsaeError(f"hydra.run.dir={run_dir} is a file; the run dir must be a folder.")
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = resume_checkpoint(cfg, run_dir)
    with process_settings(cfg):
        dm, node = prepare_data(cfg)
        module = build_module(cfg, dm, int(node["max_steps"]), run_dir)
        if ckpt_path is None:  # a resumed run takes b_dec from its checkpoint
            module.init_from_sample(torch.from_numpy(dm.sample), str(cfg.sae.b_dec_init))
        log.info(
            "training sae=%s d_sae=%d on %s (layer %d, %s; %d train / %d val vectors, scale %.4g)",
            module.sae.variant, module.sae.d_sae, dm.store_path, dm.layer, dm.tokens,
            dm.n_train_vectors, dm.n_val_vectors, dm.scale,
        )  # fmt: skip
        trainer = instantiate_checked(
            node, callbacks=run_callbacks(cfg, run_dir), logger=run_loggers(cfg) or False
        )
        fit(trainer, module, dm, ckpt_path)
    if trainer.is_global_zero:
        log.info("done, %s", summary(trainer))
        if cfg.train.export:
            path = save_sae(module.sae.cpu(), run_dir, export_meta(cfg, dm, trainer))
            log.info("exported %s", path)
    return run_dir
