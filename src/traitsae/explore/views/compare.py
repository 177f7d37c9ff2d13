"""Compare groups: two groups of images from metadata columns -> eval=discovery's ranking of the
latents specific to each, with its statistics (permutation p, BH q, held-out confirmation) and
heat-maps: discovery_stats.contrast and candidates.build_candidates themselves, fed with image
scores from the sparse codes instead of a new pass over the store."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from traitsae.errors import TraitsaeError
from traitsae.evaluation.core import heatmaps
from traitsae.evaluation.discovery import groups
from traitsae.evaluation.discovery.candidates import build_candidates
from traitsae.evaluation.discovery.stats import NullOptions, RankingRule, contrast
from traitsae.explore import draw
from traitsae.explore.views.common import overlays

# The ranking's columns as the page shows them (code name -> plain name, help).
TABLE_COLUMNS = {
    "group": ("group", "the group the latent is specific to"),
    "rank": ("rank", "its rank among that group's candidates (1 = most specific)"),
    "latent": ("latent", "the latent's number"),
    "specificity": (
        "AUROC for its group",
        "how well its activation picks its own group's images out of both groups; 1 = "
        "perfectly, 0.5 = chance",
    ),
    "p_value": ("p", "permutation p-value of the group difference"),
    "q_value": ("q", "Benjamini-Hochberg q over the tested latents; <= alpha = a discovery"),
    "discovery": ("discovery", "q <= alpha"),
    "confirm_specificity": (
        "held-out AUROC",
        "the same AUROC on the held-out images (confirmation); near the first = it holds",
    ),
    "confirmed": ("confirmed", "significant again on the held-out images"),
    "rate_a": ("A firing", "share of group A's images it fires on"),
    "rate_b": ("B firing", "share of group B's images it fires on"),
    "entropy": ("map spread", "entropy of its heat-maps: low = one place, high = everywhere"),
    "morans_i": ("map clumping", "Moran's I of its heat-maps: high = one connected region"),
    "score": ("triage score", "eval=discovery's heat-map triage score (higher = cleaner)"),
}


def ranking_table(candidates: list[Any]) -> Any:
    """The candidates with plain column names; scores read for each latent's own group."""
    table = pd.DataFrame([c.row() for c in candidates])
    own_b = table["group"] == "b"
    # AUROC is A (positive) vs B: a B latent's 0.08 means it picks B out well. Flip it.
    if "confirm_auroc" in table:
        confirm = table["confirm_auroc"].astype(float)
        table["confirm_specificity"] = np.where(own_b, 1.0 - confirm, confirm)
    table["group"] = table["group"].str.upper()
    shown = [c for c in TABLE_COLUMNS if c in table]
    return table[shown].rename(columns={c: TABLE_COLUMNS[c][0] for c in shown})


def column_help() -> dict[str, Any]:
    return {plain: st.column_config.Column(help=text) for plain, text in TABLE_COLUMNS.values()}


def plain_sentence(sentence: str) -> str:
    """eval=discovery's verdict as this page words it: its settings are this page's boxes, and
    latents.csv (eval=discovery's full table) is not written here."""
    return sentence.replace(" (latents.csv)", " (not in the table)").replace("eval.", "")


def sizes_sentence(sizes: dict[str, Any], names: dict[str, str]) -> str:
    """'A (species=001.Alpha): 6 to rank, 6 held out to confirm; B ...'."""
    parts = []
    for g in ("a", "b"):
        n = sizes.get(g, {})
        parts.append(
            f"{g.upper()} ({names[g]}): {n.get('selection', '?')} images to rank, "
            f"{n.get('confirmation', 0)} held out to confirm"
        )
    return "; ".join(parts)


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


