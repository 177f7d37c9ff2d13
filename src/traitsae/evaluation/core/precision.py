"""precision@k of every direction for every trait at once, plus AP, selection and bootstrap CIs.

precision@k(t, j) = fraction of the k images that direction j scores highest which carry trait t.
The research notes compute it with one argsort per (direction, trait); here it is, per block of
directions, one top-k and one matrix product with the label matrix:

    w[j, n] = 1 if image n is in direction j's top k, else 0        # [M, N]
    prec[j, t] = (w @ labels)[j, t] / k                             # [M, T]

Ties at the k-th score are shared fairly: an image tied at the threshold gets weight
(k - #strictly above) / #tied, i.e. the expected precision under a random tie-break. Sparse SAE
latents are zero on most images, so without this a latent that fires on fewer than k images
would score whatever the sort order of its zeros happens to be.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from traitsae.errors import TraitsaeError


def check_k(ks: Sequence[int], n_images: int, what: str = "the evaluation split") -> list[int]:
    """Validate the k list against the number of images; returns it sorted and deduplicated."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise TraitsaeError(f"eval.k must be a non-empty list of positive integers, got {ks}.")
    if ks[-1] > n_images:
        raise TraitsaeError(
            f"eval.k={ks} asks for the top {ks[-1]} images but {what} has only {n_images} valid "
            f"images; pass smaller values, e.g. eval.k=[{min(10, n_images)}]."
        )
    return ks


def usable_ks(ks: Sequence[int], n_images: int, what: str) -> tuple[list[int], list[str]]:
    """The k values a split of `n_images` can rank, and one line per k it cannot (skipped).

    A default like k=[10, 50, 100] must not stop a run on a small split: k above the split's size
    is dropped with a message; only when no k is left is it an error.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise TraitsaeError(f"eval.k must be a non-empty list of positive integers, got {ks}.")
    kept = [k for k in ks if k <= n_images]
    notes = [
        f"eval.k: skipping k={k}: {what} has only {n_images} valid images"
        for k in ks
        if k > n_images
    ]
    if not kept:
        raise TraitsaeError(
            f"eval.k={ks}: every k exceeds the {n_images} valid images of {what}; pass smaller "
            f"values, e.g. eval.k=[{min(10, n_images)}]."
        )
    return kept, notes


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def precision_at_k(
    scores_NM: np.ndarray | torch.Tensor,
    labels_NT: np.ndarray | torch.Tensor,
    ks: Sequence[int],
    block: int = 2048,
    traits_for_k: np.ndarray | None = None,
) -> dict[int, np.ndarray]:
    """precision@k for all M directions x T traits, for every k in `ks`.

    scores_NM: image scores [N images, M directions]; labels_NT: 0/1 trait labels [N, T].
    Returns {k: precision [M, T] float32}. With `traits_for_k` (a k per trait, [T]) each k is
    computed only for its own traits: {k: [M, T_k]} (see precision_at_trait_k).
    Peak extra memory is a few [block, N] float32 arrays.
    """
    scores_NM = _as_tensor(scores_NM)
    labels_NT = _as_tensor(labels_NT).to(torch.float32)
    n_images, n_dirs = scores_NM.shape
    if labels_NT.shape[0] != n_images:
        raise TraitsaeError(
            f"scores have {n_images} images but labels have {labels_NT.shape[0]} rows; "
            "they must be aligned image by image."
        )
    ks = check_k(ks, n_images)
    columns = {
        k: slice(None)
        if traits_for_k is None
        else torch.from_numpy(np.flatnonzero(traits_for_k == k))
        for k in ks
    }
    labels_by_k = {k: labels_NT[:, cols] for k, cols in columns.items()}
    out = {k: np.empty((n_dirs, lab.shape[1]), dtype=np.float32) for k, lab in labels_by_k.items()}
    # One more than k_max, to see whether the k-th score is tied with the next one.
    n_top = min(ks[-1] + 1, n_images)
    for start in range(0, n_dirs, block):
        # Directions as rows, so topk and the comparisons run along contiguous memory.
        s_BN = scores_NM[:, start : start + block].T.to(torch.float32).contiguous()
        top_BK, idx_BK = torch.topk(s_BN, n_top, dim=1, sorted=True)  # descending
        # NaN and +inf sort to the top, so checking the top scores catches them.
        if not torch.isfinite(top_BK[:, 0]).all():
            raise TraitsaeError(
                f"non-finite image scores in directions {start}..{start + s_BN.shape[0] - 1}; "
                "the SAE or the store produced NaN/inf activations."
            )
        for k in ks:
            weights_BN = _topk_weights(s_BN, top_BK, idx_BK, k)
            out[k][start : start + s_BN.shape[0]] = (weights_BN @ labels_by_k[k] / k).numpy()
    return out


def _topk_weights(
    s_BN: torch.Tensor, top_BK: torch.Tensor, idx_BK: torch.Tensor, k: int
) -> torch.Tensor:
    """Membership weights [B, N] of each row's top k; ties at the threshold share the last slots."""
    weights_BN = torch.zeros_like(s_BN).scatter_(1, idx_BK[:, :k], 1.0)
    if k == s_BN.shape[1]:
        return weights_BN  # every image is in the top k: no threshold to tie at
    # Rows whose k-th score equals the (k+1)-th have a tie across the cut: share it fairly
    # (cheap for continuous scores, where there are none).
    rows = torch.nonzero(top_BK[:, k] == top_BK[:, k - 1]).flatten()
    if rows.numel():
        s_RN, kth_R = s_BN[rows], top_BK[rows, k - 1, None]
        tied_RN = s_RN == kth_R
        n_above_R = (s_RN > kth_R).sum(1)
        share_R = (k - n_above_R).to(torch.float32) / tied_RN.sum(1).to(torch.float32)
        weights_BN[rows] = torch.where(tied_RN, share_R[:, None], (s_RN > kth_R).to(torch.float32))
    return weights_BN


