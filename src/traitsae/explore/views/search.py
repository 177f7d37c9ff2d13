"""Search by example: a few positive and a few negative images -> the latents that fire on the
positives and not on the negatives (the saev logbook's search idea), ranked, with galleries."""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st

from traitsae.explore.views.common import image_label, latent_gallery

N_GALLERIES = 3
GALLERY_SIZE = 8  # images per gallery: three galleries stay quick to draw


def example_picker(data: Any, label: str, key: str) -> list[int]:
    """Images chosen one by one, or all images with one metadata value at once."""
    columns = data.metadata_columns()
    left, right = st.columns([1, 3])
    column = left.selectbox(f"{label}: add all of", ["(none)", *columns], key=f"{key}_col")
    rows: list[int] = []
    if column != "(none)":
        values = np.asarray(data.metadata[column]).astype(str)
        value = left.selectbox("value", sorted(set(values[data.rows_V])), key=f"{key}_val")
        rows = data.rows_V[values[data.rows_V] == value].tolist()
    picked = right.multiselect(
        f"{label} images",
        data.rows_V.tolist(),
        format_func=lambda r: image_label(data, r),
        key=f"{key}_rows",
    )
    return sorted(set(rows) | {int(r) for r in picked})


def region_examples(data: Any) -> dict[str, list[np.ndarray]]:
    """Score vectors of the patch sets saved on the Image page, by sign."""
    examples = st.session_state.get("region_examples", [])
    out: dict[str, list[np.ndarray]] = {"positive": [], "negative": []}
    if not examples:
        return out
    st.markdown(
        "Patch examples (from the Image page): "
        + "; ".join(f"{e['sign']} #{e['row']} ({len(e['patches'])} patches)" for e in examples)
    )
    if st.button("clear patch examples", key="clear_regions"):
        st.session_state["region_examples"] = []
        st.rerun()
    for e in examples:
        out[e["sign"]].append(data.region_scores(int(e["row"]), np.asarray(e["patches"])))
    return out


def stack(data: Any, rows: list[int], regions: list[np.ndarray]) -> np.ndarray:
    parts = [data.image_scores(np.asarray(rows, dtype=np.int64)), *(r[None] for r in regions)]
    return np.concatenate(parts).reshape(-1, data.d_sae)


def render(data: Any) -> None:
    st.header("Search by example")
    positives = example_picker(data, "positive", "pos")
    negatives = example_picker(data, "negative", "neg")
    overlap = set(positives) & set(negatives)
    if overlap:
        st.warning(f"{len(overlap)} images are both positive and negative; they count as positive.")
        negatives = [r for r in negatives if r not in overlap]
    regions = region_examples(data)
    n_pos, n_neg = (
        len(positives) + len(regions["positive"]),
        len(negatives) + len(regions["negative"]),
    )
    st.caption(f"{n_pos} positive, {n_neg} negative examples")
    if not n_pos:
        st.info("choose positive images or regions (and some negatives) to rank latents.")
        return
    ranking = data.search(
        stack(data, positives, regions["positive"]), stack(data, negatives, regions["negative"])
    )
    st.subheader("Latents that fire on the positives and not on the negatives")
    st.dataframe(ranking.head(50), hide_index=True, key="search_ranking")
    for latent in ranking.latent.head(N_GALLERIES):
        row = ranking[ranking.latent == latent].iloc[0]
        st.markdown(
            f"**latent {int(latent)}**: fires on {row.rate_pos:.0%} of positives, "
            f"{row.rate_neg:.0%} of negatives"
        )
        latent_gallery(data, int(latent), GALLERY_SIZE)
