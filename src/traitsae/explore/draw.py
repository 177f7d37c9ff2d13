"""Pixels and charts for the pages: heat-map overlays as uint8 arrays, Vega-Lite specs.

Overlays are composed with numpy (no matplotlib figure per image): a gallery of 16 images
renders in milliseconds, which keeps every interaction well under a second.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from PIL import Image

from traitsae.evaluation.core.heatmaps import upsample_map

BLANK_SIZE = 128  # pixels of a heat-map drawn without its image
DIM = 0.55  # brightness of the patches where the map is 0


def colourise(map_RC: np.ndarray, vmax: float, size: tuple[int, int], cmap: str) -> np.ndarray:
    """[H, W, 4] float RGBA of a patch map upsampled to pixels (nearest patch)."""
    scaled_RC = np.clip(np.asarray(map_RC, dtype=np.float64) / (vmax or 1.0), 0, 1)
    return matplotlib.colormaps[cmap](upsample_map(scaled_RC, *size))


def overlay(
    image_HW3: np.ndarray | None,
    map_RC: np.ndarray,
    vmax: float,
    alpha: float = 0.75,
    cmap: str = "inferno",
) -> np.ndarray:
    """The image with the map blended over it; patches where the map is 0 dimmed."""
    if image_HW3 is None:
        return (colourise(map_RC, vmax, (BLANK_SIZE, BLANK_SIZE), cmap)[..., :3] * 255).astype(
            np.uint8
        )
    height, width = image_HW3.shape[:2]
    rgba_HW4 = colourise(map_RC, vmax, (height, width), cmap)
    on_HW = upsample_map(np.asarray(map_RC) > 0, height, width)[..., None]
    picture_HW3 = image_HW3 / 255.0
    blended = (1 - alpha) * picture_HW3 + alpha * rgba_HW4[..., :3]
    # Patches where the latent is silent are dimmed: the map reads as a highlight of the
    # picture, not as one more coloured patch on it (the raw picture is shown beside it).
    return (np.where(on_HW, blended, DIM * picture_HW3) * 255).astype(np.uint8)


PATCH_PICK, PATCH_BOX = "patches", "box"  # the patch grid's point and interval selections


def patch_grid_spec(picture_HW3: np.ndarray, grid: tuple[int, int], size: int = 320) -> tuple:
    """(data, Vega-Lite spec) of an image under its patch grid, for choosing patches.

    A click toggles one patch (selection PATCH_PICK: [{"patch": p}, ...]); dragging draws a
    box (PATCH_BOX: {"col": [lo, hi], "row": [lo, hi]} in patch units); chosen patches are
    outlined in cyan. Double-click clears the box.
    """

    rows, cols = grid
    patch = np.arange(rows * cols)
    frame = pd.DataFrame({"patch": patch, "row": patch // cols, "col": patch % cols})
    frame["row_end"], frame["col_end"] = frame.row + 1, frame.col + 1
    png = io.BytesIO()
    Image.fromarray(picture_HW3).resize((size, size)).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    x = {"field": "col", "type": "quantitative", "scale": {"domain": [0, cols], "nice": False}}
    y = {
        "field": "row",
        "type": "quantitative",
        "scale": {"domain": [0, rows], "nice": False, "reverse": True},
    }
    chosen = [  # outlined, not filled: the picture under a chosen patch stays visible
        {"param": PATCH_PICK, "empty": False, "value": 2.5},
        {"param": PATCH_BOX, "empty": False, "value": 2.5},
    ]
    picture = {
        "mark": {  # the plot's own size: Streamlit may fit the chart into a narrower column
            "type": "image",
            "width": {"expr": "width"},
            "height": {"expr": "height"},
            "aspect": False,
            "align": "left",
            "baseline": "top",
        },
        "encoding": {
            "x": {"datum": 0, "type": "quantitative", "scale": x["scale"]},
            "y": {"datum": 0, "type": "quantitative", "scale": y["scale"]},
            "url": {"value": url},
        },
    }
    patches = {
        "params": [
            {
                "name": PATCH_PICK,
                "select": {"type": "point", "fields": ["patch"], "toggle": "true"},
            },
            {"name": PATCH_BOX, "select": {"type": "interval", "encodings": ["x", "y"]}},
        ],
        "mark": {"type": "rect", "fill": "white", "fillOpacity": 0.0, "stroke": "cyan"},
        "encoding": {
            "x": {**x, "title": "patch column"},
            "x2": {"field": "col_end"},
            "y": {**y, "title": "patch row"},
            "y2": {"field": "row_end"},
            "strokeWidth": {"condition": chosen, "value": 0.3},
            "tooltip": [{"field": f} for f in ("patch", "row", "col")],
        },
    }
    spec = {"width": size, "height": size, "layer": [picture, patches]}
    return frame, spec


def blank_image(size: int = BLANK_SIZE) -> np.ndarray:
    return np.full((size, size, 3), 200, dtype=np.uint8)


def histogram_spec(scores: np.ndarray, n_zero: int, title: str) -> tuple[Any, dict]:
    """(data, Vega-Lite spec) of a latent's image scores where it fires; zeros counted in the
    title. Plain specs for st.vega_lite_chart: no Altair validation pass on every rerun."""

    counts, edges = np.histogram(scores, bins=30) if len(scores) else (np.zeros(0), np.zeros(1))
    frame = pd.DataFrame({"from": edges[:-1], "to": edges[1:], "images": counts})
    spec = {
        "title": f"{title} ({n_zero} images at 0 not shown)",
        "mark": "rect",
        "height": 180,
        "encoding": {
            "x": {
                "field": "from",
                "type": "quantitative",
                "title": "image score (max over patches)",
            },
            "x2": {"field": "to"},
            "y": {"field": "images", "type": "quantitative"},
            "y2": {"datum": 0},
        },
    }
    return frame, spec


DENSITY_PICK = "pick"  # the density scatter's point selection: the latent clicked


def density_spec(table: Any, selected: int | None = None) -> tuple[Any, dict]:
    """(data, Vega-Lite spec): log10 firing frequency vs log10 mean top-image score, coloured
    by label entropy; the selected latent ringed in red. A click picks the nearest point's
    latent (selection DENSITY_PICK: [{"latent": s}])."""
    alive = table[(table.patch_freq > 0) & (table.mean_top_score > 0)]
    frame = alive[["latent", "log10_freq", "patch_freq", "mean_top_score", "label_entropy"]].copy()
    frame["log10_mean_top"] = np.log10(frame.mean_top_score)
    x = {"field": "log10_freq", "type": "quantitative", "title": "log10 firing frequency"}
    y = {"field": "log10_mean_top", "type": "quantitative", "title": "log10 mean top score"}
    points = {
        "params": [
            {
                "name": DENSITY_PICK,
                "select": {"type": "point", "fields": ["latent"], "nearest": True},
            }
        ],
        "mark": {"type": "circle", "size": 14, "opacity": 0.7, "cursor": "pointer"},
        "encoding": {
            "x": x,
            "y": y,
            "color": {
                "field": "label_entropy",
                "type": "quantitative",
                "title": "label entropy (bits)",
                "scale": {"scheme": "viridis"},
            },
            "tooltip": [
                {"field": f} for f in ("latent", "patch_freq", "mean_top_score", "label_entropy")
            ],
        },
    }
    layers = [points]
    if selected is not None:
        layers.append(
            {
                "transform": [{"filter": f"datum.latent == {int(selected)}"}],
                "mark": {"type": "point", "size": 220, "color": "red", "strokeWidth": 2},
                "encoding": {"x": x, "y": y},
            }
        )
    return frame, {"height": 320, "layer": layers}


def probability_spec() -> dict:
    """Vega-Lite spec of clean vs steered class probabilities (columns class, run, probability)."""
    return {
        "mark": "bar",
        "height": 220,
        "encoding": {
            "y": {"field": "class", "type": "nominal", "sort": None, "title": None},
            "yOffset": {"field": "run"},
            "x": {"field": "probability", "type": "quantitative", "scale": {"domain": [0, 1]}},
            "color": {"field": "run", "type": "nominal"},
        },
    }


COLOUR_BAR_CLASS = "traitsae-colour-bar"  # the browser test finds the bar by it


def colour_bar_html(vmax: float, label: str = "", cmap: str = "inferno") -> str:
    """An HTML colour scale 0 .. vmax of the heat-map colours (patches at 0 keep the picture)."""
    stops = ", ".join(
        matplotlib.colors.to_hex(matplotlib.colormaps[cmap](t)) for t in np.linspace(0, 1, 9)
    )
    what = f"{label}: " if label else ""
    return (
        f'<div class="{COLOUR_BAR_CLASS}" title="heat-map colours; patches at 0 are not coloured" '
        'style="display:flex;align-items:center;gap:0.3em;font-size:0.75rem;white-space:nowrap;'
        'margin:0 0 0.3rem 0">'
        f"<span>{what}0</span>"
        f'<span style="flex:1;min-width:2rem;max-width:16rem;height:0.7rem;border-radius:2px;'
        f'background:linear-gradient(to right, {stops})"></span>'
        f"<span>{vmax:.3g}</span></div>"
    )


def short_label(value: Any) -> str:
    """A class name for a caption: '006.Zeta_warbler' -> 'Zeta warbler' (wraps at spaces)."""
    text = str(value)
    head, dot, tail = text.partition(".")
    if dot and head.isdigit():
        text = tail
    return text.replace("_", " ")


def gallery(
    st: Any, images: Sequence[np.ndarray], captions: Sequence[str], per_row: int = 8
) -> None:
    """Images in rows of `per_row` columns."""
    for lo in range(0, len(images), per_row):
        columns = st.columns(per_row)
        for column, image, caption in zip(
            columns, images[lo : lo + per_row], captions[lo : lo + per_row], strict=False
        ):
            column.image(image, caption=caption, width="stretch")


def steer_curve_spec() -> dict:
    """Vega-Lite spec of eval=steer's curve (columns alpha, series, p, low, high): mean
    p(target) over the steered images with its 95 % CI band, and the random-latent control."""
    x = {"field": "alpha", "type": "quantitative", "title": "alpha (typical activations added)"}
    y = {"field": "p", "type": "quantitative", "title": "mean p(target)", "scale": {"zero": True}}
    colour = {
        "field": "series",
        "type": "nominal",
        "title": None,
        "legend": {"orient": "bottom"},
        "scale": {
            "domain": ["chosen latents", "random latents (control)"],
            "range": ["#c0392b", "#7f7f7f"],
        },
    }
    return {
        "height": 260,
        "layer": [
            {
                "transform": [{"filter": "isValid(datum.low)"}],
                "mark": {"type": "area", "opacity": 0.2},
                "encoding": {
                    "x": x,
                    "y": {**y, "field": "low"},
                    "y2": {"field": "high"},
                    "color": colour,
                },
            },
            {
                "mark": {"type": "line", "point": True},
                "encoding": {
                    "x": x,
                    "y": y,
                    "color": colour,
                    "tooltip": [{"field": f} for f in ("series", "alpha", "p", "low", "high")],
                },
            },
        ],
    }
