"""Patch-level metrics of many directions x classes at once (eval=segments).

Inputs are a score matrix `scores_RM` (R patches x M directions: SAE latents, projections) and
binary patch labels `labels_RC` (R x C classes). Every function returns an [M, C] matrix, computed
in blocks of directions so the working memory stays within `budget` bytes.

- average precision: AP = sum over positives of the precision at that positive's score, divided
  by the number of positives; patches tied at a score count as one threshold (as sklearn).
- purity@k: the fraction of the k highest-scoring patches that belong to the class (ties at the
  k-th score share the remaining places: `precision.precision_at_k` over patches).
- coverage@tau: with the activation a = max(s, 0) (an SAE latent's own value; for a centred
  projection, its positive part), the direction *fires strongly* on a patch when
  a >= tau * max a and a > 0; coverage is the fraction of the class's patches where it does.
- 1-D logistic probes p = sigmoid(a + b z), z the direction's standardised score, one per
  (direction, class), all fitted together by Newton's method (`fit_probes_1d`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from traitsae.evaluation.core.precision import precision_at_k

BUDGET_BYTES = 256 * 2**20


def _tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(torch.float32)


def _block(n_rows: int, per_row_bytes: int, budget: int, n_dirs: int) -> int:
    return max(1, min(n_dirs, budget // max(1, n_rows * per_row_bytes)))


@torch.no_grad()
def average_precision(
    scores_RM: np.ndarray | torch.Tensor,
    labels_RC: np.ndarray | torch.Tensor,
    budget: int = BUDGET_BYTES,
) -> np.ndarray:
    """AP of every direction for every class, [M, C] float64 (NaN for a class without positives).

    Per direction: sort the patches by score; precision at each patch is tp / rank; a positive
    scores the precision at the *last* patch of its tie group (everything tied with it is
    retrieved together), summed and divided by the class's positives.
    """
    scores_RM, labels_RC = _tensor(scores_RM), _tensor(labels_RC)
    n_rows, n_dirs = scores_RM.shape
    n_classes = labels_RC.shape[1]
    n_pos_C = labels_RC.sum(0).to(torch.float64)
    rank_R = torch.arange(1, n_rows + 1, dtype=torch.float64)
    out_MC = np.empty((n_dirs, n_classes), dtype=np.float64)
    block = _block(n_rows, n_classes * 8 * 4 + 32, budget, n_dirs)
    for start in range(0, n_dirs, block):
        s_BR = scores_RM[:, start : start + block].T
        s_BR, order_BR = torch.sort(s_BR, dim=1, descending=True, stable=True)
        y_BRC = labels_RC[order_BR].to(torch.float64)
        prec_BRC = y_BRC.cumsum(1) / rank_R[None, :, None]
        is_end_BR = torch.ones_like(s_BR, dtype=torch.bool)
        is_end_BR[:, :-1] = s_BR[:, 1:] != s_BR[:, :-1]
        # Index of the last patch of each patch's tie group: a reversed running minimum.
        ends_BR = torch.where(is_end_BR, torch.arange(n_rows), n_rows)
        ends_BR = ends_BR.flip(1).cummin(1).values.flip(1)
        prec_end_BRC = torch.gather(prec_BRC, 1, ends_BR[:, :, None].expand_as(prec_BRC))
        ap_BC = (y_BRC * prec_end_BRC).sum(1) / n_pos_C
        out_MC[start : start + s_BR.shape[0]] = ap_BC.numpy()
    out_MC[:, (n_pos_C == 0).numpy()] = np.nan
    return out_MC


def purity_at_k(
    scores_RM: np.ndarray | torch.Tensor, labels_RC: np.ndarray | torch.Tensor, k: int
) -> np.ndarray:
    """Fraction of each direction's top-k patches in each class, [M, C] (ties shared fairly)."""
    return precision_at_k(scores_RM, labels_RC, [k])[k]


