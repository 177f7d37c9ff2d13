"""What every image source produces (`ImageList`) and the torch Dataset that decodes it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from traitsae.data.images.decode import to_rgb
from traitsae.data.images.foreground import ForegroundFlags
from traitsae.errors import TraitsaeError


@dataclass
class ImageList:
    """The images of one split: absolute paths, int labels (-1 = none), per-image metadata."""

    root: Path
    paths: list[str]
    labels: np.ndarray  # int64 [N]
    metadata: dict[str, list[str]] = field(default_factory=dict)  # column -> N strings

    def __post_init__(self) -> None:
        n = len(self.paths)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        bad = {k: len(v) for k, v in self.metadata.items() if len(v) != n}
        if self.labels.shape != (n,) or bad:
            raise ValueError(f"ImageList columns disagree in length: {n} paths, {bad}")

    def __len__(self) -> int:
        return len(self.paths)

    def store_images(self) -> dict[str, Any]:
        """The `images/` datasets of a store (index is added by the writer's caller)."""
        columns: dict[str, Any] = {"path": list(self.paths), "label": self.labels}
        columns.update({k: list(v) for k, v in self.metadata.items()})
        return columns


def require_file(path: Path, what: str, key: str = "dataset.root") -> Path:
    if not path.is_file():
        raise TraitsaeError(
            f"{what} {path} not found. Check {key} (it must point at the dataset's top folder)."
        )
    return path


def require_dir(path: Path, what: str, key: str = "dataset.root") -> Path:
    if not path.is_dir():
        raise TraitsaeError(f"{what} {path} does not exist or is not a directory; set {key}.")
    return path


class ImageDataset(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers (`to_rgb`: every PIL mode to 8-bit RGB); an
    unreadable file yields a blank image, ok=False, and the reason. With `foreground` each item
    also carries the image's foreground patch flags (`foreground` [P] bool; all False for an
    unreadable image) and `foreground_error`: a bad mask, which stops extraction."""

    def __init__(
        self,
        paths: list[str],
        transform: Callable,
        image_size: int,
        foreground: ForegroundFlags | None = None,
    ) -> None:
        self.paths = paths
        self.transform = transform
        self.image_size = image_size
        self.foreground = foreground

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"index": index, "ok": True, "error": ""}
        fg = self.foreground
        if fg is not None:
            item.update(foreground=np.zeros(fg.n_patches, dtype=bool), foreground_error="")
        try:
            with Image.open(self.paths[index]) as img:
                rgb = to_rgb(img)
            if fg is None:
                return {**item, "image": self.transform(rgb)}
            framed = fg.frame(rgb)
            item["image"] = fg.to_tensor(framed)
        except Exception as err:  # noqa: BLE001 -- any decode failure is recorded, not fatal
            blank_CHW = torch.zeros(3, self.image_size, self.image_size)
            reason = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            return {**item, "image": blank_CHW, "ok": False, "error": reason}
        try:
            item["foreground"] = fg.flags(self.paths[index], rgb, framed)
        except TraitsaeError as err:  # a bad mask: the main process stops with this message
            item["foreground_error"] = str(err)
        return item
