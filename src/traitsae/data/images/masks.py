"""Per-image segmentation masks in a Fish-Vista-like layout, and patch labels from them.

Layout (keys of the `dataset` config, both relative to `dataset.root`; null when a dataset has
no masks):
- `dataset.masks`: a folder of PNG files, one per image, whose pixel values are class ids
  (0 = background). A mask belongs to the image whose path, without its suffix, ends with the
  mask's path relative to the folder, without its suffix: `masks/001.Alpha/a_01.png` is the mask
  of `.../images/001.Alpha/a_01.png`, and a flat `masks/fish_17.png` that of `.../fish_17.jpg`.
  The longest match wins. Images without a mask are left out of patch-level evaluation.
- `dataset.mask_classes`: the class names, either `<id> <name>` lines or a JSON object
  `{"<id>": "<name>"}`. Id 0 (background) may be listed; it is never evaluated.

A mask is drawn on the raw image. Before it can label patches it must go through the same
geometry as the image did in the backbone's preprocessing (`frame_labels`: resize and centre crop,
nearest neighbour so class ids stay ids); then each patch of the backbone's grid gets the class
histogram of its pixels (`patch_class_counts`) and a label rule (`patch_labels`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torchvision.transforms import CenterCrop, InterpolationMode, Resize

from traitsae.errors import TraitsaeError

RULES = ("majority", "any")
# Preprocessing steps that change an image's colour mode only (open_clip's): no geometry.
COLOUR_ONLY_STEPS = ("_convert_to_rgb", "MaybeConvertMode")


@dataclass(frozen=True)
class MaskLayout:
    """The mask folder of a dataset, indexed once, and its class names (id >= 1)."""

    folder: Path
    classes: dict[int, str]  # evaluated classes: id >= 1 -> name
    index: dict[str, Path]  # mask path relative to `folder`, without suffix -> file

    @property
    def class_ids(self) -> list[int]:
        return sorted(self.classes)

    def mask_path(self, image_path: str | Path) -> Path | None:
        """The mask file of an image (longest matching path tail), or None if it has none."""
        parts = Path(image_path).with_suffix("").parts
        for n in range(len(parts), 0, -1):
            found = self.index.get("/".join(parts[-n:]))
            if found is not None:
                return found
        return None

    def read(self, mask_path: Path, image_size: tuple[int, int] | None = None) -> np.ndarray:
        """Class ids [H, W] (int64) of one mask file, checked against the classes and the image."""
        try:
            with Image.open(mask_path) as img:
                if img.mode not in ("L", "P", "I", "I;16", "1"):
                    raise TraitsaeError(
                        f"mask {mask_path} has PIL mode {img.mode!r}; masks must be "
                        "single-channel PNGs whose pixel values are class ids (mode L, P or I)."
                    )
                labels_HW = np.asarray(img, dtype=np.int64)
        except (OSError, SyntaxError, ValueError) as err:  # truncated or not an image at all
            raise TraitsaeError(
                f"mask {mask_path} cannot be read ({type(err).__name__}: {err}); it is truncated "
                "or not an image. Re-export that mask, or remove it (its image is then scored "
                "without a mask)."
            ) from None
        if image_size is not None and labels_HW.shape != (image_size[1], image_size[0]):
            raise TraitsaeError(
                f"mask {mask_path} is {labels_HW.shape[1]} x {labels_HW.shape[0]} px but its "
                f"image is {image_size[0]} x {image_size[1]} px; a mask must label the raw "
                "image pixel by pixel."
            )
        unknown = sorted(set(np.unique(labels_HW).tolist()) - {0, *self.classes})
        if unknown:
            raise TraitsaeError(
                f"mask {mask_path} has pixel values {unknown[:10]} that are not class ids in the "
                f"classes file (ids {self.class_ids[:10]}...); add them to dataset.mask_classes "
                "or fix the mask."
            )
        return labels_HW


def load_mask_layout(dataset_cfg: Any) -> MaskLayout:
    """The mask layout named by `dataset.masks` / `dataset.mask_classes` (TraitsaeError if none)."""
    name, root = dataset_cfg.get("name"), dataset_cfg.get("root")
    masks, classes = dataset_cfg.get("masks"), dataset_cfg.get("mask_classes")
    if not masks or not classes or not root:
        raise TraitsaeError(
            f"dataset {name!r} has no segmentation masks configured (dataset.masks={masks!r}, "
            f"dataset.mask_classes={classes!r}, dataset.root={root!r}); point dataset.masks at "
            "the folder of per-image mask PNGs and dataset.mask_classes at the classes file, "
            "both relative to dataset.root."
        )
    folder = Path(root) / str(masks)
    if not folder.is_dir():
        raise TraitsaeError(
            f"mask folder {folder} (dataset.masks={masks!r} under dataset.root) does not exist."
        )
    index = {p.relative_to(folder).with_suffix("").as_posix(): p for p in folder.rglob("*.png")}
    if not index:
        raise TraitsaeError(f"mask folder {folder} (dataset.masks) holds no .png files.")
    return MaskLayout(folder, read_mask_classes(Path(root) / str(classes)), index)


def read_mask_classes(path: Path) -> dict[int, str]:
    """{id: name} for ids >= 1 from `<id> <name>` lines or a JSON object."""
    if not path.is_file():
        raise TraitsaeError(f"classes file {path} (dataset.mask_classes) does not exist.")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            pairs = list(json.loads(text).items())
        else:
            pairs = [line.split(maxsplit=1) for line in text.splitlines() if line.strip()]
        classes = {int(i): str(n).strip() for i, n in pairs}
    except (ValueError, AttributeError, json.JSONDecodeError) as err:
        raise TraitsaeError(
            f"classes file {path} (dataset.mask_classes) must hold `<id> <name>` lines or a "
            f'JSON object {{"<id>": "<name>"}} ({err}).'
        ) from err
    classes.pop(0, None)  # background is never a class to find
    if not classes or min(classes) < 0:
        raise TraitsaeError(
            f"classes file {path} (dataset.mask_classes) lists no class ids >= 1: {classes}."
        )
    return classes


# ----------------------------------------------------------------------------- geometry


def split_transform(transform: Any) -> tuple[list[Any], list[Any]]:
    """A backbone transform (a torchvision Compose) cut into its PIL-level framing (resize,
    crop: every step before ToTensor) and the tensor steps from there on. Applying the two
    lists in turn is the transform."""
    steps = list(getattr(transform, "transforms", [transform]))
    for i, op in enumerate(steps):
        if "ToTensor" in type(op).__name__ or "Normalize" in type(op).__name__:
            return steps[:i], steps[i:]
    return steps, []


def frame_labels(image_ops: Sequence[Any], labels_HW: np.ndarray) -> np.ndarray:
    """Apply a backbone's PIL-level preprocessing (resize, centre crop) to a class-id map.

    `image_ops` are the transform steps before ToTensor (`heatmaps.Frame.image_ops`). Resizes
    become nearest-neighbour resizes with the same target size; any other geometric step is an
    error rather than a silently misaligned mask.
    """
    labels_HW = np.asarray(labels_HW)
    if labels_HW.size and (labels_HW.min() < 0 or labels_HW.max() > 255):
        framed = Image.fromarray(labels_HW.astype(np.int32))  # mode I
    else:
        framed = Image.fromarray(labels_HW.astype(np.uint8))  # mode L
    for op in image_ops:
        if isinstance(op, Resize):
            framed = Resize(op.size, InterpolationMode.NEAREST, op.max_size)(framed)
        elif isinstance(op, CenterCrop):
            framed = op(framed)
        elif getattr(op, "__name__", type(op).__name__) in COLOUR_ONLY_STEPS:
            continue
        else:
            raise TraitsaeError(
                f"cannot frame segmentation masks through the backbone preprocessing step {op!r}; "
                "only resizes and centre crops are supported. Pass eval.frame=center_crop or "
                "eval.frame=stretch to choose the geometry explicitly."
            )
    return np.asarray(framed, dtype=np.int64)


def framed_patch_labels(
    labels_HW: np.ndarray,
    image_ops: Sequence[Any],
    frame_size: int,
    grid: tuple[int, int],
    class_ids: Sequence[int],
    rule: str,
    what: str = "mask",
) -> np.ndarray:
    """[rows * cols, C] bool labels of one image's patches from its raw class-id map: framed like
    the image (`frame_labels`), checked to be the backbone's input size, counted per patch and
    labelled by `rule` (`patch_labels`)."""
    framed_HW = frame_labels(image_ops, labels_HW)
    if framed_HW.shape != (frame_size, frame_size):
        raise TraitsaeError(
            f"{what} framed by the backbone preprocessing is {framed_HW.shape}, not the "
            f"backbone's {frame_size} x {frame_size} input; check eval.frame."
        )
    n_ids = max(class_ids) + 1
    return patch_labels(patch_class_counts(framed_HW, grid, n_ids), class_ids, rule)


def patch_class_counts(labels_HW: np.ndarray, grid: tuple[int, int], n_ids: int) -> np.ndarray:
    """Pixels of each class id in each patch: [rows * cols, n_ids] int64, patches row-major.

    Pixel (y, x) of an H x W frame lies in patch (y * rows // H, x * cols // W): the ViT's patch
    grid when H = rows x patch size (and a proportional split otherwise).
    """
    labels_HW = np.asarray(labels_HW, dtype=np.int64)
    height, width = labels_HW.shape
    rows, cols = grid
    row_H = np.arange(height) * rows // height
    col_W = np.arange(width) * cols // width
    patch_HW = row_H[:, None] * cols + col_W[None, :]
    flat = (patch_HW * n_ids + labels_HW).ravel()
    return np.bincount(flat, minlength=rows * cols * n_ids).reshape(rows * cols, n_ids)


def patch_labels(counts_PK: np.ndarray, class_ids: Sequence[int], rule: str) -> np.ndarray:
    """Binary patch labels [P, C] for `class_ids` from per-patch class counts [P, K].

    `majority`: a patch belongs to the class covering most of its pixels, background included
    (one label per patch; ties go to the lowest id). `any`: a patch belongs to every class with at
    least one pixel in it (several labels per patch possible).
    """
    ids_C = np.asarray(class_ids, dtype=np.int64)
    if rule == "any":
        return counts_PK[:, ids_C] > 0
    if rule == "majority":
        return counts_PK.argmax(axis=1)[:, None] == ids_C[None, :]
    raise TraitsaeError(f"eval.patch_rule must be one of {RULES}, got {rule!r}.")
