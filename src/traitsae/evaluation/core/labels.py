"""Image labels and captions, and the label entropy of a latent's top images (the CLIP-SAE
write-up's density-figure colour).

Plain numpy, kept apart from the torch modules so the explorer can open its
Latents page without loading torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def image_labels(metadata: Mapping[str, np.ndarray]) -> np.ndarray:
    """Class of every store image for label entropy: `label` where the dataset has classes,
    else the finest taxon column (species, subspecies) as integer codes; -1 = no label."""
    labels_N = np.asarray(metadata["label"], dtype=np.int64)
    if (labels_N >= 0).any():
        return labels_N
    column = caption_column(metadata)
    if column is None:
        return labels_N
    _, codes_N = np.unique(np.asarray(metadata[column]).astype(str), return_inverse=True)
    return codes_N.astype(np.int64)


def label_entropy(labels_SK: np.ndarray, weights_SK: np.ndarray) -> np.ndarray:
    """Entropy (bits) of each row's label distribution, each entry weighted by its weight.

    Rows are latents, entries their top images; entries with label -1 or weight <= 0 do not
    count. A row with nothing left gets NaN (a latent that never fires has no top images).
    """
    labels_SK = np.asarray(labels_SK, dtype=np.int64)
    w_SK = np.where(labels_SK >= 0, np.clip(np.asarray(weights_SK, dtype=np.float64), 0, None), 0)
    order_SK = np.argsort(labels_SK, axis=1, kind="stable")
    labels_SK = np.take_along_axis(labels_SK, order_SK, axis=1)
    w_SK = np.take_along_axis(w_SK, order_SK, axis=1)
    # Equal labels are now adjacent: number the runs and add up each run's weight.
    new_run_SK = np.ones(labels_SK.shape, dtype=bool)
    new_run_SK[:, 1:] = labels_SK[:, 1:] != labels_SK[:, :-1]
    run_SK = np.cumsum(new_run_SK, axis=1) - 1
    mass_SK = np.zeros(labels_SK.shape)
    np.add.at(mass_SK, (np.arange(len(labels_SK))[:, None], run_SK), w_SK)
    total_S = mass_SK.sum(axis=1)
    p_SK = mass_SK / np.where(total_S > 0, total_S, 1.0)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy_S = -np.where(p_SK > 0, p_SK * np.log2(p_SK), 0.0).sum(axis=1)
    return np.where(total_S > 0, entropy_S + 0.0, np.nan)  # + 0.0: no -0.0


def top_image_summary(
    values_SK: np.ndarray, rows_SK: np.ndarray, labels_N: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(mean score of the top images, label entropy of the top images) per latent.

    `values_SK`/`rows_SK`: each latent's top image scores and store rows (-1 = empty slot);
    only images where the latent fires (score > 0) count. NaN for a latent that never fires.
    """
    values_SK = np.asarray(values_SK, dtype=np.float64)
    fired_SK = (values_SK > 0) & (rows_SK >= 0)
    n_S = fired_SK.sum(axis=1)
    with np.errstate(invalid="ignore"):
        mean_S = np.where(fired_SK, values_SK, 0.0).sum(axis=1) / n_S
    labels_SK = np.where(fired_SK, np.asarray(labels_N)[np.clip(rows_SK, 0, None)], -1)
    return np.where(n_S > 0, mean_S, np.nan), label_entropy(labels_SK, values_SK * fired_SK)


def caption_column(metadata: Mapping[str, np.ndarray]) -> str | None:
    """The metadata column that names an image best in a caption (finest taxon present)."""
    return next((c for c in ("subspecies", "species") if c in metadata), None)
