"""Compare groups: two groups of images from metadata columns -> eval=discovery's ranking of the
latents specific to each, with its statistics and heat-maps (traitsae.evaluation.discovery's own
functions, fed with image scores from the sparse codes instead of a new pass over the store)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import streamlit as st

from traitsae.errors import TraitsaeError
from traitsae.evaluation import discovery, heatmaps
from traitsae.explore import draw
from traitsae.explore.views.common import overlays

TABLE_COLUMNS = ["group", "rank", "latent", "score", "auroc", "rate_a", "rate_b", "entropy",
                 "morans_i", "support"]  # fmt: skip


def group_editor(data: Any, name: str, default: dict[str, Any]) -> dict[str, list[str]]:
    """{column: [values]} picked in two widgets, starting from the dataset's contrast pair."""
    columns = data.metadata_columns()
    default_column = next(iter(default), columns[0] if columns else None)
    left, right = st.columns([1, 3])
    column = left.selectbox(
        f"group {name.upper()}: column",
        columns,
        index=columns.index(default_column) if default_column in columns else 0,
        key=f"group_{name}_col",
    )
    values = np.asarray(data.metadata[column]).astype(str)
    options = sorted(set(values[data.rows_V]))
    wanted = default.get(column, [])
    wanted = [str(v) for v in (wanted if isinstance(wanted, list) else [wanted])]
    chosen = right.multiselect(
        f"group {name.upper()}: values",
        options,
        default=[v for v in wanted if v in options],
        key=f"group_{name}_vals",
    )
    return {column: chosen} if chosen else {}


def rank_groups(data: Any, group_a: dict, group_b: dict, rule: discovery.RankingRule) -> Any:
    """Candidates per group (discovery's statistics and triage), cached per choice of groups."""
    key = (repr(group_a), repr(group_b), repr(rule))
    cache = data.__dict__.setdefault("_compare_cache", {})
    if key not in cache:
        source = str(data.store.path)
        mask_a = discovery.group_mask(data.metadata, group_a, "group_a", source)
        mask_b = discovery.group_mask(data.metadata, group_b, "group_b", source)
        if (mask_a & mask_b).any():
            raise TraitsaeError(
                f"groups {group_a} and {group_b} share {int((mask_a & mask_b).sum())} images; "
                "choose disjoint groups."
            )
        scores = data.group_scores(mask_a, mask_b)
        stats = discovery.latent_stats(scores)
        candidates, _ = discovery.build_candidates(
            data.store,
            data.sae,
            scores,
            stats,
            rule,
            heatmaps.TriageWeights(),
            n_top_images=6,
            device=data.session.device,
        )
        cache[key] = (candidates, {"a": int(mask_a.sum()), "b": int(mask_b.sum())})
    return cache[key]


def render(data: Any) -> None:
    import pandas as pd

    st.header("Compare groups")
    contrast = data.session.contrast or {}
    group_a = group_editor(data, "a", dict(contrast.get("group_a") or {}))
    group_b = group_editor(data, "b", dict(contrast.get("group_b") or {}))
    with st.expander("ranking rule (eval=discovery's options)"):
        left, mid, right = st.columns(3)
        rule = discovery.RankingRule(
            min_support=left.number_input("min_support", 0.0, 1.0, 0.2, key="min_support"),
            dense_rate=mid.number_input("dense_rate", 0.0, 1.0, 0.9, key="dense_rate"),
            min_auroc=right.number_input("min_auroc", 0.0, 1.0, 0.8, key="min_auroc"),
            n_candidates=int(left.number_input("n_candidates", 1, 100, 10, key="n_candidates")),
        )
    if not group_a or not group_b:
        st.info("choose a column and at least one value for each group.")
        return
    candidates, sizes = rank_groups(data, group_a, group_b, rule)
    st.caption(f"group A: {sizes['a']} images, group B: {sizes['b']} images")
    if not candidates:
        st.warning("no latent passes the ranking rule for either group; loosen the rule.")
        return
    table = pd.DataFrame([asdict(c) for c in candidates])
    st.dataframe(table[[c for c in TABLE_COLUMNS if c in table]], hide_index=True, key="ranking")
    for cand in candidates[:4]:
        other = "b" if cand.group == "a" else "a"
        st.markdown(
            f"**{cand.group.upper()}#{cand.rank}: latent {cand.latent}** (AUROC {cand.auroc:.2f}, "
            f"rate A {cand.rate_a:.2f} / B {cand.rate_b:.2f}); upper row group "
            f"{cand.group.upper()}, lower row group {other.upper()}"
        )
        rows = np.array(cand.top_rows + cand.top_rows_other, dtype=np.int64)
        images = overlays(data, cand.latent, rows)
        captions = [data.caption(int(r)) for r in rows]
        n_own = len(cand.top_rows)
        draw.gallery(st, images[:n_own], captions[:n_own], per_row=6)
        draw.gallery(st, images[n_own:], captions[n_own:], per_row=6)
