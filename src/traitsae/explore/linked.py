"""Per-latent columns of the latent table from other evaluations of this SAE: eval=cub_traits'
cub_traits.json and eval=discovery's outputs (found next to the run dir by session.prepare)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from traitsae.explore.session import Session


def linked_columns(session: Session, d_sae: int) -> dict[str, np.ndarray]:
    """Per-latent columns from cub_traits.json / discovery outputs of this SAE, if any."""
    columns: dict[str, np.ndarray] = {}
    if session.cub_traits:
        columns.update(cub_trait_columns(Path(session.cub_traits), d_sae))
    if session.discovery:
        columns.update(discovery_columns(Path(session.discovery), d_sae))
    return columns


def cub_trait_columns(path: Path, d_sae: int) -> dict[str, np.ndarray]:
    """Per latent: the CUB trait it is the selected SAE direction for (best precision), if any."""
    result = json.loads(path.read_text())
    rows = [
        r
        for r in result.get("per_trait", [])
        if r.get("method") == "sae" and r.get("protocol") == "select_on_train"
    ]
    if not rows:
        return {}
    k = min(r["k"] for r in rows)
    trait = np.full(d_sae, "", dtype=object)
    precision = np.full(d_sae, np.nan)
    for r in rows:
        latent = int(r["best_direction"])
        if r["precision"] is None:  # no held-out positives for this trait: nothing to show
            continue
        if r["k"] == k and 0 <= latent < d_sae and not precision[latent] >= r["precision"]:
            trait[latent], precision[latent] = r["trait"], r["precision"]
    return {"cub_trait": trait, f"cub_precision@{k}": precision}


def discovery_columns(folder: Path, d_sae: int) -> dict[str, np.ndarray]:
    """Per latent: discovery AUROC (latents.csv) and candidate rank / q-value (discovery.json)."""
    columns: dict[str, np.ndarray] = {}
    latents_csv = folder / "latents.csv"
    if latents_csv.is_file():
        table = pd.read_csv(latents_csv)
        if "auroc" in table and len(table) == d_sae:
            columns["discovery_auroc"] = table["auroc"].to_numpy()
    result = json.loads((folder / "discovery.json").read_text())
    rank = np.full(d_sae, "", dtype=object)
    q_value = np.full(d_sae, np.nan)
    for cand in result.get("candidates", []):
        latent = int(cand["latent"])
        if 0 <= latent < d_sae:
            # eval.pairs: a latent may be a candidate of several pairs; show each, keep the best q
            label = f"{cand['group'].upper()}#{cand['rank']}"
            label = f"{cand['pair']}: {label}" if cand.get("pair") else label
            rank[latent] = f"{rank[latent]}, {label}" if rank[latent] else label
            q = cand.get("q_value")
            q_value[latent] = np.fmin(q_value[latent], np.nan if q is None else q)
    columns["discovery_rank"] = rank
    if np.isfinite(q_value).any():
        columns["discovery_q"] = q_value
    return columns
