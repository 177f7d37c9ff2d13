"""Images as the backbone saw them: paths, the backbone's framing (resize/crop), captions."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms import CenterCrop, InterpolationMode, Resize

from traitsae.backbones import build_backbone
from traitsae.data.images.masks import split_transform
from traitsae.data.store import Store
from traitsae.errors import TraitsaeError

log = logging.getLogger(__name__)


def resolve_image_path(path: str, root: str | Path | None) -> Path:
    """A store's `images/path` entry is absolute or relative to the dataset root."""
    candidate = Path(path)
    if candidate.is_absolute() or root is None:
        return candidate
    return Path(root) / candidate


class Frame:
    """The backbone's geometric preprocessing (resize, crop) of an image, without the tensor part.

    Heat-maps live on the patch grid of the *model input*, so images (and trait masks) must be
    framed exactly as extraction framed them: e.g. timm's eval transform resizes to
    size / crop_pct and centre-crops, which shifts every patch relative to the raw image.
    """

    def __init__(self, image_ops: Sequence[Callable], size: int) -> None:
        self.image_ops = list(image_ops)
        self.size = int(size)

    @classmethod
    def simple(cls, size: int, mode: str = "center_crop") -> Frame:
        """`center_crop`: short side to size, centre crop (CLIP-style); `stretch`: both sides."""
        bicubic = InterpolationMode.BICUBIC
        if mode == "center_crop":
            return cls([Resize(size, bicubic), CenterCrop(size)], size)
        if mode == "stretch":
            return cls([Resize((size, size), bicubic)], size)
        raise TraitsaeError(
            f"unknown resize mode {mode!r}; use backbone (the backbone's own transform), "
            "center_crop or stretch."
        )

    @classmethod
    def from_transform(cls, transform: Any, size: int) -> Frame:
        """The PIL-level prefix of a torchvision Compose (everything before ToTensor)."""
        return cls(split_transform(transform)[0], size)

    def image(self, path: Path) -> np.ndarray:
        """uint8 [size, size, 3] as the backbone saw it."""
        if not path.exists():
            raise TraitsaeError(
                f"image {path} (from the store's images/path) does not exist; pass the dataset "
                "root the store was extracted from (eval.image_root=<dir>) or move the images back."
            )
        with Image.open(path) as img:
            framed = img.convert("RGB")
            for op in self.image_ops:
                framed = op(framed)
            return np.asarray(framed.convert("RGB"), dtype=np.uint8)

    def mask(self, mask_HW: np.ndarray) -> np.ndarray:
        """A pixel mask of the raw image, framed like the image (nearest-neighbour resizing)."""
        framed = Image.fromarray(np.asarray(mask_HW, dtype=np.uint8) * 255)
        for op in self.image_ops:
            if isinstance(op, Resize):
                framed = Resize(op.size, InterpolationMode.NEAREST, op.max_size)(framed)
            elif isinstance(op, CenterCrop):
                framed = op(framed)
        return np.asarray(framed) > 127


def backbone_frame(backbone_cfg: Any, size: int, fallback: str = "center_crop") -> Frame:
    """The frame of a backbone config (as recorded in a store's `config`), weights not loaded.

    Building the architecture with random weights gives the same transform (it depends on the
    architecture, not the weights); if even that fails (e.g. an hf-hub model offline) the
    `fallback` frame is used and a warning says so.
    """

    cfg = OmegaConf.create(OmegaConf.to_container(backbone_cfg, resolve=True))
    cfg.pretrained = False
    cfg.weights = None
    try:
        return Frame.from_transform(build_backbone(cfg).transform, size)
    except (TraitsaeError, OSError, RuntimeError, ValueError) as err:
        log.warning(
            "could not rebuild backbone %r to frame images like extraction did (%s); "
            "using %s resizing instead",
            cfg.get("name"),
            err,
            fallback,
        )
        return Frame.simple(size, fallback)


@dataclass(frozen=True)
class ImageSource:
    """Where figure images come from (`root` for relative store paths) and how to frame them.

    `frame=None` draws heat-maps without pictures (e.g. images not on this machine).
    """

    root: str | None
    frame: Frame | None

    def load(self, path: str) -> np.ndarray | None:
        if self.frame is None:
            return None
        full = resolve_image_path(path, self.root)
        if not full.exists():
            log.warning("image %s not found: drawing its heat-map without the picture", full)
            return None
        return self.frame.image(full)


def store_image_source(
    store: Store, root: str | None = None, size: int | None = None, mode: str = "backbone"
) -> ImageSource:
    """Images of a store's `images/path` (absolute, or relative to `root`), framed like extraction.

    mode `backbone` rebuilds the transform of the backbone recorded in the store's `config`;
    `center_crop` / `stretch` resize to `size` (default: the store's image_size).
    """
    size = int(size or getattr(store, "image_size", 0) or 0)
    if size <= 0:
        raise TraitsaeError(
            f"store {store.path} records no image_size; pass the backbone input "
            "size in pixels (eval.image_size=<int>) to draw its images."
        )
    config = getattr(store, "config", "")
    if mode == "backbone" and config:
        frame = backbone_frame(OmegaConf.create(config).backbone, size)
    else:
        frame = Frame.simple(size, "center_crop" if mode == "backbone" else mode)
    return ImageSource(root=root, frame=frame)


@dataclass(frozen=True)
class ImageOptions:
    """How an evaluation's figures show images: `eval.image_root` (default: the store's dataset
    root), `eval.image_size` (default: the store's), `eval.resize_mode`, `eval.draw_images`."""

    image_root: str | None
    image_size: int | None
    resize_mode: str
    draw_images: bool


def image_source(store: Store, opts: ImageOptions) -> ImageSource:
    """The images of `store` framed for figures, or none when `draw_images` is off."""
    if not opts.draw_images:
        return ImageSource(root=None, frame=None)
    return store_image_source(store, opts.image_root, opts.image_size, opts.resize_mode)
