"""Guess the image: the seed write-up's game. An image is hidden; its strongest latents are shown,
each by its own top images; the player picks the hidden image among four. Whether latents are
readable enough to name what they saw, asked as a game (a score is kept per browser session)."""

from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st

from traitsae.explore import draw
from traitsae.explore.views.common import overlays

N_LATENTS = 4  # clues: the hidden image's strongest latents
N_CLUE_IMAGES = 6  # top images shown per clue latent
N_CHOICES = 4


def new_round(data: Any) -> dict[str, Any]:
    """A hidden image (with at least one latent firing) and the shuffled choices."""
    rng = np.random.default_rng(st.session_state.get("guess_round", 0))
    rows = data.rows_V
    hidden = int(rng.choice(rows))
    others = rng.choice(rows[rows != hidden], size=min(N_CHOICES - 1, len(rows) - 1), replace=False)
    choices = [hidden, *(int(r) for r in others)]
    rng.shuffle(choices)
    return {"hidden": hidden, "choices": choices, "answered": None}


def render(data: Any) -> None:
    st.header("Guess the image")
    if data.n_images < 2:
        st.info("the game needs at least two images.")
        return
    if "guess" not in st.session_state:
        st.session_state["guess"] = new_round(data)
    game = st.session_state["guess"]
    score = st.session_state.setdefault("guess_score", [0, 0])
    latents, scores = data.image_latents(game["hidden"])
    st.markdown(
        f"An image is hidden. Below are the {min(N_LATENTS, len(latents))} latents firing most "
        "on it, each shown by its own top images. Which of the four images is it? "
        f"(score: {score[0]} of {score[1]})"
    )
    for latent, value in zip(latents[:N_LATENTS], scores[:N_LATENTS], strict=False):
        rows, top = data.top_images(int(latent), N_CLUE_IMAGES)
        st.markdown(f"latent {int(latent)} (activation {value:.2f} on the hidden image)")
        st.markdown(draw.colour_bar_html(float(top[0]), "activation"), unsafe_allow_html=True)
        images = overlays(data, int(latent), rows, float(top[0]))
        draw.gallery(st, images, [""] * len(rows), N_CLUE_IMAGES)
    columns = st.columns(N_CHOICES)
    for i, (column, row) in enumerate(zip(columns, game["choices"], strict=False)):
        picture = data.image(row)
        column.image(picture if picture is not None else draw.blank_image(), width="stretch")
        if column.button("this one", key=f"guess_{i}", disabled=game["answered"] is not None):
            game["answered"] = row
            score[0] += int(row == game["hidden"])
            score[1] += 1
            st.rerun()
    if game["answered"] is not None:
        if game["answered"] == game["hidden"]:
            st.success(f"Right: it was {data.caption(game['hidden'])}.")
        else:
            st.error(f"No: it was {data.caption(game['hidden'])}.")
        if st.button("next image", key="guess_next"):
            st.session_state["guess_round"] = st.session_state.get("guess_round", 0) + 1
            st.session_state["guess"] = new_round(data)
            st.rerun()
