"""Patch-level logistic probes per trait: the supervised side of eval=cub_traits.

A direction's image score is the max over the image's patches of a linear score, so the probe for
trait t is trained the same way, as multiple-instance learning: image logit = max over patches of
w_t . x + b_t, fit to the image labels. It is solved by alternating (mi-SVM style, with logistic
loss) between picking each image's *witness* patch (its arg-max under the current probe) and
refitting the T logistic regressions on those witnesses, started from the mean-pooled probe.
Any max-pooled linear direction (random, PCA, k-means) is in this hypothesis class.

Every probe is fit K + 1 times: once per cross-fitting fold (on the other folds' images) and once on
all training images. The fold fits score the images they did not see, so a probe's precision on the
training split is measured out of sample, as honestly as an unsupervised direction's (which saw
no labels at all); cub_traits compares candidates on exactly that footing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from traitsae.data.store import Store
from traitsae.evaluation.core.directions import TrainSample
from traitsae.evaluation.core.foreground import patch_keep
from traitsae.evaluation.core.methods import Method, image_scores, iter_valid_tokens, linear_scorer
from traitsae.evaluation.core.probes import fit_logistic
from traitsae.evaluation.core.tokens import images_per_block

# Witness features [N, C, D] float32 are held for a chunk of columns at a time.
WITNESS_BUDGET_BYTES = 1 << 30


@dataclass(frozen=True)
class ProbeSet:
    """C = (n_folds + 1) x L x T probes in raw activation space; column c = (fit * L + l) * T + t."""

    w_CD: torch.Tensor
    b_C: torch.Tensor
    n_folds: int
    l2: list[float]
    n_traits: int
    fold_N: np.ndarray  # [N_train] fold of each valid training image (store order)

    def column(self, fit: int, l2_index: np.ndarray | int, trait: np.ndarray | int):
        return (fit * len(self.l2) + l2_index) * self.n_traits + trait

    def final_columns(self) -> np.ndarray:
        """Columns of the probes fit on every training image, [L * T] ordered (l2, trait)."""
        start = self.n_folds * len(self.l2) * self.n_traits
        return np.arange(start, start + len(self.l2) * self.n_traits)


@torch.no_grad()
def _witnesses(
    store: Store, layer: int, tokens: str, w_DC, b_C, mu_D, sd_D, desc: str
) -> torch.Tensor:
    """Each valid image's arg-max patch under every probe column, standardised: [N, C, D]."""
    n_cols = w_DC.shape[1]
    block = images_per_block(store, tokens, n_cols)
    parts = []
    for rows_B, acts_BPD in iter_valid_tokens(store, layer, tokens, block, desc=desc):
        z_BPD = (acts_BPD - mu_D) / sd_D
        s_BPC = z_BPD @ w_DC + b_C
        keep_BP = patch_keep(store, rows_B) if tokens != "cls" else None
        if keep_BP is not None:  # eval.patches=foreground: witnesses among those patches
            s_BPC = s_BPC.masked_fill(~keep_BP[:, :, None], -torch.inf)
        idx_BC = s_BPC.argmax(dim=1)
        parts.append(torch.gather(z_BPD, 1, idx_BC[..., None].expand(-1, -1, z_BPD.shape[-1])))
    return torch.cat(parts)


def fit_trait_probes(
    store: Store,
    layer: int,
    tokens: str,
    sample: TrainSample,
    labels_NT: np.ndarray,
    l2: Sequence[float],
    n_folds: int = 3,
    n_rounds: int = 3,
    max_iter: int = 100,
    seed: int = 0,
) -> ProbeSet:
    """Patch-level (max-pooled) logistic probes for every trait, L2 value and fit set."""
    n_images, n_traits = labels_NT.shape
    grid = [float(v) for v in l2]
    fold_N = np.random.default_rng([seed, 7]).permutation(n_images) % n_folds
    n_fits = n_folds + 1
    fit_C = np.repeat(np.arange(n_fits), len(grid) * n_traits)
    l2_C = np.tile(np.repeat(grid, n_traits), n_fits)
    trait_C = np.tile(np.arange(n_traits), n_fits * len(grid))
    # Fold fit f leaves out fold f's images; the last fit uses every image.
    member_NF = np.c_[fold_N[:, None] != np.arange(n_folds)[None], np.ones(n_images, bool)]

    tokens_SD = torch.from_numpy(sample.tokens_SD)
    mu_D, sd_D = tokens_SD.mean(0), tokens_SD.std(0).clamp_min(1e-6)
    pooled_ND = (torch.from_numpy(sample.pooled_ND) - mu_D) / sd_D
    labels = torch.from_numpy(np.asarray(labels_NT, dtype=np.float32))
    d_model = mu_D.numel()
    chunk = max(1, WITNESS_BUDGET_BYTES // (4 * d_model * max(n_images, 1)))
    w_parts, b_parts = [], []
    for start in range(0, fit_C.size, chunk):
        cols = slice(start, start + chunk)
        y_NC = labels[:, trait_C[cols]]
        mask_NC = torch.from_numpy(member_NF[:, fit_C[cols]])
        l2_c = torch.from_numpy(l2_C[cols].astype(np.float32))
        # Mean-pooled probe first: a sensible witness for round one.
        w_DC, b_C = fit_logistic(pooled_ND, y_NC, l2_c, max_iter, mask_NC)
        for r in range(n_rounds):
            desc = f"probe witnesses {r + 1}/{n_rounds}"
            z_NCD = _witnesses(store, layer, tokens, w_DC, b_C, mu_D, sd_D, desc)
            w_DC, b_C = fit_logistic(z_NCD, y_NC, l2_c, max_iter, mask_NC, init=(w_DC, b_C))
        w_parts.append(w_DC)
        b_parts.append(b_C)
    w_DC, b_C = torch.cat(w_parts, 1), torch.cat(b_parts)
    # Back to raw activations: w . (x - mu) / sd + b.
    w_raw_DC = w_DC / sd_D[:, None]
    b_raw_C = b_C - mu_D @ w_raw_DC
    return ProbeSet(w_raw_DC.T.contiguous(), b_raw_C, n_folds, grid, n_traits, fold_N)


def probe_scores(
    probes: ProbeSet,
    train_store: Store,
    test_store: Store,
    layer: int,
    tokens: str,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Image scores of the probes, scored exactly like every direction (max over patches).

    Returns (train [N_train, L*T] out of fold: each image scored by the fold fit that did not see
    it; test [N_test, L*T] by the fits on all training images), columns ordered (l2, trait).
    """
    scorer = linear_scorer(probes.w_CD.to(device), probes.b_C.to(device))
    method = {"probe": Method("probe", scorer, probes.w_CD.shape[0], "max")}
    all_train_NC = image_scores(train_store, layer, method, tokens, device, "probe (train)")[0]
    n_lt = len(probes.l2) * probes.n_traits
    oof_NX = np.empty((all_train_NC["probe"].shape[0], n_lt), dtype=np.float32)
    for f in range(probes.n_folds):
        rows = probes.fold_N == f
        oof_NX[rows] = all_train_NC["probe"][rows, f * n_lt : (f + 1) * n_lt]
    final = Method("probe", linear_scorer(*_final(probes, device)), n_lt, "max")
    test_NX = image_scores(test_store, layer, {"probe": final}, tokens, device, "probe (test)")[0]
    return oof_NX, test_NX["probe"]


def _final(probes: ProbeSet, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    cols = torch.from_numpy(probes.final_columns())
    return probes.w_CD[cols].to(device), probes.b_C[cols].to(device)
