"""Read buffers of a stream: the vectors of a few blocks, gathered in a shuffled order.

`open_buffer` picks the memory-mapped buffer when the store's layout allows it (unfiltered
little-endian float16 in whole-row chunks, what the extraction writer creates), else the h5py
buffer. Both hold the rows of whole blocks in the order added (valid images only, patch by
patch) and gather any selection of them into an output slot.
"""

from __future__ import annotations

import mmap
import os
import sys
import warnings
from typing import Any

import numpy as np
import torch

from traitsae.data.store import row_offsets
from traitsae.data.stream_plan import StreamPlan


def open_buffer(plan: StreamPlan, data: Any, capacity: int) -> ReadBuffer | MappedBuffer:
    """A buffer for up to `capacity` vectors of `data` (an open h5py dataset of `plan`)."""
    return MappedBuffer.open(plan, data, capacity) or ReadBuffer(plan, data, capacity)


class ReadBuffer:
    """Vectors read whole-block with h5py into one reused array (any HDF5 layout or filter)."""

    def __init__(self, plan: StreamPlan, data: Any, capacity: int) -> None:
        self.plan, self.data = plan, data
        self.buf_ND = np.empty((capacity, plan.d_model), np.float16)
        self.capacity, self.n_rows = capacity, 0

    def add(self, start: int, stop: int) -> None:
        """Read images [start, stop) straight into the buffer (whole chunks, no temporary)."""
        per_image = self.data.shape[1] if self.data.ndim == 3 else 1
        dest_ND = self.buf_ND[self.n_rows : self.n_rows + (stop - start) * per_image]
        target = dest_ND.reshape((stop - start, *self.data.shape[1:]))
        self.data.read_direct(target, source_sel=np.s_[start:stop])
        valid, keep = self.plan.valid, self.plan.keep
        if keep is not None:  # only the kept vectors (foreground patches of valid images)
            kept_ND = target[keep[start:stop]]
            dest_ND[: len(kept_ND)] = kept_ND
            dest_ND = dest_ND[: len(kept_ND)]
        elif valid is not None and not valid[start:stop].all():  # drop invalid images
            kept_ND = target[valid[start:stop]].reshape(-1, self.plan.d_model)
            dest_ND[: len(kept_ND)] = kept_ND
            dest_ND = dest_ND[: len(kept_ND)]
        self.n_rows += len(dest_ND)

    def gather(self, rows: np.ndarray, out_ND: torch.Tensor) -> None:
        # np.take with out= and mode="clip" gathers in one pass without a temporary.
        np.take(self.buf_ND, rows, axis=0, out=out_ND.numpy(), mode="clip")

    def clear(self) -> None:
        self.n_rows = 0


class MappedBuffer:
    """The buffer as positions in a memory map of the store's raw chunks, for unfiltered
    little-endian float16 data: the shuffle gathers vectors straight from the page cache into
    the output, one copy instead of a read copy plus a gather (the read was half the cost).
    `add` asks the kernel for each block's whole byte range, and the round's first `gather` maps
    them all (large reads, all blocks of a round in flight at once on cold storage, and no random
    page faults, which cost ~20x more here on first touch). The map is read-only file-backed page
    cache, reclaimed by the kernel like any cached read (stores larger than memory included);
    the stream's own memory is 8 bytes per buffered vector."""

    def __init__(self, plan: StreamPlan, first_N: np.ndarray, per_image: int, capacity: int):
        with open(plan.path, "rb") as fh:  # the map outlives the descriptor
            # Read-only and shared: a private (copy-on-write) map counts against the memory the
            # kernel may commit, so a store larger than RAM could not be mapped at all.
            self.fmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():  # torch warns that the map is read-only: never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            halves = torch.from_numpy(np.frombuffer(self.fmap, np.float16, len(self.fmap) // 2))
        d_model = plan.d_model
        # Row v of this view is the d_model values starting at float16 v of the file, so a
        # vector at any (even) byte offset is one row: chunks need no common alignment.
        self.file_VD = halves.as_strided((len(halves) - d_model + 1, d_model), (1, 1))
        self.plan, self.first_N = plan, first_N  # first_N: where image i starts, in float16s
        self.steps_P = np.arange(per_image) * d_model
        self.ids = np.empty(capacity, np.int64)
        self.capacity, self.n_rows = capacity, 0
        # A mapped block stays mapped unless the kernel evicts it, i.e. unless the store does
        # not fit in memory: then every visit maps (and reads) the block anew.
        self.populated_N = np.zeros(len(first_N), bool)
        self.pending: list[tuple[int, int]] = []  # byte ranges asked for, not yet mapped
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        self.always_populate = len(self.fmap) > ram // 2

    @classmethod
    def open(cls, plan: StreamPlan, data: Any, capacity: int) -> MappedBuffer | None:
        """The mapped buffer, or None when the layout needs HDF5 to decode it."""
        first_N = locate_images(data)
        if first_N is None:
            return None
        return cls(plan, first_N, data.shape[1] if data.ndim == 3 else 1, capacity)

    def add(self, start: int, stop: int) -> None:
        """Take images [start, stop) into the buffer (as positions), their bytes read ahead."""
        images = np.arange(start, stop)
        if self.plan.valid is not None:
            images = images[self.plan.valid[start:stop]]
        if not len(images):
            return
        ids_IP = self.first_N[images, None] + self.steps_P
        ids = ids_IP.ravel() if self.plan.keep is None else ids_IP[self.plan.keep[images]]
        if not len(ids):
            return
        self.ids[self.n_rows : self.n_rows + len(ids)] = ids
        self.n_rows += len(ids)
        if self.always_populate or not self.populated_N[start:stop].all():
            lo = int(ids.min()) * 2 // mmap.PAGESIZE * mmap.PAGESIZE
            length = (int(ids.max()) + self.plan.d_model) * 2 - lo
            # Ask for the block now, map it at the first gather: the kernel reads every block of
            # the round at once (a deep queue), not one block after the other (cold storage:
            # 0.07 vs 0.25 GB/s sequential on this machine's disk).
            self.fmap.madvise(mmap.MADV_WILLNEED, lo, length)
            self.pending.append((lo, length))
            self.populated_N[start:stop] = True

    def _populate(self, start: int, length: int) -> None:
        """Map a block's bytes in one call, reading them (sequentially) if not cached. Left to
        page faults, a random gather faults one page at a time: ~20x slower on first touch."""
        if _POPULATE_READ is not None:
            try:
                self.fmap.madvise(_POPULATE_READ, start, length)
                return
            except OSError:  # kernel < 5.14
                pass
        self.fmap.madvise(mmap.MADV_WILLNEED, start, length)

    def gather(self, rows: np.ndarray, out_ND: torch.Tensor) -> None:
        while self.pending:
            self._populate(*self.pending.pop())
        torch.index_select(self.file_VD, 0, torch.from_numpy(self.ids[rows]), out=out_ND)

    def clear(self) -> None:
        self.n_rows = 0


def locate_images(data: Any) -> np.ndarray | None:
    """Where each image's first vector starts in the file, counted in float16 values; None
    unless the data is little-endian float16 at even byte offsets (see `row_offsets`)."""
    if data.dtype != np.dtype("<f2") or sys.byteorder != "little":
        return None
    offsets_N = row_offsets(data)
    if offsets_N is None or (offsets_N % 2).any():
        return None  # unallocated, filtered or oddly placed: let HDF5 read it
    return offsets_N // 2


# madvise(MADV_POPULATE_READ) (Linux >= 5.14; the mmap module does not name it yet).
_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)
