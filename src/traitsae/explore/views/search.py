"""Search by example: a few positive and a few negative images -> the latents that fire on the
positives and not on the negatives (the saev logbook's search idea), ranked, each drawn on the
chosen examples themselves."""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st

from traitsae.explore import draw
from traitsae.explore.views.common import image_label, overlays

N_GALLERIES = 3
GALLERY_SIZE = 8  # positives per gallery (and half as many negatives): stays quick


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
    st.dataframe(
        ranking.head(50).rename(columns=PLAIN),
        hide_index=True,
        key="search_ranking",
        column_config=HELP,
    )
    pos_rows = positives + [int(e["row"]) for e in region_list("positive")]
    neg_rows = negatives + [int(e["row"]) for e in region_list("negative")]
    for latent in ranking.latent.head(N_GALLERIES):
        row = ranking[ranking.latent == latent].iloc[0]
        st.markdown(
            f"**latent {int(latent)}**: fires on {row.rate_pos:.0%} of the positives, "
            f"{row.rate_neg:.0%} of the negatives; its map on your examples:"
        )
        examples_gallery(data, int(latent), pos_rows, neg_rows)


PLAIN = {
    "rate_pos": "positives firing",
    "rate_neg": "negatives firing",
    "mean_pos": "mean on positives",
    "mean_neg": "mean on negatives",
    "rate_gap": "firing gap",
    "score_gap": "activation gap",
}
HELP = {
    "firing gap": st.column_config.NumberColumn(
        help="share of positives it fires on minus share of negatives; 1 = all positives, "
        "no negative (the ranking)",
        format="%.2f",
    ),
    "activation gap": st.column_config.NumberColumn(
        help="mean activation on positives minus on negatives (breaks ties)", format="%.3g"
    ),
}


def region_list(sign: str) -> list[dict]:
    return [e for e in st.session_state.get("region_examples", []) if e["sign"] == sign]


def examples_gallery(data: Any, latent: int, positives: list[int], negatives: list[int]) -> None:
    """The latent's map on the chosen positive and negative images, one colour scale."""
    pos = np.asarray(positives[:GALLERY_SIZE], dtype=np.int64)
    neg = np.asarray(negatives[: GALLERY_SIZE // 2], dtype=np.int64)
    rows = np.concatenate([pos, neg])
    maps = data.latent_maps(latent, rows)
    vmax = float(maps.max()) if maps.size and maps.max() > 0 else 1.0
    st.markdown(draw.colour_bar_html(vmax, "activation"), unsafe_allow_html=True)
    images = overlays(data, latent, rows, vmax)
    captions = [
        f"{'+' if i < len(pos) else '−'} {data.short_caption(int(r))} #{int(r)}"
        for i, r in enumerate(rows)
    ]
    draw.gallery(st, images, captions, per_row=GALLERY_SIZE)
    if len(positives) > len(pos) or len(negatives) > len(neg):
        st.caption(
            f"the first {len(pos)} of {len(positives)} positives and {len(neg)} of "
            f"{len(negatives)} negatives shown (+ positive, − negative)"
        )
