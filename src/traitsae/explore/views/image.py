"""Image page: pick an image by metadata or path; see its patch grid, the latents firing most on
it, the SAE's per-patch reconstruction error; choose patches on the image (one by one, or a box)
to see the latents firing on exactly those patches."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from traitsae.explore import draw
from traitsae.explore.views.common import image_label

MAX_LISTED = 2000  # images offered in one select box; narrow by metadata first
MAX_TOP = 50  # latents offered in the heat-map box
N_SIDE_BY_SIDE = 6  # the image's top latents drawn side by side, each with its own map


def latent_map(
    codes_PS: np.ndarray, grid: tuple, picture: np.ndarray | None, latent: int, where: Any
) -> None:
    """One latent's map over the picture, with its own colour bar."""
    map_RC = codes_PS[:, latent].reshape(grid)
    vmax = float(map_RC.max())
    where.markdown(draw.colour_bar_html(vmax), unsafe_allow_html=True)
    where.image(draw.overlay(picture, map_RC, vmax), caption=f"latent {latent}", width="stretch")


def top_latent_maps(
    data: Any, row: int, codes_PS: np.ndarray, picture: Any, latents: Any, scores: Any
) -> None:
    """The image's strongest latents side by side, each on its own colour scale."""
    n = min(N_SIDE_BY_SIDE, len(latents))
    if n == 0:
        st.info(f"no latent fires on image #{row}.")
        return
    st.markdown(f"**The {n} latents firing most on this image** (each on its own scale)")
    for column, latent in zip(st.columns(N_SIDE_BY_SIDE), latents[:n], strict=False):
        latent_map(codes_PS, data.grid, picture, int(latent), column)


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
    picture = data.image(row)
    codes_PS = data.image_codes(row)
    base = picture if picture is not None else draw.blank_image()
    latents, scores = data.image_latents(row)
    raw, grid, chosen = st.columns(3)
    raw.image(
        base, caption=f"{data.caption(row)} (the picture as the model saw it)", width="stretch"
    )
    with grid:
        event = st.vega_lite_chart(
            *draw.patch_grid_spec(base, data.grid),
            on_select="rerun",
            key=f"patch_grid_{row}",  # a new image starts with no patches chosen
            width="content",  # the picture layer has the spec's pixel size
        )
        st.caption(
            "Choose patches: click them one by one, or drag a box (double-click clears it); "
            "chosen patches are outlined."
        )
    patches = chosen_patches(event.selection, data.grid)
    with chosen:
        if len(latents):
            shown = st.selectbox(
                "heat-map of latent",
                latents[:MAX_TOP].tolist(),
                format_func=lambda s: f"{s} (max {scores[latents.tolist().index(s)]:.2f})",
                key="image_heat",
            )
            latent_map(codes_PS, data.grid, picture, int(shown), st)
    top_latent_maps(data, row, codes_PS, picture, latents, scores)
    error_RC = data.reconstruction_error(row)
    err_col, table_col = st.columns([1, 2])
    err_col.markdown(
        draw.colour_bar_html(float(error_RC.max()), "error", cmap="magma"), unsafe_allow_html=True
    )
    err_col.image(
        draw.overlay(picture, error_RC, float(error_RC.max()), cmap="magma"),
        caption=f"reconstruction error ||x - x̂||²/||x||² per patch (mean {error_RC.mean():.3f})",
        width="stretch",
    )
    with table_col:
        top = st.number_input("latents listed", 1, 200, 10, key="image_top")
        st.markdown(f"**Latents firing most on image #{row}**")
        st.dataframe(
            pd.DataFrame(
                {
                    "latent": latents[:top],
                    "max activation": scores[:top],
                    "patches firing": (codes_PS[:, latents[:top]] > 0).sum(0),
                }
            ),
            hide_index=True,
            key="image_latents",
        )
    if len(patches) == 0:
        st.info("choose patches on the image (click, or drag a box) to see the latents there.")
        return
    st.subheader(f"Latents firing on the {len(patches)} chosen patches")
    st.caption("patches " + ", ".join(str(p) for p in patches))
    st.dataframe(patch_latents(codes_PS, patches).head(int(top)), hide_index=True, key="region")
    left, right = st.columns(2)
    for column, sign in ((left, "positive"), (right, "negative")):
        if column.button(f"use these patches as a {sign} example", key=f"region_{sign}"):
            example = {"row": row, "patches": patches.tolist(), "sign": sign}
            st.session_state.setdefault("region_examples", []).append(example)
    n_examples = len(st.session_state.get("region_examples", []))
    if n_examples:
        st.caption(f"{n_examples} patch examples saved for Search by example.")


def chosen_patches(selection: Any, grid: tuple[int, int]) -> np.ndarray:
    """Flat indices of the patches clicked (PATCH_PICK) or inside the dragged box (PATCH_BOX:
    patches whose centre lies in it), sorted."""
    rows, cols = grid
    chosen = {int(p["patch"]) for p in selection.get(draw.PATCH_PICK) or [] if "patch" in p}
    box = selection.get(draw.PATCH_BOX) or {}
    if "row" in box and "col" in box:
        (r0, r1), (c0, c1) = sorted(box["row"]), sorted(box["col"])
        centre_R, centre_C = np.arange(rows) + 0.5, np.arange(cols) + 0.5
        in_R = np.flatnonzero((centre_R >= r0) & (centre_R <= r1))
        in_C = np.flatnonzero((centre_C >= c0) & (centre_C <= c1))
        chosen.update((in_R[:, None] * cols + in_C[None, :]).ravel().tolist())
    return np.array(sorted(chosen), dtype=np.int64)


def patch_latents(codes_PS: np.ndarray, patches: np.ndarray) -> Any:
    """Latents firing on the chosen patches, by their total activation there: `fires_on` of
    the chosen patches, `elsewhere` = other patches of the image where they fire, `inside` =
    share of their activation on the image that falls on the chosen patches."""

    inside_PS = codes_PS[patches]
    inside_S, total_S = inside_PS.sum(axis=0), codes_PS.sum(axis=0)
    fired = np.flatnonzero(inside_S > 0)
    order = fired[np.argsort(-inside_S[fired], kind="stable")]
    fires_on_S = (inside_PS > 0).sum(axis=0)
    return pd.DataFrame(
        {
            "latent": order,
            "sum_on_patches": inside_S[order],
            "max_on_patches": inside_PS.max(axis=0)[order],
            "fires_on": fires_on_S[order],
            "elsewhere": (codes_PS > 0).sum(axis=0)[order] - fires_on_S[order],
            "inside": inside_S[order] / total_S[order],
        }
    )
