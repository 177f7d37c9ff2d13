"""Within-stratum ranks for the `discovery` proposer: AUROCs of every class at once.

The same statistic as eval=discovery's (its `null` module); a task does not import another
task, so this small generic piece lives here until ranks move to the shared core.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def stratum_codes(labels_N: np.ndarray) -> np.ndarray:
    """int64 [N]: one code per distinct stratum label."""
    return np.unique(np.asarray(labels_N).astype(str), return_inverse=True)[1].reshape(-1)


def centred_ranks(scores_NS: np.ndarray, codes_N: np.ndarray) -> np.ndarray:
    """float64 [N, S]: average ranks of each column within each stratum, minus the stratum's
    mean rank; summed over a class's images they give sum_s (U_s - n_c,s * n_rest,s / 2)."""
    ranks_NS = np.empty(scores_NS.shape, dtype=np.float64)
    for code in np.unique(codes_N):
        rows = codes_N == code
        ranks_NS[rows] = rankdata(scores_NS[rows], axis=0, method="average") - (rows.sum() + 1) / 2
    return ranks_NS


def comparable_pairs(in_class_N: np.ndarray, codes_N: np.ndarray) -> int:
    """sum_s n_c,s * n_rest,s: the (class, rest) pairs of images that share a stratum."""
    n_in = np.bincount(codes_N[in_class_N], minlength=codes_N.max() + 1)
    n_out = np.bincount(codes_N[~in_class_N], minlength=codes_N.max() + 1)
    return int((n_in * n_out).sum())
