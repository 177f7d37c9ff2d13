"""eval=dictionary's scores that need the true codes (which feature fires on which vector):
MCC, F1, absorption by firing and splitting, streamed over the store's first `truth_vectors`
vectors (quality/dictionary.py has the definitions)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

SPLIT_COS = 0.5
SPLIT_PRECISION = 0.9
ABSORBED_RECALL = 0.5


def true_codes(truth: dict, lo: int, hi: int, n_features: int) -> torch.Tensor:
    """The true codes [hi - lo, F] of vectors lo..hi from the store's CSR."""
    indptr, indices, values = truth["codes_indptr"], truth["codes_indices"], truth["codes_values"]
    true_NF = torch.zeros(hi - lo, n_features)
    a, b = int(indptr[lo]), int(indptr[hi])
    rows = np.repeat(np.arange(hi - lo), np.diff(indptr[lo : hi + 1]))
    true_NF[rows, indices[a:b]] = torch.from_numpy(values[a:b])
    return true_NF


class CodeStreams:
    """Running sums over the scored vectors, all [F] / [S] / [F, S] float64."""

    def __init__(self, cos_FS: torch.Tensor, parents_F: torch.Tensor) -> None:
        F, S = cos_FS.shape
        self.n = 0
        self.parents_F = parents_F
        self.match_S = cos_FS.abs().argmax(0)  # SynthSAEBench: feature of each latent
        self.parent_latent_F = cos_FS.argmax(1)  # best latent of each feature
        self.split_cand_FS = cos_FS > SPLIT_COS
        self.sum_t = torch.zeros(F, dtype=torch.float64)
        self.sum_tt = torch.zeros(F, dtype=torch.float64)
        self.sum_c = torch.zeros(S, dtype=torch.float64)
        self.sum_cc = torch.zeros(S, dtype=torch.float64)
        self.sum_tc = torch.zeros(F, S, dtype=torch.float64)
        self.tp_S = torch.zeros(S, dtype=torch.float64)
        self.fires_S = torch.zeros(S, dtype=torch.float64)
        self.active_F = torch.zeros(F, dtype=torch.float64)
        self.fires_with_FS = torch.zeros(F, S, dtype=torch.float64)  # latent fires & feature on
        # absorption: parent latent firing with child c on / parent alone
        self.parent_hits_F = torch.zeros(F, dtype=torch.float64)
        self.alone_F = torch.zeros(F, dtype=torch.float64)
        self.alone_hits_F = torch.zeros(F, dtype=torch.float64)
        self.true_active_sum = 0.0

    def update(self, true_NF: torch.Tensor, codes_NS: torch.Tensor) -> None:
        t, c = true_NF.double(), codes_NS.double()
        on_NF, fires_NS = true_NF > 0, codes_NS > 0
        self.n += t.shape[0]
        self.sum_t += t.sum(0)
        self.sum_tt += t.pow(2).sum(0)
        self.sum_c += c.sum(0)
        self.sum_cc += c.pow(2).sum(0)
        self.sum_tc += t.T @ c
        self.tp_S += (fires_NS & on_NF[:, self.match_S]).sum(0)
        self.fires_S += fires_NS.sum(0)
        self.active_F += on_NF.sum(0)
        self.fires_with_FS += on_NF.double().T @ fires_NS.double()
        self.true_active_sum += float(on_NF.sum())
        # per feature f: does the latent matched to f's parent fire (child pairs)?
        child = self.parents_F >= 0
        parent_fires_NF = fires_NS[:, self.parent_latent_F[self.parents_F.clamp_min(0)]]
        self.parent_hits_F[child] += (on_NF & parent_fires_NF)[:, child].sum(0).double()
        # per parent p: vectors where p is on and none of its children is
        n_kids_on = torch.zeros(on_NF.shape[0], on_NF.shape[1], dtype=torch.int64)
        n_kids_on.index_add_(1, self.parents_F[child], on_NF[:, child].long())
        alone_NF = on_NF & (n_kids_on == 0)
        own_fires_NF = fires_NS[:, self.parent_latent_F]
        self.alone_F += alone_NF.sum(0)
        self.alone_hits_F += (alone_NF & own_fires_NF).sum(0)

    def true_l0(self) -> float:
        return self.true_active_sum / max(self.n, 1)

    def mcc(self) -> float:
        n = max(self.n, 1)
        cov_FS = self.sum_tc / n - torch.outer(self.sum_t / n, self.sum_c / n)
        sd_F = (self.sum_tt / n - (self.sum_t / n) ** 2).clamp_min(0).sqrt()
        sd_S = (self.sum_cc / n - (self.sum_c / n) ** 2).clamp_min(0).sqrt()
        denom = torch.outer(sd_F, sd_S)
        corr_FS = torch.where(denom > 0, cov_FS / denom.clamp_min(1e-300), torch.zeros_like(cov_FS))
        rows, cols = linear_sum_assignment(corr_FS.numpy(), maximize=True)
        matched = np.zeros(corr_FS.shape[0])  # features left unmatched (F > S) score 0
        matched[rows] = corr_FS.numpy()[rows, cols]
        return float(matched.mean())

    def f1(self) -> float:
        positives_S = self.active_F[self.match_S]
        precision = torch.where(self.fires_S > 0, self.tp_S / self.fires_S.clamp_min(1), 0.0)
        recall = torch.where(positives_S > 0, self.tp_S / positives_S.clamp_min(1), 0.0)
        total = precision + recall
        f1_S = torch.where(total > 0, 2 * precision * recall / total.clamp_min(1e-300), 0.0)
        return float(f1_S.mean())

    def absorption(self, min_support: int) -> dict[str, int]:
        child = torch.nonzero(self.parents_F >= 0).squeeze(1)
        parent = self.parents_F[child]
        ok = (self.active_F[child] >= min_support) & (self.alone_F[parent] >= min_support)
        recall_child = self.parent_hits_F[child] / self.active_F[child].clamp_min(1)
        recall_alone = self.alone_hits_F[parent] / self.alone_F[parent].clamp_min(1)
        absorbed = ok & (recall_alone >= ABSORBED_RECALL) & (recall_child < ABSORBED_RECALL)
        return {"absorption": int(absorbed.sum()), "absorption_pairs": int(ok.sum())}

    def splitting(self, min_support: int) -> dict[str, int]:
        parents = torch.unique(self.parents_F[self.parents_F >= 0])
        precision_FS = self.fires_with_FS / self.fires_S.clamp_min(1)
        split = 0
        supported = parents[self.active_F[parents] >= min_support]
        for p in supported.tolist():
            detectors = self.split_cand_FS[p] & (precision_FS[p] >= SPLIT_PRECISION)
            split += int(detectors.sum() >= 2)
        return {"splitting": split, "split_parents": int(supported.numel())}
