"""The image-level score index of one SAE x store, built once from the sparse codes and cached.

`codes.h5` (eval=encode) is CSR over patch rows. From it one pass builds, and caches on disk
under the session's cache dir, two views of the image-level scores (max over an image's patches,
or over its foreground patches only):
- image-major CSR (`img_*`): the latents firing on an image, for the Image / Search / Compare pages;
- latent-major CSC sorted by score (`lat_*`): a latent's images best first, so top images,
  frequencies and histograms are slices, not scans.
No torch at import (the launch stays torch-free): building the index imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_INDEX_ARRAYS = (
    "img_indptr",
    "img_latent",
    "img_score",
    "lat_indptr",
    "lat_image",
    "lat_score",
    "patch_fires",
)


@dataclass
class ImageIndex:
    """Image-level scores in both orders (see the module docstring)."""

    img_indptr: np.ndarray  # [V + 1]
    img_latent: np.ndarray  # [M] int32, increasing within an image
    img_score: np.ndarray  # [M] float32
    lat_indptr: np.ndarray  # [S + 1]
    lat_image: np.ndarray  # [M] int32 image positions, best score first within a latent
    lat_score: np.ndarray  # [M] float32
    patch_fires: np.ndarray  # [S] int64 patches where each latent fires


def build_index(
    indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, n_patches: int, d_sae: int
) -> ImageIndex:
    """Max-pool CSR patch codes to images, then sort a copy latent-major, best first."""
    import torch  # lazy: torch (launch stays torch-free)

    n_images = (len(indptr) - 1) // n_patches
    nnz_per_image = np.diff(indptr[::n_patches])
    image_M = torch.repeat_interleave(
        torch.arange(n_images, dtype=torch.int64), torch.from_numpy(nnz_per_image)
    )
    latent_M = torch.from_numpy(np.asarray(indices, dtype=np.int64))
    keys, inverse = torch.unique(image_M * d_sae + latent_M, sorted=True, return_inverse=True)
    score_U = torch.zeros(len(keys)).scatter_reduce_(
        0,
        inverse,
        torch.from_numpy(np.asarray(values, dtype=np.float32)),
        "amax",
        include_self=False,
    )
    img_U, lat_U = keys // d_sae, keys % d_sae
    by_score = torch.argsort(-score_U, stable=True)
    order = by_score[torch.argsort(lat_U[by_score], stable=True)]
    return ImageIndex(
        img_indptr=_indptr(img_U, n_images),
        img_latent=lat_U.to(torch.int32).numpy(),
        img_score=score_U.numpy(),
        lat_indptr=_indptr(lat_U, d_sae),
        lat_image=img_U[order].to(torch.int32).numpy(),
        lat_score=score_U[order].numpy(),
        patch_fires=np.bincount(indices, minlength=d_sae).astype(np.int64),
    )


def _indptr(sorted_ids: Any, n: int) -> np.ndarray:
    counts = np.bincount(sorted_ids.numpy(), minlength=n)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def keep_patches(
    indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, keep_R: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR codes with the rows (patches) where keep_R is False emptied: image scores then
    pool over the kept patches only (the foreground)."""
    row_M = np.repeat(np.arange(len(keep_R)), np.diff(indptr))
    kept_M = keep_R[row_M]
    counts_R = np.bincount(row_M[kept_M], minlength=len(keep_R))
    return np.concatenate([[0], np.cumsum(counts_R)]), indices[kept_M], values[kept_M]


def load_or_build_index(cache: Path, codes: Any, keep_R: np.ndarray | None = None) -> ImageIndex:
    """The index from `cache/index/*.npy` (memory-mapped), built and saved on first use;
    with `keep_R` (bool per patch row), pooled over those patches only (`cache/index-foreground`)."""
    folder = cache / ("index" if keep_R is None else "index-foreground")
    if (folder / "complete").is_file():
        return ImageIndex(**{n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in _INDEX_ARRAYS})
    csr = (codes.indptr, codes.indices, codes.values)
    if keep_R is not None:
        csr = keep_patches(*csr, keep_R)
    index = build_index(*csr, codes.n_patches, codes.d_sae)
    folder.mkdir(parents=True, exist_ok=True)
    for name in _INDEX_ARRAYS:
        np.save(folder / f"{name}.npy", getattr(index, name))
    (folder / "complete").write_text("")
    return index
