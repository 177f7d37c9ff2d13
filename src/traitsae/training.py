"""train(cfg): store -> ActivationsDataModule -> SAEModule -> Lightning fit -> sae.json export.

Set-up, train, clean-up:
- the data module opens the store once (layer, validation split, normaliser scale);
- the SAE module is built from `cfg.sae` / `cfg.sparsity` / `cfg.optim`; b_dec starts at the
  data's mean or geometric median unless the run resumes;
- Lightning runs to `trainer.max_steps` on an endless shuffled stream, checkpointing into
  `<run dir>/checkpoints` (re-running the same command in the same run dir resumes from
  `last.ckpt`);
- rank 0 writes the portable `sae.safetensors` + `sae.json` into the run dir.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from traitsae.errors import TraitsaeError
from traitsae.paths import hydra_output_dir
from traitsae.sae.model import VARIANTS

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


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


def _trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(kwargs, dict)
    kwargs.pop("_target_", None)
    max_steps = int(kwargs.get("max_steps", -1))
    if max_steps <= 0:
        raise TraitsaeError("trainer.max_steps must be a positive integer: the stream is endless.")
    _reject_local_multirun_ddp(kwargs)
    # At least one validation per run, even for short runs.
    if kwargs.get("val_check_interval"):
        kwargs["val_check_interval"] = min(int(kwargs["val_check_interval"]), max_steps)
    return kwargs


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


def _callbacks(cfg: DictConfig, run_dir: Path) -> list[Any]:
    from hydra.utils import instantiate
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
        )
    ]
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is not None and "_target_" in node:
            log.info("callback %s: %s", name, node._target_)
            callbacks.append(instantiate(node))
    return callbacks


def _loggers(cfg: DictConfig) -> list[Any]:
    from hydra.utils import instantiate

    return [instantiate(node) for node in (cfg.get("logger") or {}).values() if node is not None]


def _resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    last = run_dir / CHECKPOINT_DIR / "last.ckpt"
    if cfg.get("resume", True) and last.is_file():
        log.info("resuming from %s", last)
        return str(last)
    return None


def export_meta(cfg: DictConfig, dm: Any, trainer: Any) -> dict[str, Any]:
    """sae.json fields besides the architecture: provenance, normaliser, final metrics."""
    info = dm.describe()
    config = {  # the job's config (compose() in tests also carries a `hydra` node: skip it)
        key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        for key, value in cfg.items()
        if key != "hydra"
    }
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
        "config": config,
    }


@contextmanager
def _process_settings(cfg: DictConfig) -> Iterator[None]:
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


def train(cfg: DictConfig) -> Path:
    """Train one SAE as configured; returns the run dir (holding sae.json)."""
    import lightning as L
    from hydra.utils import instantiate

    from traitsae.sae.export import save_sae

    run_dir = hydra_output_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    with _process_settings(cfg):
        L.seed_everything(int(cfg.seed), workers=True)
        dm = instantiate(cfg.data)
        dm.prepare()
        trainer_kwargs = _trainer_kwargs(cfg)
        if dm.n_val_vectors == 0:
            trainer_kwargs["limit_val_batches"] = 0
        module = build_module(cfg, dm, int(trainer_kwargs["max_steps"]), run_dir)
        ckpt_path = _resume_checkpoint(cfg, run_dir)
        if ckpt_path is None:  # a resumed run takes b_dec from its checkpoint
            module.init_b_dec(torch.from_numpy(dm.sample), str(cfg.sae.get("b_dec_init", "mean")))
        log.info(
            "training sae=%s d_sae=%d on %s (layer %d, %s; %d train / %d val vectors, scale %.4g)",
            module.sae.variant, module.sae.d_sae, dm.store_path, dm.layer, dm.tokens,
            dm.n_train_vectors, dm.n_val_vectors, dm.scale,
        )  # fmt: skip
        trainer = L.Trainer(
            **trainer_kwargs, callbacks=_callbacks(cfg, run_dir), logger=_loggers(cfg) or False
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    if trainer.is_global_zero and cfg.get("export", True):
        path = save_sae(module.sae.cpu(), run_dir, export_meta(cfg, dm, trainer))
        log.info("exported %s", path)
    return run_dir
