"""Latents page: the table of every latent (plain column names, trait columns first) beside the
chosen latent's top images, so both sit in a laptop's first screen; below, examples from lower
activation ranges, the density figure, the activation histogram, co-firing latents and the
user's note. The chosen latent is in the URL (`?page=Latents&latent=7` reopens it)."""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st

from traitsae.explore import draw
from traitsae.explore.notes import read_notes, save_note
from traitsae.explore.views import table as columns
from traitsae.explore.views.common import cached_table, latent_gallery, overlays

FIRST_LATENT = 0  # shown before any choice (and framed by the launch): the number box's minimum
PER_ROW = 4  # gallery tiles per row beside the table (~150 px each at 1440 px)
# Activation ranges of a latent's firing images, as fractions of their ranking (0 = best).
BANDS = {
    "top": (0.0, 0.0),
    "high (top quarter)": (0.0, 0.25),
    "middle": (0.25, 0.75),
    "low (bottom quarter)": (0.75, 1.0),
}


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


def latent_from_url(data: Any) -> None:
    """On a page's first run, `?latent=N` in the URL chooses latent N."""
    if "latent" in st.session_state:
        return
    wanted = st.query_params.get("latent")
    if wanted is not None and wanted.isdigit() and int(wanted) < data.d_sae:
        st.session_state["latent"] = int(wanted)


def filtered(data: Any, table: Any) -> Any:
    """The table through the filter expander's windows."""
    with st.expander("Filter"):
        shown = window(table, "log10_freq", "log10 patches firing")
        shown = window(shown, "mean_top_score", "top activation")
        shown = window(shown, "label_entropy", "label mix of top images (bits)")
        if st.checkbox("hide latents that never fire", value=False, key="hide_dead"):
            shown = shown[shown.patch_freq > 0]
    return shown


def table_column(data: Any) -> None:
    """Number box, sort box and the table; a clicked row chooses its latent."""
    table = cached_table(data)
    notes = read_notes(data.session.notes) if data.session.notes else {}
    box, sort, order = st.columns([2, 3, 2])
    box.number_input("Latent", 0, data.d_sae - 1, step=1, key="latent")
    shown = columns.display_table(filtered(data, table))
    if notes:
        shown["note"] = [notes.get(int(s), "") for s in shown.latent]
    names = list(shown.columns)
    default = columns.default_sort(shown)
    sort_by = sort.selectbox("sort by", names, index=names.index(default), key="sort_by")
    descending = order.checkbox(
        "descending", value=columns.descending_default(sort_by), key=f"descending_{sort_by}"
    )
    shown = shown.sort_values(sort_by, ascending=not descending, kind="stable")
    st.session_state["shown_latents"] = shown.latent.to_numpy().tolist()
    st.dataframe(
        shown,
        hide_index=True,
        on_select=pick_from_table,
        selection_mode="single-row",
        key="latent_table",
        height=420,
        column_config=columns.column_config(shown),
    )
    st.caption(
        f"{len(shown)} of {len(table)} latents; hover a column name for what it means. Click "
        "a row to see the latent (a header click re-sorts this view only)."
    )


def pick_from_table() -> None:
    """on_select callback (runs before the rerun, so it may set the number box): the clicked
    row's latent, in the order the table was shown."""
    rows = ((st.session_state.get("latent_table") or {}).get("selection") or {}).get("rows")
    shown = st.session_state.get("shown_latents") or []
    if rows and rows[0] < len(shown):
        st.session_state["latent"] = int(shown[rows[0]])


