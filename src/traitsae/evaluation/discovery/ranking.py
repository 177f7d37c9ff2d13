"""Per-latent statistics of a contrast's selection part and the candidates they rank:
firing rates and support, specificity (AUROC), the RankingRule, and each candidate's numbers
(CandidateStats)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from traitsae.evaluation.discovery.null import auroc_per_column


@dataclass(frozen=True)
class RankingRule:
    """Which latents may be candidates, and how many per group."""

    min_support: float = 0.2  # fraction of the own group where the latent must fire
    dense_rate: float = 0.9  # firing on >= this fraction of both groups = dense, excluded
    min_auroc: float = 0.8  # specificity floor (AUROC for A, 1 - AUROC for B)
    n_candidates: int = 10  # per group


# ----------------------------------------------------------------------------- per-latent table


@dataclass
class LatentTable:
    """Per-latent statistics on the selection part, arrays of length d_sae."""

    rate_a: np.ndarray
    rate_b: np.ndarray
    mean_a: np.ndarray
    mean_b: np.ndarray
    support_a: np.ndarray  # images of A where the latent fires
    support_b: np.ndarray
    auroc: np.ndarray  # A (positive) vs B; stratified when strata are given
    dense: np.ndarray  # bool: fires on >= dense_rate of both groups (never a candidate)
    tested: np.ndarray  # bool: in the BH family
    p_value: np.ndarray  # two-sided; NaN when not tested
    q_value: np.ndarray  # BH over the tested latents; NaN when not tested
    permutations: np.ndarray  # draws behind each p-value (0 when not tested)

    def columns(self) -> dict[str, np.ndarray]:
        return {"latent": np.arange(len(self.auroc)), **asdict(self)}


def firing_stats(
    scores_NS: np.ndarray, in_a_N: np.ndarray, fire_threshold: float
) -> dict[str, np.ndarray]:
    """Rates, means and support (images where the latent fires) of every latent per group."""
    fires_NS = scores_NS > fire_threshold
    support_a, support_b = fires_NS[in_a_N].sum(axis=0), fires_NS[~in_a_N].sum(axis=0)
    return {
        "rate_a": support_a / in_a_N.sum(),
        "rate_b": support_b / (~in_a_N).sum(),
        "mean_a": scores_NS[in_a_N].mean(axis=0),
        "mean_b": scores_NS[~in_a_N].mean(axis=0),
        "support_a": support_a,
        "support_b": support_b,
    }


def specificity(table: LatentTable, group: str) -> np.ndarray:
    return table.auroc if group == "a" else 1.0 - table.auroc


def rank_by_specificity(table: LatentTable, group: str, rule: RankingRule) -> np.ndarray:
    """Eligible latents for `group` ('a' or 'b'), most specific first (ties: larger rate gap)."""
    spec_S = specificity(table, group)
    own, other = (table.rate_a, table.rate_b) if group == "a" else (table.rate_b, table.rate_a)
    eligible_S = (own >= rule.min_support) & (spec_S >= rule.min_auroc) & ~table.dense
    latents = np.flatnonzero(eligible_S)
    order = np.lexsort((-(own - other)[latents], -spec_S[latents]))
    return latents[order][: rule.n_candidates]


# ----------------------------------------------------------------------------- candidates


@dataclass
class CandidateStats:
    """Everything the statistics say about one candidate (selection part unless `confirm_`)."""

    latent: int
    group: str  # "a" | "b": the group it is specific to
    auroc: float
    specificity: float
    rate_a: float
    rate_b: float
    mean_a: float
    mean_b: float
    support: int
    p_value: float | None
    q_value: float | None
    discovery: bool | None  # q <= alpha
    permutations: int
    confirm_auroc: float | None = None
    confirm_p_value: float | None = None
    confirm_q_value: float | None = None
    confirmed: bool | None = None
    auroc_unstratified: float | None = None
    strata_auroc: dict[str, float] | None = None


def _optional(value: Any) -> Any:
    """NumPy scalars to Python; NaN to None (JSON null)."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


def candidate_stats(table: LatentTable, latent: int, group: str, alpha: float) -> CandidateStats:
    q = _optional(table.q_value[latent])
    return CandidateStats(
        latent=int(latent),
        group=group,
        auroc=float(table.auroc[latent]),
        specificity=float(specificity(table, group)[latent]),
        rate_a=float(table.rate_a[latent]),
        rate_b=float(table.rate_b[latent]),
        mean_a=float(table.mean_a[latent]),
        mean_b=float(table.mean_b[latent]),
        support=int((table.support_a if group == "a" else table.support_b)[latent]),
        p_value=_optional(table.p_value[latent]),
        q_value=q,
        discovery=None if q is None else bool(q <= alpha),
        permutations=int(table.permutations[latent]),
    )


def add_strata_aurocs(
    candidates: list[CandidateStats],
    scores_NS: np.ndarray,
    in_a_N: np.ndarray,
    strata_N: np.ndarray,
) -> None:
    """Each candidate's AUROC ignoring strata, and within every stratum holding both groups."""
    if not candidates:
        return
    latents = np.array([c.latent for c in candidates])
    pooled_C = auroc_per_column(scores_NS[:, latents], in_a_N)
    labels = np.asarray(strata_N).astype(str)
    per_stratum = {}
    for label in np.unique(labels):
        rows = labels == label
        if in_a_N[rows].any() and (~in_a_N[rows]).any():
            per_stratum[str(label)] = auroc_per_column(scores_NS[rows][:, latents], in_a_N[rows])
    for j, cand in enumerate(candidates):
        cand.auroc_unstratified = float(pooled_C[j])
        cand.strata_auroc = {label: float(au[j]) for label, au in per_stratum.items()}
