"""Image page: pick an image by metadata or path; see its patch grid, the latents firing most on
it, the SAE's per-patch reconstruction error; choose a region of patches to see what fires there."""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st

from traitsae.explore import draw
from traitsae.explore.views.common import image_label

MAX_LISTED = 2000  # images offered in one select box; narrow by metadata first


def pick_image(data: Any, key: str = "image") -> int:
    """An image row chosen by a metadata filter and a path substring."""
    columns = ["(all)", *data.metadata_columns()]
    left, mid, right = st.columns(3)
    column = left.selectbox("filter by", columns, key=f"{key}_column")
    candidates = data.rows_V
    if column != "(all)":
        values = np.asarray(data.metadata[column]).astype(str)
        choice = mid.selectbox("value", sorted(set(values[data.rows_V])), key=f"{key}_value")
        candidates = candidates[values[candidates] == choice]
    needle = right.text_input("path contains", key=f"{key}_needle")
    if needle:
        candidates = candidates[np.char.find(data.paths[candidates], needle) >= 0]
    if len(candidates) == 0:
        st.warning("no image matches this filter.")
        st.stop()
    if len(candidates) > MAX_LISTED:
        st.caption(f"{len(candidates)} images match; the first {MAX_LISTED} are listed.")
    return int(
        st.selectbox(
            "image",
            candidates[:MAX_LISTED].tolist(),
            format_func=lambda r: image_label(data, r),
            key=f"{key}_row",
        )
    )


def render(data: Any) -> None:
    st.header("Image")
    row = pick_image(data)
    rows, cols = data.grid
    r0, r1 = st.slider("region rows (patches)", 0, rows, (0, rows), key="region_rows")
    c0, c1 = st.slider("region columns (patches)", 0, cols, (0, cols), key="region_cols")
    region = (slice(r0, max(r1, r0 + 1)), slice(c0, max(c1, c0 + 1)))
    picture = data.image(row)
    codes_PS = data.image_codes(row)
    codes_RCS = codes_PS.reshape(rows, cols, -1)
    left, mid, right = st.columns(3)
    base = picture if picture is not None else draw.blank_image()
    left.image(draw.with_grid(base, data.grid, region), caption=data.caption(row), width="stretch")
    error_RC = data.reconstruction_error(row)
    mid.image(
        draw.overlay(picture, error_RC, float(error_RC.max()), cmap="magma"),
        caption=f"reconstruction error ||x - x̂||²/||x||² per patch (mean {error_RC.mean():.3f})",
        width="stretch",
    )
    latents, scores = data.image_latents(row)
    top = st.number_input("latents listed", 1, 200, 10, key="image_top")
    import pandas as pd

    patches_firing = (codes_PS[:, latents[:top]] > 0).sum(0)
    st.subheader(f"Latents firing most on image #{row}")
    st.dataframe(
        pd.DataFrame(
            {"latent": latents[:top], "max_score": scores[:top], "patches": patches_firing}
        ),
        hide_index=True,
        key="image_latents",
    )
    if len(latents):
        shown = st.selectbox("heat-map of latent", latents[:top].tolist(), key="image_heat")
        map_RC = codes_RCS[..., int(shown)]
        right.image(
            draw.overlay(picture, map_RC, float(map_RC.max())),
            caption=f"latent {shown}",
            width="stretch",
        )
    st.subheader(
        f"Latents firing in the region rows {region[0].start}-{region[0].stop - 1}, "
        f"columns {region[1].start}-{region[1].stop - 1}"
    )
    st.dataframe(region_latents(codes_RCS, region).head(int(top)), hide_index=True, key="region")
    left, right = st.columns(2)
    for column, sign in ((left, "positive"), (right, "negative")):
        if column.button(f"use this region as a {sign} example", key=f"region_{sign}"):
            bounds = {
                "rows": (region[0].start, region[0].stop),
                "cols": (region[1].start, region[1].stop),
            }
            example = {"row": row, **bounds, "sign": sign}
            st.session_state.setdefault("region_examples", []).append(example)
    n_examples = len(st.session_state.get("region_examples", []))
    if n_examples:
        st.caption(f"{n_examples} region examples saved for Search by example.")


def region_latents(codes_RCS: np.ndarray, region: tuple[slice, slice]) -> Any:
    """Latents by total activation inside the region; `inside` = share of their image total."""
    import pandas as pd

    inside_S = codes_RCS[region].sum(axis=(0, 1))
    total_S = codes_RCS.sum(axis=(0, 1))
    fired = np.flatnonzero(inside_S > 0)
    order = fired[np.argsort(-inside_S[fired], kind="stable")]
    return pd.DataFrame(
        {
            "latent": order,
            "sum_in_region": inside_S[order],
            "max_in_region": codes_RCS[region].max(axis=(0, 1))[order],
            "inside": inside_S[order] / total_S[order],
        }
    )
