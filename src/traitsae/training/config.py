"""One job's training config, typed and checked up front: before any store is opened."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from traitsae.config_checks import integer
from traitsae.errors import TraitsaeError
from traitsae.sae.config import Architecture, Objective, Optim
from traitsae.sae.sparsity import SparsityPenalty


@dataclass(frozen=True)
class TrainConfig:
    """What one job trains (`architecture`), to minimise what (`objective`), how (`optim`), for
    how long (`max_steps`) and from which seed (the SAE's initialisation)."""

    architecture: Architecture
    objective: Objective
    optim: Optim
    max_steps: int
    seed: int

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> TrainConfig:
        """Every key of `cfg.sae`, `cfg.sparsity`, `cfg.optim` and the trainer's length, checked
        (a TraitsaeError naming the key and value); the store is not opened."""
        optim = Optim.from_node(_plain(cfg.optim))
        max_steps = integer("trainer.max_steps", cfg.trainer.max_steps, minimum=1)
        if cfg.trainer.get("val_check_interval") is not None:  # steps: the stream has no length
            integer("trainer.val_check_interval", cfg.trainer.val_check_interval, minimum=1)
        sae = _plain(cfg.sae)
        architecture = Architecture.from_node(sae)
        penalty = instantiate_checked(cfg.sparsity)
        if not isinstance(penalty, SparsityPenalty):
            raise TraitsaeError(
                f"sparsity._target_={cfg.sparsity.get('_target_')} built a "
                f"{type(penalty).__name__}, not a traitsae.sae.sparsity.SparsityPenalty: "
                "subclass SparsityPenalty (see conf/sparsity/) and point sparsity._target_ at it."
            )
        objective = Objective.from_node(sae, penalty, architecture)
        seed = integer("seed", cfg.seed)
        return cls(architecture, objective, optim, max_steps, seed)


def _plain(node: Any) -> dict[str, Any]:
    value = OmegaConf.to_container(node, resolve=True)
    assert isinstance(value, dict)
    return value


def instantiate_checked(node: Any, **kwargs: Any) -> Any:
    """hydra's instantiate, but a TraitsaeError raised by the target reaches the user as is
    (Hydra wraps it in an InstantiationException with its own traceback text)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, TraitsaeError):
            raise cause from None
        raise


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The job's config as plain containers (compose() in tests also carries `hydra`: skip)."""
    return {
        key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        for key, value in cfg.items()
        if key != "hydra"
    }
