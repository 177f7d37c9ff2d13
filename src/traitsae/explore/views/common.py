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


def overlays(data: Any, latent: int, rows: np.ndarray) -> list[np.ndarray]:
    """The latent's heat-map over each image, one colour scale for all of them."""
    maps = data.latent_maps(latent, rows)
    vmax = float(maps.max()) if maps.size else 1.0
    return [draw.overlay(data.image(int(r)), m, vmax) for r, m in zip(rows, maps, strict=True)]


def latent_gallery(data: Any, latent: int, k: int, per_row: int = 8) -> list[int]:
    """Top-k images of a latent with heat-maps; returns their store rows."""
    rows, scores = data.top_images(latent, k)
    if len(rows) == 0:
        st.info(f"latent {latent} never fires on this store: it has no top images.")
        return []
    captions = [f"{data.caption(int(r))} max={s:.2f}" for r, s in zip(rows, scores, strict=True)]
    draw.gallery(st, overlays(data, latent, rows), captions, per_row)
    st.caption("top images: " + ", ".join(str(data.paths[r]) for r in rows))
    return [int(r) for r in rows]


def image_label(data: Any, row: int) -> str:
    return f"#{row} {data.paths[row]}"
