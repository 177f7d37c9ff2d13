"""Directions an SAE must beat: random, PCA, k-means, the SAE's own initialisation; logistic fits.

All are fit on the training split: PCA and k-means on a random sample of token activations.
`untrained_sae` is the trained SAE's architecture at initialisation (random tied unit rows, b_dec
from the data, the same TopK/ReLU/JumpReLU and normaliser): "random directions through the same
encoder", so "beats random" and "training helped" are separate questions.
`fit_logistic` solves many independent L2 logistic regressions at once (mean-pooled probes here,
the patch-level probes of `trait_probes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans
from sklearn.decomposition import PCA

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.foreground import patch_keep, pool_tokens
from traitsae.evaluation.core.tokens import iter_valid_tokens, tokens_per_image, valid_rows
from traitsae.sae.export import RawSpaceSAE
from traitsae.sae.model import build_sae


@dataclass(frozen=True)
class TrainSample:
    tokens_SD: np.ndarray  # [S, D] float32, token activations sampled uniformly over valid images
    pooled_ND: np.ndarray  # [N_valid, D] float32, mean over each valid image's tokens
    rows_N: np.ndarray  # [N_valid] store rows of pooled_ND


@torch.no_grad()
def sample_train_activations(
    store: Store, layer: int, tokens: str, n_samples: int, seed: int, block: int = 64
) -> TrainSample:
    """One pass over the store: a uniform token sample and every valid image's mean activation
    (both over the pooled patches only when `store.patch_mask` is set: eval.patches)."""
    rows_V = valid_rows(store)
    if rows_V.size == 0:
        raise TraitsaeError(f"store {store.path} has no valid images to fit the baselines on.")
    if store.patch_mask is None or tokens == "cls":
        total = rows_V.size * tokens_per_image(store, tokens)
    else:
        total = int(store.patch_mask[rows_V].sum())
    rate = min(1.0, n_samples / total)
    rng = np.random.default_rng(seed)
    samples, pooled, rows = [], [], []
    for rows_B, acts_BPD in iter_valid_tokens(store, layer, tokens, block):
        keep_BP = patch_keep(store, rows_B) if tokens != "cls" else None
        flat_RD = acts_BPD.reshape(-1, acts_BPD.shape[-1])
        # Bernoulli thinning per block keeps the sample uniform without knowing all rows upfront.
        keep_R = rng.random(flat_RD.shape[0]) < rate
        if keep_BP is not None:
            keep_R &= keep_BP.reshape(-1).numpy()
        samples.append(flat_RD[torch.from_numpy(keep_R)].numpy())
        pooled.append(pool_tokens(acts_BPD, "mean", keep_BP).numpy())
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
    if n_clusters > tokens_SD.shape[0]:
        raise TraitsaeError(
            f"eval.kmeans_clusters={n_clusters} exceeds the {tokens_SD.shape[0]} sampled tokens; "
            "lower it or raise eval.n_samples."
        )
    # One k-means++ start per call: eval.seeds repeats the fit, and k-means++ on 1024 centroids
    # was most of a demo run's time with three starts.
    km = MiniBatchKMeans(n_clusters=n_clusters, random_state=seed, n_init=1, batch_size=4096)
    return km.fit(tokens_SD).cluster_centers_.astype(np.float32)


def untrained_sae(sae: RawSpaceSAE, tokens_SD: np.ndarray, seed: int) -> RawSpaceSAE:
    """`sae`'s architecture as training starts it, drawn with `seed`, in raw activation space.

    Same variant, width, k and normaliser scale; tied random unit rows (the model's own init);
    b_dec from the token sample by the run's own `sae.b_dec_init` rule (mean for runs that
    record none), as training sets it from its sample.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init = build_sae(**sae.sae.architecture())
    rule = ((sae.meta.get("config") or {}).get("sae") or {}).get("b_dec_init", "mean")
    x_SD = torch.from_numpy(np.asarray(tokens_SD, dtype=np.float32)) * float(sae.scale)
    init.init_b_dec(x_SD, str(rule))
    device = sae.sae.W_enc.device
    return RawSpaceSAE(init.to(device), sae.scale, {**sae.meta, "untrained_seed": seed}).eval()
