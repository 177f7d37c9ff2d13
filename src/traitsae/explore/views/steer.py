"""Steer: sliders on chosen latents -> the class probe's probabilities for one image, clean and
steered (eval=steer's `steered_probabilities`: alpha is added to each latent's code at the SAE's
layer, the remaining blocks and the head run, the probe reads the final embedding)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from traitsae.explore import draw
from traitsae.explore.views.common import cached_table
from traitsae.explore.views.image import pick_image

N_DEFAULT_LATENTS = 3
N_CLASSES_SHOWN = 8


def steering(data: Any) -> Any:
    """One Steering per ExplorerData (backbone built, probe loaded or fitted once)."""
    if getattr(data, "_steering", None) is None:
        from traitsae.explore.steering import Steering  # lazy: torch (launch stays torch-free)

        with st.spinner("building the backbone and the class probe (once) ..."):
            data._steering = Steering(data)
    return data._steering


def render(data: Any) -> None:
    st.header("Steer")
    model = steering(data)
    classes = model.probe.classes
    row = pick_image(data, key="steer")
    target = st.selectbox("target class", classes, key="steer_target")
    suggested = data.class_latents(model.classes_N == target, N_DEFAULT_LATENTS).tolist()
    latents = st.multiselect(
        "latents to steer (default: the most specific to the target class)",
        list(range(data.d_sae)),
        default=suggested,
        key=f"steer_latents_{target}",
    )
    where = st.radio("edit", ["all", "firing"], horizontal=True, key="steer_where",
                     help="all: every edited token; firing: only where the latent fires")  # fmt: skip
    table = cached_table(data)
    alphas = []
    for latent in latents:
        scale = float(table.max_score.iloc[latent]) or 1.0
        alphas.append(
            st.slider(
                f"latent {latent}: alpha (its largest image score is {scale:.2f})",
                -2 * scale,
                4 * scale,
                0.0,
                key=f"alpha_{latent}",
            )
        )
    clean_C = model.probabilities(row, [], [])
    steered_C = model.probabilities(row, latents, alphas, where)
    t = classes.index(target)
    left, right = st.columns([1, 2])
    picture = data.image(row)
    left.image(picture if picture is not None else draw.blank_image(), caption=data.caption(row))
    right.markdown(
        f"p({target}) clean **{clean_C[t]:.3f}** → steered **{steered_C[t]:.3f}**; "
        f"most probable: {classes[int(np.argmax(clean_C))]} → {classes[int(np.argmax(steered_C))]}"
    )
    shown = np.argsort(-np.maximum(clean_C, steered_C), kind="stable")[:N_CLASSES_SHOWN]
    frame = pd.DataFrame(
        {
            "class": [classes[c] for c in shown for _ in range(2)],
            "run": ["clean", "steered"] * len(shown),
            "probability": [p for c in shown for p in (clean_C[c], steered_C[c])],
        }
    )
    right.vega_lite_chart(frame, draw.probability_spec(), width="stretch")
    right.dataframe(
        pd.DataFrame({"class": classes, "clean": clean_C, "steered": steered_C}),
        hide_index=True,
        key="steer_probabilities",
    )
    st.caption(f"class probe: {model.probe_source}")
