"""Which patches of an image show the specimen: the foreground flags extraction stores as
`images/foreground` (bool [N, P], the order of `patches/<L>`).

`extract.foreground` (conf/extract.yaml) picks the rule; docs/guide/extract.md explains it:
- `masks`: the dataset's segmentation masks (`dataset.masks`, the layout `eval=segments` reads):
  any non-zero class id is foreground.
- `color`: a pixel is background when no channel differs from the background colour by more than
  `tolerance` (0-255); the colour is `border` (the per-channel median of the outermost ring of
  pixels of the framed image) or a fixed `[r, g, b]`.
- `auto`: `masks` when the dataset has them, else `color`; `none`: no flags.

Either way the pixels are those of the backbone's input frame (its own resize and crop), and a
patch is foreground when foreground pixels are the majority of its pixels: the `majority` rule
of `masks.patch_labels` (a tie is background). An image without a mask file, or whose mask
covers no patch, has no foreground patch: training streams none of its vectors, and the
evaluations that pool over foreground patches skip it and say so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from traitsae.data.images.masks import (
    MaskLayout,
    framed_patch_labels,
    load_mask_layout,
    patch_class_counts,
    patch_labels,
    split_transform,
)
from traitsae.errors import TraitsaeError

RULES = ("auto", "masks", "color", "none")
# The patch rule shared with eval=segments: foreground pixels must be the majority of a patch.
PATCH_RULE = "majority"


@dataclass(frozen=True)
class ForegroundRule:
    """A resolved `extract.foreground`: `masks` or `color` (with its colour and tolerance)."""

    rule: str  # masks | color
    color: str | tuple[int, int, int] = "border"
    tolerance: int = 0
    masks: str = ""  # dataset.masks, for the record

    def to_json(self) -> str:
        """What the store's `foreground` attr records: equal JSON, equal flags."""
        if self.rule == "masks":
            record: dict[str, Any] = {"rule": "masks", "masks": self.masks}
        else:
            color = self.color if isinstance(self.color, str) else list(self.color)
            record = {"rule": "color", "color": color, "tolerance": self.tolerance}
        return json.dumps({**record, "patch_rule": PATCH_RULE}, sort_keys=True)


def foreground_rule(options: dict[str, Any], dataset_cfg: Any) -> ForegroundRule | None:
    """`extract.foreground` (a plain dict) resolved against the dataset (None for `none`), every
    value checked."""
    rule = options.get("rule")
    if rule not in RULES:
        raise TraitsaeError(
            f"extract.foreground.rule={rule!r} is not one of {list(RULES)} (conf/extract.yaml)."
        )
    color, tolerance = options.get("color"), options.get("tolerance")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or not 0 <= tolerance < 255:
        raise TraitsaeError(
            f"extract.foreground.tolerance={tolerance!r} must be an integer in [0, 255): how far "
            "(largest channel difference) a background pixel may be from the background colour."
        )
    if color != "border":
        if not (isinstance(color, list | tuple) and len(color) == 3 and all(map(_byte, color))):
            raise TraitsaeError(
                f"extract.foreground.color={color!r} must be `border` (the image's border "
                "colour) or an [r, g, b] list of integers 0-255."
            )
        color = tuple(int(v) for v in color)
    if rule == "none":
        return None
    has_masks = bool(dataset_cfg.get("masks"))
    if rule == "auto":
        rule = "masks" if has_masks else "color"
    if rule == "masks":
        if not has_masks:
            raise TraitsaeError(
                f"extract.foreground.rule=masks, but dataset {dataset_cfg.get('name')!r} has no "
                "segmentation masks (dataset.masks is null); point dataset.masks and "
                "dataset.mask_classes at them, or use extract.foreground.rule=color."
            )
        return ForegroundRule("masks", masks=str(dataset_cfg.masks))
    return ForegroundRule("color", color, tolerance)


def _byte(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255


class ForegroundFlags:
    """Frames an image like the backbone does and flags its foreground patches, in a DataLoader
    worker (picklable). `transform` is the backbone's: `frame` + `to_tensor` is that transform,
    so the image is resized once for both the model and the flags."""

    def __init__(
        self,
        rule: ForegroundRule,
        transform: Callable,
        frame_size: int,
        grid: tuple[int, int],
        layout: MaskLayout | None = None,
    ) -> None:
        self.rule, self.frame_size, self.grid, self.layout = rule, frame_size, grid, layout
        self.image_ops, self.tensor_ops = split_transform(transform)
        self.n_patches = grid[0] * grid[1]

    @classmethod
    def build(
        cls, rule: ForegroundRule, dataset_cfg: Any, transform: Callable, frame_size: int,
        grid: tuple[int, int],
    ) -> ForegroundFlags:  # fmt: skip
        layout = load_mask_layout(dataset_cfg) if rule.rule == "masks" else None
        return cls(rule, transform, frame_size, grid, layout)

    def frame(self, image: Image.Image) -> Image.Image:
        for op in self.image_ops:
            image = op(image)
        return image

    def to_tensor(self, framed: Image.Image) -> torch.Tensor:
        out: Any = framed
        for op in self.tensor_ops:
            out = op(out)
        return out

    def flags(self, path: str, raw: Image.Image, framed: Image.Image) -> np.ndarray:
        """bool [P] for one image (`raw` as decoded, `framed` as the backbone saw it)."""
        if self.rule.rule == "masks":
            assert self.layout is not None
            mask_path = self.layout.mask_path(path)
            if mask_path is None:
                return np.zeros(self.n_patches, dtype=bool)  # no mask: no foreground
            labels_HW = self.layout.read(mask_path, raw.size) > 0
            labels_P1 = framed_patch_labels(
                labels_HW.astype(np.int64), self.image_ops, self.frame_size, self.grid,
                [1], PATCH_RULE, f"mask {mask_path}",
            )  # fmt: skip
            return labels_P1[:, 0]
        return color_foreground(np.asarray(framed.convert("RGB")), self.rule, self.grid)


def color_foreground(
    image_HW3: np.ndarray, rule: ForegroundRule, grid: tuple[int, int]
) -> np.ndarray:
    """bool [P]: the patches whose pixels are mostly not the background colour."""
    pixels = np.asarray(image_HW3, dtype=np.int16)
    if rule.color == "border":
        ring = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
        background_3 = np.median(ring, axis=0)
    else:
        background_3 = np.asarray(rule.color, dtype=np.float64)
    far_HW = (np.abs(pixels - background_3).max(axis=2) > rule.tolerance).astype(np.int64)
    return patch_labels(patch_class_counts(far_HW, grid, 2), [1], PATCH_RULE)[:, 0]
