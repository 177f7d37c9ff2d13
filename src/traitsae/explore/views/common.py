"""Pieces several pages draw: the latent table (built once per session), image galleries."""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st

from traitsae.explore import draw


def cached_table(data: Any) -> Any:
    """The per-latent table, computed once per ExplorerData (it is shared by all sessions)."""
    if getattr(data, "_table", None) is None:
        data._table = data.latent_table()
    return data._table


def overlays(
    data: Any, latent: int, rows: np.ndarray, vmax: float | None = None
) -> list[np.ndarray]:
    """The latent's heat-map over each image, one colour scale 0..vmax (default: their max)."""
    maps = data.latent_maps(latent, rows)
    if vmax is None:
        vmax = float(maps.max()) if maps.size else 1.0
    return [draw.overlay(data.image(int(r)), m, vmax) for r, m in zip(rows, maps, strict=True)]


def latent_gallery(data: Any, latent: int, k: int, per_row: int = 8, key: str = "") -> list[int]:
    """Top-k images of a latent with heat-maps under one colour bar, captions that wrap
    (class · activation), the paths behind a toggle; returns their store rows."""
    rows, scores = data.top_images(latent, k)
    if len(rows) == 0:
        st.info(f"latent {latent} never fires on this store: it has no top images.")
        return []
    st.markdown(draw.colour_bar_html(float(scores[0]), "activation"), unsafe_allow_html=True)
    captions = [
        f"{data.short_caption(int(r))} · {s:.2f}" for r, s in zip(rows, scores, strict=True)
    ]
    draw.gallery(st, overlays(data, latent, rows, float(scores[0])), captions, per_row)
    image_paths(data, rows, key=f"paths_{key}{latent}")
    return [int(r) for r in rows]


def image_paths(data: Any, rows: np.ndarray, key: str) -> None:
    """The images' store rows and paths, shown only when asked for."""
    if st.toggle("show image paths", key=key):
        st.caption("; ".join(f"#{int(r)} {data.paths[int(r)]}" for r in rows))


def image_label(data: Any, row: int) -> str:
    return f"#{row} {data.paths[row]}"