def rank_groups(
    data: Any, group_a: dict, group_b: dict, rule: RankingRule, null: NullOptions
) -> tuple[list[Any], dict[str, Any]]:
    """eval=discovery's candidates (statistics, p/q-values, confirmation, heat-map triage) and
    summary, cached per choice of groups and options."""
    key = (repr(group_a), repr(group_b), repr(rule), repr(null))
    cache = data.__dict__.setdefault("_compare_cache", {})
    if key not in cache:
        source = str(data.store.path)
        mask_a = groups.group_mask(data.metadata, group_a, "group_a", source)
        mask_b = groups.group_mask(data.metadata, group_b, "group_b", source)
        if (mask_a & mask_b).any():
            raise TraitsaeError(
                f"groups {group_a} and {group_b} share {int((mask_a & mask_b).sum())} images; "
                "choose disjoint groups."
            )
        scores = data.group_scores(mask_a, mask_b)
        names = {"a": groups.describe_group(group_a), "b": groups.describe_group(group_b)}
        result = contrast(scores.scores_NS, scores.in_a, rule, null, names=names, progress=False)
        candidates, _ = build_candidates(
            data.store,
            data.sae,
            scores,
            result.candidates,
            heatmaps.TriageWeights(),
            n_top_images=6,
            device=data.session.device,
        )
        cache[key] = (candidates, result.summary)
    return cache[key]


def options() -> tuple[RankingRule, NullOptions]:
    """eval=discovery's ranking rule and null options, with its defaults."""
    with st.expander("ranking rule and null (eval=discovery's options)"):
        left, mid, right = st.columns(3)
        rule = RankingRule(
            min_support=left.number_input("min_support", 0.0, 1.0, 0.2, key="min_support"),
            dense_rate=mid.number_input("dense_rate", 0.0, 1.0, 0.9, key="dense_rate"),
            min_auroc=right.number_input("min_auroc", 0.0, 1.0, 0.8, key="min_auroc"),
            n_candidates=int(left.number_input("n_candidates", 1, 100, 10, key="n_candidates")),
        )
        n_perm = int(mid.number_input("n_permutations", 0, 100_000, 1000, key="n_perm"))
        null = NullOptions(
            n_permutations=n_perm,
            max_permutations=int(
                right.number_input(
                    "max_permutations",
                    n_perm,
                    1_000_000,
                    max(n_perm, 100_000),
                    key="max_perm",
                    help="latents whose p-value is limited by n_permutations get more draws, "
                    "up to this many",
                )
            ),
            alpha=left.number_input("alpha", 0.0, 1.0, 0.05, key="alpha"),
            confirm=mid.number_input("confirm", 0.0, 0.9, 0.5, key="confirm"),
        )
    return rule, null


def render(data: Any) -> None:
    st.header("Compare groups")
    contrast_pair = data.session.contrast or {}
    group_a = group_editor(data, "a", dict(contrast_pair.get("group_a") or {}))
    group_b = group_editor(data, "b", dict(contrast_pair.get("group_b") or {}))
    rule, null = options()
    if not group_a or not group_b:
        st.info("choose a column and at least one value for each group.")
        return
    candidates, summary = rank_groups(data, group_a, group_b, rule, null)
    names = {"a": groups.describe_group(group_a), "b": groups.describe_group(group_b)}
    st.caption(sizes_sentence(summary.get("sizes", {}), names))
    for group, sentence in summary.get("verdict", {}).items():
        st.markdown(f"**{group.upper()}**: {plain_sentence(sentence)}")
    if not candidates:
        st.warning("no latent passes the ranking rule for either group; loosen the rule.")
        return
    st.dataframe(
        ranking_table(candidates), hide_index=True, key="ranking", column_config=column_help()
    )
    for cand in candidates[:4]:
        stats = cand.stats
        other = "b" if stats.group == "a" else "a"
        q = "" if stats.q_value is None else f", q {stats.q_value:.2g}"
        st.markdown(
            f"**{stats.group.upper()}#{cand.rank}: latent {stats.latent}** (AUROC for group "
            f"{stats.group.upper()} {stats.specificity:.2f}{q}; fires on {stats.rate_a:.0%} of A, "
            f"{stats.rate_b:.0%} of B): upper row group {stats.group.upper()}, lower row group "
            f"{other.upper()}"
        )
        rows = np.array(cand.top_rows + cand.top_rows_other, dtype=np.int64)
        vmax = float(data.latent_maps(stats.latent, rows).max()) if len(rows) else 1.0
        st.markdown(draw.colour_bar_html(vmax or 1.0, "activation"), unsafe_allow_html=True)
        images = overlays(data, stats.latent, rows, vmax or 1.0)
        captions = [f"{data.short_caption(int(r))} #{int(r)}" for r in rows]
        n_own = len(cand.top_rows)
        draw.gallery(st, images[:n_own], captions[:n_own], per_row=6)
        draw.gallery(st, images[n_own:], captions[n_own:], per_row=6)
