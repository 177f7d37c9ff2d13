"""Patch heat-maps of one latent: label-free quality scores and mask geometry.

A heat-map is a latent's activation on every patch of one image, laid out on the ViT's patch grid
(rows x cols). Two trait-agnostic numbers from the research notes rank them for triage:

- normalised entropy of the map seen as a distribution over patches (0 = one patch, 1 = uniform):
  low means the latent points at a narrow place;
- Moran's I on the grid with 4-neighbour (rook) weights (about 0 for noise, towards 1 for one
  coherent blob, negative for a checkerboard): high means a spatially structured pattern.

triage score = alpha * specificity + beta * (-entropy) + gamma * Moran's I.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from traitsae.errors import TraitsaeError


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
