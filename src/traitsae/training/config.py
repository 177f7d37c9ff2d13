"""The training config checked up front: optimiser and trainer settings, the SAE's kwargs."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from traitsae.config_checks import integer, number
from traitsae.errors import TraitsaeError
from traitsae.sae.model import VARIANTS


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


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The job's config as plain containers (compose() in tests also carries `hydra`: skip)."""
    return {
        key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        for key, value in cfg.items()
        if key != "hydra"
    }
