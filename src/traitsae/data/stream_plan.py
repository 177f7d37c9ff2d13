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

    def block_rows(self) -> np.ndarray:
        """Vectors in each block (valid images only), [n_blocks] int64."""
        if self.valid is None:
            return np.array([(b - a) * self.per_image for a, b in self.blocks], np.int64)
        return np.array([self.valid[a:b].sum() * self.per_image for a, b in self.blocks], np.int64)
