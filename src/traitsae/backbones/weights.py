"""Loading pretrained weights: local files for offline clusters, clear errors when unavailable."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from huggingface_hub import constants
from omegaconf import OmegaConf

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

    Without network and without HF_HUB_OFFLINE=1, huggingface_hub retries for about a minute
    before failing (or before falling back to its cache). A probe of a few seconds finds that
    out first; the build then runs in offline mode: cached weights load at once, missing ones
    fail at once. Any exception while fetching weights means the same thing to the user: this
    checkpoint is not available here. The original error type and text end the message.
    """
    offline = _env_offline()
    unreachable = not offline and not hub_reachable()
    try:
        with hub_offline() if unreachable else nullcontext():
            return build()
    except TraitsaeError:
        raise
    except Exception as err:  # noqa: BLE001 -- hub/network errors come in many types
        where = (
            "offline (HF_HUB_OFFLINE=1) and "
            if offline
            else f"the hub ({hub_endpoint()}) is unreachable and "
            if unreachable
            else ""
        )
        raise TraitsaeError(
            f"cannot load pretrained weights {checkpoint!r} for backbone {name!r}: {where}they are "
            "not in the local cache. Either download them once on a machine with network (they "
            "land in ~/.cache/huggingface; copy that folder to the same place here, or set HF_HOME), "
            f"or pass a local file with backbone.weights=<path>; or use backbone.pretrained=false "
            f"for a randomly initialised model. ({type(err).__name__}: {_first_line(err)})"
        ) from None


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True", "YES", "yes", "ON", "on")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can a TCP connection to the hub (or the HTTPS proxy) open within `timeout` seconds?

    Run in a daemon thread so that a slow DNS resolver cannot stretch the wait either.
    """
    target = urlparse(
        os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or hub_endpoint()
    )
    host, port = target.hostname or "", target.port or (80 if target.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


@contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub in offline mode for the duration (it reads the flag at call time)."""
    saved_flag, saved_env = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE, os.environ["HF_HUB_OFFLINE"] = True, "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_flag
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


def init_kwargs(cfg: Any) -> dict[str, Any]:
    """The family-specific constructor overrides of a backbone config as a plain dict."""
    kwargs = cfg.get("model_kwargs") or {}
    return (
        OmegaConf.to_container(kwargs, resolve=True)
        if OmegaConf.is_config(kwargs)
        else dict(kwargs)
    )