def precision_at_trait_k(
    scores_NM: np.ndarray | torch.Tensor,
    labels_NT: np.ndarray | torch.Tensor,
    k_T: Sequence[int] | np.ndarray,
    block: int = 2048,
) -> np.ndarray:
    """precision at a per-trait k [M, T]; with k_T = n_pos_T this is R-precision.

    R-precision (precision at k = the trait's number of positives) never asks for more positives
    than exist, so it does not saturate the way a fixed k does on rare traits. Traits sharing a k
    are computed together (one top-k weight matrix per distinct k and block).
    """
    k_T = np.asarray(k_T, dtype=np.int64)
    labels_NT = _as_tensor(labels_NT).to(torch.float32)
    if k_T.shape != (labels_NT.shape[1],) or (k_T < 1).any():
        raise TraitsaeError(
            f"per-trait k must be one positive integer per trait ({labels_NT.shape[1]}), got {k_T}."
        )
    out_MT = np.empty((_as_tensor(scores_NM).shape[1], k_T.size), dtype=np.float32)
    distinct = np.unique(k_T)
    prec = precision_at_k(scores_NM, labels_NT, distinct.tolist(), block, traits_for_k=k_T)
    for k in distinct:
        out_MT[:, k_T == k] = prec[int(k)]
    return out_MT


def precision_at_k_loop(scores_NM: np.ndarray, labels_NT: np.ndarray, k: int) -> np.ndarray:
    """The research notes' reference: one argsort per direction and trait. Slow; tests/benchmarks."""
    n_dirs, n_traits = scores_NM.shape[1], labels_NT.shape[1]
    prec_MT = np.empty((n_dirs, n_traits), dtype=np.float32)
    for t in range(n_traits):
        y_true = labels_NT[:, t]
        for j in range(n_dirs):
            topk = np.argsort(scores_NM[:, j])[-k:]
            prec_MT[j, t] = y_true[topk].mean()
    return prec_MT


