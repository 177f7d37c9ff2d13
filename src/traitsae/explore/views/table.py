"""The latent table as a reader sees it: plain column names, one line of help each (what the
number means, what is good), the trait and discovery columns first.

`ExplorerData.latent_table` keeps code names (`patch_freq`, ...: the API and the density chart
use them); `display_table` renames them for the page, and the same plain names are offered by
the "sort by" box, so it sorts what the header shows.
"""

from __future__ import annotations

import re
from typing import Any

import streamlit as st

# code name -> (plain name, help). Linked columns (cub_trait.json, discovery) come first.
LINKED = {
    "cub_trait": (
        "CUB trait",
        "the CUB attribute this latent is the best SAE direction for (eval=cub_traits); "
        "empty: none",
    ),
    "cub_precision": (
        "trait precision",
        "of the latent's top-k training images, the share that have its CUB trait; 1 = all "
        "(good), the trait's base rate = chance",
    ),
    "discovery_rank": (
        "discovery rank",
        "its rank among the latents specific to group A or B (eval=discovery); A#1 = the most "
        "specific to A",
    ),
    "discovery_q": (
        "discovery q",
        "Benjamini-Hochberg q-value of its group difference; <= 0.05 = a discovery",
    ),
    "discovery_auroc": (
        "group AUROC",
        "how well its activation separates group A (1.0) from group B (0.0); 0.5 = no difference",
    ),
}
CORE = {
    "latent": ("latent", "the latent's number in the SAE"),
    "image_freq": (
        "images firing",
        "share of images on which the latent is active anywhere; near 1 = fires on everything "
        "(dense), 0 = never (dead)",
    ),
    "patch_freq": (
        "patches firing",
        "share of all image patches where it is active; a part of an image is typically "
        "1e-3 .. 1e-1",
    ),
    "label_entropy": (
        "label mix (bits)",
        "entropy of the labels of its top images; 0 = they all share one label (specific), "
        "higher = mixed labels",
    ),
    "mean_top_score": (
        "top activation",
        "mean activation over its top images (activation of an image = its largest patch value)",
    ),
    "max_score": ("max activation", "its largest activation on any image"),
    "mean_image_score": (
        "mean activation",
        "mean activation over all images, 0 where it does not fire",
    ),
    "log10_freq": ("log10 patches firing", "log10 of 'patches firing'"),
}


def column_key(name: str) -> str:
    """`cub_precision@10` -> `cub_precision`: the help key of a column whose name carries k."""
    return re.sub(r"@\d+$", "", name)


def plain_name(name: str) -> str:
    key = column_key(name)
    plain, _ = {**LINKED, **CORE}.get(key, (name, ""))
    k = name[len(key) + 1 :]
    return f"{plain} @{k}" if k else plain


def display_table(table: Any) -> Any:
    """The table with plain column names: latent, the linked columns, then the firing columns."""
    linked = [c for c in table.columns if column_key(c) in LINKED]
    core = [c for c in CORE if c in table.columns and c != "log10_freq"]
    rest = [c for c in table.columns if c not in linked and c not in CORE]
    ordered = ["latent", *linked, *[c for c in core if c != "latent"], *rest]
    return table[ordered].rename(columns={c: plain_name(c) for c in ordered})


def column_config(shown: Any) -> dict[str, Any]:
    """st.dataframe column settings: each column's help line and number format."""
    helps = {plain_name(c): h for c, (_, h) in {**LINKED, **CORE}.items()}
    config: dict[str, Any] = {}
    for name in shown.columns:
        help_ = next((h for p, h in helps.items() if name.split(" @")[0] == p), None)
        if shown[name].dtype.kind == "f":
            config[name] = st.column_config.NumberColumn(name, help=help_, format="%.3g")
        elif name == "latent":
            config[name] = st.column_config.NumberColumn(name, help=help_, format="%d", width=60)
        else:
            config[name] = st.column_config.TextColumn(name, help=help_)
    return config


def default_sort(shown: Any) -> str:
    """Trait precision when the run has one (its trait latents first), else images firing."""
    for name in shown.columns:
        if name.startswith("trait precision") or name == "discovery q":
            return name
    return "images firing"


def descending_default(name: str) -> bool:
    return name not in ("discovery q", "latent")
