"""Stream activation vectors from an HDF5 store into SAE training.

I/O plan (see ENGINEERING.md): the store is cut into *blocks* of whole images aligned with its
HDF5 chunks. A seeded draw, the same in every process, deals the blocks to the (DDP rank x
DataLoader worker) streams, so every vector is read exactly once per epoch by exactly one stream;
each stream visits its share in a new seeded order every epoch. A stream keeps its share across
epochs, so it maps only that part of the store. It reads its blocks whole (sequential I/O), fills a
buffer (>= 100k vectors from many blocks), draws one uniform permutation of it, and gathers it
in pieces of whole batches into a ring of shared-memory slots that the training process mapped
before the workers started: only slot numbers cross the process boundary, and the training
process cuts the slots into batches (views) and tells the worker when a slot may be rewritten.
Vectors stay float16 until the step casts them on its device. Validation holds out whole blocks,
i.e. whole images, never patches of training images. Memory per worker is bounded: a read buffer
(buffer + one block) plus RING_SIZE pieces of ~PIECE_BYTES, whatever the store's size.
"""

from __future__ import annotations

import math
import mmap
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from traitsae.data.store import Store, row_offsets
from traitsae.errors import TraitsaeError
from traitsae.paths import extract_command, store_path

# Aim for at least this many blocks per store so small stores still split across streams and
# leave whole images for validation.
MIN_BLOCKS = 32


@dataclass(frozen=True)
class StreamPlan:
    """Everything a worker needs to read its share; picklable (no open file handles)."""

    path: str
    key: str  # HDF5 dataset, e.g. "patches/11"
    blocks: tuple[tuple[int, int], ...]  # [start, stop) image ranges
    valid: np.ndarray | None  # bool [N] per image, None = all valid
    d_model: int


def _stream_rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def _permutation_generator(seed: int, *key: int) -> torch.Generator:
    """Draws the in-buffer permutations: `torch.randperm` (int32) is 3x faster than numpy's
    `permutation`, which took ~13 % of a loader worker's time next to the gather."""
    return torch.Generator().manual_seed(int(_stream_rng(seed, *key).integers(2**62)))


