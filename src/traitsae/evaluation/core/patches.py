"""The patches of a store whose images have segmentation masks, with their class labels.

Activation row p of an image is patch (p // cols, p % cols) of the backbone's input frame; the
mask is framed exactly like the image was (`masks.frame_labels` with the backbone's own
resize/crop ops, or an explicit `center_crop` / `stretch`), then cut into the same grid.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from traitsae.backbones import build_backbone
from traitsae.data.images.masks import MaskLayout, framed_patch_labels
from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.frames import Frame, resolve_image_path
from traitsae.evaluation.core.tokens import valid_rows

log = logging.getLogger(__name__)
FRAMES = ("backbone", "center_crop", "stretch")


@dataclass
class SplitPatches:
    """Every patch of the evaluated images of one split, in store order, image after image."""

    acts_RD: torch.Tensor  # [R, D] float32 raw activations (R = images x patches per image)
    labels_RC: np.ndarray  # [R, C] bool, one column per class of the layout (ids >= 1)
    rows_N: np.ndarray  # [N] store rows of the evaluated images
    paths_N: list[str]  # their image paths
    n_without_mask: int  # valid images left out because no mask file matches them
    store_path: str


def store_frame(store: Store, mode: str) -> Frame:
    """The geometry that took the store's raw images to the backbone's input frame."""
    if mode not in FRAMES:
        raise TraitsaeError(f"eval.frame must be one of {FRAMES}, got {mode!r}.")
    size = int(store.image_size)
    if size <= 0:
        raise TraitsaeError(
            f"store {store.path} records no image_size, so masks cannot be framed like its "
            "images; re-extract it with extract.py."
        )
    if mode != "backbone":
        return Frame.simple(size, mode)
    if not store.config:
        raise TraitsaeError(
            f"store {store.path} records no extraction config, so the backbone's preprocessing "
            "is unknown; pass eval.frame=center_crop or eval.frame=stretch."
        )

    backbone_yaml = OmegaConf.to_yaml(OmegaConf.create(store.config).backbone)
    try:
        transform = _backbone_transform(backbone_yaml)
    except (OSError, RuntimeError, ValueError) as err:
        raise TraitsaeError(
            f"could not rebuild the backbone of store {store.path} to frame the masks like its "
            f"images ({err}); pass eval.frame=center_crop or eval.frame=stretch if you know "
            "that is its preprocessing."
        ) from err
    return Frame.from_transform(transform, size)


@functools.lru_cache(maxsize=4)
def _backbone_transform(backbone_yaml: str) -> Any:
    """The preprocessing of a backbone config; it depends on the architecture, not the weights,
    so the model is built randomly initialised (once per config: train and test share it)."""

    cfg = OmegaConf.create(backbone_yaml)
    cfg.pretrained, cfg.weights = False, None
    return build_backbone(cfg).transform


def image_patch_labels(
    layout: MaskLayout,
    mask_path: Path,
    image_path: Path,
    frame: Frame,
    grid: tuple[int, int],
    rule: str,
) -> np.ndarray:
    """[rows * cols, C] bool labels of one image's patches from its mask."""

    size = None
    if image_path.exists():
        with Image.open(image_path) as img:
            size = img.size
    labels_HW = layout.read(mask_path, size)
    return framed_patch_labels(
        labels_HW, frame.image_ops, frame.size, grid, layout.class_ids, rule, f"mask {mask_path}"
    )


def collect_patches(
    store: Store,
    layout: MaskLayout,
    layer: int,
    *,
    frame: Frame,
    rule: str,
    image_root: str | None,
    max_images: int | None,
    seed: int,
) -> SplitPatches:
    """Patch activations and labels of the store's valid images that have a mask."""

    rows_V = valid_rows(store)
    paths = store.metadata["path"]
    masks = {
        int(r): layout.mask_path(resolve_image_path(str(paths[r]), image_root)) for r in rows_V
    }
    rows_N = np.array([r for r, m in masks.items() if m is not None], dtype=np.int64)
    if rows_N.size == 0:
        raise TraitsaeError(
            f"none of the {rows_V.size} valid images of store {store.path} has a mask in "
            f"{layout.folder} (a mask's path relative to that folder, without suffix, must end "
            f"the image path, e.g. {paths[rows_V[0]] if rows_V.size else '...'}); check "
            "dataset.masks and dataset.root."
        )
    if max_images is not None and rows_N.size > max_images:
        pick = np.random.default_rng(seed).choice(rows_N.size, size=max_images, replace=False)
        rows_N = np.sort(rows_N[pick])
    grid = tuple(int(g) for g in store.grid)
    if grid[0] * grid[1] != store.n_patches:
        raise TraitsaeError(
            f"store {store.path} has {store.n_patches} patches per image but grid {grid}."
        )
    labels = []
    for r in tqdm(rows_N, desc=f"masks ({store.split})", unit="img", leave=False):
        image_path = resolve_image_path(str(paths[r]), image_root)
        labels.append(image_patch_labels(layout, masks[int(r)], image_path, frame, grid, rule))
    keep_N = np.zeros(store.n_images, dtype=bool)
    keep_N[rows_N] = True
    acts = [
        torch.from_numpy(np.asarray(a)).to(torch.float32).reshape(-1, store.d_model)
        for _, a in store.iter_valid(layer, tokens="patches", keep=keep_N)
    ]
    return SplitPatches(
        acts_RD=torch.cat(acts),
        labels_RC=np.concatenate(labels),
        rows_N=rows_N,
        paths_N=[str(paths[r]) for r in rows_N],
        n_without_mask=sum(m is None for m in masks.values()),
        store_path=str(store.path),
    )
