"""`StreamPlan`: which vectors of a store a stream reads (shared by the stream and its buffers)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StreamPlan:
    """Everything a worker needs to read its share; picklable (no open file handles)."""

    path: str
    key: str  # HDF5 dataset, e.g. "patches/11"
    blocks: tuple[tuple[int, int], ...]  # [start, stop) image ranges
    valid: np.ndarray | None  # bool [N] per image, None = all valid
    d_model: int
    per_image: int  # vectors per image: patches, or 1 for CLS tokens
    # bool [N, per_image]: the only vectors read (data.tokens=foreground), `valid` folded in;
    # None = every vector of the valid images.
    keep: np.ndarray | None = None

    def block_rows(self) -> np.ndarray:
        """Vectors in each block (valid images only; kept vectors only), [n_blocks] int64."""
        if self.keep is not None:
            counts_N = np.concatenate([[0], np.cumsum(self.keep.sum(axis=1))])
            return np.array([counts_N[b] - counts_N[a] for a, b in self.blocks], np.int64)
        if self.valid is None:
            return np.array([(b - a) * self.per_image for a, b in self.blocks], np.int64)
        return np.array([self.valid[a:b].sum() * self.per_image for a, b in self.blocks], np.int64)
