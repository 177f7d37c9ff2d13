"""Image sources: `load_image_list(cfg.dataset, split)` -> ImageList, by `dataset.format`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from traitsae.data.collection import ensure_collection
from traitsae.data.images.butterflies import load_butterflies
from traitsae.data.images.common import ImageDataset, ImageList
from traitsae.data.images.cub import load_cub
from traitsae.data.images.imagefolder import load_imagefolder
from traitsae.data.synthetic import ensure_synthetic
from traitsae.errors import TraitsaeError


def _cub(cfg: Any, split: str) -> ImageList:
    return load_cub(cfg.root, split)


def _synthetic(cfg: Any, split: str) -> ImageList:
    # The demo data is generated on first use (deterministic from dataset.seed).
    ensure_synthetic(Path(cfg.root), seed=int(cfg.get("seed", 0)))
    return load_cub(cfg.root, split)


def _collection(cfg: Any, split: str) -> ImageList:
    # The generated collection, on first use; then read as the butterflies layout it is.
    ensure_collection(Path(cfg.root), seed=int(cfg.get("seed", 0)))
    return load_butterflies(cfg, split)


FORMATS: dict[str, Callable[[Any, str], ImageList]] = {
    "cub": _cub,
    "synthetic": _synthetic,
    "butterflies": load_butterflies,
    "collection": _collection,
    "imagefolder": load_imagefolder,
}


def load_image_list(cfg: Any, split: str) -> ImageList:
    """The images of `split` for the `dataset` config `cfg`; errors when none are found."""
    fmt = cfg.get("format")
    if fmt not in FORMATS:
        raise TraitsaeError(
            f"dataset {cfg.get('name')!r} has format {fmt!r}; known formats: {sorted(FORMATS)}."
        )
    if not cfg.get("root"):
        raise TraitsaeError(f"dataset.root is not set for dataset {cfg.name!r}.")
    images = FORMATS[fmt](cfg, split)
    if len(images) == 0:
        raise TraitsaeError(
            f"split {split!r} of dataset {cfg.name!r} at {cfg.root} holds no images (after "
            "filters); check split=, dataset.root, dataset.filters and the split column/file."
        )
    return images


__all__ = ["FORMATS", "ImageDataset", "ImageList", "load_image_list"]
