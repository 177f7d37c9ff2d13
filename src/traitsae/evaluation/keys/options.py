"""Options dataclasses built from `cfg.eval`: the YAML file is the only source of defaults."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from traitsae.errors import TraitsaeError

T = TypeVar("T")


def options_from_cfg(cls: type[T], cfg: DictConfig) -> T:
    """`cls(**cfg.eval)` for the fields `cls` declares (device from the top-level `device`)."""
    values: dict[str, Any] = OmegaConf.to_container(cfg.eval, resolve=True)
    values["device"] = str(cfg.get("device", "cpu"))
    names = [f.name for f in fields(cls)]
    missing = [n for n in names if n not in values]
    if missing:
        raise TraitsaeError(
            f"eval={cfg.eval.get('name')} lacks the option(s) {missing}: conf/eval/"
            f"{cfg.eval.get('name')}.yaml declares every option; restore them from the repository."
        )
    return cls(**{n: values[n] for n in names})
