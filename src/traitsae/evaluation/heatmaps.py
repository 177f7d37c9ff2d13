"""Patch heat-maps of one latent: label-free quality scores and overlay figures.

A heat-map is a latent's activation on every patch of one image, laid out on the ViT's patch grid
(rows x cols). Two trait-agnostic numbers from the research notes rank them for triage:

- normalised entropy of the map seen as a distribution over patches (0 = one patch, 1 = uniform):
  low means the latent points at a narrow place;
- Moran's I on the grid with 4-neighbour (rook) weights (about 0 for noise, towards 1 for one
  coherent blob, negative for a checkerboard): high means a spatially structured pattern.

triage score = alpha * specificity + beta * (-entropy) + gamma * Moran's I.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from traitsae.errors import TraitsaeError

log = logging.getLogger(__name__)


def normalised_entropy(maps_NP: np.ndarray) -> np.ndarray:
    """Shannon entropy of each non-negative map (flattened over patches) divided by log(P).

    An all-zero map carries no location at all and gets the maximum, 1.0.
    """
    maps_NP = np.clip(np.asarray(maps_NP, dtype=np.float64).reshape(len(maps_NP), -1), 0, None)
    n_patches = maps_NP.shape[1]
    if n_patches < 2:
        raise TraitsaeError(
            f"a heat-map needs at least 2 patches to have an entropy, got {n_patches}."
        )
    total_N = maps_NP.sum(axis=1)
    p_NP = maps_NP / np.where(total_N > 0, total_N, 1.0)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp_NP = np.where(p_NP > 0, p_NP * np.log(p_NP), 0.0)
    entropy_N = -plogp_NP.sum(axis=1) / np.log(n_patches)
    return np.where(total_N > 0, entropy_N, 1.0)


def morans_i(maps_NRC: np.ndarray) -> np.ndarray:
    """Moran's I of each [rows, cols] map with binary rook (edge-sharing) neighbours.

    I = (n / W) * sum_ij w_ij z_i z_j / sum_i z_i^2 with z = x - mean(x) and W = sum_ij w_ij.
    A constant map has no spatial structure to measure and gets 0.
    """
    maps_NRC = np.asarray(maps_NRC, dtype=np.float64)
    if (
        maps_NRC.ndim != 3
        or min(maps_NRC.shape[1:]) < 1
        or maps_NRC.shape[1] * maps_NRC.shape[2] < 2
    ):
        raise TraitsaeError(
            f"Moran's I needs maps shaped [N, rows, cols] with at least 2 cells, got {maps_NRC.shape}."
        )
    _, rows, cols = maps_NRC.shape
    z_NRC = maps_NRC - maps_NRC.mean(axis=(1, 2), keepdims=True)
    # Each unordered neighbour pair appears twice in sum_ij w_ij z_i z_j (w is symmetric).
    cross_N = 2 * (
        (z_NRC[:, :, :-1] * z_NRC[:, :, 1:]).sum(axis=(1, 2))
        + (z_NRC[:, :-1, :] * z_NRC[:, 1:, :]).sum(axis=(1, 2))
    )
    weight_total = 2 * (rows * (cols - 1) + (rows - 1) * cols)
    denom_N = (z_NRC**2).sum(axis=(1, 2))
    n_cells = rows * cols
    with np.errstate(divide="ignore", invalid="ignore"):
        moran_N = (n_cells / weight_total) * cross_N / denom_N
    return np.where(denom_N > 1e-12 * np.maximum(1.0, np.abs(maps_NRC).max()), moran_N, 0.0)


@dataclass(frozen=True)
class TriageWeights:
    """alpha * specificity + beta * (-entropy) + gamma * Moran's I (notes' triage score)."""

    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.5


def triage_score(
    specificity: np.ndarray | float,
    entropy: np.ndarray | float,
    moran: np.ndarray | float,
    weights: TriageWeights,
) -> np.ndarray:
    return (
        weights.alpha * np.asarray(specificity, dtype=np.float64)
        - weights.beta * np.asarray(entropy, dtype=np.float64)
        + weights.gamma * np.asarray(moran, dtype=np.float64)
    )


def upsample_map(map_RC: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour upsampling of a patch map to pixels (each patch becomes its block)."""
    rows, cols = map_RC.shape
    row_of_pixel = np.minimum((np.arange(height) * rows) // height, rows - 1)
    col_of_pixel = np.minimum((np.arange(width) * cols) // width, cols - 1)
    return map_RC[np.ix_(row_of_pixel, col_of_pixel)]


def mass_inside(map_RC: np.ndarray, mask_HW: np.ndarray) -> float:
    """Fraction of a heat-map's total activation that falls inside a binary pixel mask.

    The map is upsampled to the mask's resolution, so both must cover the same image frame
    (the backbone's input after its resize/crop).
    """
    mask_HW = np.asarray(mask_HW, dtype=bool)
    heat_HW = np.clip(upsample_map(np.asarray(map_RC, dtype=np.float64), *mask_HW.shape), 0, None)
    total = heat_HW.sum()
    return float(heat_HW[mask_HW].sum() / total) if total > 0 else 0.0


def patch_mask(mask_HW: np.ndarray, grid: tuple[int, int], min_cover: float = 0.0) -> np.ndarray:
    """[rows, cols] bool: patches whose pixels are covered by the mask more than `min_cover`.

    A latent can only say "this patch", so a trait smaller than a patch is fully found when the
    heat-map sits on the patches the trait touches; compare maps to this, not to pixels.
    """
    mask_HW = np.asarray(mask_HW, dtype=bool)
    rows, cols = grid
    row_of_pixel = np.minimum((np.arange(mask_HW.shape[0]) * rows) // mask_HW.shape[0], rows - 1)
    col_of_pixel = np.minimum((np.arange(mask_HW.shape[1]) * cols) // mask_HW.shape[1], cols - 1)
    covered_RC = np.zeros(grid)
    pixels_RC = np.zeros(grid)
    np.add.at(covered_RC, (row_of_pixel[:, None], col_of_pixel[None, :]), mask_HW)
    np.add.at(pixels_RC, (row_of_pixel[:, None], col_of_pixel[None, :]), 1.0)
    return covered_RC / pixels_RC > min_cover


# ----------------------------------------------------------------------------- images


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
        from torchvision.transforms import CenterCrop, InterpolationMode, Resize

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
        ops = []
        for op in getattr(transform, "transforms", [transform]):
            if "ToTensor" in type(op).__name__ or "Normalize" in type(op).__name__:
                break
            ops.append(op)
        return cls(ops, size)

    def image(self, path: Path) -> np.ndarray:
        """uint8 [size, size, 3] as the backbone saw it."""
        from PIL import Image

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
        from PIL import Image
        from torchvision.transforms import CenterCrop, InterpolationMode, Resize

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
    from omegaconf import OmegaConf

    from traitsae.backbones import build_backbone

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
    store: Any, root: str | None = None, size: int | None = None, mode: str = "backbone"
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
        from omegaconf import OmegaConf

        frame = backbone_frame(OmegaConf.create(config).backbone, size)
    else:
        frame = Frame.simple(size, "center_crop" if mode == "backbone" else mode)
    return ImageSource(root=root, frame=frame)


def caption_column(metadata: Mapping[str, np.ndarray]) -> str | None:
    """The metadata column that names an image best in a caption (finest taxon present)."""
    return next((c for c in ("subspecies", "species") if c in metadata), None)


@dataclass
class Panel:
    """One image of a figure: pixels, its patch heat-map and a caption."""

    image_HW3: np.ndarray | None  # None when the image file is unavailable: map alone
    map_RC: np.ndarray
    caption: str


def plot_panel_rows(
    rows: Sequence[tuple[str, Sequence[Panel]]],
    out_path: Path,
    title: str,
    alpha: float = 0.55,
    cmap: str = "inferno",
) -> Path:
    """One figure row per (label, panels); a shared colour scale so weak rows look weak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = len(rows)
    n_cols = max(1, max(len(panels) for _, panels in rows))
    vmax = max((float(p.map_RC.max()) for _, panels in rows for p in panels), default=1.0) or 1.0
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(2.0 * n_cols, 2.2 * n_rows + 0.4), squeeze=False
    )
    for r, (label, panels) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(panels):
                ax.axis("off")
                continue
            panel = panels[c]
            if panel.image_HW3 is not None:
                height, width = panel.image_HW3.shape[:2]
                ax.imshow(panel.image_HW3)
                # Silent patches stay transparent so the picture shows where the latent is off.
                ax.imshow(
                    np.ma.masked_less_equal(panel.map_RC, 0),
                    cmap=cmap,
                    alpha=alpha,
                    vmin=0,
                    vmax=vmax,
                    extent=(0, width, height, 0),
                    interpolation="nearest",
                )
            else:
                ax.imshow(panel.map_RC, cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_title(panel.caption, fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=80)
    plt.close(fig)
    return out_path