class ActivationStream(IterableDataset):
    """Batches of float16 vectors [batch_size, D] from whole blocks of a store.

    `epochs=None` streams forever (training runs on `max_steps`, so every rank always has a
    next batch and DDP never waits on a rank that ran dry); the partial buffer carries over
    epoch boundaries, so each epoch still yields every vector exactly once. With a finite
    `epochs` the last batch of a stream may be short.
    """

    def __init__(
        self,
        plan: StreamPlan,
        batch_size: int,
        buffer_vectors: int,
        seed: int,
        shuffle: bool = True,
        epochs: int | None = None,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.batch_size = int(batch_size)
        self.buffer_vectors = max(int(buffer_vectors), self.batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epochs = epochs
        self.start_epoch = 0
        # Set in the main process (Lightning reseeds and forks later): DDP rank and world.
        self.rank = 0
        self.world_size = 1
        # Shared output rings, set by BatchLoader in the main process before workers start.
        self.outputs: SharedOutputs | None = None

    def stream_id(self) -> tuple[int, int]:
        """(this stream's id, number of streams) over DDP ranks x DataLoader workers."""
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * n_workers + worker, self.world_size * n_workers

    def blocks_for(self, epoch: int, stream: int, n_streams: int) -> list[tuple[int, int]]:
        """This stream's blocks in epoch `epoch`, in a seeded order that changes every epoch.

        Each stream keeps the same share of blocks in every epoch (a seeded draw, the same on
        every process): a worker then maps and reads ahead only its own share of the store,
        once, instead of every block over a few epochs (which doubled that work with 2 workers).
        """
        blocks = list(self.plan.blocks)
        if not self.shuffle:
            return blocks[stream::n_streams]
        share = _stream_rng(self.seed).permutation(len(blocks))[stream::n_streams]
        order = _stream_rng(self.seed, epoch, stream, 2).permutation(len(share))
        return [blocks[i] for i in share[order]]

    def piece_rows(self) -> int:
        """Rows of one output piece: whole batches, about PIECE_BYTES (at least one batch)."""
        batch_bytes = self.batch_size * self.plan.d_model * 2
        return self.batch_size * max(1, PIECE_BYTES // batch_bytes)

    def __iter__(self) -> Iterator[torch.Tensor | Piece]:
        """Shuffled pieces of whole batches (the last of a finite stream may be ragged), which
        `BatchLoader` / `iter_batches` cut into batches. With `outputs` set (by `BatchLoader`,
        before the workers start) a worker yields only `Piece` numbers into shared rings, and
        works ahead of the DataLoader's requests; otherwise it yields the pieces as tensors."""
        if self.outputs is not None:
            return _run_ahead(self._pieces())
        return self._pieces()

    def _pieces(self) -> Iterator[torch.Tensor | Piece]:
        import h5py

        stream, n_streams = self.stream_id()
        out = self.outputs if self.outputs is not None else _LocalOutputs(self)
        # Opened here, inside the worker: an HDF5 handle must never cross a fork.
        with h5py.File(self.plan.path, "r", locking=False) as f:
            data = f[self.plan.key]
            per_image = data.shape[1] if data.ndim == 3 else 1
            largest = max((b - a for a, b in self.plan.blocks), default=0) * per_image
            # One buffer per stream, reused: memory stays bounded whatever the store's size.
            buf = _MappedBuffer.open(self.plan, data, self.buffer_vectors + largest)
            if buf is None:
                buf = _ReadBuffer(self.plan, data, self.buffer_vectors + largest)
            epoch = self.start_epoch
            rng = _permutation_generator(self.seed, epoch, stream, 1)
            while self.epochs is None or epoch < self.start_epoch + self.epochs:
                rng = _permutation_generator(self.seed, epoch, stream, 1)
                for start, stop in self.blocks_for(epoch, stream, n_streams):
                    buf.add(start, stop)
                    if buf.n_rows >= self.buffer_vectors:
                        yield from self._shuffle(buf, rng, out)
                # Epoch end: emit what is buffered; only a ragged < batch_size rest carries over.
                if buf.n_rows >= self.batch_size:
                    yield from self._shuffle(buf, rng, out)
                epoch += 1
            if buf.n_rows:
                yield from self._shuffle(buf, rng, out, final=True)

    def _shuffle(
        self,
        buf: _ReadBuffer | _MappedBuffer,
        rng: torch.Generator,
        out: _LocalOutputs | SharedOutputs,
        final: bool = False,
    ) -> Iterator[torch.Tensor | Piece]:
        """Yield the buffer's rows under one uniform permutation, as pieces of whole batches;
        the rows that do not fill a batch stay in the buffer for the next round."""
        n_rows = buf.n_rows
        if self.shuffle:
            order = torch.randperm(n_rows, generator=rng, dtype=torch.int32).numpy()
        else:
            order = np.arange(n_rows, dtype=np.int32)
        n_out = n_rows if final else n_rows // self.batch_size * self.batch_size
        step = self.piece_rows()
        for start in range(0, n_out, step):
            rows = order[start : min(start + step, n_out)]
            piece_ND, item = out.claim(len(rows))
            buf.gather(rows, piece_ND)  # written while this piece (<= PIECE_BYTES) is cache-warm
            yield item
        buf.keep(order[n_out:])  # only after every piece is out: this rewrites the buffer


class _ReadBuffer:
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
        valid = self.plan.valid
        if valid is not None and not valid[start:stop].all():  # drop invalid images
            kept_ND = target[valid[start:stop]].reshape(-1, self.plan.d_model)
            dest_ND[: len(kept_ND)] = kept_ND
            dest_ND = dest_ND[: len(kept_ND)]
        self.n_rows += len(dest_ND)

    def gather(self, rows: np.ndarray, out_ND: torch.Tensor) -> None:
        # np.take with out= and mode="clip" gathers in one pass without a temporary.
        np.take(self.buf_ND, rows, axis=0, out=out_ND.numpy(), mode="clip")

    def keep(self, rows: np.ndarray) -> None:
        self.buf_ND[: len(rows)] = self.buf_ND[rows]
        self.n_rows = len(rows)


class _MappedBuffer:
    """The buffer as positions in a memory map of the store's raw chunks, for unfiltered
    little-endian float16 data: the shuffle gathers vectors straight from the page cache into
    the output, one copy instead of a read copy plus a gather (the read was half the cost).
    `add` maps each block's whole byte range at once (sequential I/O on cold storage, and no
    random page faults, which cost ~20x more here on first touch). The map is file-backed page cache, reclaimed by the kernel like any
    cached read; the stream's own memory is 8 bytes per buffered vector."""

    def __init__(self, plan: StreamPlan, first_N: np.ndarray, per_image: int, capacity: int):
        with open(plan.path, "rb") as fh:  # the map outlives the descriptor
            # Copy-on-write map: writable for torch, yet nothing is ever written or copied.
            self.fmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
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
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        self.always_populate = len(self.fmap) > ram // 2

    @classmethod
    def open(cls, plan: StreamPlan, data: Any, capacity: int) -> _MappedBuffer | None:
        """The mapped buffer, or None when the layout needs HDF5 to decode it."""
        first_N = _locate_images(data)
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
        ids = (self.first_N[images, None] + self.steps_P).ravel()
        self.ids[self.n_rows : self.n_rows + len(ids)] = ids
        self.n_rows += len(ids)
        if self.always_populate or not self.populated_N[start:stop].all():
            lo = int(ids.min()) * 2 // mmap.PAGESIZE * mmap.PAGESIZE
            self._populate(lo, (int(ids.max()) + self.plan.d_model) * 2 - lo)
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
        torch.index_select(self.file_VD, 0, torch.from_numpy(self.ids[rows]), out=out_ND)

    def keep(self, rows: np.ndarray) -> None:
        self.ids[: len(rows)] = self.ids[rows]
        self.n_rows = len(rows)


def _locate_images(data: Any) -> np.ndarray | None:
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

# A shuffled buffer leaves its stream in pieces of about this size (whole batches), so the output
# memory stays small whatever the shuffle buffer's size, and pieces are written cache-warm.
PIECE_BYTES = 16 * 2**20
# DataLoader prefetch per worker, and the pieces each producer cycles through: up to PREFETCH
# queued, one being written, the two the consumer may hold (the piece it cuts batches from, and
# the previous one while the trainer still steps on its last batch), and RUN_AHEAD more. The
# DataLoader delivers pieces in order, worker by worker, so a worker that is momentarily faster
# waits for a free slot; with 3 spare slots the 2-worker loader went from 0.78x to 0.85x of
# sequential reading (median of 7; benchmarks/loader.py), for 16 MiB more per slot.
PREFETCH = 2
RUN_AHEAD = 3
RING_SIZE = PREFETCH + 3 + RUN_AHEAD


class Piece(NamedTuple):
    """What a worker sends instead of a tensor: which slot of which worker's ring to read."""

    worker: int
    index: int  # the worker's running piece count; the slot is index % RING_SIZE
    n_rows: int


class _LocalOutputs:
    """Output ring owned by the producer (in-process use, or a plain DataLoader without
    `BatchLoader`). Reused slots cost no fresh page faults (first-touch of new memory costs
    more than the shuffle). In a worker the slots live in shared memory and travel as storage
    handles with every piece; correctness then rests on the DataLoader queueing at most its
    prefetch_factor (default PREFETCH) pieces per worker."""

    def __init__(self, stream: ActivationStream) -> None:
        self.shape = (stream.piece_rows(), stream.plan.d_model)
        self.shared = get_worker_info() is not None
        self.slots: list[torch.Tensor] = []
        self.count = 0

    def claim(self, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.count % RING_SIZE
        self.count += 1
        if i == len(self.slots):  # allocated on first use: short streams stay small
            self.slots.append(_empty_f16(self.shape, self.shared))
        piece_ND = self.slots[i][:n_rows]
        return piece_ND, piece_ND


class SharedOutputs:
    """Per-worker output rings in shared memory, allocated by the training process before the
    DataLoader starts its workers, which inherit them. A worker writes a piece into its ring and
    sends only a `Piece` (three ints): no storage handle, file descriptor or fresh mapping per
    piece (re-sending shared storages cost more than the shuffle). The consumer acknowledges the
    pieces it is done with in `released`; a worker rewrites a slot only after that."""

    def __init__(self, n_workers: int, piece_rows: int, d_model: int) -> None:
        self.slots_WRPD = _empty_f16((n_workers, RING_SIZE, piece_rows, d_model), shared=True)
        self.released_W = torch.zeros(n_workers, dtype=torch.int64).share_memory_()
        self.count = 0  # pieces claimed; each worker counts in its own copy
        self.owner = os.getpid()

    def claim(self, n_rows: int) -> tuple[torch.Tensor, Piece]:
        """(where to write, what to send) for this worker's next piece."""
        worker = get_worker_info().id
        released = self.released_W.numpy()
        while released[worker] <= self.count - RING_SIZE:  # slot still held by the consumer
            if os.getppid() != self.owner:
                raise RuntimeError("the training process exited; stopping this loader worker")
            time.sleep(2e-4)
        piece = Piece(worker, self.count, n_rows)
        self.count += 1
        return self.view(piece), piece

    def view(self, piece: Piece) -> torch.Tensor:
        return self.slots_WRPD[piece.worker, piece.index % RING_SIZE, : piece.n_rows]

    def release(self, piece: Piece) -> None:
        self.released_W.numpy()[piece.worker] = piece.index + 1

    def release_all(self) -> None:
        """Unblock every worker (the consumer stopped): lets them reach the shutdown signal."""
        self.released_W.fill_(2**62)


def _run_ahead(pieces: Iterator[Piece]) -> Iterator[Piece]:
    """Produce `pieces` in a thread: a worker otherwise idles between the DataLoader's requests
    (a round trip through the training process per piece). The gather releases the GIL, and
    the shared ring's release protocol bounds how far ahead the thread can get."""
    ready: queue.Queue[Any] = queue.Queue(maxsize=RING_SIZE)
    end = object()

    def produce() -> None:
        try:
            for piece in pieces:
                ready.put(piece)
            ready.put(end)
        except BaseException as err:  # re-raised in the worker's main thread
            ready.put(err)

    threading.Thread(target=produce, name="traitsae-shuffle", daemon=True).start()
    while (item := ready.get()) is not end:
        if isinstance(item, BaseException):
            raise item
        yield item


def _empty_f16(shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    if not shared:
        return torch.empty(shape, dtype=torch.float16)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * 2)
    return torch.empty(0, dtype=torch.float16).set_(storage, 0, shape)


def iter_batches(pieces: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Cut shuffled pieces into batches (views, no copy)."""
    for piece_ND in pieces:
        for start in range(0, len(piece_ND), batch_size):
            yield piece_ND[start : start + batch_size]


class BatchLoader:
    """What Lightning iterates: a DataLoader over shuffled pieces, cut into batches.

    A batch stays valid until the batch after next is requested (the trainer's one-batch
    lookahead is covered); clone a batch to keep it longer.
    """

    def __init__(self, loader: DataLoader, batch_size: int) -> None:
        self.loader = loader
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        stream = self.loader.dataset
        if self.loader.num_workers == 0 or not isinstance(stream, ActivationStream):
            return iter_batches(self.loader, self.batch_size)
        return self._shared_batches(stream)

    def _shared_batches(self, stream: ActivationStream) -> Iterator[torch.Tensor]:
        # Fresh rings per pass: workers of an abandoned pass may still be writing the old ones.
        outputs = SharedOutputs(self.loader.num_workers, stream.piece_rows(), stream.plan.d_model)
        stream.outputs = outputs  # the workers fork inside iter() below and inherit the rings
        held: deque[tuple[Piece, int]] = deque()  # pieces not yet released, their last batch
        n_batches = 0
        try:
            for piece in self.loader:
                for batch in iter_batches([outputs.view(piece)], self.batch_size):
                    # Batch n is asked for: the trainer no longer uses batches up to n - 2.
                    while held and held[0][1] <= n_batches - 2:
                        outputs.release(held.popleft()[0])
                    yield batch
                    n_batches += 1
                held.append((piece, n_batches - 1))
        finally:
            outputs.release_all()
            stream.outputs = None


def plan_blocks(
    n_images: int, chunk_images: int, min_blocks: int = MIN_BLOCKS
) -> list[tuple[int, int]]:
    """[start, stop) image ranges: HDF5 chunks, halved until there are at least `min_blocks`."""
    size = max(1, int(chunk_images))
    while size > 1 and math.ceil(n_images / size) < min_blocks:
        size = max(1, size // 2)
    return [(start, min(start + size, n_images)) for start in range(0, n_images, size)]


def split_blocks(
    blocks: list[tuple[int, int]], val_fraction: float, seed: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Hold out whole blocks (so whole images) for validation, chosen by a seeded draw."""
    if val_fraction <= 0 or len(blocks) < 2:
        return blocks, []
    n_val = min(len(blocks) - 1, max(1, round(val_fraction * len(blocks))))
    chosen = set(_stream_rng(seed, 7).choice(len(blocks), size=n_val, replace=False).tolist())
    train = [b for i, b in enumerate(blocks) if i not in chosen]
    val = [b for i, b in enumerate(blocks) if i in chosen]
    return train, val


class ActivationsDataModule(L.LightningDataModule):
    """Train/validation streams of one layer's patch (or CLS) vectors from one store.

    The store is `data.store` when given, else the DESIGN.md path of backbone x dataset x split.
    `batch_size` is per DDP rank. `scale` (set by `prepare()`) makes E||x * scale||^2 = d_model.
    """

    def __init__(
        self,
        activations_dir: str,
        backbone: str,
        dataset: str,
        split: str = "train",
        store: str | None = None,
        layer: int = -1,
        tokens: str = "patches",
        d_model: int | None = None,
        batch_size: int = 4096,
        num_workers: int = 2,
        buffer_vectors: int = 131072,
        val_fraction: float = 0.05,
        val_batch_size: int | None = None,
        scale_sample: int = 16384,
        seed: int = 0,
        allow_incomplete: bool = False,
        block_images: int | None = None,
    ) -> None:
        super().__init__()
        if tokens not in ("patches", "cls"):
            raise TraitsaeError(f"data.tokens must be 'patches' or 'cls', got {tokens!r}.")
        if int(batch_size) < 1:
            raise TraitsaeError(f"data.batch_size must be a positive integer, got {batch_size}.")
        self.activations_dir = activations_dir
        self.backbone, self.dataset, self.split = backbone, dataset, split
        self.store_override = store
        self.layer_requested = int(layer)
        self.tokens = tokens
        self.expected_d_model = d_model
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.buffer_vectors = int(buffer_vectors)
        self.val_fraction = float(val_fraction)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.scale_sample = int(scale_sample)
        self.seed = int(seed)
        self.allow_incomplete = bool(allow_incomplete)
        self.block_images = block_images
        self.prepared = False

    # ---- store discovery -----------------------------------------------------------------
    def resolve_store_path(self) -> tuple[Path, bool]:
        """(path to read, complete?) -- a missing store names the extract.py command."""
        if self.store_override:
            path = Path(self.store_override)
        else:
            path = store_path(self.activations_dir, self.dataset, self.split, self.backbone)
        if path.is_file():
            return path, True
        cmd = extract_command(self.backbone, self.dataset, self.split, self.activations_dir)
        unfinished = path.with_name(path.name + ".tmp")
        if unfinished.is_file():
            if self.allow_incomplete:
                return unfinished, False
            raise TraitsaeError(
                f"activation store {path} is incomplete (extraction stopped; partial file "
                f"{unfinished}). Finish it by re-running:\n  {cmd}\nor pass "
                "data.allow_incomplete=true to train on the images extracted so far."
            )
        hint = "" if self.store_override else f" Make it with:\n  {cmd}"
        raise TraitsaeError(f"activation store {path} does not exist.{hint}")

    def prepare(self) -> None:
        """Open the store once in this process: layer, blocks, validation split, scale."""
        if self.prepared:
            return

        path, complete = self.resolve_store_path()
        with Store(path, require_complete=complete and not self.allow_incomplete) as store:
            self._check_width(store)
            self.layer = store.resolve_layer(self.layer_requested)
            data = store.tokens(self.layer, self.tokens)
            valid_N = np.asarray(store.valid, dtype=bool).copy()
            if not complete and "done" in store.file["images"]:
                valid_N &= store.file["images/done"][()]
            chunk = data.chunks[0] if data.chunks else data.shape[0]
            self.store_info = {"backbone": store.backbone, "dataset": store.dataset}
            self.n_images = store.n_images
            self.d_model = store.d_model
            self.vectors_per_image = 1 if self.tokens == "cls" else store.n_patches
        self.store_path = path
        blocks = plan_blocks(self.n_images, self.block_images or chunk)
        if not complete:  # only the prefix of finished rows
            blocks = [b for b in blocks if valid_N[b[0] : b[1]].any()]
        train, val = split_blocks(blocks, self.val_fraction, self.seed)
        key = f"{self.tokens}/{self.layer}"
        valid = None if valid_N.all() else valid_N
        self.train_plan = StreamPlan(str(path), key, tuple(train), valid, self.d_model)
        self.val_plan = StreamPlan(str(path), key, tuple(val), valid, self.d_model)
        self.n_train_vectors = self._count(train, valid_N)
        self.n_val_vectors = self._count(val, valid_N)
        if self.n_train_vectors == 0:
            raise TraitsaeError(f"store {path} has no valid training vectors ({key}).")
        self.sample = self._sample_vectors()
        bad = int((~np.isfinite(self.sample)).sum())
        if bad:
            raise TraitsaeError(
                f"store {path} ({key}) holds non-finite activations: {bad} inf/NaN values in a "
                f"sample of {len(self.sample)} vectors (float16 overflows beyond 65504). "
                "Re-extract with a backbone/layer whose activations fit float16."
            )
        mean_sq = float(np.mean(np.sum(self.sample.astype(np.float64) ** 2, axis=1)))
        self.scale = math.sqrt(self.d_model / mean_sq) if mean_sq > 0 else 1.0
        self.prepared = True

    def _check_width(self, store: Any) -> None:
        if self.expected_d_model is not None and int(self.expected_d_model) != store.d_model:
            raise TraitsaeError(
                f"store {store.path} holds {store.backbone!r} activations of width "
                f"d_model={store.d_model}, but the SAE is configured for d_model="
                f"{self.expected_d_model} (backbone={self.backbone}). Train with the backbone "
                f"that wrote the store (backbone={store.backbone}) or point data.store at a "
                "store of this backbone."
            )

    def _count(self, blocks: list[tuple[int, int]], valid_N: np.ndarray) -> int:
        return int(sum(valid_N[a:b].sum() for a, b in blocks)) * self.vectors_per_image

    def _sample_vectors(self) -> np.ndarray:
        """Up to `scale_sample` training vectors from seeded random blocks (float16 [n, D])."""
        stream = ActivationStream(self.train_plan, self.scale_sample, self.scale_sample, self.seed)
        stream.epochs = 1
        return next(iter(stream))[: self.scale_sample].numpy().copy()

    # ---- Lightning hooks -----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def train_dataset(self) -> ActivationStream:
        stream = ActivationStream(self.train_plan, self.batch_size, self.buffer_vectors, self.seed)
        stream.rank, stream.world_size = self._rank_world()
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.global_step > 0:
            # Resumed run: continue with the data epoch the checkpoint was in (a fresh shuffle).
            seen = trainer.global_step * self.batch_size * stream.world_size
            stream.start_epoch = seen // self.n_train_vectors
        return stream

    def train_dataloader(self) -> BatchLoader:
        return self._loader(self.train_dataset())

    def val_dataloader(self) -> BatchLoader:
        stream = ActivationStream(
            self.val_plan, self.val_batch_size, self.val_batch_size, self.seed, False, epochs=1
        )
        stream.rank, stream.world_size = self._rank_world()
        return self._loader(stream)

    def _loader(self, stream: ActivationStream) -> BatchLoader:
        # batch_size=None: the stream yields whole shuffled pieces (no per-vector collation).
        workers = self.num_workers
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=PREFETCH if workers else None,
        )
        return BatchLoader(loader, stream.batch_size)

    def describe(self) -> dict[str, Any]:
        """What the SAE export records about its data."""
        return {
            "store": str(self.store_path),
            "layer": self.layer,
            "tokens": self.tokens,
            "d_model": self.d_model,
            "scale": self.scale,
            "n_train_vectors": self.n_train_vectors,
            "n_val_vectors": self.n_val_vectors,
            **self.store_info,
        }
