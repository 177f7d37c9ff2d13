"""How much of a trait a specimen shows, and where: per image x latent numbers from patch codes.

Units (docs/guide/traits_table.md): the *frame* is the backbone's input image (after its resize
and crop; the store's `image_size` pixels square), divided into the store's patch grid. A patch
stands for its centre: row r of R is at y = (r + 0.5) / R, column c of C at x = (c + 0.5) / C,
so frame coordinates run from 0 (top / left edge) to 1 (bottom / right edge). The foreground's
bounding box spans its outermost foreground patches edge to edge; `*_fg` coordinates are 0 at its
top / left edge and 1 at its bottom / right edge.
"""

from __future__ import annotations

import numpy as np
import torch

# Per image x latent, in this order (NaN where undefined: see `measure`).
MEASURES = (
    "n_foreground",
    "n_fires",
    "area",
    "max",
    "mean",
    "centroid_x",
    "centroid_y",
    "centroid_x_fg",
    "centroid_y_fg",
    "total",
    "outside",
    "max_outside",
)


def patch_centres(grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [P], x [P]) of every patch centre in frame units, patches row-major."""
    rows, cols = grid
    y_R = (torch.arange(rows, dtype=torch.float32) + 0.5) / rows
    x_C = (torch.arange(cols, dtype=torch.float32) + 0.5) / cols
    return y_R.repeat_interleave(cols), x_C.repeat(rows)


def _span(any_BK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First index and one past the last index where `any_BK` is true (0, 0 when none)."""
    k = any_BK.shape[1]
    first_B = any_BK.float().argmax(dim=1)
    last_B = k - 1 - any_BK.flip(1).float().argmax(dim=1)
    has_B = any_BK.any(dim=1)
    return torch.where(has_B, first_B, 0), torch.where(has_B, last_B + 1, 0)


@torch.no_grad()
def measure(
    codes_BPL: torch.Tensor,
    foreground_BP: torch.Tensor,
    grid: tuple[int, int],
    fire_threshold: float = 0.0,
) -> dict[str, np.ndarray]:
    """Every measure of `MEASURES` as float64 [B, L] arrays.

    codes_BPL: the latents' codes on each patch (>= 0); foreground_BP: bool, the patches that
    count. Over the foreground patches only: `n_foreground` (their number), `n_fires` (those
    where the code exceeds `fire_threshold`), `area` = n_fires / n_foreground, `max` and `mean`
    code, and the centroid of the firing patches weighted by their codes, in frame units and
    within the foreground's bounding box. Over every patch: `total` code, and the share of it
    `outside` the foreground (how much of the latent's firing is background), and the largest
    code off the foreground, `max_outside` (NaN when every patch is foreground): above `max`, a
    score pooled over every patch comes from the background. An image without
    foreground patches gets NaN in the foreground measures (n_foreground = n_fires = 0); a latent
    that does not fire on the foreground gets NaN centroids, one that does not fire at all a NaN
    `outside`.
    """
    codes_BPL = codes_BPL.float()
    fg_BP1 = foreground_BP.to(codes_BPL.device, torch.bool)[:, :, None]
    n_fg_B1 = fg_BP1.sum(dim=1).float()
    fires_BPL = (codes_BPL > fire_threshold) & fg_BP1
    n_fires_BL = fires_BPL.sum(dim=1).float()
    # NaN (not inf or 0) where an image has no foreground: nothing was measured.
    per_fg_B1 = torch.where(n_fg_B1 > 0, 1.0 / n_fg_B1.clamp(min=1), torch.nan)
    max_BL = codes_BPL.masked_fill(~fg_BP1, -torch.inf).amax(dim=1)
    max_BL = torch.where(n_fg_B1 > 0, max_BL, torch.nan)
    weight_BPL = codes_BPL * fires_BPL
    mass_BL = weight_BPL.sum(dim=1)
    y_P, x_P = (c.to(codes_BPL.device) for c in patch_centres(grid))
    cy_BL = torch.einsum("bpl,p->bl", weight_BPL, y_P) / mass_BL  # 0 / 0 = NaN: no firing
    cx_BL = torch.einsum("bpl,p->bl", weight_BPL, x_P) / mass_BL
    rows, cols = grid
    fg_BRC = foreground_BP.to(codes_BPL.device, torch.bool).reshape(-1, rows, cols)
    r0_B, r1_B = _span(fg_BRC.any(dim=2))
    c0_B, c1_B = _span(fg_BRC.any(dim=1))
    cy_fg_BL = (cy_BL - (r0_B / rows)[:, None]) / ((r1_B - r0_B) / rows)[:, None]
    cx_fg_BL = (cx_BL - (c0_B / cols)[:, None]) / ((c1_B - c0_B) / cols)[:, None]
    total_BL = codes_BPL.sum(dim=1)  # every patch, foreground or not
    max_out_BL = codes_BPL.masked_fill(fg_BP1, -torch.inf).amax(dim=1)
    max_out_BL = torch.where(max_out_BL > -torch.inf, max_out_BL, torch.nan)  # all foreground
    values = {
        "n_foreground": n_fg_B1.expand_as(n_fires_BL),
        "n_fires": n_fires_BL,
        "area": n_fires_BL * per_fg_B1,
        "max": max_BL,
        "mean": (codes_BPL * fg_BP1).sum(dim=1) * per_fg_B1,
        "centroid_x": cx_BL,
        "centroid_y": cy_BL,
        "centroid_x_fg": cx_fg_BL,
        "centroid_y_fg": cy_fg_BL,
        "total": total_BL,
        "outside": (codes_BPL * ~fg_BP1).sum(dim=1) / total_BL,  # 0 / 0 = NaN: no firing
        "max_outside": max_out_BL,
    }
    return {k: values[k].cpu().numpy().astype(np.float64) for k in MEASURES}
