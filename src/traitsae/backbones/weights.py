"""Loading pretrained weights: local files for offline clusters, clear errors when unavailable."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from traitsae.errors import TraitsaeError

T = TypeVar("T")


def local_weights(weights: str | None, name: str) -> Path | None:
    """The local weights path of `backbone.weights`, checked to exist (None when not given)."""
    if not weights:
        return None
    path = Path(weights).expanduser()
    if not path.exists():
        raise TraitsaeError(
            f"backbone.weights={weights} for backbone {name!r} does not exist; give the path of a "
            "local checkpoint file (or, for hf-hub models, the downloaded model directory)."
        )
    return path


def load_or_explain(build: Callable[[], T], name: str, checkpoint: str) -> T:
    """Run `build()` (which downloads or reads cached weights); turn hub failures into one paragraph.

    Any exception while fetching weights means the same thing to the user: this checkpoint is not
    available here. The original error type and text are kept at the end of the message.
    """
    try:
        return build()
    except TraitsaeError:
        raise
    except Exception as err:  # noqa: BLE001 -- hub/network errors come in many types
        offline = os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True", "YES", "yes")
        where = "offline (HF_HUB_OFFLINE=1) and " if offline else ""
        raise TraitsaeError(
            f"cannot load pretrained weights {checkpoint!r} for backbone {name!r}: {where}they are "
            "not in the local cache. Either download them once on a machine with network (they "
            "land in ~/.cache/huggingface; copy that folder to the same place here, or set HF_HOME), "
            f"or pass a local file with backbone.weights=<path>; or use backbone.pretrained=false "
            f"for a randomly initialised model. ({type(err).__name__}: {_first_line(err)})"
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


def init_kwargs(cfg: Any) -> dict[str, Any]:
    """The family-specific constructor overrides of a backbone config as a plain dict."""
    from omegaconf import OmegaConf

    kwargs = cfg.get("model_kwargs") or {}
    return (
        OmegaConf.to_container(kwargs, resolve=True)
        if OmegaConf.is_config(kwargs)
        else dict(kwargs)
    )