@torch.no_grad()
def coverage_at_tau(
    scores_RM: np.ndarray | torch.Tensor,
    labels_RC: np.ndarray | torch.Tensor,
    tau: float,
    budget: int = BUDGET_BYTES,
) -> np.ndarray:
    """Fraction of each class's patches where each direction fires strongly, [M, C] float64.

    Strongly = a >= tau * max(a) and a > 0 with a = max(s, 0), max over the R patches: for an
    SAE latent `activation >= tau x its max`. A direction that is never positive fires nowhere.
    """
    scores_RM, labels_RC = _tensor(scores_RM), _tensor(labels_RC)
    n_rows, n_dirs = scores_RM.shape
    n_pos_C = labels_RC.sum(0).to(torch.float64)
    out_MC = np.empty((n_dirs, labels_RC.shape[1]), dtype=np.float64)
    block = _block(n_rows, 12, budget, n_dirs)
    for start in range(0, n_dirs, block):
        s_RB = scores_RM[:, start : start + block]
        act_RB = s_RB.clamp_min(0)
        fires_RB = (act_RB >= tau * act_RB.max(0).values) & (act_RB > 0)
        hits_BC = fires_RB.to(torch.float64).T @ labels_RC.to(torch.float64)
        out_MC[start : start + s_RB.shape[1]] = (hits_BC / n_pos_C).numpy()
    out_MC[:, (n_pos_C == 0).numpy()] = np.nan
    return out_MC


# ----------------------------------------------------------------------------- 1-D probes


