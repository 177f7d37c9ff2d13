"""The methods every trait evaluation compares, and their image-level scores in one pass.

A *method* turns token activations [R, D] into per-token scores [R, M] (SAE codes, or
projections on directions); the image score is the max (or mean, `eval.pool`) over the image's
tokens. Invalid images (unreadable at extraction, rows zero-filled) are skipped.

`baseline_methods` is the one menu of unsupervised baselines (the SAE at initialisation, random,
PCA and k-means directions) with one centring rule: a direction scores (x - centre) . u, the
centre being the mean training activation, as the SAE subtracts b_dec before encoding. Rankings
(precision, AP) do not depend on the shift; thresholds relative to a direction's maximum
(coverage@tau) do, and mean the same for every method this way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.directions import (
    kmeans_directions,
    pca_directions,
    random_directions,
    untrained_sae,
)
from traitsae.evaluation.core.foreground import patch_keep, pool_tokens
from traitsae.evaluation.core.tokens import images_per_block, iter_valid_tokens, valid_rows
from traitsae.sae.export import RawSpaceSAE

log = logging.getLogger(__name__)
TokenScorer = Callable[[torch.Tensor], torch.Tensor]  # [R, D] float32 -> [R, M]
POOLS = ("max", "mean")  # an image's score from its tokens' scores: `eval.pool` everywhere


@dataclass(frozen=True)
class Method:
    name: str
    scorer: TokenScorer
    n_directions: int
    pool: str = "max"
    per_class: bool = False  # direction c belongs to class c (a supervised probe per class)

    @torch.no_grad()
    def scores(self, acts_RD: torch.Tensor, device: str, chunk: int = 8192) -> torch.Tensor:
        """Token scores [R, M] (float32, CPU) of held activations, `chunk` rows at a time."""
        return torch.cat(
            [
                self.scorer(acts_RD[i : i + chunk].to(device)).float().cpu()
                for i in range(0, acts_RD.shape[0], chunk)
            ]
        )


def linear_scorer(
    directions_MD: torch.Tensor,
    bias_M: torch.Tensor | None = None,
    centre_D: torch.Tensor | None = None,
) -> TokenScorer:
    """Projection on M directions: x @ U^T (+ b), or (x - centre) @ U^T."""
    u_DM = directions_MD.to(torch.float32).T.contiguous()
    shift_M = None if centre_D is None else centre_D.to(u_DM) @ u_DM

    def score(x_RD: torch.Tensor) -> torch.Tensor:
        s_RM = x_RD @ u_DM
        if shift_M is not None:
            s_RM = s_RM - shift_M
        return s_RM if bias_M is None else s_RM + bias_M

    return score


BASELINES = ("sae_init", "random", "pca", "kmeans")


def baseline_methods(
    names: Sequence[str],
    sae: RawSpaceSAE,
    tokens_SD: np.ndarray,
    centre_D: torch.Tensor,
    seed: int,
    *,
    n_random: int | None,
    pca_both_signs: bool,
    kmeans_clusters: int,
    pool: str = "max",
    device: str = "cpu",
) -> dict[str, Method]:
    """The unsupervised baselines among `names` (in that order), fit on the token sample
    `tokens_SD` with `seed`; linear ones centred on `centre_D` (the module docstring's rule).
    `n_random` None: as many random directions as the SAE has latents."""
    d_model = tokens_SD.shape[1]
    methods: dict[str, Method] = {}

    def add_linear(name: str, dirs_MD: np.ndarray) -> None:
        u_MD = torch.from_numpy(np.ascontiguousarray(dirs_MD, dtype=np.float32)).to(device)
        scorer = linear_scorer(u_MD, centre_D=centre_D.to(device))
        methods[name] = Method(name, scorer, dirs_MD.shape[0], pool)

    for name in names:
        if name == "sae_init":
            init = untrained_sae(sae, tokens_SD, seed)
            methods[name] = Method(name, sae_scorer(init), sae.d_sae, pool)
        elif name == "random":
            add_linear(name, random_directions(d_model, n_random or sae.d_sae, seed))
        elif name == "pca":
            add_linear(name, pca_directions(tokens_SD, pca_both_signs, seed))
        elif name == "kmeans":
            log.info("fitting k-means: %d centroids on %d tokens", kmeans_clusters, len(tokens_SD))
            add_linear(name, kmeans_directions(tokens_SD, kmeans_clusters, seed))
    return methods


def sae_scorer(sae: RawSpaceSAE) -> TokenScorer:
    """SAE codes (>= 0) of raw activations."""

    def score(x_RD: torch.Tensor) -> torch.Tensor:
        return sae.encode(x_RD)

    return score


def check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise TraitsaeError(f"eval.pool must be one of {POOLS}, got {pool!r}.")


@torch.no_grad()
def image_scores(
    store: Store,
    layer: int,
    methods: Mapping[str, Method],
    tokens: str = "patches",
    device: str = "cpu",
    desc: str | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Scores [N_valid, M] per method, and the store rows they belong to ([N_valid])."""
    widest = max(m.n_directions for m in methods.values())
    block = images_per_block(store, tokens, widest)
    n_valid = valid_rows(store).size
    out = {
        name: np.empty((n_valid, m.n_directions), dtype=np.float32) for name, m in methods.items()
    }
    rows = np.empty(n_valid, dtype=np.int64)
    filled = 0
    for rows_B, acts_BPD in iter_valid_tokens(store, layer, tokens, block, device, desc=desc):
        n_b, n_p, d = acts_BPD.shape
        flat_RD = acts_BPD.reshape(n_b * n_p, d)
        for name, method in methods.items():
            s_BPM = method.scorer(flat_RD).reshape(n_b, n_p, -1)
            keep_BP = patch_keep(store, rows_B, s_BPM.device)  # eval.patches
            out[name][filled : filled + n_b] = (
                pool_tokens(s_BPM, method.pool, keep_BP).cpu().numpy()
            )
        rows[filled : filled + n_b] = rows_B
        filled += n_b
    return out, rows
