"""Within-stratum ranks: the Mann-Whitney statistics behind every AUROC of discovery and audit.

An AUROC inside strata compares only images of the same stratum (sum_s U_s / sum_s n_a,s n_b,s),
so a latent that separates collections but not the groups within them scores 0.5.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def stratum_codes(strata_N: np.ndarray | None, n_images: int) -> np.ndarray:
    """int [N]: one code per distinct stratum label (all 0 without strata)."""
    if strata_N is None:
        return np.zeros(n_images, dtype=np.int64)
    return np.unique(np.asarray(strata_N).astype(str), return_inverse=True)[1].reshape(-1)


def centred_ranks(scores_NS: np.ndarray, codes_N: np.ndarray) -> np.ndarray:
    """float64 [N, S]: each column's average ranks within each stratum, minus the stratum's mean
    rank. Summed over the images of A they give sum_s (U_s - n_a,s * n_b,s / 2)."""

    ranks_NS = np.empty(scores_NS.shape, dtype=np.float64)
    for code in np.unique(codes_N):
        rows = codes_N == code
        ranks_NS[rows] = rankdata(scores_NS[rows], axis=0, method="average") - (rows.sum() + 1) / 2
    return ranks_NS


def comparable_pairs(in_a_N: np.ndarray, codes_N: np.ndarray) -> int:
    """sum_s n_a,s * n_b,s: the (A, B) image pairs that share a stratum."""
    n_a = np.bincount(codes_N[in_a_N], minlength=codes_N.max() + 1)
    n_b = np.bincount(codes_N[~in_a_N], minlength=codes_N.max() + 1)
    return int((n_a * n_b).sum())