@dataclass(frozen=True)
class Probes1D:
    """p(class c | patch) = sigmoid(intercept[j, c] + slope[j, c] * (s_j - mean[j]) / std[j])."""

    intercept_MC: torch.Tensor  # float64
    slope_MC: torch.Tensor  # float64
    mean_M: torch.Tensor
    std_M: torch.Tensor

    def pair_logits(self, dirs_C: np.ndarray, scores_RC: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Logits [R, C] of the probe of (direction dirs_C[c], class c) on scores_RC[:, c], the
        scores of direction dirs_C[c]."""
        j_C = torch.as_tensor(np.asarray(dirs_C), dtype=torch.long)
        c_C = torch.arange(len(j_C))
        z_RC = (_tensor(scores_RC) - self.mean_M[j_C]) / self.std_M[j_C]
        return self.intercept_MC[j_C, c_C] + self.slope_MC[j_C, c_C] * z_RC.to(torch.float64)


def _standardise(s_RB: torch.Tensor, mean_B: torch.Tensor, std_B: torch.Tensor) -> torch.Tensor:
    return (s_RB - mean_B) / std_B


@torch.no_grad()
def fit_probes_1d(
    scores_RM: np.ndarray | torch.Tensor,
    labels_RC: np.ndarray | torch.Tensor,
    l2: float = 1e-4,
    steps: int = 12,
    max_step: float = 5.0,
    budget: int = BUDGET_BYTES,
) -> Probes1D:
    """One logistic regression on one standardised feature per (direction, class), jointly.

    Minimises mean_r BCE(a + b z_r, y_r) + (l2 / 2) b^2 per pair (the intercept is not
    penalised; z = (s - mean) / std, the population std over the R patches, 1 for a constant
    direction) with `steps` Newton steps from the base rate (a = logit of the class frequency,
    b = 0), each step's components clipped to +-max_step. A step that raises a pair's objective
    (near-separable classes, where the Hessian vanishes) is halved instead of taken, so the
    objective never increases; the last candidate is checked too. Strictly convex for l2 > 0;
    equals sklearn's LogisticRegression(C = 1 / (l2 R)) on z.
    """
    scores_RM, y_RC = _tensor(scores_RM), _tensor(labels_RC)
    n_rows, n_dirs = scores_RM.shape
    n_classes = y_RC.shape[1]
    mean_M = scores_RM.mean(0)
    std_M = scores_RM.std(0, correction=0)
    std_M = torch.where(std_M > 0, std_M, torch.ones_like(std_M))
    rate_C = y_RC.mean(0).clamp(1e-6, 1 - 1e-6).to(torch.float64)
    intercept_MC = torch.log(rate_C / (1 - rate_C)).expand(n_dirs, n_classes).clone()
    slope_MC = torch.zeros(n_dirs, n_classes, dtype=torch.float64)
    # Working set per (patch, direction): a handful of [.., C] float64 arrays.
    chunk = max(1, budget // max(1, min(n_dirs, 256) * n_classes * 8 * 6))
    y_RC = y_RC.to(torch.float64)
    for start in range(0, n_dirs, 256):
        sl = slice(start, start + 256)
        z_RB = _standardise(scores_RM[:, sl], mean_M[sl], std_M[sl])
        a_BC, b_BC = intercept_MC[sl], slope_MC[sl]
        best = (a_BC, b_BC, torch.full_like(a_BC, torch.inf))  # last accepted (a, b, objective)
        step_a = step_b = torch.zeros_like(a_BC)
        for i in range(steps + 1):
            loss, g_a, g_b, h_aa, h_ab, h_bb = _newton_sums(z_RB, y_RC, a_BC, b_BC, chunk)
            objective = loss / n_rows + 0.5 * l2 * b_BC**2
            # float32 sums carry ~1e-7 relative noise: only a clear rise counts as worse.
            worse = objective > best[2] + 1e-6 * best[2].abs().clamp_max(1e30) + 1e-9
            # Worse pairs retry half their step from the accepted point; the others move on.
            best = tuple(
                torch.where(worse, old, new)
                for old, new in zip(best, (a_BC, b_BC, objective), strict=True)
            )
            if i == steps:
                break
            g_a, g_b = g_a / n_rows, g_b / n_rows + l2 * b_BC
            h_aa, h_ab, h_bb = h_aa / n_rows, h_ab / n_rows, h_bb / n_rows + l2
            det = (h_aa * h_bb - h_ab**2).clamp_min(1e-300)
            new_a = ((h_bb * g_a - h_ab * g_b) / det).clamp(-max_step, max_step)
            new_b = ((h_aa * g_b - h_ab * g_a) / det).clamp(-max_step, max_step)
            step_a = torch.where(worse, 0.5 * step_a, new_a)
            step_b = torch.where(worse, 0.5 * step_b, new_b)
            a_BC, b_BC = best[0] - step_a, best[1] - step_b
        intercept_MC[sl], slope_MC[sl] = best[0], best[1]
    return Probes1D(intercept_MC, slope_MC, mean_M, std_M)


def _newton_sums(
    z_RB: torch.Tensor, y_RC: torch.Tensor, a_BC: torch.Tensor, b_BC: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, ...]:
    """BCE, gradient and Hessian sums over patches (un-normalised), each [B, C] float64.

    Elementwise work in float32 (the [r, B, C] tensors dominate the cost), sums in float64.
    """
    sums = [torch.zeros_like(a_BC) for _ in range(6)]
    a32_BC, b32_BC = a_BC.float(), b_BC.float()
    for lo in range(0, z_RB.shape[0], chunk):
        z_rB = z_RB[lo : lo + chunk].float()
        logit_rBC = torch.addcmul(a32_BC, b32_BC, z_rB[:, :, None])
        y_rC = y_RC[lo : lo + chunk, None, :].float()
        bce_BC = (F.softplus(logit_rBC) - y_rC * logit_rBC).sum(0)
        p_rBC = torch.sigmoid(logit_rBC)
        resid_rBC = p_rBC - y_rC
        w_rBC = p_rBC.sub_(p_rBC * p_rBC)  # p (1 - p), in place of p
        zz_rB = z_rB * z_rB
        terms = (
            bce_BC,
            resid_rBC.sum(0),
            torch.einsum("rbc,rb->bc", resid_rBC, z_rB),
            w_rBC.sum(0),
            torch.einsum("rbc,rb->bc", w_rBC, z_rB),
            torch.einsum("rbc,rb->bc", w_rBC, zz_rB),
        )
        for acc, term in zip(sums, terms, strict=True):
            acc += term.double()
    return tuple(sums)


@torch.no_grad()
def probe_loss(
    probes: Probes1D,
    scores_RM: np.ndarray | torch.Tensor,
    labels_RC: np.ndarray | torch.Tensor,
    budget: int = BUDGET_BYTES,
) -> np.ndarray:
    """Mean BCE (no penalty) of every probe on these patches, [M, C] float64."""
    scores_RM, y_RC = _tensor(scores_RM), _tensor(labels_RC).to(torch.float64)
    n_rows, n_dirs = scores_RM.shape
    n_classes = y_RC.shape[1]
    out_MC = np.empty((n_dirs, n_classes), dtype=np.float64)
    chunk = max(1, budget // max(1, min(n_dirs, 256) * n_classes * 8 * 3))
    for start in range(0, n_dirs, 256):
        sl = slice(start, start + 256)
        z_RB = _standardise(scores_RM[:, sl], probes.mean_M[sl], probes.std_M[sl])
        total_BC = torch.zeros_like(probes.intercept_MC[sl])
        for lo in range(0, n_rows, chunk):
            logits_rBC = probes.intercept_MC[sl] + probes.slope_MC[sl] * z_RB[
                lo : lo + chunk, :, None
            ].to(torch.float64)
            y_rBC = y_RC[lo : lo + chunk, None, :].expand_as(logits_rBC)
            total_BC += F.binary_cross_entropy_with_logits(logits_rBC, y_rBC, reduction="none").sum(
                0
            )
        out_MC[sl] = (total_BC / n_rows).numpy()
    return out_MC