def render(data: Any) -> None:
    st.header("Latents")
    latent_from_url(data)
    left, right = st.columns([5, 7], gap="medium")
    with left:
        table_column(data)
    latent = int(st.session_state.get("latent", FIRST_LATENT))
    st.query_params["latent"] = str(latent)
    with right:
        show_latent(data, latent)
    chart_col, hist_col = st.columns([3, 2])
    chart_col.vega_lite_chart(
        *draw.density_spec(cached_table(data), latent),
        on_select=pick_from_density,
        selection_mode=draw.DENSITY_PICK,
        key="density",
        width="stretch",
    )
    chart_col.caption(
        "Each point a latent: how often it fires vs how strongly on its top images, coloured by "
        "the label mix of its top images. High-mix latents in the low band fire at random. "
        "Click a point to choose its latent."
    )
    scores = data.latent_scores(latent)
    hist_col.vega_lite_chart(
        *draw.histogram_spec(scores, data.n_images - len(scores), f"latent {latent}"),
        width="stretch",
    )
    related(data, latent, hist_col)


def show_latent(data: Any, latent: int) -> None:
    """Heading, one-line summary, colour bar and the chosen band of the latent's images."""
    row = cached_table(data).iloc[latent]
    st.subheader(f"Top images of latent {latent}")
    trait = f" · CUB trait **{row.cub_trait}**" if str(row.get("cub_trait", "")) else ""
    st.markdown(
        f"fires on {row.image_freq:.1%} of images, {row.patch_freq:.2%} of patches · label "
        f"mix {row.label_entropy:.2f} bits{trait}"
    )
    band = st.radio(
        "examples", list(BANDS), horizontal=True, key="band", label_visibility="collapsed"
    )
    if band == "top":
        latent_gallery(data, latent, data.session.top_k, PER_ROW)
    else:
        lo, hi = BANDS[band]
        rows, scores = data.band_images(latent, lo, hi, data.session.top_k)
        band_gallery(data, latent, rows, scores)


def band_gallery(data: Any, latent: int, rows: np.ndarray, scores: np.ndarray) -> None:
    if len(rows) == 0:
        st.info(f"latent {latent} fires on too few images for this range.")
        return
    captions = [
        f"{data.short_caption(int(r))} · {s:.2f}" for r, s in zip(rows, scores, strict=True)
    ]
    vmax = float(data.top_images(latent, 1)[1][0])  # the top images' scale: bands compare
    st.markdown(draw.colour_bar_html(vmax, "activation"), unsafe_allow_html=True)
    draw.gallery(st, overlays(data, latent, rows, vmax), captions, PER_ROW)


def related(data: Any, latent: int, column: Any) -> None:
    """Co-firing latents and the user's note on this latent."""
    column.markdown("**Fires together with**")
    column.dataframe(data.co_firing(latent, 8), hide_index=True, key="co_firing", height=200)
    if not data.session.notes:
        return
    notes = read_notes(data.session.notes)
    column.text_area(
        f"note on latent {latent}", notes.get(latent, ""), key=f"note_{latent}", height=80
    )
    column.button(
        "save note",
        key="save_note",
        on_click=save_from_box,  # before the rerun: the table shows the note at once
        args=(data.session.notes, latent),
    )
    if latent in notes:
        column.caption(f"notes are kept in {data.session.notes}")


def save_from_box(path: str, latent: int) -> None:
    """on_click callback: the note box's text as it is when the button is pressed."""
    save_note(path, latent, st.session_state.get(f"note_{latent}", ""))


def clicked_latent(event: Any) -> int | None:
    """The latent of the point clicked on the density scatter; None when nothing is picked."""
    picked = ((event or {}).get("selection") or {}).get(draw.DENSITY_PICK) or []
    return int(picked[0]["latent"]) if picked and "latent" in picked[0] else None


def pick_from_density() -> None:
    """on_select callback: runs before the rerun, so it may still set the number box."""
    latent = clicked_latent(st.session_state.get("density"))
    if latent is not None:
        st.session_state["latent"] = latent


def warm(data: Any) -> None:
    """What the first view computes once (the table, colour maps, its gallery's pictures)."""
    cached_table(data)
    overlays(data, FIRST_LATENT, data.top_images(FIRST_LATENT, data.session.top_k)[0])
