"""Is a proposed direction grounded in a localised trait? Best-class AP on masked patches, the
yield of a ranking of proposals, its bootstrap over images and its permutation null.

A direction is *grounded* when its patch scores rank the patches of some mask class well:
best-class AP = max over classes of the AP of its scores against that class's patch labels
(`core.precision.average_precision_columns`, sklearn's AP, ties as one threshold) is >= tau.
Yield(B) = (grounded directions among the top B proposals) / B; a ranking shorter than B
counts its missing proposals as not grounded.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from traitsae.evaluation.core.precision import average_precision_columns

# Patch scores held at once while grounding every direction (float32).
_SCORE_BYTES = 512 * 2**20


def best_class_ap(
    scores_RM: np.ndarray | torch.Tensor, labels_RC: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(best AP [M], its class index [M]) over the classes with labelled patches; a direction
    whose classes have no labelled patch gets AP 0."""
    scores_RM = np.asarray(scores_RM, dtype=np.float32)
    ap_MC = np.stack(
        [average_precision_columns(scores_RM[:, j], labels_RC) for j in range(scores_RM.shape[1])]
    )
    ap_MC = np.nan_to_num(ap_MC, nan=-1.0)  # NaN: a class without labelled patches
    best_C = ap_MC.argmax(axis=1)
    return np.maximum(ap_MC[np.arange(len(best_C)), best_C], 0.0), best_C


@torch.no_grad()
def patch_scores(
    scorer: Callable[[torch.Tensor], torch.Tensor],
    acts_RD: torch.Tensor,
    columns: np.ndarray | None,
    device: str,
    chunk: int = 8192,
) -> torch.Tensor:
    """float32 [R, M] scores of every patch (only `columns` when given), encoded in chunks."""
    parts = []
    for lo in range(0, acts_RD.shape[0], chunk):
        s_rM = scorer(acts_RD[lo : lo + chunk].to(device)).float()
        parts.append((s_rM if columns is None else s_rM[:, torch.as_tensor(columns)]).cpu())
    return torch.cat(parts)