def select_best(prec_MT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best direction per trait (first on ties) and its precision: ([T] int64, [T] float32)."""
    best_T = prec_MT.argmax(axis=0)
    return best_T, prec_MT[best_T, np.arange(prec_MT.shape[1])]


def average_precision_columns(scores_N: np.ndarray, labels_NT: np.ndarray) -> np.ndarray:
    """AP of one ranking for several traits at once, [T]; equals sklearn's (ties grouped).

    AP = sum over distinct score thresholds of (recall gain) x (precision at the threshold).
    NaN for traits without positives.
    """
    order_N = np.argsort(-np.asarray(scores_N), kind="stable")
    s_N = np.asarray(scores_N)[order_N]
    tp_NT = np.cumsum(np.asarray(labels_NT, dtype=np.float64)[order_N], axis=0)
    ends_G = np.flatnonzero(np.r_[s_N[1:] != s_N[:-1], True])  # last row of each tie group
    tp_GT = tp_NT[ends_G]
    prec_GT = tp_GT / (ends_G + 1)[:, None]
    gain_GT = np.diff(tp_GT, axis=0, prepend=0.0)
    n_pos_T = tp_GT[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pos_T > 0, (gain_GT * prec_GT).sum(0) / n_pos_T, np.nan)


def average_precision_pairs(
    scores_NM: np.ndarray, labels_NT: np.ndarray, dirs_P: np.ndarray, traits_P: np.ndarray
) -> np.ndarray:
    """AP of (direction, trait) pairs, [P]; one sort per distinct direction."""
    ap_P = np.empty(len(dirs_P), dtype=np.float64)
    dirs_P, traits_P = np.asarray(dirs_P), np.asarray(traits_P)
    for j in np.unique(dirs_P):
        at = np.flatnonzero(dirs_P == j)
        ap_P[at] = average_precision_columns(scores_NM[:, j], labels_NT[:, traits_P[at]])
    return ap_P


def bootstrap_ci(
    values_T: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over traits (traits resampled with replacement)."""
    values_T = np.asarray(values_T, dtype=np.float64)
    if values_T.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx_BT = rng.integers(0, values_T.size, size=(n_boot, values_T.size))
    means_B = values_T[idx_BT].mean(axis=1)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(means_B, [alpha, 1.0 - alpha])
    return float(low), float(high)


def paired_difference(
    a_U: np.ndarray, b_U: np.ndarray, n_boot: int, seed: int, level: float, unit: str
) -> dict[str, Any]:
    """Mean of a - b over paired units (traits, classes: their difficulty cancels) with a
    percentile bootstrap CI over the units; units where either side is NaN are left out."""
    diff_U = np.asarray(a_U, dtype=np.float64) - np.asarray(b_U, dtype=np.float64)
    diff_U = diff_U[np.isfinite(diff_U)]
    low, high = bootstrap_ci(diff_U, n_boot, seed, level)
    return {
        "sae_minus_method": float(diff_U.mean()) if diff_U.size else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "excludes_zero": bool(low > 0 or high < 0),
        f"n_{unit}": int(diff_U.size),
    }


def units_with_positives(
    pos_train_U: np.ndarray, pos_test_U: np.ndarray, positives: str
) -> tuple[np.ndarray, dict[int, dict[str, Any]]]:
    """Units (traits, classes) with `positives` in both splits -> (keep_U, skipped), skipped
    mapping each other unit to its counts and the reason, reported instead of averaged in as
    NaNs."""
    skipped = {
        int(u): {
            "n_pos_train": int(pos_train_U[u]),
            "n_pos_test": int(pos_test_U[u]),
            "reason": f"no {positives} in the "
            + " and ".join(
                s for s, n in (("train", pos_train_U[u]), ("test", pos_test_U[u])) if n == 0
            )
            + " split",
        }
        for u in np.flatnonzero((pos_train_U == 0) | (pos_test_U == 0))
    }
    keep_U = np.ones(len(pos_train_U), dtype=bool)
    keep_U[list(skipped)] = False
    return keep_U, skipped
