"""Evidence on the candidates beyond the selection part: one-sided permutation re-tests on
held-out images (confirmation here, replication in replicates.py), their BH over every
contrast's candidates together, and the per-group verdict sentences."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from traitsae.evaluation.core.ranks import comparable_pairs
from traitsae.evaluation.discovery.null import (
    GROUPS,
    NullOptions,
    bh_qvalues,
    permutation_test,
    smallest_p,
)
from traitsae.evaluation.discovery.ranking import CandidateStats, LatentTable


def directional_test(
    scores_NC: np.ndarray,
    in_a_N: np.ndarray,
    codes_N: np.ndarray,
    sign_C: np.ndarray,
    null: NullOptions,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """AUROC of every column and a one-sided permutation p in its direction (sign +1: A
    higher); p is NaN without a null (n_permutations=0)."""
    t_C, p_C, _ = permutation_test(
        scores_NC, in_a_N, codes_N, null, rng, sign_S=sign_C, progress=False
    )
    return 0.5 + t_C / comparable_pairs(in_a_N, codes_N), p_C


def direction(candidates: Sequence[CandidateStats]) -> np.ndarray:
    """+1 for candidates specific to A, -1 for B: the sign of a one-sided re-test."""
    return np.array([1.0 if c.group == "a" else -1.0 for c in candidates])


def confirm_candidates(
    candidates: list[CandidateStats],
    scores_NS: np.ndarray,
    in_a_N: np.ndarray,
    codes_N: np.ndarray,
    null: NullOptions,
    rng: np.random.Generator,
) -> None:
    """AUROC on the held-out images and a one-sided permutation p in the candidate's
    direction; the q-values come from `confirm_fdr` over every contrast's candidates."""
    if not candidates:
        return
    held_NC = scores_NS[:, [c.latent for c in candidates]]
    auroc_C, p_C = directional_test(held_NC, in_a_N, codes_N, direction(candidates), null, rng)
    for cand, auroc, p in zip(candidates, auroc_C, p_C, strict=True):
        cand.confirm_auroc = float(auroc)
        if null.n_permutations:
            cand.confirm_p_value = float(p)


def confirm_fdr(candidates: Sequence[CandidateStats], alpha: float) -> None:
    """BH over the confirmation p-values of all candidates (of every contrast): a family chosen
    without looking at the held-out images; `confirmed` when q <= alpha."""
    tested = [c for c in candidates if c.confirm_p_value is not None]
    q_C = bh_qvalues(np.array([c.confirm_p_value for c in tested]))
    for cand, q in zip(tested, q_C, strict=True):
        cand.confirm_q_value = float(q)
        cand.confirmed = bool(q <= alpha)


def verdicts(
    table: LatentTable,
    candidates: list[CandidateStats],
    null: NullOptions,
    in_a_N: np.ndarray,
    codes_N: np.ndarray,
    family: int | None = None,
    n_contrasts: int = 1,
) -> tuple[dict[str, int], dict[str, str]]:
    """Discoveries per group among all tested latents, and one sentence per group saying so
    (and, when there are none, whether these group sizes allowed any). `family`: the tests BH
    ran over (default this contrast's tested latents; more when contrasts share one FDR)."""
    n_tested = int(table.tested.sum())
    family = n_tested if family is None else family
    joint = (
        f" (BH over all {family} tests of the {n_contrasts} contrasts together)"
        if n_contrasts > 1
        else ""
    )
    significant_S = table.tested & (np.nan_to_num(table.q_value, nan=1.0) <= null.alpha)
    counts = {
        "a": int((significant_S & (table.auroc > 0.5)).sum()),
        "b": int((significant_S & (table.auroc < 0.5)).sum()),
    }
    floor = smallest_p(in_a_N, codes_N, null.max_permutations)
    needed = math.ceil(floor * family / null.alpha - 1e-9)
    limit = (
        f" With these group sizes and {null.max_permutations:,} permutations no p-value can be "
        f"below {floor:.2g}, so at least {needed} {'tests' if n_contrasts > 1 else 'latents'} "
        "would have to reach it together for "
        f"any q to be <= {null.alpha}."
        if needed > 1
        else ""
    )
    words = {}
    for g in GROUPS:
        if null.n_permutations == 0:
            words[g] = "No permutation null was run (eval.n_permutations=0): no p-values."
        elif counts[g]:
            shown = sum(bool(c.discovery) for c in candidates if c.group == g)
            rest = counts[g] - shown
            words[g] = (
                f"{counts[g]} of {n_tested} tested latents are discoveries specific to group "
                f"{g.upper()} (q <= {null.alpha}{joint}); {shown} of them pass the candidate filters"
                + (
                    f", {rest} are dense, rare or below eval.min_auroc (latents.csv)."
                    if rest
                    else "."
                )
            )
        else:
            words[g] = (
                f"No discoveries: none of the {n_tested} tested latents is specific to group "
                f"{g.upper()} at q <= {null.alpha}{joint}." + limit
            )
    return counts, words


def strata_cells(
    strata_N: np.ndarray, in_a_N: np.ndarray, held_N: np.ndarray
) -> list[dict[str, Any]]:
    """Images of each group per stratum (selection part); `compared`: holds both groups."""
    labels_N = np.asarray(strata_N).astype(str)
    cells = []
    for label in np.unique(labels_N):
        rows = (labels_N == label) & ~held_N
        n_a, n_b = int((rows & in_a_N).sum()), int((rows & ~in_a_N).sum())
        cells.append({"stratum": str(label), "n_a": n_a, "n_b": n_b, "compared": n_a * n_b > 0})
    return cells