def ground_all(
    scorer: Callable[[torch.Tensor], torch.Tensor],
    n_directions: int,
    acts_RD: torch.Tensor,
    labels_RC: np.ndarray,
    device: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Best-class AP and class of every direction, in blocks of directions that fit memory."""
    block = max(1, _SCORE_BYTES // (4 * max(1, acts_RD.shape[0])))
    ap_M = np.empty(n_directions)
    cls_M = np.empty(n_directions, dtype=np.int64)
    for lo in range(0, n_directions, block):
        columns = None if block >= n_directions else np.arange(lo, min(lo + block, n_directions))
        scores = patch_scores(scorer, acts_RD, columns, device)
        ap_M[lo : lo + scores.shape[1]], cls_M[lo : lo + scores.shape[1]] = best_class_ap(
            scores, labels_RC
        )
    return ap_M, cls_M


def yield_curve(ranking: np.ndarray, grounded_S: np.ndarray, budgets: list[int]) -> np.ndarray:
    """Yield(B) for each budget: grounded directions among the first B of `ranking`, over B."""
    hits = np.cumsum(grounded_S[np.asarray(ranking, dtype=np.int64)])
    return np.array([(hits[min(b, len(hits)) - 1] if len(hits) else 0) / b for b in budgets])


def yield_auc(yields_B: np.ndarray, budgets: list[int]) -> float:
    """Area under Yield(B) over the budgets, divided by their range (the mean with one budget)."""
    if len(budgets) == 1:
        return float(yields_B[0])
    return float(np.trapezoid(yields_B, budgets) / (budgets[-1] - budgets[0]))


class RankedPatches:
    """Directions' patch rankings, sorted once, for the AP of each against its own class under
    patch weights.

    With integer weights (how often the bootstrap drew each patch's image) the AP equals
    `best_class_ap`'s on the resampled rows, without re-sorting them: a positive scores the
    weighted precision at the last patch of its tie group. Only two passes over all patches
    remain per call (the weights in rank order and their running sum); the rest runs over the
    positives, a few per cent of the patches.
    """

    def __init__(self, scores_RB: torch.Tensor, labels_RC: np.ndarray, classes_B: np.ndarray):
        s_BR, self.order_BR = torch.sort(scores_RB.T.float(), dim=1, descending=True, stable=True)
        n_dirs, n_rows = s_BR.shape
        is_end_BR = torch.ones_like(s_BR, dtype=torch.bool)
        is_end_BR[:, :-1] = s_BR[:, 1:] != s_BR[:, :-1]
        ends_BR = torch.where(is_end_BR, torch.arange(n_rows), n_rows)
        ends_BR = ends_BR.flip(1).cummin(1).values.flip(1)
        labels_BR = torch.from_numpy(np.asarray(labels_RC, dtype=bool)[:, classes_B].T.copy())
        positive_BR = torch.gather(labels_BR, 1, self.order_BR)
        # Ranks of each direction's positives, padded (mask False) to the longest list.
        n_pos_B = positive_BR.sum(1)
        width = max(1, int(n_pos_B.max()))
        rank_BR = torch.arange(n_rows).expand(n_dirs, n_rows)
        key_BR = torch.where(positive_BR, rank_BR, n_rows + rank_BR)
        self.pos_BP = key_BR.sort(dim=1).values[:, :width].clamp_max(n_rows - 1)
        self.mask_BP = torch.arange(width)[None] < n_pos_B[:, None]
        self.end_BP = torch.gather(ends_BR, 1, self.pos_BP)
        # The last positive at or before each positive's group end: its running count is the
        # number of positives retrieved with that group.
        last_BP = torch.searchsorted(
            torch.where(self.mask_BP, self.pos_BP, n_rows).contiguous(),
            self.end_BP.contiguous(),
            right=True,
        )
        self.last_BP = (last_BP - 1).clamp_min(0)

    def ap(self, weights_R: torch.Tensor) -> np.ndarray:
        """AP [B] of every direction against its class, with these patch weights."""
        # float32: integer weights and their sums stay exact below 2^24 patches.
        w_BR = weights_R.to(torch.float32)[self.order_BR]
        seen_BR = w_BR.cumsum(1)
        w_BP = torch.gather(w_BR, 1, self.pos_BP) * self.mask_BP
        hits_BP = torch.gather(w_BP.cumsum(1), 1, self.last_BP)
        prec_BP = hits_BP / torch.gather(seen_BR, 1, self.end_BP).clamp_min(1e-12)
        n_pos_B = w_BP.sum(1)
        ap_B = (w_BP * prec_BP).sum(1) / n_pos_B.clamp_min(1e-12)
        return torch.where(n_pos_B > 0, ap_B, 0.0).numpy()


def bootstrap_yields(
    scores_RB: torch.Tensor,
    labels_RC: np.ndarray,
    classes_B: np.ndarray,
    patches_per_image: int,
    budgets: list[int],
    tau: float,
    n_boot: int,
    seed: int,
    level: float,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Percentile CIs of Yield(B) [B] (low, high) and of its AUC, resampling the audited images.

    scores_RB: patch scores of the top proposals in ranking order (image after image, each
    `patches_per_image` rows); the proposals stay fixed, and so does each one's best class on
    all audited images (`classes_B`): a resample re-measures the AP against that class.
    """
    n_images = scores_RB.shape[0] // patches_per_image
    ranked = RankedPatches(scores_RB, labels_RC, classes_B)
    rng = np.random.default_rng(seed)
    order = np.arange(scores_RB.shape[1])
    yields_bB, aucs_b = [], []
    for _ in range(n_boot):
        draws_N = np.bincount(rng.integers(0, n_images, size=n_images), minlength=n_images)
        weights_R = torch.from_numpy(np.repeat(draws_N, patches_per_image))
        yields_B = yield_curve(order, ranked.ap(weights_R) >= tau, budgets)
        yields_bB.append(yields_B)
        aucs_b.append(yield_auc(yields_B, budgets))
    alpha = (1 - level) / 2
    low_B, high_B = np.quantile(np.array(yields_bB), [alpha, 1 - alpha], axis=0)
    auc_low, auc_high = np.quantile(aucs_b, [alpha, 1 - alpha])
    return low_B, high_B, (float(auc_low), float(auc_high))


def permute_within(y_N: np.ndarray, codes_N: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The labels shuffled within each stratum (codes: one int per stratum)."""
    out = y_N.copy()
    for code in np.unique(codes_N):
        at = np.flatnonzero(codes_N == code)
        out[at] = y_N[rng.permutation(at)]
    return out


def permutation_pvalue(observed: tuple[float, float], null: list[tuple[float, float]]) -> float:
    """One-sided p = (1 + #{null >= observed}) / (1 + draws), comparing (yield AUC, mean AP of the
    top proposals) lexicographically: the AP breaks the ties a yield (a count) has."""
    return (1 + sum(draw >= observed for draw in null)) / (1 + len(null))
