"""Output rings: how shuffled pieces travel from loader workers to the training process.

A stream writes each piece (whole batches, about PIECE_BYTES) into a slot of a ring. In a
DataLoader worker the rings live in shared memory that the training process allocated before the
workers forked, so only a `Piece` (three ints) crosses the process boundary; the training process
cuts the slot into batches (views, no copy) and tells the worker when the slot may be rewritten.
In-process (0 workers) a stream cycles through its own ring of reused slots.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple, Protocol

import torch
from torch.utils.data import DataLoader, get_worker_info

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


class RingProducer(Protocol):
    """A dataset that can write into `SharedOutputs` (set before the workers start)."""

    outputs: SharedOutputs | None
    batch_size: int

    def piece_rows(self) -> int: ...

    @property
    def d_model(self) -> int: ...


class LocalOutputs:
    """Output ring owned by the producer (in-process use, or a plain DataLoader without
    `BatchLoader`). Reused slots cost no fresh page faults (first-touch of new memory costs
    more than the shuffle). In a worker the slots live in shared memory and travel as storage
    handles with every piece; correctness then rests on the DataLoader queueing at most its
    prefetch_factor (default PREFETCH) pieces per worker."""

    def __init__(self, piece_rows: int, d_model: int) -> None:
        self.shape = (piece_rows, d_model)
        self.shared = get_worker_info() is not None
        self.slots: list[torch.Tensor] = []
        self.count = 0

    def claim(self, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.count % RING_SIZE
        self.count += 1
        if i == len(self.slots):  # allocated on first use: short streams stay small
            self.slots.append(empty_f16(self.shape, self.shared))
        piece_ND = self.slots[i][:n_rows]
        return piece_ND, piece_ND


class SharedOutputs:
    """Per-worker output rings in shared memory, allocated by the training process before the
    DataLoader starts its workers, which inherit them. A worker writes a piece into its ring and
    sends only a `Piece`: no storage handle, file descriptor or fresh mapping per piece
    (re-sending shared storages cost more than the shuffle). The consumer acknowledges the
    pieces it is done with in `released`; a worker rewrites a slot only after that."""

    def __init__(self, n_workers: int, piece_rows: int, d_model: int) -> None:
        self.slots_WRPD = empty_f16((n_workers, RING_SIZE, piece_rows, d_model), shared=True)
        with torch.inference_mode(False):
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


def run_ahead(pieces: Iterator[Piece]) -> Iterator[Piece]:
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


@torch.inference_mode(False)
def empty_f16(shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    """A normal (not inference-mode) tensor even when Lightning builds a loader inside inference
    mode (trainer.validate after fit): the loader writes into it outside that mode."""
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
    lookahead is covered); clone a batch to keep it longer. Pieces arrive in the DataLoader's
    fixed worker order, so the batch sequence is a function of the streams alone.
    """

    def __init__(self, loader: DataLoader, batch_size: int) -> None:
        self.loader = loader
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        stream = self.loader.dataset
        if self.loader.num_workers == 0 or not hasattr(stream, "outputs"):
            return iter_batches(self.loader, self.batch_size)
        return self._shared_batches(stream)

    def _shared_batches(self, stream: RingProducer) -> Iterator[torch.Tensor]:
        # Fresh rings per pass: workers of an abandoned pass may still be writing the old ones.
        outputs = SharedOutputs(self.loader.num_workers, stream.piece_rows(), stream.d_model)
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
