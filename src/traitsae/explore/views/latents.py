"""Latents page: every latent in one filterable, sortable table; the density figure; one latent's
top images with their patch heat-maps and its activation histogram."""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st

from traitsae.explore import draw
from traitsae.explore.views.common import cached_table, latent_gallery, overlays

FIRST_LATENT = 0  # shown before any choice: the number box starts at its minimum
SORTABLE = ("latent", "patch_freq", "image_freq", "mean_top_score", "label_entropy", "max_score")


def window(table: Any, column: str, label: str, fmt: str = "%.2f") -> Any:
    """Rows of `table` whose `column` lies in a slider window (NaN rows kept only when full)."""
    values = table[column].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    if len(finite) == 0 or finite.min() == finite.max():
        return table
    lo, hi = float(finite.min()), float(finite.max())
    chosen = st.slider(label, lo, hi, (lo, hi), format=fmt, key=f"window_{column}")
    if chosen == (lo, hi):
        return table
    return table[(values >= chosen[0]) & (values <= chosen[1])]


def render(data: Any) -> None:
    st.header("Latents")
    table = cached_table(data)
    with st.expander("Filter and sort", expanded=True):
        left, right = st.columns(2)
        with left:
            shown = window(table, "log10_freq", "log10 firing frequency (fraction of patches)")
            shown = window(shown, "mean_top_score", "mean score of top images")
        with right:
            shown = window(shown, "label_entropy", "label entropy of top images (bits)")
            hide_dead = st.checkbox("hide latents that never fire", value=False, key="hide_dead")
            sort_by = st.selectbox("sort by", SORTABLE, index=2, key="sort_by")
            descending = st.checkbox("descending", value=True, key="descending")
    if hide_dead:
        shown = shown[shown.patch_freq > 0]
    shown = shown.sort_values(sort_by, ascending=not descending, kind="stable")
    st.caption(f"{len(shown)} of {len(table)} latents shown; click a column header to re-sort.")
    picked = st.dataframe(
        shown,
        hide_index=True,
        on_select="rerun",
        selection_mode="single-row",
        key="latent_table",
        height=300,
    )
    rows = picked.selection.rows if picked is not None else []
    clicked = int(shown.iloc[rows[0]].latent) if rows else None
    if clicked is not None and clicked != st.session_state.get("clicked_latent"):
        st.session_state["latent"] = clicked  # a new click wins; the number box stays editable
    st.session_state["clicked_latent"] = clicked
    latent = st.number_input("Latent", 0, data.d_sae - 1, step=1, key="latent")
    chart_col, hist_col = st.columns([3, 2])
    chart_col.vega_lite_chart(
        *draw.density_spec(shown, int(latent)),
        on_select=pick_from_density,
        selection_mode=draw.DENSITY_PICK,
        key="density",
        width="stretch",
    )
    chart_col.caption(
        "Density vs mean activation (top images), coloured by label entropy: the CLIP-SAE "
        "write-up's figure. High-entropy latents in the low band fire at random. Click a "
        "point to choose its latent."
    )
    show_latent(data, int(latent), hist_col)


def clicked_latent(event: Any) -> int | None:
    """The latent of the point clicked on the density scatter; None when nothing is picked."""
    picked = ((event or {}).get("selection") or {}).get(draw.DENSITY_PICK) or []
    return int(picked[0]["latent"]) if picked and "latent" in picked[0] else None


def pick_from_density() -> None:
    """on_select callback: runs before the rerun, so it may still set the number box."""
    latent = clicked_latent(st.session_state.get("density"))
    if latent is not None:
        st.session_state["latent"] = latent


def show_latent(data: Any, latent: int, hist_col: Any) -> None:
    row = cached_table(data).iloc[latent]
    scores = data.latent_scores(latent)
    hist_col.vega_lite_chart(
        *draw.histogram_spec(scores, data.n_images - len(scores), f"latent {latent}"),
        width="stretch",
    )
    hist_col.markdown(
        f"**latent {latent}**: fires on {row.patch_freq:.3g} of patches, "
        f"{row.image_freq:.3g} of images; mean top score {row.mean_top_score:.3g}, "
        f"label entropy {row.label_entropy:.3g} bits"
    )
    st.subheader(f"Top images of latent {latent}")
    latent_gallery(data, latent, data.session.top_k)


def warm(data: Any) -> None:
    """What the first view computes once (the table, colour maps, its gallery's pictures)."""
    cached_table(data)
    overlays(data, FIRST_LATENT, data.top_images(FIRST_LATENT, data.session.top_k)[0])
