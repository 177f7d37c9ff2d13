"""Directions an SAE must beat: random, PCA, k-means, the SAE's own initialisation; logistic fits.

All are fit on the training split: PCA and k-means on a random sample of token activations.
`untrained_sae` is the trained SAE's architecture at initialisation (random tied unit rows, b_dec
from the data, the same TopK/ReLU/JumpReLU and normaliser): "random directions through the same
encoder", so "beats random" and "training helped" are separate questions.
`fit_logistic` solves many independent L2 logistic regressions at once (mean-pooled probes here,
the patch-level probes of `trait_probes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from traitsae.errors import TraitsaeError
from traitsae.evaluation.encode import iter_valid_tokens
from traitsae.evaluation.scoring import tokens_per_image, valid_rows


@dataclass(frozen=True)
class TrainSample:
    tokens_SD: np.ndarray  # [S, D] float32, token activations sampled uniformly over valid images
    pooled_ND: np.ndarray  # [N_valid, D] float32, mean over each valid image's tokens
    rows_N: np.ndarray  # [N_valid] store rows of pooled_ND


@torch.no_grad()
def sample_train_activations(
    store, layer: int, tokens: str, n_samples: int, seed: int, block: int = 64
) -> TrainSample:
    """One pass over the store: a uniform token sample and every valid image's mean activation."""
    n_valid = valid_rows(store).size
    if n_valid == 0:
        raise TraitsaeError(f"store {store.path} has no valid images to fit the baselines on.")
    total = n_valid * tokens_per_image(store, tokens)
    rate = min(1.0, n_samples / total)
    rng = np.random.default_rng(seed)
    samples, pooled, rows = [], [], []
    for rows_B, acts_BPD in iter_valid_tokens(store, layer, tokens, block):
        flat_RD = acts_BPD.reshape(-1, acts_BPD.shape[-1])
        # Bernoulli thinning per block keeps the sample uniform without knowing all rows upfront.
        keep_R = rng.random(flat_RD.shape[0]) < rate
        samples.append(flat_RD[torch.from_numpy(keep_R)].numpy())
        pooled.append(acts_BPD.mean(dim=1).numpy())
        rows.append(rows_B)
    return TrainSample(np.concatenate(samples), np.concatenate(pooled), np.concatenate(rows))


def random_directions(d_model: int, n: int, seed: int) -> np.ndarray:
    """n unit vectors uniform on the sphere, [n, D]."""
    g = torch.Generator().manual_seed(seed)
    u_MD = torch.randn(n, d_model, generator=g)
    return (u_MD / u_MD.norm(dim=1, keepdim=True)).numpy()


def pca_directions(tokens_SD: np.ndarray, both_signs: bool = True, seed: int = 0) -> np.ndarray:
    """Principal axes of the token sample, [C, D] (C = min(S, D)), optionally also negated.

    A component's sign is arbitrary, and precision@k reads only the top of the ranking, so a
    trait aligned with -u would be invisible to u: both signs keep the baseline honest.
    """
    from sklearn.decomposition import PCA

    n_comp = min(tokens_SD.shape)
    if n_comp < 1:
        raise TraitsaeError(
            "the PCA baseline needs a non-empty token sample; raise eval.n_samples."
        )
    comps_CD = PCA(n_components=n_comp, random_state=seed).fit(tokens_SD).components_
    comps_CD = comps_CD.astype(np.float32)
    return np.concatenate([comps_CD, -comps_CD]) if both_signs else comps_CD


