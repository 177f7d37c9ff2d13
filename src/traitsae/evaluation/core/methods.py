"""Image-level scores of many directions, streamed from a store in one pass.

A *method* turns token activations [R, D] into per-token scores [R, M] (SAE codes, or
projections on directions); the image score is the max (or mean) over the image's tokens.
Invalid images (unreadable at extraction, rows zero-filled) are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core.tokens import iter_valid_tokens
from traitsae.sae.export import RawSpaceSAE

TokenScorer = Callable[[torch.Tensor], torch.Tensor]  # [R, D] float32 -> [R, M]
POOLS = ("max", "mean")  # an image's score from its tokens' scores: `eval.pool` everywhere
# Per-block working set of the widest method, [B, P, M] float32; bounds memory whatever M is.
BLOCK_BUDGET_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Method:
    name: str
    scorer: TokenScorer
    n_directions: int
    pool: str = "max"


def linear_scorer(directions_MD: torch.Tensor, bias_M: torch.Tensor | None = None) -> TokenScorer:
    """Projection on M directions: x @ U^T (+ b)."""
    u_DM = directions_MD.to(torch.float32).T.contiguous()

    def score(x_RD: torch.Tensor) -> torch.Tensor:
        s_RM = x_RD @ u_DM
        return s_RM if bias_M is None else s_RM + bias_M

    return score


def sae_scorer(sae: RawSpaceSAE) -> TokenScorer:
    """SAE codes (>= 0) of raw activations."""

    def score(x_RD: torch.Tensor) -> torch.Tensor:
        return sae.encode(x_RD)

    return score


def check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise TraitsaeError(f"eval.pool must be one of {POOLS}, got {pool!r}.")


def pool_tokens(s_BPM: torch.Tensor, pool: str) -> torch.Tensor:
    """[B, P, M] -> [B, M]."""
    return s_BPM.amax(dim=1) if pool == "max" else s_BPM.mean(dim=1)


def valid_rows(store: Store) -> np.ndarray:
    """Indices of the store's valid images (store order)."""
    return np.flatnonzero(np.asarray(store.metadata["valid"], dtype=bool))


def tokens_per_image(store: Store, tokens: str) -> int:
    return 1 if tokens == "cls" else int(store.n_patches)


def images_per_block(store: Store, tokens: str, widest: int) -> int:
    per_image = tokens_per_image(store, tokens) * max(widest, store.d_model) * 4
    return max(1, min(1024, BLOCK_BUDGET_BYTES // per_image))


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
            out[name][filled : filled + n_b] = pool_tokens(s_BPM, method.pool).cpu().numpy()
        rows[filled : filled + n_b] = rows_B
        filled += n_b
    return out, rows
