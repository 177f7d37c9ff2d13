"""One way to read an evaluation's options: a frozen dataclass built from `cfg.eval`.

conf/eval/<name>.yaml is the only source of defaults: an options dataclass declares its fields
without defaults, and `build_options` fills every field from `cfg.eval` (`device` and `seed` may
come from the top-level config). A field missing from the YAML is a TraitsaeError naming the
file; the dataclass's `__post_init__` checks the values once, before any store is opened.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from traitsae.errors import TraitsaeError

T = TypeVar("T")
# Fields an evaluation may take from the top-level config when its eval group does not set them.
TOP_LEVEL = ("device", "seed")


def build_options(cls: type[T], cfg: DictConfig) -> T:
    """`cls(**{field: cfg.eval[field]})`, resolved to plain Python values."""
    values = OmegaConf.to_container(cfg.eval, resolve=True)
    assert isinstance(values, dict)
    kwargs: dict[str, Any] = {}
    missing = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in values:
            kwargs[f.name] = values[f.name]
        elif f.name in TOP_LEVEL and cfg.get(f.name) is not None:
            kwargs[f.name] = cfg.get(f.name)
        else:
            missing.append(f.name)
    if missing:
        name = values.get("name", "<name>")
        raise TraitsaeError(
            f"conf/eval/{name}.yaml sets no eval.{', eval.'.join(missing)}; the YAML is where "
            "every evaluation option gets its default. Add the key there (or pass "
            f"eval.{missing[0]}=<value>)."
        )
    return cls(**kwargs)