def kmeans_directions(tokens_SD: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """Mini-batch k-means centroids of the token sample, [C, D]."""
    from sklearn.cluster import MiniBatchKMeans

    if n_clusters > tokens_SD.shape[0]:
        raise TraitsaeError(
            f"eval.kmeans_clusters={n_clusters} exceeds the {tokens_SD.shape[0]} sampled tokens; "
            "lower it or raise eval.n_samples."
        )
    # One k-means++ start per call: eval.seeds repeats the fit, and k-means++ on 1024 centroids
    # was most of a demo run's time with three starts.
    km = MiniBatchKMeans(n_clusters=n_clusters, random_state=seed, n_init=1, batch_size=4096)
    return km.fit(tokens_SD).cluster_centers_.astype(np.float32)


def untrained_sae(sae: torch.nn.Module, tokens_SD: np.ndarray, seed: int) -> torch.nn.Module:
    """`sae`'s architecture as training starts it, drawn with `seed`, in raw activation space.

    Same variant, width, k and normaliser scale; tied random unit rows (the model's own init);
    b_dec from the token sample by the run's own `sae.b_dec_init` rule (mean for runs that
    record none), as training sets it from its sample.
    """
    from traitsae.sae.export import RawSpaceSAE
    from traitsae.sae.model import build_sae

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init = build_sae(**sae.sae.architecture())
    rule = ((sae.meta.get("config") or {}).get("sae") or {}).get("b_dec_init", "mean")
    x_SD = torch.from_numpy(np.asarray(tokens_SD, dtype=np.float32)) * float(sae.scale)
    init.init_b_dec(x_SD, str(rule))
    device = sae.sae.W_enc.device
    return RawSpaceSAE(init.to(device), sae.scale, {**sae.meta, "untrained_seed": seed}).eval()


def fit_logistic(
    z_ND: torch.Tensor,
    y_NC: torch.Tensor,
    l2_C: torch.Tensor,
    max_iter: int,
    mask_NC: torch.Tensor | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint L-BFGS fit of C independent L2 logistic regressions; returns (w [D, C], b [C]).

    z_ND holds features shared by all columns, or z_NCD one feature vector per image and column
    (the patch-level probes: each trait's own witness patch). mask_NC says which images each
    column is fit on (cross-fitting folds); `init` warm-starts (w, b).
    """
    n_cols = y_NC.shape[1]
    mask_NC = torch.ones_like(y_NC) if mask_NC is None else mask_NC.to(y_NC.dtype)
    n_fit_C = mask_NC.sum(0).clamp_min(1.0)
    if init is None:
        # Start at the base rate so traits with few positives do not begin far from optimum.
        rate_C = ((y_NC * mask_NC).sum(0) / n_fit_C).clamp(1e-4, 1 - 1e-4)
        init = (torch.zeros(z_ND.shape[-1], n_cols), torch.log(rate_C / (1 - rate_C)))
    w_DC = init[0].clone().requires_grad_(True)
    b_C = init[1].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w_DC, b_C], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        if z_ND.ndim == 2:
            logits_NC = z_ND @ w_DC + b_C
        else:
            logits_NC = torch.einsum("ncd,dc->nc", z_ND, w_DC) + b_C
        bce_NC = F.binary_cross_entropy_with_logits(logits_NC, y_NC, reduction="none")
        # Sum over columns of (mean BCE + l2 |w|^2): the columns' problems stay independent.
        loss = ((bce_NC * mask_NC).sum(0) / n_fit_C + l2_C * (w_DC**2).sum(0)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w_DC.detach(), b_C.detach()


def linear_probes(
    pooled_ND: np.ndarray,
    labels_NT: np.ndarray,
    l2: float | Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
    max_iter: int = 200,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """One L2-regularised logistic regression per trait, on raw pooled activations.

    The T problems are independent (the loss is a sum over traits), so they are solved jointly as
    one [D -> T] linear layer with L-BFGS: a few seconds instead of T separate sklearn fits.
    With several `l2` values, each trait gets the one with the lowest loss on a held-out
    `val_fraction` of the images (probes overfit small splits otherwise), then all are refit on
    every image. Features are standardised; the returned (W [T, D], b [T]) act on raw inputs.
    """
    x_ND = torch.from_numpy(np.asarray(pooled_ND, dtype=np.float32))
    y_NT = torch.from_numpy(np.asarray(labels_NT, dtype=np.float32))
    mu_D, sd_D = x_ND.mean(0), x_ND.std(0).clamp_min(1e-6)
    z_ND = (x_ND - mu_D) / sd_D
    grid = [float(v) for v in (l2 if isinstance(l2, Sequence) else [l2])]
    l2_T = torch.full((y_NT.shape[1],), grid[0])
    if len(grid) > 1:
        l2_T = _select_l2(z_ND, y_NT, grid, max_iter, val_fraction, seed)
    w_DT, b_T = fit_logistic(z_ND, y_NT, l2_T, max_iter)
    w_raw_DT = w_DT / sd_D[:, None]
    b_raw_T = b_T - mu_D @ w_raw_DT
    return w_raw_DT.T.contiguous().numpy(), b_raw_T.numpy()


def _select_l2(
    z_ND: torch.Tensor,
    y_NT: torch.Tensor,
    grid: list[float],
    max_iter: int,
    val_fraction: float,
    seed: int,
) -> torch.Tensor:
    """Per-trait L2 weight with the lowest held-out BCE, [T]."""
    perm_N = torch.randperm(z_ND.shape[0], generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(val_fraction * z_ND.shape[0])))
    val, fit = perm_N[:n_val], perm_N[n_val:]
    losses_LT = []
    for value in grid:
        w_DT, b_T = fit_logistic(
            z_ND[fit], y_NT[fit], torch.full((y_NT.shape[1],), value), max_iter
        )
        logits_VT = z_ND[val] @ w_DT + b_T
        losses_LT.append(
            F.binary_cross_entropy_with_logits(logits_VT, y_NT[val], reduction="none").mean(0)
        )
    return torch.tensor(grid)[torch.stack(losses_LT).argmin(0)]
