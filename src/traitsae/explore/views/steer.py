"""Steer: `eval=steer` run from the page (`compute_steer`, the CLI's own code): the probe fitted
on the train split, the target's latents chosen there by their measured effect on the probe,
held-out images of other classes steered with them over alpha, beside frequency-matched random
latents at equal norm. Shown: what alpha means, the curve with its CI and the control, the
verdict, each chosen latent's effect, and one steered image with its changed patches and its
classes before and after."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from traitsae.explore import draw
from traitsae.explore.steering import held_out_split, run_steer

EVERY_OTHER = "every other class"
N_CLASSES_SHOWN = 6


def class_options(data: Any) -> list[str]:
    column = str(data.session.launch.get("steer", {}).get("class_column", "species"))
    if column not in data.metadata:
        return []
    values = np.asarray(data.metadata[column]).astype(str)[data.rows_V]
    return sorted(set(values) - {""})


def alpha_sentence(result: dict[str, Any]) -> str:
    target = result["target_class"]
    if result.get("meta", {}).get("alpha_units") == "code":
        return "**alpha**: how much is added to each chosen latent's activation at every patch."
    return (
        f"**alpha** = 1 adds to every patch as much of each chosen latent as a typical "
        f"{target} image carries (its mean activation there); alpha 0 is the clean image."
    )


def verdict_lines(result: dict[str, Any]) -> str:
    verdict = result.get("verdict", {})
    words = {True: "yes", False: "no"}
    return (
        f"rises at every alpha: **{words[verdict.get('monotonic', False)]}** · beats random "
        f"latents at every alpha > 0: **{words[verdict.get('beats_control', False)]}** · the "
        f"probe tells held-out {result['target_class']} images from the others: "
        f"**{words[verdict.get('readout_informative', False)]}**"
    )


def curve_frame(result: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for p in result["curve"]:
        low, high = (p.get("ci") or [np.nan, np.nan])[:2]
        rows.append({"alpha": p["alpha"], "series": "chosen latents", "p": p["mean_p_target"],
                     "low": low, "high": high})  # fmt: skip
    control = result.get("control", {}).get("curve")
    for p, c in zip(result["curve"], control or [], strict=False):
        rows.append({"alpha": p["alpha"], "series": "random latents (control)", "p": c,
                     "low": np.nan, "high": np.nan})  # fmt: skip
    return pd.DataFrame(rows)


def latent_frame(result: dict[str, Any]) -> pd.DataFrame:
    """The chosen latents with their measured effect (d log p(target) / d alpha at 0)."""
    selection = result.get("selection", {})
    effect = dict(zip(selection.get("candidates", []), selection.get("effect", []), strict=False))
    return pd.DataFrame(
        {
            "latent": result["latents"],
            "effect on log p(target) per alpha": [effect.get(s, np.nan) for s in result["latents"]],
            "specificity": selection.get("specificity", [np.nan] * len(result["latents"])),
            "alpha unit": result.get("alpha_unit", [np.nan] * len(result["latents"])),
        }
    )


def render(data: Any) -> None:
    st.header("Steer")
    classes = class_options(data)
    if len(classes) < 2:
        st.info("the Steer page needs a store with at least two classes.")
        return
    left, mid, right = st.columns([2, 2, 1])
    target = left.selectbox("target class", classes, key="steer_target")
    others = [c for c in classes if c != target]
    source = mid.selectbox("steer held-out images of", [EVERY_OTHER, *others], key="steer_source")
    source = None if source == EVERY_OTHER else source
    cache = data.__dict__.setdefault("_steer_cache", {})
    if right.button("run eval=steer", key="steer_run", type="primary"):
        with st.spinner("fitting the probe, choosing the latents, steering (eval=steer) ..."):
            cache[(target, source)] = run_steer(data.session, target, source)
    steered = cache.get((target, source))
    if steered is None:
        st.info(
            f"Runs eval=steer: a class probe fitted on the train split; {target}'s latents "
            "chosen there by how much adding them raises the probe's p(target); held-out "
            f"images ({held_out_split(data.session)} split) steered with them and with random "
            "latents of the same firing frequency at equal norm."
        )
        return
    show_result(data, steered)


def show_result(data: Any, steered: Any) -> None:
    result = steered.result
    st.markdown(alpha_sentence(result))
    st.markdown(verdict_lines(result))
    for note in result.get("notes", []):
        st.warning(note)
    chart, table = st.columns([3, 2])
    chart.vega_lite_chart(curve_frame(result), draw.steer_curve_spec(), width="stretch")
    chart.caption(
        f"mean p({result['target_class']}) over {result['n_images']} held-out images (band: "
        "95 % CI over images) and over random latents of the same firing frequency."
    )
    table.markdown("**Latents chosen by their measured effect on the probe**")
    table.dataframe(latent_frame(result), hide_index=True, key="steer_latents")
    steered_image(data, steered)


def steered_image(data: Any, steered: Any) -> None:
    """One steered image: its changed patches and its classes at alpha 0 and a chosen alpha."""
    result, probs_ANC = steered.result, steered.probs_ANC
    alphas = [p["alpha"] for p in result["curve"]]
    n = result["n_images"]
    per_image = result["images"][:n]  # the first alpha's block: one entry per image, in order
    left, right = st.columns([1, 2])
    i = left.selectbox(
        "steered image",
        list(range(n)),
        format_func=lambda j: (
            f"{per_image[j]['class']} · {per_image[j]['path'].rsplit('/', 1)[-1]}"
        ),
        key="steer_image",
    )
    alpha = right.select_slider("alpha", alphas, value=alphas[-1], key="steer_alpha")
    picture = load_picture(data, per_image[i]["path"])
    changed_RC = steered.changed_NP[i].reshape(data.grid).astype(np.float32)
    left.image(
        draw.overlay(picture, changed_RC, 1.0, alpha=0.35, cmap="cool"),
        caption="coloured: the patches the edit changes (eval.where="
        f"{result.get('meta', {}).get('where', 'all')})",
        width="stretch",
    )
    classes = steered.probe.classes
    t = classes.index(result["target_class"])
    a = alphas.index(alpha)
    clean_C, after_C = probs_ANC[0, i], probs_ANC[a, i]
    right.markdown(
        f"p({result['target_class']}): clean **{clean_C[t]:.3f}** → at alpha {alpha:g} "
        f"**{after_C[t]:.3f}**; most probable {classes[int(clean_C.argmax())]} → "
        f"{classes[int(after_C.argmax())]}"
    )
    shown = np.argsort(-np.maximum(clean_C, after_C), kind="stable")[:N_CLASSES_SHOWN]
    frame = pd.DataFrame(
        {
            "class": [classes[c] for c in shown for _ in range(2)],
            "run": ["alpha 0", f"alpha {alpha:g}"] * len(shown),
            "probability": [p for c in shown for p in (clean_C[c], after_C[c])],
        }
    )
    right.vega_lite_chart(frame, draw.probability_spec(), width="stretch")


def load_picture(data: Any, path: str) -> np.ndarray | None:
    """The steered image framed like extraction (None: drawn without it)."""
    if not data.session.draw_images:
        return None
    try:
        return data.image_source().load(path)
    except Exception:  # a picture is a nicety here: the numbers stand without it
        return None
