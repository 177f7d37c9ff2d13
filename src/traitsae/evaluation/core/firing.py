"""Per-latent firing over a store in one streaming pass: counts, a running top-k of images, and
the density figure (log frequency vs mean top score, coloured by label entropy).

Memory O(k x d_sae), never the n_images x d_sae matrix. Shared by eval=features (galleries,
latents.csv), eval=health (the density figure) and the explorer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from traitsae.data.store import Store
from traitsae.errors import TraitsaeError
from traitsae.evaluation.core import figures
from traitsae.evaluation.core.figures import plt
from traitsae.evaluation.core.foreground import patch_keep, pool_tokens
from traitsae.evaluation.core.labels import image_labels, top_image_summary
from traitsae.evaluation.core.tokens import stream_codes
from traitsae.sae.export import RawSpaceSAE


class RunningTopK:
    """Per-column top-k of a stream of [B, S] score batches, with the row id of each value."""

    def __init__(self, n_columns: int, k: int) -> None:
        if k < 1:
            raise TraitsaeError(f"eval.top_k must be >= 1, got {k}.")
        self.k = k
        self.values_KS = torch.full((k, n_columns), -torch.inf)
        self.rows_KS = torch.full((k, n_columns), -1, dtype=torch.int64)

    def update(self, scores_BS: torch.Tensor, rows_B: np.ndarray) -> None:
        rows_BS = torch.as_tensor(rows_B, dtype=torch.int64)[:, None].expand_as(scores_BS)
        values_CS = torch.cat([self.values_KS, scores_BS.float().cpu()])  # C = k + B
        rows_CS = torch.cat([self.rows_KS, rows_BS])
        self.values_KS, pick_KS = values_CS.topk(min(self.k, len(values_CS)), dim=0)
        self.rows_KS = rows_CS.gather(0, pick_KS)

    def top(self, column: int, positive_only: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(rows, values) of one column, best first; unfilled slots (and zeros) dropped."""
        values_K = self.values_KS[:, column].numpy()
        rows_K = self.rows_KS[:, column].numpy()
        keep_K = (values_K > 0) if positive_only else (rows_K >= 0)
        return rows_K[keep_K], values_K[keep_K]


@dataclass
class FiringStats:
    """Counts over one pass; frequencies are per patch (as in training logs) and per image."""

    patch_fires_S: np.ndarray
    image_fires_S: np.ndarray
    image_max_sum_S: np.ndarray
    image_max_S: np.ndarray
    n_patches: int
    n_images: int

    @property
    def patch_freq(self) -> np.ndarray:
        return self.patch_fires_S / max(1, self.n_patches)

    @property
    def image_freq(self) -> np.ndarray:
        return self.image_fires_S / max(1, self.n_images)

    @property
    def mean_image_max(self) -> np.ndarray:
        return self.image_max_sum_S / max(1, self.n_images)


def scan(
    store: Store,
    sae: RawSpaceSAE,
    top_k: int,
    *,
    batch_patches: int = 4096,
    device: str = "cpu",
    pool: str = "max",
) -> tuple[FiringStats, RunningTopK]:
    """The streaming pass: firing counts and per-latent top-k images."""
    d_sae = int(sae.d_sae)
    topk = RunningTopK(d_sae, top_k)
    patch_fires_S = torch.zeros(d_sae, dtype=torch.int64)
    image_fires_S = torch.zeros(d_sae, dtype=torch.int64)
    max_sum_S = torch.zeros(d_sae, dtype=torch.float64)
    max_S = torch.zeros(d_sae)
    n_patches = n_images = 0
    batches = stream_codes(
        store, sae, batch_patches=batch_patches, device=device, desc="latent statistics"
    )
    for batch in batches:
        codes_BPS = batch.codes_BPS.cpu()
        keep_BP = patch_keep(store, batch.image_index)  # eval.patches: None = every patch
        pooled_BS = pool_tokens(codes_BPS, pool, keep_BP)
        if keep_BP is not None:  # firing frequencies over the pooled patches too
            codes_BPS = codes_BPS * keep_BP[:, :, None]
        patch_fires_S += torch.count_nonzero(codes_BPS, dim=(0, 1))
        image_fires_S += (pooled_BS > 0).sum(dim=0)
        max_sum_S += pooled_BS.sum(dim=0, dtype=torch.float64)
        max_S = torch.maximum(max_S, pooled_BS.amax(dim=0))
        topk.update(pooled_BS, batch.image_index)
        n_patches += codes_BPS[:, :, 0].numel() if keep_BP is None else int(keep_BP.sum())
        n_images += codes_BPS.shape[0]
    if n_images == 0:
        raise TraitsaeError(f"store {store.path} has no valid image to scan.")
    stats = FiringStats(
        patch_fires_S.numpy(),
        image_fires_S.numpy(),
        max_sum_S.numpy(),
        max_S.numpy(),
        n_patches,
        n_images,
    )
    return stats, topk


def density_figure(
    patch_freq_S: np.ndarray, mean_top_S: np.ndarray, entropy_S: np.ndarray, title: str
):
    """log10 firing frequency vs log10 mean top-image score, coloured by label entropy.

    The CLIP-SAE write-up's view: an ultra-low-density cluster of high-entropy latents sits
    apart from the interpretable ones. Latents that never fire are left out (counted in the title).
    """

    alive_S = (patch_freq_S > 0) & (mean_top_S > 0)
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    points = ax.scatter(
        np.log10(patch_freq_S[alive_S]),
        np.log10(mean_top_S[alive_S]),
        c=entropy_S[alive_S],
        cmap="viridis",
        s=6,
        alpha=0.8,
        plotnonfinite=True,
    )
    fig.colorbar(points, ax=ax, label="label entropy of top images (bits)")
    ax.set_xlabel("log10 firing frequency (fraction of patches)")
    ax.set_ylabel("log10 mean score of top images")
    ax.set_title(f"{title} ({int((~alive_S).sum())} latents never fire)", fontsize=9)
    fig.tight_layout()
    return fig


def density_outputs(
    store: Store, stats: FiringStats, topk: RunningTopK, out_png: Path, title: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per-latent (mean top score, label entropy) of a scan, and the density figure."""

    mean_top_S, entropy_S = top_image_summary(
        topk.values_KS.numpy().T, topk.rows_KS.numpy().T, image_labels(store.metadata)
    )
    figures.save(density_figure(stats.patch_freq, mean_top_S, entropy_S, title), out_png)
    return mean_top_S, entropy_S
