"""The activation stream: one layer's vectors of a store, in a seeded shuffled order.

I/O plan (docs/ENGINEERING.md): the store is cut into *blocks* of whole images aligned with its
HDF5 chunks. A seeded draw, the same in every process, deals the blocks to the (DDP rank x
DataLoader worker) streams, so every vector is read exactly once per epoch by exactly one stream;
a stream keeps its share across epochs (it maps only that part of the store) and visits it in a
new seeded order every epoch. Consecutive blocks of that order form *rounds* of at least
`buffer_vectors` vectors; a round is read whole (sequential I/O) and emitted under one uniform
permutation.

The order is a pure function of (seed, stream, epoch, round): a stream's endless sequence of
vectors is the concatenation of its rounds, and batches are consecutive slices of it that may
straddle rounds and epochs. So the vector at any position is known without replaying what came
before, and a resumed run starts at the batch its checkpoint reached: `start_batch` (the rank's
global step) is mapped onto the worker that delivers it and the position in its sequence.
Memory per stream is bounded: a read buffer (buffer + one block) plus the output ring.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import h5py
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from traitsae.data.read_buffers import open_buffer
from traitsae.data.rings import PIECE_BYTES, LocalOutputs, Piece, SharedOutputs, run_ahead
from traitsae.data.stream_plan import StreamPlan

# Aim for at least this many blocks per store so small stores still split across streams and
# leave whole images for validation.
MIN_BLOCKS = 32


def _stream_rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def _round_permutation(seed: int, n_rows: int, *key: int) -> np.ndarray:
    """The shuffled order of a round's n_rows: `torch.randperm` (int32) is 3x faster than
    numpy's `permutation`, which took ~13 % of a loader worker's time next to the gather."""
    generator = torch.Generator().manual_seed(int(_stream_rng(seed, *key).integers(2**62)))
    return torch.randperm(n_rows, generator=generator, dtype=torch.int32).numpy()


class StreamOrder:
    """Which vector sits at each position of one stream's endless sequence (no I/O)."""

    def __init__(
        self,
        plan: StreamPlan,
        stream: int,
        n_streams: int,
        seed: int,
        shuffle: bool,
        round_vectors: int,
    ) -> None:
        self.plan, self.stream, self.n_streams = plan, stream, n_streams
        self.seed, self.shuffle, self.round_vectors = seed, shuffle, round_vectors
        self.rows_B = plan.block_rows()
        self.share = self._share()
        self.epoch_rows = int(self.rows_B[self.share].sum())

    def _share(self) -> np.ndarray:
        """This stream's blocks (indices into plan.blocks): a seeded draw, the same in every
        process, so each block belongs to exactly one stream."""
        n_blocks = len(self.plan.blocks)
        if not self.shuffle:
            return np.arange(n_blocks)[self.stream :: self.n_streams]
        return _stream_rng(self.seed).permutation(n_blocks)[self.stream :: self.n_streams]

    def blocks(self, epoch: int) -> np.ndarray:
        """The share in epoch `epoch`'s order (a new seeded order every epoch)."""
        if not self.shuffle:
            return self.share
        return self.share[
            _stream_rng(self.seed, epoch, self.stream, 2).permutation(len(self.share))
        ]

    def rounds(self, epoch: int) -> list[np.ndarray]:
        """Consecutive blocks of the epoch's order, >= round_vectors vectors each (the last may
        be smaller): what one buffer holds and shuffles at once."""
        rounds, current, n_rows = [], [], 0
        for block in self.blocks(epoch):
            current.append(block)
            n_rows += int(self.rows_B[block])
            if n_rows >= self.round_vectors:
                rounds.append(np.array(current))
                current, n_rows = [], 0
        if current:
            rounds.append(np.array(current))
        return rounds

    def max_round_rows(self) -> int:
        """Rows a buffer must hold: a round stops at the first block that reaches the target."""
        largest = int(self.rows_B.max(initial=0))
        return self.round_vectors + largest

    def permutation(self, epoch: int, index: int, n_rows: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n_rows, dtype=np.int32)
        return _round_permutation(self.seed, n_rows, epoch, self.stream, index)

    def rounds_from(self, position: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(blocks to load, buffer rows to emit in order) for every round from `position` on;
        rounds before it are skipped without reading anything."""
        epoch, offset = divmod(position, self.epoch_rows)
        while True:
            for index, blocks in enumerate(self.rounds(epoch)):
                n_rows = int(self.rows_B[blocks].sum())
                if offset >= n_rows:
                    offset -= n_rows
                    continue
                yield blocks, self.permutation(epoch, index, n_rows)[offset:]
                offset = 0
            epoch += 1


class ActivationStream(IterableDataset):
    """Pieces of whole batches of float16 vectors [rows, D] from whole blocks of a store.

    `epochs=None` streams forever (training runs on `max_steps`, so every rank always has a
    next batch and DDP never waits on a rank that ran dry); batches straddle epoch boundaries,
    so each epoch still yields every vector exactly once. With a finite `epochs` the last piece
    of a stream may be ragged. `rank`/`world_size` are the DDP rank and world, captured in the
    main process (Lightning reseeds and forks later); `start_batch` is the number of batches
    this rank has already trained on (a resumed run).
    """

    def __init__(
        self,
        plan: StreamPlan,
        batch_size: int,
        buffer_vectors: int,
        seed: int,
        *,
        shuffle: bool = True,
        epochs: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.batch_size = int(batch_size)
        self.buffer_vectors = max(int(buffer_vectors), self.batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epochs = epochs
        self.rank, self.world_size = int(rank), int(world_size)
        self.start_batch = int(start_batch)
        self.plan_rows = int(plan.block_rows().sum())
        # Shared output rings, handed over by BatchLoader in the main process before the
        # workers start (the one attribute set after construction: it is runtime state).
        self.outputs: SharedOutputs | None = None

    @property
    def d_model(self) -> int:
        return self.plan.d_model

    def piece_rows(self) -> int:
        """Rows of one output piece: whole batches, about PIECE_BYTES but at most the plan's
        vectors (small stores), and at least one batch."""
        batch_bytes = self.batch_size * self.plan.d_model * 2
        batches = min(PIECE_BYTES // batch_bytes, self.plan_rows // self.batch_size)
        return self.batch_size * max(1, batches)

    def placement(self, worker: int, n_workers: int) -> tuple[int, int, int]:
        """(stream id, number of streams, first position in that stream's sequence) for the
        DataLoader worker `worker` of `n_workers`.

        The DataLoader delivers pieces round-robin over its workers, so the rank's piece q comes
        from stream `q % n_workers` of this rank, as that stream's piece `q // n_workers`. A
        resumed rank starts at piece q0 = start_batch // batches-per-piece: its worker i plays
        stream (q0 + i) % n_workers, and worker 0 starts inside that piece.
        """
        per_piece = self.piece_rows() // self.batch_size
        first_piece, batch_offset = divmod(self.start_batch, per_piece)
        piece = first_piece + worker
        position = piece // n_workers * self.piece_rows()
        if worker == 0:
            position += batch_offset * self.batch_size
        stream = self.rank * n_workers + piece % n_workers
        return stream, self.world_size * n_workers, position

    def order(self, stream: int, n_streams: int) -> StreamOrder:
        return StreamOrder(
            self.plan, stream, n_streams, self.seed, self.shuffle, self.buffer_vectors
        )

    def __iter__(self) -> Iterator[torch.Tensor | Piece]:
        """Shuffled pieces of whole batches, which `BatchLoader` / `iter_batches` cut into
        batches. With `outputs` set (by `BatchLoader`, before the workers start) a worker yields
        only `Piece` numbers into shared rings, and works ahead of the DataLoader's requests;
        otherwise it yields the pieces as tensors."""
        if self.outputs is not None:
            return run_ahead(self._pieces())
        return self._pieces()

    def _pieces(self) -> Iterator[torch.Tensor | Piece]:
        info = get_worker_info()
        stream, n_streams, position = self.placement(
            *((info.id, info.num_workers) if info else (0, 1))
        )
        order = self.order(stream, n_streams)
        if order.epoch_rows == 0:
            raise RuntimeError(f"stream {stream} of {n_streams} has no vectors to read")
        end = math.inf if self.epochs is None else self.epochs * order.epoch_rows
        size = self.piece_rows()
        out = self.outputs if self.outputs is not None else LocalOutputs(size, self.d_model)
        # Opened here, inside the worker: an HDF5 handle must never cross a fork.
        with h5py.File(self.plan.path, "r", locking=False) as f:
            # One buffer per stream, reused: memory stays bounded whatever the store's size.
            buf = open_buffer(self.plan, f[self.plan.key], order.max_round_rows())
            rounds = order.rounds_from(position)
            pending = np.empty(0, np.int32)  # rows of the loaded round still to emit
            while position < end:
                stop = min((position // size + 1) * size, end)  # pieces align to `size`
                piece_ND, item = out.claim(int(stop - position))
                filled = 0
                while filled < len(piece_ND):
                    if not len(pending):
                        blocks, pending = next(rounds)
                        buf.clear()
                        for block in blocks:
                            buf.add(*self.plan.blocks[block])
                    rows = pending[: len(piece_ND) - filled]
                    # Written while this piece (<= PIECE_BYTES) is cache-warm.
                    buf.gather(rows, piece_ND[filled : filled + len(rows)])
                    pending, filled = pending[len(rows) :], filled + len(rows)
                position = stop
                yield item


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


def sample_vectors(plan: StreamPlan, n_vectors: int, seed: int) -> np.ndarray:
    """Up to `n_vectors` vectors from seeded random blocks of `plan` (float16 [n, D], a copy)."""
    stream = ActivationStream(plan, n_vectors, n_vectors, seed, epochs=1)
    return next(iter(stream))[:n_vectors].numpy().copy()
